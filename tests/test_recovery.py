"""recovery: the guide's ladders as rules, inside the bounds, never relaxing a pin."""

from __future__ import annotations

from smartrun.contracts import Bounds, KnobBound, Plan, Proposal
from smartrun.recovery import Stop, candidates, next_step
from smartrun.vllm_log import Failure

PLAN = Plan(params={"max_model_len": 32768, "gpu_memory_utilization": 0.92, "max_num_seqs": 64,
                    "tensor_parallel_size": 1, "enforce_eager": False})


def bounds(**extra: KnobBound) -> Bounds:
    knobs = {
        "max_model_len": KnobBound(knob="max_model_len", min=4096, max=131072, sources=("bounds:b.toml:3",)),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.95, recovery_min=0.82),
        "max_num_seqs": KnobBound(knob="max_num_seqs", min=8, max=256),
        "tensor_parallel_size": KnobBound(knob="tensor_parallel_size", choices=(1, 2)),
        "enforce_eager": KnobBound(knob="enforce_eager", choices=(False, True)),
        "optimization_level": KnobBound(knob="optimization_level", min=0, max=3),
        "disable_custom_all_reduce": KnobBound(knob="disable_custom_all_reduce", choices=(False, True)),
        "dtype": KnobBound(knob="dtype", choices=("bfloat16", "float16")),
    }
    return Bounds(knobs={**knobs, **extra})


def pin(knob: str, value) -> KnobBound:
    return KnobBound(knob=knob, min=value, max=value, pinned=True, llm_may_change=False, sources=("pin",))


def change(step) -> tuple[str, object]:
    assert isinstance(step, Proposal), step
    (c,) = step.changes
    return c.knob, c.value


def test_kv_too_small_uses_vllms_estimate_inside_the_bounds():
    failure = Failure(klass="kv_cache_too_small", evidence="...", estimated_max_model_len=20000)
    step = next_step(failure, PLAN, bounds())
    assert change(step) == ("max_model_len", 20000)
    assert step.source == "recovery" and "vLLM estimates at most 20000" in step.reason


def test_kv_too_small_with_a_pin_raises_util_then_stops_naming_the_pin():
    b = bounds(max_model_len=pin("max_model_len", 32768))
    failure = Failure(klass="kv_cache_too_small", evidence="...", estimated_max_model_len=20000)
    assert change(next_step(failure, PLAN, b)) == ("gpu_memory_utilization", 0.95)
    b = bounds(max_model_len=pin("max_model_len", 32768), gpu_memory_utilization=pin("gpu_memory_utilization", 0.92))
    stop = next_step(failure, PLAN, b)
    assert isinstance(stop, Stop) and stop.pin == "max_model_len"
    assert stop.message() == ("pinned --max-model-len 32768 does not fit: vLLM estimates at most 20000; "
                              "unpin it or set it to <= 20000")


def test_estimate_below_the_bounds_minimum_is_not_used():
    failure = Failure(klass="kv_cache_too_small", evidence="...", estimated_max_model_len=2000)
    props, stop = candidates(failure, PLAN, bounds(gpu_memory_utilization=pin("gpu_memory_utilization", 0.92)))
    assert [change(p) for p in props] == [("max_model_len", 16384)]  # halving toward the min instead
    assert "below the bound's minimum max_model_len 4096 (bounds:b.toml:3)" in stop.reason


def test_oom_ladder_order_profiling_vs_after_kv_allocation():
    oom = Failure(klass="oom_profiling", evidence="CUDA out of memory")
    props, _ = candidates(oom, PLAN, bounds())
    assert [change(p) for p in props] == [("max_model_len", 16384), ("gpu_memory_utilization", 0.88),
                                          ("max_num_seqs", 32)]
    assert "OOM rung 1" in props[0].reason
    graph = Failure(klass="oom_cuda_graph", evidence="CUDA out of memory")
    props, _ = candidates(graph, PLAN, bounds())
    assert [change(p) for p in props] == [("gpu_memory_utilization", 0.88), ("max_num_seqs", 32),
                                          ("enforce_eager", True)]


