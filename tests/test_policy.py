"""The planning policy (preferences as data) and what the plan does with the estimate on real fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from smartrun import hardware, memory, model, no_fit, policy, rules, sizing
from smartrun.argv import parse_user_args
from smartrun.contracts import GOALS
from smartrun.errors import InfeasibleError, InputError
from smartrun.fit import PlanFit

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def _load(machine: str, name: str):
    return hardware.load_snapshot(FIX / "hardware" / f"{machine}.json"), model.inspect(str(FIX / "models" / name))


def _plan(machine: str, name: str, goal: str = "stable", pins: list[str] | None = None, file=None):
    hw, facts = _load(machine, name)
    user = parse_user_args(pins or [])
    b = rules.effective_bounds(facts, hw, file, user.pins, goal, pin_flags=user.pin_flags)
    return sizing.baseline(b, facts, hw, goal)


def test_the_shipped_policy_covers_every_goal_and_names_only_catalogue_knobs():
    p = policy.load()
    assert set(p.goals) == set(GOALS)
    assert p.tune.ladder[0] == "max_num_seqs" and "data_parallel_size" in p.tune.ladder
    assert p.sizing.utilization == 0.92  # vLLM 0.33's own default


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("version = 1\n[sizing]\n", "policy.toml: sizing.utilization: Field required"),
        ("version = [", "policy.toml: "),
    ],
)
def test_a_broken_policy_is_one_line_naming_the_field(text, problem):
    with pytest.raises(InputError) as err:
        policy.parse(text)
    assert err.value.message.startswith(problem) and "\n" not in err.value.message


def test_one_h100_with_an_8b_serves_the_native_context_and_a_kv_sized_batch():
    plan, est = _plan("1x-h100-80gb", "llama-3.1-8b-instruct")
    p = plan.params
    assert p["max_model_len"] == 131072 and p["gpu_memory_utilization"] == 0.92
    # ~1M tokens of cache: hundreds of sequences (not the guide's 4), never more than it holds at 2048 tokens each
    assert 128 <= p["max_num_seqs"] <= memory.plan_safe_kv_tokens(est) // 2048 and est.fits
    assert p["max_num_seqs"] <= est.max_num_seqs or p["max_num_seqs"] <= 1024
    assert "native context" in plan.provenance["max_model_len"]


def test_four_h100s_run_replicas_for_throughput_and_tensor_parallelism_for_latency():
    plan, _ = _plan("4x-h100-80gb-nvlink", "llama-3.1-8b-instruct", "throughput")
    assert (plan.params["tensor_parallel_size"], plan.params["data_parallel_size"]) == (1, 4)
    plan, _ = _plan("4x-h100-80gb-nvlink", "llama-3.1-8b-instruct", "latency")
    assert plan.params["tensor_parallel_size"] == 4 and "data_parallel_size" not in plan.params


def test_a_model_too_long_for_one_card_trades_context_for_concurrency_and_says_so():
    plan, est = _plan("1x-l4", "llama-3.1-8b-instruct", "throughput")
    assert plan.params["max_model_len"] < 131072 and est.max_concurrency >= 2
    assert "trades context for concurrency" in plan.provenance["max_model_len"]
    plan, _ = _plan("1x-l4", "llama-3.1-8b-instruct", "long-context")
    assert plan.params["max_model_len"] > 20000  # the longest one request fits


def test_gemma_never_gets_float16_it_gets_float32_with_the_reason_or_a_refusal():
    hw, facts = _load("1x-t4", "gemma-2-9b-it")
    with pytest.raises(InfeasibleError) as err:  # 9B in float32 is 34 GiB: the T4 refuses, and says why
        rules.effective_bounds(facts, hw, None, {}, "stable")
    assert "float32: vLLM refuses float16 for gemma2" in err.value.message
    facts = model.inspect(str(FIX / "models" / "gemma-2-9b-it"))
    small = facts.model_copy(update={"num_hidden_layers": 2, "weight_bytes": None})  # a small gemma2 fits in fp32
    plan, _ = sizing.baseline(rules.effective_bounds(small, hw, None, {}, "stable"), small, hw, "stable")
    assert plan.params["dtype"] == "float32" and "vLLM refuses float16 for gemma2" in plan.provenance["dtype"]


def test_a_user_bounds_file_that_allows_only_float16_refuses_gemma_with_the_reason(tmp_path):
    from smartrun import bounds

    path = tmp_path / "smartrun.toml"
    path.write_text("version = 1\n[knobs.dtype]\nchoices = ['float16']\n")
    hw, facts = _load("1x-h100-80gb", "gemma-2-9b-it")
    with pytest.raises(InfeasibleError, match="vLLM refuses float16 for gemma2"):
        rules.effective_bounds(facts, hw, bounds.load(path), {}, "stable")


def test_online_fp8_of_a_safetensors_dir_counts_fp8_weights():
    hw, facts = _load("1x-h100-80gb", "mixtral-8x7b-v0.1")
    specs = [memory.GpuSpec.from_gpu(g) for g in hw.gpus]
    full = memory.estimate(facts, specs, memory.EngineFlags())
    fp8 = memory.estimate(facts, specs, memory.EngineFlags(quantization="fp8"))
    assert full.weights_gib > 80 and 40 < fp8.weights_gib < 0.55 * full.weights_gib and fp8.fits


def test_cpu_offload_moves_weights_out_of_the_gpu_budget():
    hw, facts = _load("1x-h100-80gb", "mixtral-8x7b-v0.1")
    specs = [memory.GpuSpec.from_gpu(g) for g in hw.gpus]
    off = memory.estimate(facts, specs, memory.EngineFlags(cpu_offload_gb=20, max_model_len=8192))
    assert off.fits and off.weights_gib == pytest.approx(memory.estimate(facts, specs, memory.EngineFlags())
                                                        .weights_gib - 20, abs=0.01)


def test_no_fit_suggestions_are_each_checked_by_the_estimator_and_none_is_applied():
    hw, facts = _load("1x-h100-80gb", "mixtral-8x7b-v0.1")
    with pytest.raises(InfeasibleError) as err:
        rules.effective_bounds(facts, hw, None, {}, "stable")
    message = err.value.message
    assert "; would fit: 2x NVIDIA H100 80GB HBM3 with --tensor-parallel-size 2; --quantization fp8" in message
    from smartrun.contracts import Bounds

    b = Bounds(knobs={}, goal="stable", gpu_count=1)
    ctx = PlanFit(b, facts, hw, "stable", None, memory.estimate, policy.load())
    found = no_fit.suggestions(ctx, {"tensor_parallel_size": 1, "dtype": "bfloat16"})
    assert [text.split()[0] for text, _ in found][:3] == ["2x", "--quantization", "--cpu-offload-gb"]
    assert all(ctx.estimate(params).fits for text, params in found if not text.startswith("2x"))
    # a pinned suggestion is what starts it
    plan, est = _plan("1x-h100-80gb", "mixtral-8x7b-v0.1", pins=["--quantization", "fp8"])
    assert est.fits and plan.params["quantization"] == "fp8"


def test_throughput_grows_replicas_before_adding_starved_ones_and_says_why():
    plan, _ = _plan("4x-h100-80gb-nvlink", "qwen2.5-72b-instruct-awq", "throughput")
    assert (plan.params["tensor_parallel_size"], plan.params["data_parallel_size"]) == (2, 2)
    assert "larger replicas first" in plan.provenance["tensor_parallel_size"]


def test_a_starved_throughput_replica_takes_the_bands_top_utilization_and_says_so():
    plan, est = _plan("1x-l4", "llama-3.1-8b-instruct", "throughput")
    assert plan.params["gpu_memory_utilization"] == 0.93 and est.fits
    assert plan.provenance["gpu_memory_utilization"].startswith("estimate: the band's top 0.93")
    stable, _ = _plan("1x-l4", "llama-3.1-8b-instruct", "stable")  # the default goal keeps vLLM's 0.92
    assert stable.params["gpu_memory_utilization"] == 0.92


def test_a_plan_that_fits_only_at_the_point_estimate_is_tried_and_says_so():
    hw, facts = _load("2x-a100-80gb-nvlink", "qwen2.5-72b-instruct")  # plain vLLM at its defaults would not start
    b = rules.effective_bounds(facts, hw, None, {}, "stable")
    plan, est = sizing.baseline(b, facts, hw, "stable")
    assert est.fits and not memory.plan_safe_fits(est)
    assert "fits only at the estimate's point value" in plan.reason
    assert any("only at the estimate's point value" in w for w in b.warnings)
