"""The rule engine: effective bounds with sources, pins, infeasibility, GPU choice, baseline and fit check."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartrun import bounds as bounds_mod
from smartrun import hardware, model, rules, sizing
from smartrun.argv import parse_user_args
from smartrun.contracts import GOALS, Change, Proposal
from smartrun.errors import InfeasibleError, InputError, PinConflictError
from smartrun.fit import fit_check
from smartrun.gpus import select_gpus
from smartrun.hardware import GpuInfo, GpuProcess, HardwareSnapshot
from smartrun.knobs import REDACTED, build_argv
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.validate import check

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def _facts(**kw) -> ModelFacts:
    base = dict(name="Org/Test-7B", path="/models/test-7b", architecture="LlamaForCausalLM", model_type="llama",
                num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                num_kv_heads=8, head_dim=128, vocab_size=32000, derived_max_model_len=32768, torch_dtype="bfloat16")
    return ModelFacts(**{**base, **kw})


def _gpu(i: int, total_gib: float = 80, used_gib: float = 0.5, cc: str = "9.0", name="NVIDIA H100 80GB HBM3",
         procs=()) -> GpuInfo:
    total, used = int(total_gib * 1024), int(used_gib * 1024)
    return GpuInfo(index=i, uuid=f"GPU-{i}", name=name, memory_total_mib=total, memory_free_mib=total - used,
                   memory_used_mib=used, compute_capability=cc, processes=procs)


def _machine(*gpus: GpuInfo, links=()) -> HardwareSnapshot:
    return HardwareSnapshot(source="test", cpu_count=8, ram_mib=65536, gpus=gpus, nvlink_pairs=links)


def _stub(weights_gib: float = 14.0, tokens_per_gib: int = 8192):
    """A stand-in estimator: weights split by tp, 1 GiB overhead, the rest is KV at a fixed token density."""
    calls = []

    def estimate(facts, gpus, flags, version=None):
        calls.append(flags)
        total = min(g.memory_total_mib for g in gpus) / 1024
        util = flags.gpu_memory_utilization or 0.92
        weights = weights_gib / flags.tensor_parallel_size
        kv = util * total - weights - 1.0
        largest = max(0, min(int(kv * tokens_per_gib), facts.derived_max_model_len)) if kv > 0 else 0
        mml = flags.max_model_len or facts.derived_max_model_len
        fits = kv > 0 and mml <= largest
        return MemoryEstimate(
            vllm_version="0.33.0", profile="stub", total_gib=total, requested_gib=round(util * total, 2),
            free_gib=total, weights_gib=round(weights, 2), activation_gib=0.5, non_torch_gib=0.5, cudagraph_gib=0,
            kv_cache_gib=max(kv, 0), kv_cache_tokens=max(0, int(kv * tokens_per_gib)), kv_bytes_per_token=1,
            block_size=16, num_gpu_blocks=1, max_model_len=mml, max_num_seqs=flags.max_num_seqs or 256,
            max_num_batched_tokens=2048, max_concurrency=round(max(kv, 0) * tokens_per_gib / mml, 2), fits=fits,
            reason=None if fits else f"short by {(mml - largest) / tokens_per_gib:.2f} GiB", largest_max_model_len=largest)

    estimate.calls = calls
    return estimate


def _file(tmp_path: Path, text: str) -> bounds_mod.BoundsFile:
    path = tmp_path / "smartrun.toml"
    path.write_text("version = 1\n" + text)
    return bounds_mod.load(path)


def _eff(facts=None, machine=None, file=None, pins=None, goal="stable", force=False, est=None):
    return rules.effective_bounds(facts or _facts(), machine or _machine(_gpu(0)), file, pins or {}, goal,
                                  force=force, estimate_fn=est or _stub())


# --- effective bounds ----------------------------------------------------------------------------


def test_domain_file_hardware_model_and_estimate_each_leave_their_source():
    b = _eff(machine=_machine(_gpu(0), _gpu(1), _gpu(2), links=((0, 1), (0, 2), (1, 2))),
             est=_stub(weights_gib=60, tokens_per_gib=200))
    util = b.knobs["gpu_memory_utilization"]
    assert (util.min, util.max, util.sources) == (0.85, 0.93, ("bounds:builtin:10", "bounds:builtin:11"))
    assert util.recovery_min == 0.82
    assert b.knobs["tensor_parallel_size"].choices == (1, 2)  # 3 GPUs, but 3 does not divide 32 heads
    assert "model" in b.knobs["tensor_parallel_size"].sources
    mml = b.knobs["max_model_len"]
    assert mml.min == 1 and mml.max < 32768 and "estimate" in mml.sources  # the 2048 floor is a preference now
    assert any(n.startswith("estimate: largest max_model_len that fits at tp 2") for n in mml.notes)
    assert b.knobs["optimization_level"].max == 2 and b.knobs["enforce_eager"].choices == (False, True)
    assert b.gpu_count == 3 and b.bounds_file == "builtin"


def test_model_derived_maximum_bounds_the_context():
    b = _eff(facts=_facts(derived_max_model_len=8192))
    assert b.knobs["max_model_len"].max == 8192 and "model" in b.knobs["max_model_len"].sources


def test_kv_heads_rule_for_tensor_parallel():
    # 32 heads, 2 KV heads: tp 4 replicates KV heads (4 % 2 == 0), allowed; 3 GPUs: tp 3 does not divide
    b = _eff(facts=_facts(num_kv_heads=2), machine=_machine(*(_gpu(i) for i in range(4))))
    assert b.knobs["tensor_parallel_size"].choices == (1, 2, 4)
    b = _eff(facts=_facts(num_attention_heads=12, num_kv_heads=12), machine=_machine(*(_gpu(i) for i in range(8))))
    assert b.knobs["tensor_parallel_size"].choices == (1, 2, 3, 4, 6)


def test_no_bfloat16_or_fp8_kv_below_their_compute_capability():
    b = _eff(machine=_machine(_gpu(0, 16, cc="7.5", name="Tesla T4")), est=_stub(weights_gib=4))
    assert b.knobs["dtype"].choices == ("float16",) and "hardware" in b.knobs["dtype"].sources
    assert b.knobs["kv_cache_dtype"].choices == ("auto",)
    plan, _ = sizing.baseline(b, _facts(), _machine(_gpu(0, 16, cc="7.5", name="Tesla T4")),
                             estimate_fn=_stub(weights_gib=4))
    assert plan.params["dtype"] == "float16" and plan.provenance["dtype"].startswith("hardware: compute capability 7.5")


def test_busy_gpu_caps_utilization_with_a_margin(tmp_path):
    busy = _gpu(0, 80, used_gib=20, procs=(GpuProcess(pid=7, used_memory_mib=20480),))
    file = _file(tmp_path, "[knobs.gpu_memory_utilization]\nmin = 0.5\nmax = 0.95\n")
    b = _eff(machine=_machine(busy), file=file)
    util = b.knobs["gpu_memory_utilization"]
    assert util.max == 0.73 and "hardware" in util.sources  # 60/80 free, less the 0.02 margin
    # the built-in 0.85 floor is only advice: on a shared GPU it gives way to what is free, with a warning
    shared = _eff(machine=_machine(busy))
    util = shared.knobs["gpu_memory_utilization"]
    assert (util.min, util.max) == (0.65, 0.73) and util.sources == ("hardware",)
    assert any("gives way to 0.73" in w and "bounds:builtin:10" in w for w in shared.warnings)
    # a person's bounds file is never relaxed: its floor above what is free is an infeasibility naming both
    strict = _file(tmp_path, "[knobs.gpu_memory_utilization]\nmin = 0.85\nmax = 0.93\n")
    with pytest.raises(InfeasibleError) as err:
        _eff(machine=_machine(busy), file=strict)
    assert "hardware requires <= 0.73" in err.value.message and "bounds:" in err.value.message


def test_overrides_replace_and_goals_narrow(tmp_path):
    file = _file(tmp_path, (
        "[knobs.max_model_len]\nmax = 8192\n"
        "[[models]]\nmatch = 'test-*'\nknobs.max_model_len = { max = 16384 }\n"
        "[[gpus]]\nmatch = '*H100*'\nknobs.gpu_memory_utilization = { max = 0.9 }\n"
        "[goals.latency.knobs.max_num_seqs]\nmin = 2\nmax = 4\n"
    ))
    b = _eff(file=file, goal="latency")
    assert b.knobs["max_model_len"].max == 16384
    assert b.knobs["max_model_len"].sources[-1] == f"bounds:{tmp_path / 'smartrun.toml'}:6"
    assert b.knobs["gpu_memory_utilization"].max == 0.9
    assert (b.knobs["max_num_seqs"].min, b.knobs["max_num_seqs"].max) == (2, 4)
    other = _eff(facts=_facts(name="Other/Model", path="/m/other"), file=file, goal="stable")
    assert other.knobs["max_model_len"].max == 8192 and other.knobs["max_num_seqs"].min == 1


def test_empty_intersection_names_both_sources(tmp_path):
    file = _file(tmp_path, "[knobs.dtype]\nfixed = 'bfloat16'\n")
    with pytest.raises(InfeasibleError) as err:
        _eff(machine=_machine(_gpu(0, 16, cc="7.0", name="Tesla V100-SXM2-16GB")), file=file)
    message = err.value.message
    assert "dtype: hardware requires one of" in message and f"{tmp_path / 'smartrun.toml'}:3" in message


def test_pins_inside_bounds_become_single_values_the_llm_cannot_move():
    user = parse_user_args(["--max-model-len", "8k", "--max-num-seqs", "6", "--port", "9000", "--enforce-eager"])
    b = rules.effective_bounds(_facts(), _machine(_gpu(0)), None, user.pins, "stable", pin_flags=user.pin_flags,
                               estimate_fn=_stub())
    mml = b.knobs["max_model_len"]
    assert (mml.min, mml.max, mml.pinned, mml.llm_may_change, mml.sources) == (8000, 8000, True, False, ("pin",))
    assert (b.knobs["port"].min, b.knobs["port"].max) == (9000, 9000) and b.knobs["port"].pinned
    assert b.knobs["enforce_eager"].choices == (True,)
    assert b.to_json()["max_model_len"] == {"min": 8000, "max": 8000, "pinned": True, "llm_may_change": False,
                                            "sources": ["pin"]}
    plan, _ = sizing.baseline(b, _facts(), _machine(_gpu(0)), estimate_fn=_stub())
    assert plan.params["max_model_len"] == 8000 and plan.params["port"] == 9000 and plan.provenance["port"] == "pin"


@pytest.mark.parametrize(
    ("argv", "bound"),
    [
        (["--gpu-memory-utilization", "0.97"], "gpu_memory_utilization 0.85 <= x <= 0.93 (bounds:builtin:10, "
                                               "bounds:builtin:11)"),
        (["--dtype", "float32"], "dtype one of ['bfloat16', 'float16'] (bounds:builtin:21)"),
        (["--cpu-offload-gb", "4"], "cpu_offload_gb 0.0 <= x <= 0 (bounds:builtin:35)"),
    ],
)
def test_a_pin_past_a_builtin_bound_is_kept_with_one_warning_naming_the_bound(argv, bound):
    user = parse_user_args(argv)
    b = rules.effective_bounds(_facts(), _machine(_gpu(0)), None, user.pins, pin_flags=user.pin_flags,
                               estimate_fn=_stub())
    name, value = next(iter(user.pins.items()))
    assert b.knobs[name].pinned and b.knobs[name].contains(value)
    assert b.warnings == (f"pin {' '.join(argv)} passes the built-in bound {bound}; kept because you typed it",)
    plan, _ = sizing.baseline(b, _facts(), _machine(_gpu(0)), estimate_fn=_stub())
    assert plan.params[name] == value and plan.provenance[name] == "pin"


def test_the_guides_ranges_no_longer_cap_a_pin():
    user = parse_user_args(["--max-num-seqs", "512", "-pp", "2", "--max-model-len", "1024"])
    b = rules.effective_bounds(_facts(), _machine(_gpu(0), _gpu(1), links=((0, 1),)), None, user.pins,
                               pin_flags=user.pin_flags, estimate_fn=_stub())
    assert b.warnings == () and all(b.knobs[k].pinned for k in user.pins)


@pytest.mark.parametrize(
    ("argv", "culprit"),
    [
        (["-tp", "2"], "hardware"),
        (["--max-model-len", "65536"], "model"),
        (["--gpu-memory-utilization", "0.97"], "bounds:{file}:3"),
        (["--max-num-seqs", "512"], "bounds:{file}:5"),
    ],
)
def test_a_pin_outside_a_real_limit_or_the_users_file_is_refused_naming_both_unless_forced(tmp_path, argv, culprit):
    file = _file(tmp_path, "[knobs.gpu_memory_utilization]\nmax = 0.93\n[knobs.max_num_seqs]\nmax = 256\n")
    culprit = culprit.format(file=tmp_path / "smartrun.toml")
    user = parse_user_args(argv)
    with pytest.raises(PinConflictError) as err:
        rules.effective_bounds(_facts(), _machine(_gpu(0)), file, user.pins, pin_flags=user.pin_flags,
                               estimate_fn=_stub())
    assert err.value.message.startswith(f"pin {' '.join(argv)} conflicts with {culprit}")
    if culprit == "hardware":
        return
    b = rules.effective_bounds(_facts(), _machine(_gpu(0)), file, user.pins, force=True, pin_flags=user.pin_flags,
                               estimate_fn=_stub())
    name = next(iter(user.pins))
    assert b.knobs[name].pinned and any("--force" in w for w in b.warnings)


def test_a_pinned_context_that_does_not_fit_names_the_estimate():
    with pytest.raises(PinConflictError, match="conflicts with estimate"):
        _eff(pins={"max_model_len": 32768}, est=_stub(weights_gib=60, tokens_per_gib=1000))


def test_auto_context_pin_skips_the_estimate_bound():
    b = _eff(pins={"max_model_len": -1})
    assert b.knobs["max_model_len"].pinned and b.knobs["max_model_len"].min == -1


def test_bad_goal_and_unknown_pin_are_input_errors():
    with pytest.raises(InputError, match="--goal"):
        _eff(goal="fastest")
    with pytest.raises(InputError, match="bogus"):
        _eff(pins={"bogus": 1})


def test_quantization_below_its_compute_capability_is_infeasible():
    awq = _facts(quantization=model.QuantFacts(method="awq", weight_bits=4))
    with pytest.raises(InfeasibleError, match=r"awq-quantized.*>= 7\.5.*7\.0"):
        _eff(facts=awq, machine=_machine(_gpu(0, 16, cc="7.0", name="Tesla V100-SXM2-16GB")))


# --- GPU selection -------------------------------------------------------------------------------


def test_select_gpus_prefers_nvlink_then_free_memory():
    m = _machine(_gpu(0, used_gib=10), _gpu(1, used_gib=5), _gpu(2, used_gib=1), _gpu(3), links=((0, 1),))
    assert [g.index for g in select_gpus(m, 1)] == [3]
    assert [g.index for g in select_gpus(m, 2)] == [0, 1]  # the linked pair over the freer PCIe pair
    assert [g.index for g in select_gpus(_machine(*m.gpus), 2)] == [2, 3]
    with pytest.raises(InfeasibleError, match="5 GPUs needed; the machine has 4"):
        select_gpus(m, 5)


def test_select_gpus_on_a_32_gpu_machine_finishes_and_still_prefers_nvlink_then_free_memory():
    """Trying all 10.5M subsets of 8 out of 32 GPUs hung `model run` for minutes; big machines go greedy."""
    gpus = [_gpu(i, used_gib=0.5 + (i % 5)) for i in range(32)]
    linked = range(8, 16)
    m = _machine(*gpus, links=tuple((a, b) for a in linked for b in linked if a < b))
    assert [g.index for g in select_gpus(m, 8)] == list(linked)
    freest = sorted(range(32), key=lambda i: (i % 5, i))[:8]
    assert [g.index for g in select_gpus(_machine(*gpus), 8)] == sorted(freest)


# --- baseline ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("goal", "expected"),
    [  # 2 NVLinked 80 GB GPUs, a 14 GiB 7B with 32768 native tokens: ~480K KV tokens per GPU
        ("stable", {"max_model_len": 32768, "gpu_memory_utilization": 0.92, "tensor_parallel_size": 1,
                    "data_parallel_size": 2, "max_num_seqs": 232, "max_num_batched_tokens": 2048}),
        ("long-context", {"max_model_len": 32768, "tensor_parallel_size": 1, "data_parallel_size": 2}),
        ("throughput", {"tensor_parallel_size": 1, "data_parallel_size": 2, "max_num_seqs": 232,
                        "dtype": "bfloat16"}),
        ("latency", {"tensor_parallel_size": 2, "max_num_seqs": 64, "max_model_len": 32768}),
    ],
)
def test_baseline_is_sized_from_the_estimate_for_the_goal(goal, expected):
    m = _machine(_gpu(0), _gpu(1), links=((0, 1),))
    b = _eff(machine=m, goal=goal)
    plan, est = sizing.baseline(b, _facts(), m, goal, estimate_fn=_stub())
    assert {k: plan.params.get(k) for k in expected} == expected
    assert plan.source == "static" and est.fits
    assert plan.provenance["max_num_seqs"].startswith("estimate: the cache holds")
    assert plan.provenance["optimization_level"] == f"policy:{goal} template"
    assert all(b.knobs[k].contains(v) for k, v in plan.params.items() if k in b.knobs)
    if goal == "latency":  # TP over both GPUs, no replicas
        assert "data_parallel_size" not in plan.params and "policy:latency keeps batches" in plan.provenance[
            "max_num_seqs"]
    else:
        assert plan.provenance["data_parallel_size"].startswith("placement: 2 replicas of 1 GPU(s)")


def test_no_gpu_is_left_idle_without_a_word():
    three = _machine(_gpu(0), _gpu(1), _gpu(2), links=((0, 1), (0, 2), (1, 2)))
    est = _stub(weights_gib=100)  # needs tp 2; 3 does not divide 32 heads: one GPU stays idle
    plan, _ = sizing.baseline(_eff(machine=three, est=est, goal="throughput"), _facts(), three, "throughput",
                             estimate_fn=est)
    assert plan.params["tensor_parallel_size"] == 2 and plan.params["data_parallel_size"] == 1
    assert "GPU(s) 2 idle" in plan.provenance["data_parallel_size"]


def test_a_bounds_file_limits_the_replicas_and_says_so(tmp_path):
    four = _machine(*(_gpu(i) for i in range(4)), links=tuple((a, b) for a in range(4) for b in range(a + 1, 4)))
    file = _file(tmp_path, "[knobs.data_parallel_size]\nmax = 2\n")
    plan, _ = sizing.baseline(_eff(machine=four, file=file), _facts(), four, estimate_fn=_stub())
    assert plan.params["data_parallel_size"] == 2 and "GPU(s) 2, 3 idle" in plan.provenance["data_parallel_size"]
    assert "(4 would fit the GPUs;" in plan.provenance["data_parallel_size"]


def test_baseline_moves_sized_values_into_the_bounds_and_says_so(tmp_path):
    file = _file(tmp_path, "[knobs.max_num_seqs]\nmin = 16\nmax = 32\n[knobs.gpu_memory_utilization]\nmax = 0.8\n")
    plan, _ = sizing.baseline(_eff(file=file), _facts(), _machine(_gpu(0)), estimate_fn=_stub())
    assert plan.params["max_num_seqs"] == 32 and plan.params["gpu_memory_utilization"] == 0.8
    assert "moved to 32 to lie inside 16 <= x <= 32" in plan.provenance["max_num_seqs"]
    assert "0.92 moved to 0.8" in plan.provenance["gpu_memory_utilization"]


def test_baseline_grows_tp_when_one_gpu_is_too_small_and_disables_custom_all_reduce_without_nvlink():
    m = _machine(_gpu(0), _gpu(1))
    est = _stub(weights_gib=100)
    plan, fitted = sizing.baseline(_eff(machine=m, est=est), _facts(), m, estimate_fn=est)
    assert plan.params["tensor_parallel_size"] == 2 and fitted.fits
    assert plan.provenance["tensor_parallel_size"] == "estimate: the smallest tensor parallel size that holds the model is 2"
    assert plan.params["disable_custom_all_reduce"] is True
    assert plan.provenance["disable_custom_all_reduce"] == "hardware: no NVLink between GPUs 0, 1"
    assert not any("NVLink" in w for w in _eff(machine=m, est=est).warnings)  # the pipeline warns, for tp > 1 only


def test_baseline_lowers_the_context_to_what_fits():
    est = _stub(weights_gib=70, tokens_per_gib=1000)  # 0.92*80 - 71 = 2.6 GiB of KV: ~2600 tokens
    plan, fitted = sizing.baseline(_eff(est=est), _facts(), _machine(_gpu(0)), estimate_fn=est)
    assert plan.params["gpu_memory_utilization"] == 0.92 and 2048 <= plan.params["max_model_len"] < 4096
    assert fitted.fits and plan.params["max_model_len"] <= fitted.largest_max_model_len
    assert "estimate" in plan.provenance["max_model_len"]


def test_nothing_fits_says_what_by_how_much_and_what_would_fit_checked_by_the_estimator():
    with pytest.raises(InfeasibleError) as err:
        _eff(est=_stub(weights_gib=140))
    assert err.value.message == (
        "Org/Test-7B needs 140.0 GiB of weights per GPU at tp 1; the NVIDIA H100 80GB HBM3 offers 74.4 GiB at "
        "utilization 0.93; would fit: 2x NVIDIA H100 80GB HBM3 with --tensor-parallel-size 2")
    with pytest.raises(InfeasibleError) as err:  # nothing the estimator accepts: no suggestion is made up
        _eff(est=_stub(weights_gib=1000))
    assert err.value.message.endswith("; nothing smartrun knows would fit on this machine")


def test_fit_check_feeds_the_validator():
    m = _machine(_gpu(0))
    est = _stub(weights_gib=60, tokens_per_gib=1000)
    b = _eff(est=est, machine=m)
    plan, _ = sizing.baseline(b, _facts(), m, estimate_fn=est)
    fits = fit_check(_facts(), m, estimate_fn=est)
    assert fits(plan.params) is None
    too_long = Proposal(changes=(Change(knob="max_model_len", value=b.knobs["max_model_len"].max),
                                 Change(knob="gpu_memory_utilization", value=0.85)))
    verdict = check(b, plan, too_long, fits)
    assert not verdict.accepted and verdict.rejections[0].source == "estimate"
    assert fits({**plan.params, "tensor_parallel_size": 2}).startswith("tp x pp x dp = 2 GPUs")


def test_format_bounds_lists_every_knob_with_sources():
    lines = rules.format_bounds(_eff())
    assert lines[0] == "goal stable; bounds file builtin"
    assert any(line.startswith("gpu_memory_utilization") and "bounds:builtin:10" in line for line in lines)


# --- every fixture machine x every fixture model x every goal (real estimator) ------------------

MACHINES = sorted(p.stem for p in (FIX / "hardware").glob("*.json"))
MODELS = sorted(p.name for p in (FIX / "models").iterdir() if (p / "config.json").is_file())


@pytest.fixture(scope="module")
def loaded():
    return ({m: hardware.load_snapshot(FIX / "hardware" / f"{m}.json") for m in MACHINES},
            {m: model.inspect(str(FIX / "models" / m)) for m in MODELS})


@pytest.mark.parametrize("machine", MACHINES)
def test_every_fixture_model_and_goal_gets_a_starting_baseline_or_a_clear_error(machine, loaded):
    machines, models = loaded
    assert len(MACHINES) >= 10 and len(MODELS) >= 8
    hw = machines[machine]
    outcomes = []
    for name, facts in models.items():
        for goal in GOALS:
            try:
                b = rules.effective_bounds(facts, hw, None, {}, goal)
                plan, est = sizing.baseline(b, facts, hw, goal)
            except InfeasibleError as err:
                message = err.message
                assert "\n" not in message and any(c.isdigit() for c in message)
                assert facts.name in message or "gpu_memory_utilization" in message or "max_model_len" in message
                outcomes.append("infeasible")
                continue
            assert est.fits and fit_check(facts, hw)(plan.params) is None
            for knob, value in plan.params.items():
                assert b.knobs[knob].contains(value), (machine, name, goal, knob, value)
            assert set(plan.provenance) == set(plan.params)
            assert build_argv(facts.path, plan.params)[:3] == ["vllm", "serve", facts.path]
            outcomes.append("ok")
    if machine != "1x-h100-80gb-20gib-busy":
        assert "ok" in outcomes


def test_72b_on_one_l4_names_the_shortfall(loaded):
    machines, models = loaded
    facts = models["qwen2.5-72b-instruct"]
    with pytest.raises(InfeasibleError) as err:
        rules.effective_bounds(facts, machines["1x-l4"], None, {}, "stable")
    assert err.value.message.startswith(f"{facts.name} needs ") and "GiB of weights per GPU at tp 1; the NVIDIA L4 " \
                                                                 "offers " in err.value.message


def test_a_bounds_file_can_forbid_a_security_flag(tmp_path):
    file = _file(tmp_path, "[knobs.trust_remote_code]\nfixed = false\n[knobs.host]\nchoices = ['127.0.0.1']\n")
    b = _eff(file=file)
    assert b.knobs["trust_remote_code"].choices == (False,) and not b.knobs["trust_remote_code"].llm_may_change
    user = parse_user_args(["--trust-remote-code"])
    with pytest.raises(PinConflictError, match=r"pin --trust-remote-code conflicts with bounds:.*smartrun.toml:3"):
        rules.effective_bounds(_facts(), _machine(_gpu(0)), file, user.pins, pin_flags=user.pin_flags,
                               estimate_fn=_stub())
    with pytest.raises(PinConflictError, match=r"pin --host 0\.0\.0\.0 conflicts"):
        _eff(file=file, pins={"host": "0.0.0.0"})


# Property: for arbitrary bounds files, the baseline is inside the effective bounds, or nothing fits.

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def _random_file(draw):
    lines = []
    lo = draw(st.sampled_from([0.5, 0.7, 0.8, 0.85, 0.9]))
    lines.append(f"[knobs.gpu_memory_utilization]\nmin = {lo}\nmax = {draw(st.sampled_from([lo, 0.9, 0.93, 0.97]))}\n")
    seq_lo = draw(st.integers(1, 32))
    lines.append(f"[knobs.max_num_seqs]\nmin = {seq_lo}\nmax = {seq_lo + draw(st.integers(0, 64))}\n")
    mml_lo = draw(st.sampled_from([512, 2048, 4096, 16384]))
    lines.append(f"[knobs.max_model_len]\nmin = {mml_lo}\nmax = {mml_lo * draw(st.sampled_from([1, 2, 8]))}\n")
    dtypes = draw(st.lists(st.sampled_from(["bfloat16", "float16", "float32"]), min_size=1, unique=True))
    lines.append(f"[knobs.dtype]\nchoices = {dtypes!r}\n")
    lines.append(f"[knobs.optimization_level]\nfixed = {draw(st.integers(0, 3))}\n")
    lines.append(f"[knobs.enforce_eager]\nchoices = {draw(st.sampled_from(['[true]', '[false]', '[false, true]']))}\n")
    return "".join(lines)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_random_file(), goal=st.sampled_from(GOALS), gpus=st.integers(1, 4),
       weights=st.sampled_from([2.0, 14.0, 60.0, 150.0]))
def test_baseline_is_inside_arbitrary_bounds_or_infeasible(tmp_path, text, goal, gpus, weights):
    file = _file(tmp_path, text)
    m = _machine(*(_gpu(i) for i in range(gpus)), links=tuple((a, b) for a in range(gpus) for b in range(a + 1, gpus)))
    est = _stub(weights_gib=weights, tokens_per_gib=2000)
    try:
        b = _eff(machine=m, file=file, goal=goal, est=est)
        plan, fitted = sizing.baseline(b, _facts(), m, goal, estimate_fn=est)
    except InfeasibleError as err:
        assert err.message and "\n" not in err.message
        return
    assert fitted.fits
    for knob, value in plan.params.items():
        assert b.knobs[knob].contains(value), (knob, value, b.knobs[knob])


def test_real_fixtures_prefer_more_gpus_to_a_riskier_utilization_and_float16_for_awq(loaded):
    machines, models = loaded
    h100x4 = machines["4x-h100-80gb-nvlink"]
    big = models["qwen2.5-72b-instruct"]
    plan, est = sizing.baseline(rules.effective_bounds(big, h100x4, None, {}, "stable"), big, h100x4, "stable")
    assert (plan.params["tensor_parallel_size"], plan.params["gpu_memory_utilization"]) == (4, 0.92) and est.fits
    awq = models["qwen2.5-72b-instruct-awq"]
    plan, _ = sizing.baseline(rules.effective_bounds(awq, h100x4, None, {}, "stable"), awq, h100x4, "stable")
    assert plan.params["dtype"] == "float16" and plan.provenance["dtype"].startswith("model: awq")


def test_a_pinned_api_key_never_shows_in_bounds_notes_or_json():
    user = parse_user_args(["--api-key", "sk-secret-123"])
    b = rules.effective_bounds(_facts(), _machine(_gpu(0)), None, user.pins, pin_flags=user.pin_flags,
                               estimate_fn=_stub())
    shown = repr(b.to_json()) + "\n".join(rules.format_bounds(b)) + repr(b.knobs["api_key"].notes)
    assert "sk-secret-123" not in shown and REDACTED in shown
    plan, _ = sizing.baseline(b, _facts(), _machine(_gpu(0)), estimate_fn=_stub())
    assert plan.params["api_key"] == ("sk-secret-123",)  # launch still needs it