def test_util_goes_below_the_bound_min_only_to_the_recovery_floor():
    oom = Failure(klass="oom_cuda_graph", evidence="x")
    low = PLAN.with_changes({"gpu_memory_utilization": 0.85}, "recovery", {})
    assert change(next_step(oom, low, bounds())) == ("gpu_memory_utilization", 0.82)
    floor = PLAN.with_changes({"gpu_memory_utilization": 0.82}, "recovery", {})
    assert change(next_step(oom, floor, bounds())) == ("max_num_seqs", 32)


def test_already_tried_params_are_skipped():
    class Tried:
        params = {**PLAN.params, "gpu_memory_utilization": 0.88}

    oom = Failure(klass="oom_cuda_graph", evidence="x")
    assert change(next_step(oom, PLAN, bounds(), [Tried()])) == ("max_num_seqs", 32)


def test_no_cache_blocks_and_weights_oom_want_more_tp():
    for klass in ("no_kv_cache_memory", "oom_loading"):
        assert change(next_step(Failure(klass=klass, evidence="x"), PLAN, bounds())) == ("tensor_parallel_size", 2)
    b = bounds(tensor_parallel_size=pin("tensor_parallel_size", 1))
    assert change(next_step(Failure(klass="no_kv_cache_memory", evidence="x"), PLAN, b)) == (
        "gpu_memory_utilization", 0.95)
    assert isinstance(next_step(Failure(klass="oom_loading", evidence="x"), PLAN, b), Stop)


def test_free_memory_graph_nccl_dtype_rungs():
    free = Failure(klass="insufficient_free_memory", evidence="x", details={"free_gib": 70.7, "total_gib": 79.18})
    assert change(next_step(free, PLAN, bounds())) == ("gpu_memory_utilization", 0.88)
    tight = Failure(klass="insufficient_free_memory", evidence="x", details={"free_gib": 40.0, "total_gib": 79.18})
    stop = next_step(tight, PLAN, bounds())
    assert isinstance(stop, Stop) and "allow --gpu-memory-utilization <= 0.49" in stop.message()
    assert change(next_step(Failure(klass="compile_error", evidence="x"), PLAN, bounds())) == ("enforce_eager", True)
    no_eager = bounds(enforce_eager=pin("enforce_eager", False))
    assert change(next_step(Failure(klass="compile_error", evidence="x"), PLAN, no_eager)) == ("optimization_level", 0)
    assert change(next_step(Failure(klass="nccl_error", evidence="x"), PLAN, bounds())) == (
        "disable_custom_all_reduce", True)
    assert change(next_step(Failure(klass="dtype_unsupported", evidence="x"), PLAN, bounds())) == ("dtype", "float16")


def test_not_tunable_failures_stop_with_advice():
    for klass, words in [("port_in_use", "pick another --port"), ("model_not_found", "check the path"),
                         ("bad_argument", "vllm serve --help"), ("startup_timeout", "--startup-timeout")]:
        stop = next_step(Failure(klass=klass, evidence="the line"), PLAN, bounds())
        assert isinstance(stop, Stop) and words in stop.message() and "the line" in stop.message()


def test_more_tp_on_a_machine_full_of_replicas_makes_fewer_larger_replicas():
    plan = PLAN.with_changes({"data_parallel_size": 2}, "static", {})
    b = bounds(data_parallel_size=KnobBound(knob="data_parallel_size", min=1, max=2)).model_copy(
        update={"gpu_count": 2})
    step = next_step(Failure(klass="oom_loading", evidence="x"), plan, b)
    assert isinstance(step, Proposal)
    assert [(c.knob, c.value) for c in step.changes] == [("tensor_parallel_size", 2), ("data_parallel_size", 1)]
    pinned = b.model_copy(update={"knobs": {**b.knobs, "data_parallel_size": pin("data_parallel_size", 2)}})
    assert not isinstance(next_step(Failure(klass="oom_loading", evidence="x"), plan, pinned), Proposal)
