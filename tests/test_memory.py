"""The memory estimator: each budget term by hand from vLLM's formulas, properties, reference startups."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smartrun.cli import main as cli_main
from smartrun.errors import EstimateError
from smartrun.memory import (
    FITTED,
    GIB,
    MIB,
    EngineFlags,
    GpuSpec,
    estimate,
    evidence,
    fit,
    kv_bytes_per_token_layer,
    kv_groups,
    largest_fitting_model_len,
    layer_kinds,
    pp_layer_ranges,
    resolve_version,
    weights_per_rank,
)
from smartrun.memory import activation_bytes as activation
from smartrun.model import facts_from_config

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"

CONFIGS = evidence.reference_configs()
H100 = GpuSpec.from_name("H100")


def facts(model_id: str):
    return facts_from_config(CONFIGS[model_id.lower()], model_id)


LLAMA8 = facts("meta-llama/Llama-3.1-8B-Instruct")
QWEN7 = facts("Qwen/Qwen2.5-7B-Instruct")
QWEN3_8B = facts("Qwen/Qwen3-8B")
DSV2 = facts("deepseek-ai/DeepSeek-V2-Lite-Chat")
GEMMA3 = facts("google/gemma-3-12b-it")
AT_095 = EngineFlags(gpu_memory_utilization=0.95, max_model_len=8192)


# ---- budget terms, worked by hand -------------------------------------------------------------


def test_cuda_total_is_nvml_total_minus_driver_reservation():
    # H100 80GB: NVML 81559 MiB, vLLM prints total_memory=79.19GiB
    assert round(H100.cuda_total_bytes / GIB, 2) == 79.19
    est = estimate(LLAMA8, [H100], AT_095, "0.19.0")
    assert est.total_gib == 79.19
    assert est.requested_gib == round(math.ceil(H100.cuda_total_bytes * 0.95) / GIB, 2) == 75.23


def test_kv_bytes_per_token_gqa_mla_fp8_and_replication():
    assert kv_bytes_per_token_layer(LLAMA8, 2, 1) * 32 == 2 * 8 * 128 * 2 * 32 == 131072
    assert kv_bytes_per_token_layer(LLAMA8, 2, 2) * 32 == 65536
    assert (
        kv_bytes_per_token_layer(LLAMA8, 2, 16) == 2 * 1 * 128 * 2
    )  # 8 KV heads on 16 ranks: one replicated
    assert kv_bytes_per_token_layer(LLAMA8, 1, 1) == 2 * 8 * 128  # fp8 halves
    assert kv_bytes_per_token_layer(DSV2, 2, 1) == (512 + 64) * 2 == kv_bytes_per_token_layer(DSV2, 2, 4)
    assert estimate(LLAMA8, [H100], AT_095, "0.19.0").kv_bytes_per_token == 131072


def test_weights_counted_from_the_architecture_match_published_parameter_counts():
    rope = 131072 * 128 * 2  # vLLM's cos/sin cache: max_position x rotary_dim in bf16
    assert weights_per_rank(LLAMA8, "bfloat16", 1, 1)[0].bytes == 2 * 8030261248 + rope
    assert weights_per_rank(QWEN7, "bfloat16", 1, 1)[0].bytes == 2 * 7615616512 + 32768 * 128 * 2
    assert weights_per_rank(DSV2, "bfloat16", 1, 1)[0].bytes == pytest.approx(2 * 15706484224, rel=0.002)


def test_weights_split_by_tp_and_pp_with_vocab_sharded_and_norms_replicated():
    whole = weights_per_rank(LLAMA8, "bfloat16", 1, 1)[0].bytes
    tp2 = weights_per_rank(LLAMA8, "bfloat16", 2, 1)[0].bytes
    rope = 131072 * 128 * 2
    norms = (32 * 2 + 1) * 4096 * 2
    assert tp2 - rope == (whole - rope - norms) // 2 + norms
    first, last = weights_per_rank(LLAMA8, "bfloat16", 1, 2)
    embed = 128256 * 4096 * 2
    assert (
        first.bytes - rope
        == 16 * (4096 * (4096 + 2 * 1024) + 4096 * 4096 + 3 * 4096 * 14336) * 2 + 16 * 2 * 4096 * 2 + embed
    )
    assert last.bytes == first.bytes + 4096 * 2  # + final norm; lm_head the size of the embedding


def test_pp_layer_ranges_follow_vllm():
    assert [len(r) for r in pp_layer_ranges(32, 3)] == [11, 11, 10]
    assert [len(r) for r in pp_layer_ranges(32, 4)] == [8, 8, 8, 8]


def test_quantized_layouts():
    w8a8 = facts("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w8a8")
    w4 = facts("RedHatAI/Meta-Llama-3.1-8B-Instruct-quantized.w4a16")
    bf16 = weights_per_rank(LLAMA8, "bfloat16", 1, 1)[0].bytes
    embeds = 2 * 128256 * 4096 * 2
    linear = bf16 - embeds  # roughly: norms and rope are tiny
    assert weights_per_rank(w8a8, "bfloat16", 1, 1)[0].bytes == pytest.approx(embeds + linear / 2, rel=0.01)
    int4 = weights_per_rank(w4, "float16", 1, 1)[0].bytes
    # 4 bits + (fp16 scale + 4-bit zero) per 128 weights = 4.16 bits per weight
    assert int4 == pytest.approx(embeds + linear / 2 * 4.125 / 8, rel=0.01)


def test_activation_grows_with_batched_tokens_and_vocab():
    small = estimate(LLAMA8, [H100], AT_095.model_copy(update={"max_num_batched_tokens": 2048}), "0.19.0")
    big = estimate(LLAMA8, [H100], AT_095.model_copy(update={"max_num_batched_tokens": 16384}), "0.19.0")
    assert small.activation_gib < big.activation_gib
    assert small.kv_cache_tokens > big.kv_cache_tokens


def test_non_torch_jumps_at_tp2_and_cudagraph_is_zero_when_eager():
    one = estimate(LLAMA8, [H100] * 2, AT_095, "0.19.0")
    two = estimate(LLAMA8, [H100] * 2, AT_095.model_copy(update={"tensor_parallel_size": 2}), "0.19.0")
    assert one.non_torch_gib == round(FITTED.non_torch_single, 2) and 2.0 < two.non_torch_gib < 2.3
    eager = estimate(LLAMA8, [H100], AT_095.model_copy(update={"enforce_eager": True}), "0.33.0")
    graphs = estimate(LLAMA8, [H100], AT_095, "0.33.0")
    assert eager.cudagraph_gib == 0 < graphs.cudagraph_gib
    assert eager.kv_cache_gib == pytest.approx(graphs.kv_cache_gib + graphs.cudagraph_gib, abs=0.011)
    # 0.19 does not take the graph estimate from the KV budget
    assert estimate(
        LLAMA8, [H100], AT_095.model_copy(update={"enforce_eager": True}), "0.19.0"
    ).kv_cache_tokens == (estimate(LLAMA8, [H100], AT_095, "0.19.0").kv_cache_tokens)


def test_hybrid_groups_for_gemma3():
    kinds = layer_kinds(GEMMA3)
    assert kinds.count(("full", None)) == 8 and len(kinds) == 48
    groups = kv_groups(kinds)
    assert len(groups) == 6 and {g.layers for g in groups} == {8}


def test_version_profiles_and_defaults():
    assert resolve_version("0.19.0")[1].name == "0.19"
    assert resolve_version("0.33.0")[1].name == "0.33"
    old = estimate(LLAMA8, [H100], EngineFlags(max_model_len=8192), "0.19.0")
    new = estimate(LLAMA8, [H100], EngineFlags(max_model_len=8192), "0.33.0")
    assert old.requested_gib == round(math.ceil(H100.cuda_total_bytes * 0.90) / GIB, 2)
    assert new.requested_gib == round(math.ceil(H100.cuda_total_bytes * 0.92) / GIB, 2)
    assert (old.max_num_seqs, old.max_num_batched_tokens) == (1024, 8192)
    a100 = estimate(LLAMA8, [GpuSpec.from_name("A100-80GB")], EngineFlags(max_model_len=8192), "0.19.0")
    assert (a100.max_num_seqs, a100.max_num_batched_tokens) == (256, 2048)
    assert old.max_model_len == LLAMA8.derived_max_model_len or old.max_model_len == 8192


def test_free_memory_check_fails_with_shortfall():
    busy = GpuSpec(name=H100.name, memory_total_mib=81559, memory_free_mib=81559 - 20 * 1024)
    est = estimate(LLAMA8, [busy], AT_095, "0.19.0")
    assert (
        not est.fits and "less than desired GPU memory utilization" in est.reason and "short by" in est.reason
    )


def test_too_long_max_model_len_and_auto_fit():
    rtx = GpuSpec.from_name("RTX 4090")
    est = estimate(LLAMA8, [rtx], EngineFlags(max_model_len=131072), "0.33.0")
    assert not est.fits
    assert f"estimated maximum model length is {est.largest_max_model_len}" in est.reason
    auto = estimate(LLAMA8, [rtx], EngineFlags(max_model_len=-1), "0.33.0")
    assert auto.fits and auto.max_model_len == est.largest_max_model_len > 8192
    assert (
        largest_fitting_model_len(LLAMA8, [rtx], EngineFlags(max_model_len=-1), "0.33.0")
        == auto.max_model_len
    )
    tight = estimate(LLAMA8, [rtx], EngineFlags(max_model_len=auto.max_model_len + 64), "0.33.0")
    assert not tight.fits


def test_weights_that_do_not_fit_say_by_how_much():
    est = estimate(facts("Qwen/Qwen2.5-72B-Instruct"), [H100], EngineFlags(max_model_len=8192), "0.19.0")
    assert not est.fits and "No available memory for the cache blocks" in est.reason and "GiB" in est.reason


# ---- reference startups: every case of the repo's reference sets --------------------------------

# Read by smartrun.memory.evidence (the one reader of the startup records, shared with the benchmark): the shared reference set
# (fixtures/reference/vllm_startup_logs.jsonl, with the vLLM 0.19.0 H100 sweep the coefficients are
# fitted on) and the public startups (fixtures/startups/public.jsonl). A case added to either file is a
# test case here without any edit.
REFERENCE = {case.id: case for case in evidence.load_cases()}
STARTUPS = {**REFERENCE, **{case.id: case for case in evidence.load_public()}}
ROWS = {cid: evidence.run_case(case, CONFIGS) for cid, case in STARTUPS.items()}  # a row, or why not estimable
SWEEP_019 = sorted(cid for cid, row in ROWS.items() if isinstance(row, evidence.EstimateRow) and row.subset == evidence.FIT_SUBSET)


def test_the_sweep_is_all_there():
    assert len(SWEEP_019) == 43
    assert len(STARTUPS) == len(evidence.load_cases()) + len(evidence.load_public())  # no id used twice


# ---- properties ------------------------------------------------------------------------------

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
MODELS = [LLAMA8, QWEN7, DSV2, GEMMA3]


@FAST
@given(
    st.sampled_from(MODELS),
    st.floats(0.5, 0.94),
    st.floats(0.001, 0.05),
    st.sampled_from(["0.19.0", "0.33.0"]),
)
def test_more_utilization_never_fewer_tokens(model, util, extra, version):
    low = estimate(model, [H100], EngineFlags(gpu_memory_utilization=util, max_model_len=4096), version)
    high = estimate(
        model, [H100], EngineFlags(gpu_memory_utilization=util + extra, max_model_len=4096), version
    )
    assert high.kv_cache_tokens >= low.kv_cache_tokens


@FAST
@given(st.sampled_from(MODELS), st.sampled_from([1, 2, 4, 8]), st.sampled_from([1, 2]))
def test_larger_tp_never_more_weight_per_rank(model, tp, pp):
    if model.num_attention_heads % (2 * tp):
        return
    small = max(w.bytes for w in weights_per_rank(model, "bfloat16", tp, pp))
    large = max(w.bytes for w in weights_per_rank(model, "bfloat16", 2 * tp, pp))
    assert large <= small


@FAST
@given(st.sampled_from([LLAMA8, QWEN7, DSV2]), st.floats(0.6, 0.95))
def test_fp8_kv_about_doubles_tokens(model, util):
    flags = EngineFlags(gpu_memory_utilization=util, max_model_len=4096)
    plain = estimate(model, [H100], flags, "0.19.0")
    fp8 = estimate(model, [H100], flags.model_copy(update={"kv_cache_dtype": "fp8"}), "0.19.0")
    assert fp8.kv_cache_tokens == pytest.approx(2 * plain.kv_cache_tokens, rel=0.001)


@FAST
@given(st.sampled_from(MODELS), st.floats(0.6, 0.95), st.sampled_from(["0.19.0", "0.33.0"]))
def test_enforce_eager_never_lowers_kv(model, util, version):
    flags = EngineFlags(gpu_memory_utilization=util, max_model_len=4096)
    eager = estimate(model, [H100], flags.model_copy(update={"enforce_eager": True}), version)
    assert eager.kv_cache_tokens >= estimate(model, [H100], flags, version).kv_cache_tokens


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "gpus", "words"),
    [
        (EngineFlags(tensor_parallel_size=3), 4, "must be divisible by tensor parallel size (3)"),
        (EngineFlags(gpu_memory_utilization=1.2), 1, "must be in (0, 1]"),
        (EngineFlags(gpu_memory_utilization=0), 1, "must be in (0, 1]"),
        (EngineFlags(tensor_parallel_size=4), 2, "World size (4) is larger"),
        (EngineFlags(dtype="int3"), 1, "--dtype 'int3'"),
        (EngineFlags(kv_cache_dtype="fp3"), 1, "--kv-cache-dtype 'fp3'"),
        (EngineFlags(max_model_len=10**7), 1, "greater than the derived max_model_len"),
    ],
)
def test_bad_flags_raise_one_line(flags, gpus, words):
    with pytest.raises(EstimateError) as err:
        estimate(LLAMA8, [H100] * gpus, flags, "0.19.0")
    assert words in err.value.message and "\n" not in err.value.message


def test_kv_head_mismatch_raises():
    odd = LLAMA8.model_copy(update={"num_kv_heads": 6, "num_attention_heads": 36})
    with pytest.raises(EstimateError, match="KV heads"):
        estimate(odd, [H100] * 4, EngineFlags(tensor_parallel_size=4), "0.19.0")


def test_unknown_gpu_lists_close_matches():
    with pytest.raises(EstimateError, match=r"close matches: .*A10"):
        GpuSpec.from_name("H10")
    assert GpuSpec.from_name("h100 80gb").memory_total_mib == 81559
    assert GpuSpec.from_name("RTX 4090").name == "NVIDIA GeForce RTX 4090"


# ---- CLI -------------------------------------------------------------------------------------

LLAMA_DIR = str(FIXTURES / "models" / "llama-3.1-8b-instruct")


def test_cli_json_has_exactly_the_estimate_fields(capsys):
    from smartrun.memory import MemoryEstimate

    rc = cli_main(
        [
            "model",
            "estimate",
            LLAMA_DIR,
            "--gpu",
            "H100",
            "--max-model-len",
            "8192",
            "--vllm-version",
            "0.19",
            "--gpu-memory-utilization",
            "0.95",
            "--json",
        ]
    )
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and set(out) == set(MemoryEstimate.model_fields)
    assert out["kv_cache_tokens"] == pytest.approx(476000, rel=0.01)


def test_cli_table_and_hardware_snapshot(capsys):
    rc = cli_main(
        [
            "model",
            "estimate",
            LLAMA_DIR,
            "--hardware",
            str(FIXTURES / "hardware" / "1x-h100-80gb.json"),
            "--max-model-len",
            "auto",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0 and "KV cache tokens" in out and "largest max_model_len" in out and "fits" in out


@pytest.mark.parametrize(
    "args",
    [
        ["--gpu", "H10"],
        ["--gpu", "H100", "--gpus", "4", "--tensor-parallel-size", "3"],
        ["--gpu", "H100", "--gpu-memory-utilization", "1.5"],
        ["--gpu", "H100", "--gpus", "99999999999999"],  # once a MemoryError traceback
        ["--gpu", "H100", "--pipeline-parallel-size", "0"],  # once blamed on --gpus
        ["--gpu", "H100", "--max-num-seqs", "0"],
        ["--gpu", "H100", "--max-num-batched-tokens", "-1"],
        ["--gpu", "H100", "--max-model-len", "-5"],  # once argparse's usage block
    ],
)
def test_cli_bad_input_one_line_exit_2(capsys, args):
    rc = cli_main(["model", "estimate", LLAMA_DIR, *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("localaistack: ") and err.count("\n") == 1
    assert args[-2] in err or "tensor parallel size (3)" in err  # names the flag at fault (or vLLM's wording)


def test_snapshot_busy_gpu_fails_startup_check():
    from smartrun.hardware import load_snapshot

    snap = load_snapshot(FIXTURES / "hardware" / "1x-h100-80gb-20gib-busy.json")
    est = estimate(LLAMA8, snap, EngineFlags(gpu_memory_utilization=0.95, max_model_len=8192), "0.19.0")
    assert not est.fits and est.free_gib < est.requested_gib
    assert est.free_gib == pytest.approx((snap.gpus[0].memory_free_mib - 0) * MIB / GIB - 0.46, abs=0.1)


def test_profile_between_0_20_and_0_27():
    _version, profile = resolve_version("0.25.0")
    assert profile.name == "0.20" and profile.default_util == 0.92 and profile.cudagraph_subtracted
    assert not profile.has_160gib_tier


def test_explicit_bf16_below_cc8_is_refused_and_auto_falls_back_to_fp16():
    t4 = GpuSpec.from_name("T4")
    with pytest.raises(EstimateError, match="Bfloat16 is only supported"):
        estimate(QWEN7, [t4], EngineFlags(dtype="bfloat16", max_model_len=1024), "0.19.0")
    est = estimate(
        QWEN7.model_copy(update={"torch_dtype": "bfloat16"}), [t4], EngineFlags(max_model_len=1024), "0.19.0"
    )
    assert est.weights_gib > 0  # ran in float16


@pytest.mark.parametrize(
    "name",
    sorted(p.name for p in (FIXTURES / "models").iterdir() if (p / "config.json").exists()),
)
def test_counted_weights_match_safetensors_sizes(name):
    """Parameters counted from config.json alone agree with the checkpoint's own byte count."""
    from smartrun.memory import rope_cache_params
    from smartrun.model import inspect

    model = inspect(str(FIXTURES / "models" / name))
    assert model.weight_bytes, "every fixture model ships its safetensors sizes (headers or index)"
    dtype = "float16" if model.torch_dtype == "float16" else "bfloat16"
    counted = weights_per_rank(model.model_copy(update={"weight_bytes": None}), dtype, 1, 1)[0].bytes
    counted -= rope_cache_params(model) * 2
    assert counted == pytest.approx(model.weight_bytes, rel=0.005)


# ---- the fitted coefficients, cross-validation, models without logs ---------------------------


@pytest.fixture(scope="module")
def fit_samples():
    return evidence.fit_samples(evidence.load_cases(), CONFIGS)


def test_shipped_coefficients_are_the_full_data_fit(fit_samples):
    assert fit.fit_coefficients(fit_samples) == FITTED


def test_least_squares_recovers_a_known_line_and_zeroes_an_absent_feature():
    xs = [[1.0, float(x), 0.0] for x in range(6)]
    a, b, c = fit.least_squares(xs, [0.5 + 2.0 * x[1] for x in xs])
    assert (a, b, c) == (pytest.approx(0.5), pytest.approx(2.0), 0.0)


def test_leaving_a_family_out_barely_moves_the_sampler_coefficient(fit_samples):
    families = {s["family"] for s in fit_samples}
    assert len(families) >= 8
    for family in families:
        refit = fit.fit_coefficients([s for s in fit_samples if s["family"] != family])
        assert refit.sampler_extra_bytes == pytest.approx(FITTED.sampler_extra_bytes, rel=0.02), family


def test_out_of_family_kv_tokens_stay_within_targets(fit_samples):
    by_id = {case.id: case for case in evidence.load_cases()}
    errors = []
    for family in {s["family"] for s in fit_samples}:
        refit = fit.fit_coefficients([s for s in fit_samples if s["family"] != family])
        for s in fit_samples:
            if s["family"] == family:
                row = evidence.run_case(by_id[s["id"]], CONFIGS, refit)
                errors.append((row.tok_pred - row.tok_real) / row.tok_real)
    assert sorted(abs(e) for e in errors)[len(errors) // 2] <= 0.03
    assert max(errors) <= 0.05 and min(errors) >= -0.08


def test_multimodal_encoder_outputs_are_held_through_the_profile_run():
    text_only = GEMMA3.model_copy(update={"is_multimodal": False})
    mm = activation(GEMMA3, "bfloat16", 1, 1024, 8192, last=True)
    assert mm - activation(text_only, "bfloat16", 1, 1024, 8192, last=True) == 8192 * GEMMA3.hidden_size * 2
    # only the first PP stage runs the encoder
    assert activation(GEMMA3, "bfloat16", 1, 1024, 8192, last=True, first=False) == activation(
        text_only, "bfloat16", 1, 1024, 8192, last=True
    )


def test_modelopt_side_quant_config_halves_the_weights():
    fp8 = evidence.facts_for(CONFIGS["nvidia/llama-3.1-70b-instruct-fp8"], "nvidia/Llama-3.1-70B-Instruct-FP8")
    bf16 = facts("meta-llama/Llama-3.1-70B-Instruct")
    assert fp8.quantization is not None
    ratio = weights_per_rank(fp8, "bfloat16", 1, 1)[0].bytes / weights_per_rank(bf16, "bfloat16", 1, 1)[0].bytes
    assert 0.5 < ratio < 0.55


def test_every_model_without_logs_gets_plausible_estimates():
    flagged = []
    for model in evidence.sanity_models(CONFIGS):
        for gpu in (H100, GpuSpec.from_name("A100-SXM4-40GB")):
            for tp in (1, 2, 4):
                if model.num_attention_heads % tp:
                    continue
                est = estimate(model, [gpu] * tp, EngineFlags(tensor_parallel_size=tp), "0.19.0")
                flagged += [(model.name, gpu.name, tp, f) for f in evidence.implausible(est, model, tp)]
    assert flagged == []


@pytest.mark.parametrize("case_id", ["vsl-049", "vsl-050"])
def test_pp_first_stage_activation_counts_the_states_it_sends(case_id):
    row = evidence.run_case(REFERENCE[case_id], CONFIGS)
    assert row.act_pred == pytest.approx(row.act_real, rel=0.03)
    no_pp_term = evidence.run_case(REFERENCE[case_id], CONFIGS, FITTED.model_copy(update={"pp_hidden_buffers": 0}))
    assert no_pp_term.act_pred < row.act_real * 0.9
    assert row.tok_pred <= row.tok_real  # the sampler stage binds; its received states counted too


def test_moe_workspace_stops_growing_at_the_fused_moe_chunk():
    qwen_moe = facts("Qwen/Qwen3-30B-A3B")
    dense = qwen_moe.model_copy(update={"moe": None})

    def moe_part(mnbt):
        forward = activation(qwen_moe, "bfloat16", 1, 1, mnbt, last=False)
        return forward - activation(dense, "bfloat16", 1, 1, mnbt, last=False)

    assert moe_part(32768) == 2 * moe_part(16384) > 0
    assert moe_part(262144) == moe_part(65536)


# ---- version profiles, weights as vLLM holds them, the plan-safe band (issue 21, issue 18 items 2-3) ----


@pytest.mark.parametrize(
    ("version", "cc", "kv", "name"),
    [
        ("0.6.4", "8.6", "auto", "0.6"),
        ("0.7.3", "9.0", "auto", "0.6"),
        ("0.8.5", "8.0", "auto", "0.8"),
        ("0.8.5", "7.5", "auto", "0.6"),  # T4: V1 needs compute capability 8.0 in 0.8-0.10
        ("0.9.2", "7.0", "auto", "0.6"),  # V100
        ("0.9.2", "8.6", "fp8", "0.6"),  # fp8 KV without FA3 falls back in 0.8-0.9
        ("0.9.2", "9.0", "fp8", "0.9"),
        ("0.10.1", "8.9", "auto", "0.9"),
        ("0.10.1", "7.5", "auto", "0.6"),
        ("0.11.0", "7.5", "auto", "0.11"),  # V0 removed: no fallback
        ("0.12.0", "7.5", "auto", "0.19"),
        ("0.19.0", "9.0", "auto", "0.19"),
        ("0.25.0", "9.0", "auto", "0.20"),
        ("0.33.0", "9.0", "auto", "0.33"),
    ],
)
def test_version_profiles_follow_vllms_engine_choice(version, cc, kv, name):
    assert resolve_version(version, cc, kv)[1].name == name


def test_every_profile_names_its_range_source_and_evidence():
    from smartrun.vllm_profiles import PROFILES

    for profile in PROFILES.values():
        assert profile.versions and profile.source and profile.evidence
        assert 0 < profile.margin < 0.2 and profile.margin_floor_gib > 0


def test_a100_80gb_gets_the_big_defaults_only_in_0_8():
    a100 = [GpuSpec.from_name("A100-80GB")]
    flags = EngineFlags(max_model_len=8192)
    assert estimate(LLAMA8, a100, flags, "0.8.5").max_num_batched_tokens == 8192
    assert estimate(LLAMA8, a100, flags, "0.9.2").max_num_batched_tokens == 2048


def test_mla_cache_entry_per_engine():
    """Before 0.7.1 DeepSeek cached every head's K and V padded to 256; from 0.7.1 the 576 latent,
    padded to 640 (256 bytes) by V0 in 0.7.2-0.7.3 only."""
    old = estimate(DSV2, [H100], EngineFlags(max_model_len=4096), "0.6.6")
    new = estimate(DSV2, [H100], EngineFlags(max_model_len=4096), "0.7.1")
    padded = estimate(DSV2, [H100], EngineFlags(max_model_len=4096), "0.7.3")
    v1 = estimate(DSV2, [H100], EngineFlags(max_model_len=4096), "0.8.5")
    assert old.kv_bytes_per_token == 2 * 16 * 256 * 2 * 27
    assert new.kv_bytes_per_token == 576 * 2 * 27 == v1.kv_bytes_per_token
    assert padded.kv_bytes_per_token == 640 * 2 * 27


def _gpt_oss(layers: int, experts: int):
    """gpt-oss's published shape (hidden 2880, 64 heads of 64, 8 KV heads, vocab 201088, MXFP4 experts)."""
    config = {
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 2880,
        "intermediate_size": 2880, "num_hidden_layers": layers, "num_attention_heads": 64,
        "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 201088, "num_local_experts": experts,
        "num_experts_per_tok": 4, "max_position_embeddings": 131072, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * (layers // 2), "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "quantization_config": {"quant_method": "mxfp4"},
    }
    return facts_from_config(config, f"gpt-oss-{layers}x{experts}")


def test_mxfp4_experts_are_held_padded_for_the_kernel():
    """gpt-oss-120b on H100 under 0.10.1 (Marlin: intermediate to 128, hidden to 256): vLLM issue
    23278 logs 'Model loading took 65.9651 GiB'; the checkpoint's own layout is ~5 GiB less."""
    oss = _gpt_oss(36, 128)
    marlin = estimate(oss, [H100], EngineFlags(max_model_len=4096), "0.10.1").weights_gib
    unpadded = weights_per_rank(oss, "bfloat16", 1, 1)[0].bytes / GIB
    assert marlin == pytest.approx(65.9651, rel=0.01)
    assert marlin - unpadded > 4.5
    triton = estimate(oss, [H100], EngineFlags(max_model_len=4096), "0.11.0").weights_gib
    assert unpadded < triton < marlin  # Hopper's Triton kernels pad the intermediate size to 64 only


def test_sliding_window_requests_hold_one_batch_in_flight_before_the_0_19_fit():
    """SlidingWindowSpec.max_memory_usage_bytes of 0.8.4-0.11.0 (vllm/v1/kv_cache_interface.py): window - 1 +
    max_num_batched_tokens, + 1 block. gpt-oss-120b at TP 4 on 0.10.1.1 (pub-124) printed 284.25x for
    2,640,144 tokens at 16384 (18 full + 18 sliding layers of 128, 2048 batched tokens)."""
    from smartrun.memory import blocks_per_request
    from smartrun.memory.kv import KVGroup
    from smartrun.vllm_profiles import PROFILES

    sliding = KVGroup(kind="sliding", layers=18, window=128)
    assert blocks_per_request(sliding, 16384, 16, 2048, 1) == math.ceil((127 + 2048) / 16) + 1 == 137
    assert blocks_per_request(sliding, 16384, 16, 2048) == math.ceil((127 + 4096) / 16) + 1
    assert [PROFILES[p].sliding_in_flight_batches for p in ("0.8", "0.9", "0.11", "0.19")] == [1, 1, 1, 2]
    per_request = 18 * (1024 + 137)  # blocks of one layer
    assert 2640144 // 16 * 36 / per_request == pytest.approx(284.25, abs=0.01)


def test_plan_safe_low_end_is_below_the_estimate_and_wider_without_evidence():
    from smartrun.memory import plan_safe_kv_tokens, plan_safe_max_model_len

    measured = estimate(LLAMA8, [H100], AT_095, "0.19.0")
    unmeasured = estimate(LLAMA8, [H100], AT_095.model_copy(update={"enforce_eager": True}), "0.33.0")
    for est in (measured, unmeasured):
        assert plan_safe_kv_tokens(est) < est.kv_cache_tokens
        assert plan_safe_max_model_len(est) <= est.largest_max_model_len
        assert est.uncertainty.startswith(f"profile {est.profile}")
    lost = 1 - plan_safe_kv_tokens(measured) / measured.kv_cache_tokens
    lost_unmeasured = 1 - plan_safe_kv_tokens(unmeasured) / unmeasured.kv_cache_tokens
    assert lost < 0.01 < lost_unmeasured


ALL_ROWS = [row for row in ROWS.values() if isinstance(row, evidence.EstimateRow)]
HELD_OUT = {row.id: row for row in ALL_ROWS if row.subset != evidence.FIT_SUBSET}
PUBLIC_CASES = {case.id: case for case in evidence.load_public()}
# Stated tolerance per profile for every startup: the KV cache vLLM had (tokens; else blocks; else GiB,
# whichever its log printed), (under, over) in %. The fit set (the 0.19 H100 sweep) is held to the same
# 0.19 figures. V0 under-predicts on purpose (one non-torch figure for every GPU, LoRA buffers not
# modelled). A profile without a stated tolerance fails the test of its first startup.
HELD_OUT_TOLERANCE = {
    "0.6": (-20.0, 2.0), "0.8": (-3.0, 1.0), "0.9": (-3.0, 1.0), "0.11": (-3.0, 1.0), "0.19": (-3.0, 1.0),
    "0.33": (-3.0, 1.0),
}
# Held-out startups whose weights line vLLM printed differs from the estimate by more than 2%, with the
# largest gap (GiB) they are pinned to and why. vLLM 0.31.0 on an A10G (pub-125) reported 2.98 GiB for
# Qwen2.5-1.5B-Instruct, whose tensors are 2.88 GiB (0.7.2 loaded 2.88, pub-010); not read from source.
OPEN_WEIGHTS = {"pub-125": 0.10}
# Held-out startups of an error class the estimator does not yet get within its profile's tolerance,
# with the bound their error is pinned to (so it can only improve) and why. Not excluded anywhere else:
# the benchmark's Done-when line counts them.
OPEN_CLASSES: dict[str, tuple[float, float]] = {
    # none since the native sort is counted as torch allocates it and FlashInfer's sampler is known
    # (pub-110 +2.0% -> -0.4%; pub-120/121/122 -16.8/-3.5/-5.8% -> -1.4/-0.4/-0.9%)
}


# Reference startups the estimator cannot be run on, and what their record lacks (this is not a
# tolerance: nothing can be compared). A case leaves the list when its record gains what is missing.
NOT_ESTIMABLE = {
    **dict.fromkeys(("vsl-004", "vsl-005", "vsl-007", "vsl-008", "vsl-009", "vsl-010", "vsl-011", "vsl-012",
                     "vsl-013", "vsl-014", "vsl-015", "vsl-016", "vsl-017", "vsl-018", "vsl-020", "vsl-022",
                     "vsl-024"), "no config for the model"),
    "pub-007": "utilization not shown",
    "vsl-003": "GPU not named",
    "vsl-021": "utilization not shown",
    "vsl-023": "not estimable: --gpu 'A100 (memory size not stated)': unknown GPU",
}


def _measured_kv(row: evidence.EstimateRow) -> tuple[str, float, float, float]:
    """(what, predicted, plan-safe low end, measured) for the KV figure vLLM printed: tokens, else blocks,
    else GiB. The low end of blocks and GiB scales with the token low end (the same cache)."""
    for what, pred, real in (("KV tokens", "tok_pred", "tok_real"), ("KV blocks", "blocks_pred", "blocks_real"),
                             ("KV GiB", "kv_pred", "kv_real")):
        if getattr(row, real):
            low = getattr(row, pred) * row.tok_low / row.tok_pred if row.tok_pred else 0.0
            return what, getattr(row, pred), low, getattr(row, real)
    raise AssertionError(f"{row.id}: vLLM printed no KV figure (tokens, blocks or GiB) to compare with")


def startup_problems(case_id: str, row: evidence.EstimateRow | str) -> list[str]:
    """What is wrong with the estimate of one reference startup against its stated tolerance ([]: nothing)."""
    if isinstance(row, str):
        if case_id not in NOT_ESTIMABLE:
            return [f"cannot be estimated: {row}"]
        return [] if row.startswith(NOT_ESTIMABLE[case_id]) else [f"not estimable for another reason: {row}"]
    if case_id in NOT_ESTIMABLE:
        return ["estimable now: take it off NOT_ESTIMABLE"]
    if row.profile not in HELD_OUT_TOLERANCE:
        return [f"no stated tolerance for profile {row.profile}"]
    problems = []
    low, high = HELD_OUT_TOLERANCE[row.profile]
    low, high = OPEN_CLASSES.get(case_id, (low, high))
    what, predicted, safe, measured = _measured_kv(row)
    err = 100 * (predicted - measured) / measured
    if not low <= err <= high:
        problems.append(f"{what} off by {err:+.2f}%, profile {row.profile} allows {low:+g}..{high:+g}%")
    if safe > measured:
        problems.append(f"the plan-safe low end counts on {what} that were not there ({safe:.0f} > {measured})")
    w_gap = OPEN_WEIGHTS.get(case_id, 0.02 * (row.w_real or 0.0))
    if row.w_real and (row.quant != "mxfp4" or row.subset == evidence.FIT_SUBSET) \
            and abs(row.w_pred - row.w_real) > w_gap:
        problems.append(f"weights {row.w_pred:.2f} GiB, vLLM loaded {row.w_real:.2f}")
    if row.fits_real is not None and row.fits_pred != row.fits_real:
        problems.append(f"estimated fits={row.fits_pred}, vLLM started={row.fits_real}")
    if row.subset == evidence.FIT_SUBSET and abs(row.conc_pred - row.conc_real) > 0.03 * row.conc_real:
        problems.append(f"concurrency {row.conc_pred:.2f}, vLLM {row.conc_real:.2f}")
    return problems


@pytest.mark.parametrize("case_id", sorted(STARTUPS))
def test_every_reference_startup_within_its_profiles_tolerance(case_id):
    """Every startup of the reference sets: the KV cache within its profile's stated tolerance, the plan-safe
    low end never above what vLLM really had, the weights within 2%, fit or no fit as vLLM said; the 0.19
    sweep's concurrency within 3%. One a profile cannot yet meet is pinned in OPEN_CLASSES."""
    assert startup_problems(case_id, ROWS[case_id]) == []


def test_the_startup_check_fails_outside_the_tolerance():
    cid = SWEEP_019[0]
    row = ROWS[cid]
    assert isinstance(row, evidence.EstimateRow) and startup_problems(cid, row) == []
    bad = {
        "KV tokens off by +2.": {"tok_pred": int(row.tok_real * 1.02)},  # the 0.19 band allows +1%
        "plan-safe low end": {"tok_low": row.tok_real + 1},
        "weights": {"w_pred": row.w_real * 1.05},
        "vLLM started=True": {"fits_pred": False},
        "concurrency": {"conc_pred": row.conc_real * 1.1},
        "no stated tolerance": {"profile": "9.9"},
    }
    for words, change in bad.items():
        assert any(words in problem for problem in startup_problems(cid, row.model_copy(update=change))), words
    assert "KV blocks" in startup_problems(cid, row.model_copy(update={"tok_real": None, "blocks_real": row.blocks_pred // 2}))[0]
    assert startup_problems("pub-new", "no config for the model") == ["cannot be estimated: no config for the model"]
    assert startup_problems(cid, "GPU not named")[0].startswith("cannot be estimated")
    with pytest.raises(AssertionError, match="no KV figure"):
        _measured_kv(row.model_copy(update={"tok_real": None, "blocks_real": None, "kv_real": None}))


def test_shipped_bands_cover_what_every_startup_measured():
    from smartrun.vllm_profiles import PROFILES

    for name, (band, n) in evidence.profile_bands(ALL_ROWS).items():
        assert PROFILES[name].margin >= band, (name, band, n)
    # wider where a profile has few measurements: none is narrower than the measured 0.19 one
    assert all(p.margin >= PROFILES["0.19"].margin for p in PROFILES.values())
    # the unmeasured eras get the widest default band; a measured one is wider only where its own
    # startups need it (0.11: pub-115, 0.74 GiB over at 1024 sequences, widened x2 for n = 4)
    default = PROFILES["0.33"].margin
    assert default == PROFILES["0.20"].margin == PROFILES["0.8"].margin
    needed = evidence.profile_bands(ALL_ROWS)
    assert all(p.margin <= default or needed[p.name][0] > default for p in PROFILES.values())


def test_the_public_startups_are_there_with_their_provenance():
    cases = evidence.load_public()
    assert len(cases) >= 12 and len({c.id for c in cases}) == len(cases)
    for case in cases:
        assert case.source and case.log_lines and isinstance(case.inferred, list), case.id
        assert (case.vllm_version or "")[:1].isdigit(), case.id
    assert {f"pub-{i:03d}" for i in (1, 3, 5, 6, *range(8, 18))} <= set(HELD_OUT)


def test_held_out_summary_meets_the_0_9_and_0_19_targets():
    """Median KV-token error <= 3% on the V1 held-out startups, none over by more than 1%."""
    errs = [
        100 * (r.tok_pred - r.tok_real) / r.tok_real
        for r in HELD_OUT.values()
        if r.tok_real and r.profile in ("0.9", "0.19") and r.id not in OPEN_CLASSES
    ]
    assert len(errs) >= 4
    assert sorted(abs(e) for e in errs)[len(errs) // 2] <= 3 and max(errs) <= 1


def test_held_out_set_meets_the_issue_21_figures_it_can_show():
    """Every held-out startup with KV tokens (V0 and V1, seven GPU classes named in their logs), the two
    the 0.8 no-NVLink TP figure was read from counted leave-one-out: median |error| <= 3%, none over
    by more than 5%. Over by more than 1%: pub-014 leave-one-out (+2.4%) and the open 0.11.0-on-T4
    class (pub-110, +2.0%): 2 of 28, so the issue's "at most one in twenty" is NOT met until that
    class is explained or the set grows to 40. This pins the counts, so a new over-prediction fails."""
    done = evidence.done_when(ALL_ROWS, evidence.leave_one_out_errors(CONFIGS))
    assert set(done["leave_one_out"]) == {"pub-014", "pub-015"}  # the 0.8 no-NVLink TP figure's sources
    assert done["n"] >= 28 and len(done["gpu_classes"]) >= 7
    assert done["median_abs_pct"] <= 3 and done["over_5pct"] == 0 and done["over_1pct"] <= 2


def test_v0_0_7_2_and_0_7_3_pad_the_mla_entry_to_256_bytes():
    """vllm/worker/cache_engine.py (0.7.2, 0.7.3; not 0.7.1 nor 0.8.5.post1) rounds the MLA latent up
    to 256 bytes of the model dtype: 576 -> 640 elements. Two public startups print KV GiB and blocks:
    DeepSeek-V2-Lite on an L40S, 0.7.2 (search-index file 57044493590: 14.96 GiB / 29055 blocks) and
    DeepSeek-R1 on 8x H200, 0.7.3 (file 20903468563: 21.43 GiB / 18418 blocks, 61 layers)."""
    aligned = {v: resolve_version(v, "8.9")[1].mla_align_bytes for v in ("0.7.1", "0.7.2", "0.7.3")}
    assert aligned == {"0.7.1": 0, "0.7.2": 256, "0.7.3": 256}
    assert resolve_version("0.8.5", "7.5")[1].mla_align_bytes == 0  # V0 fallback on 0.8: no padding
    assert kv_bytes_per_token_layer(DSV2, 2, 1, True, 128) == 640 * 2
    for layers, gib, blocks in ((27, 14.96, 29055), (61, 21.43, 18418)):
        per_block = layers * 16 * 640 * 2
        assert abs(gib * GIB / blocks - per_block) <= 0.005 * GIB / blocks  # within the print's rounding
        assert abs(gib * GIB / blocks - per_block * 576 / 640) > 0.05 * per_block  # the unpadded 576 is not
    padded = estimate(DSV2, [GpuSpec.from_name("L40S")], EngineFlags(max_model_len=4096), "0.7.2")
    plain = estimate(DSV2, [GpuSpec.from_name("L40S")], EngineFlags(max_model_len=4096), "0.7.1")
    assert plain.kv_cache_tokens / padded.kv_cache_tokens == pytest.approx(640 / 576, rel=0.01)


def test_tp_without_nvlink_on_0_8_uses_the_measured_pcie_figure():
    """0.8.4 TP 2 on RTX 3090s without P2P (pub-014/015) grew ~0.7 GiB of non-torch memory, not the
    ~2.1 GiB the 0.19 H100 (NVLink) sweep fitted. Applied only where NVLink is known to be absent:
    the case says so, or the GPU table lists the model without NVLink (L40S, L4); unknown keeps
    the NVLink-class figure (errs low), as does every other era."""
    flags = EngineFlags(tensor_parallel_size=2, max_model_len=4096)
    l40s, h100 = [GpuSpec.from_name("L40S")] * 2, [H100] * 2
    rtx = GpuSpec.from_name("RTX 3090")
    assert estimate(LLAMA8, l40s, flags, "0.8.5").non_torch_gib == 0.71
    assert estimate(LLAMA8, h100, flags, "0.8.5").non_torch_gib > 2
    assert estimate(LLAMA8, [rtx] * 2, flags, "0.8.5").non_torch_gib > 2  # NVLink unknown
    no_p2p = [rtx.model_copy(update={"nvlink": False})] * 2
    assert estimate(LLAMA8, no_p2p, flags, "0.8.5").non_torch_gib == 0.71
    assert estimate(LLAMA8, no_p2p, flags, "0.9.2").non_torch_gib == 0.21  # 0.10.2's printed PCIe figure
    for cid in ("pub-014", "pub-015"):  # the term is the larger need of the two: neither over
        row = HELD_OUT[cid]
        assert -3 <= 100 * (row.tok_pred - row.tok_real) / row.tok_real <= 0.1


def test_v0_tp_over_nvlink_keeps_the_nvlink_class_non_torch_figure():
    """pub-017 (0.7.1, TP 8 on NVSwitch A100s) printed 2.10 GiB non-torch; the V0 profile's former
    0.25 GiB for every TP group (from vsl-019's two RTX 4090s, no peer access) over-predicted its
    KV cache by 7%, past the plan-safe band. Now 0.25 only where peer access is known absent."""
    nvlink = HELD_OUT["pub-017"]
    assert nvlink.tok_pred <= nvlink.tok_real and nvlink.tok_low <= nvlink.tok_real
    assert GpuSpec.from_name("RTX 4090").without_nvlink and not GpuSpec.from_name("A100-SXM4-40GB").without_nvlink
    assert -1.0 <= 100 * (HELD_OUT["vsl-019"].tok_pred / HELD_OUT["vsl-019"].tok_real - 1) <= 2.0


def test_v0_mla_keeps_absorbed_matrices_and_cpu_offload_keeps_the_non_layer_weights():
    """0.7.1-0.7.3 V0 MLA holds W_Q_UK, W_UV_O and W_QR beside the raw weights (pub-017: 3.97 GiB
    printed at TP 8, 3.74 without them); --cpu-offload-gb moves decoder-layer parameters only, and
    the absorbed copies of an offloaded layer with them (pub-016: 0.80 GiB left of DeepSeek-V2-Lite)."""
    assert HELD_OUT["pub-017"].w_pred == pytest.approx(3.97, abs=0.02)
    assert HELD_OUT["pub-016"].w_pred == pytest.approx(0.8008, abs=0.01)
    flags = EngineFlags(max_model_len=4096)
    v07 = estimate(DSV2, [H100], flags, "0.7.3").weights_gib
    v070 = estimate(DSV2, [H100], flags, "0.7.0").weights_gib  # V0 before the absorption
    assert v07 - v070 == pytest.approx(27 * 16 * (2048 * 512 * 2 + 2048 * 64) * 2 / GIB, abs=0.02)


def test_native_topk_topp_sort_is_counted_where_the_wheel_had_no_flashinfer():
    """0.9.2 on an A100 40GB (pub-001) and 0.19.1 on the same GPU (pub-002): 0.67 GiB more non-KV in
    0.9 (their KV caches, same model and settings). Predicted: the PyTorch-native top-k/top-p sort of
    256 x 151936 logits (NATIVE_TOPK_TOPP_BYTES an element), less 0.9's smaller single-GPU non-torch."""
    from smartrun.vllm_profiles import NATIVE_TOPK_TOPP_BYTES, PROFILES

    new, old = HELD_OUT["pub-002"], HELD_OUT["pub-001"]
    gap = 256 * 151936 * NATIVE_TOPK_TOPP_BYTES / GIB - (FITTED.non_torch_single - PROFILES["0.9"].non_torch_single_gib)
    assert old.nonkv_pred - new.nonkv_pred == pytest.approx(gap, abs=0.02)
    assert gap == pytest.approx(new.kv_real - old.kv_real, abs=0.05)  # 19.36 - 18.69 printed


def test_v0_fallback_below_cc8_is_used_for_the_t4_startup():
    assert HELD_OUT["pub-003"].profile == "0.6"  # vLLM 0.8.2 on a T4 logged 'Falling back to V0'
    assert resolve_version("0.8.2", "7.5")[1].v0_engine


def test_bitsandbytes_4bit_double_quant_weights():
    """pub-004: Llama-3.1-8B-Instruct nf4 with double quantization, lm_head and embeddings in fp16."""
    assert HELD_OUT["pub-004"].w_pred == pytest.approx(5.3541, rel=0.005)


def test_per_gpu_cuda_reservation_matches_printed_totals():
    assert round(GpuSpec.from_name("T4").cuda_total_bytes / GIB, 2) == 14.74
    assert round(GpuSpec.from_name("A100-SXM4-40GB").cuda_total_bytes / GIB, 2) == 39.39
    assert round(GpuSpec.from_name("RTX 3090").cuda_total_bytes / GIB, 2) == 23.58


def test_benchmark_prints_per_profile_gpu_family_and_quantization_tables():
    """The benchmark runs as a user runs it (a script; tests import nothing from benchmarks/)."""
    script = REPO / "benchmarks" / "estimator_accuracy.py"
    done = subprocess.run([sys.executable, str(script), "--summary-only"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for words in ("in-sample", "held out", "profile", "GPU", "family", "quantization", "plan-safe band"):
        assert words in out


def test_cli_reports_the_profiles_uncertainty_and_the_plan_safe_figure(capsys):
    rc = cli_main(["model", "estimate", LLAMA_DIR, "--gpu", "T4", "--vllm-version", "0.8.5", "--max-model-len", "4096"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "(0.6)" in out  # 0.8 on a T4 runs the V0 engine
    assert "plan-safe KV tokens" in out and "uncertainty" in out and "profile 0.6" in out


def test_v0_weights_count_the_caching_allocators_segment_tails():
    """V0's "Loading model weights took" is torch.cuda.max_memory_allocated after load minus before
    (vllm/platforms/cuda.py get_current_memory_usage, 0.7.0). A tensor of 10 MiB or more gets its own
    segment rounded up to 2 MiB, and a tail of at most 1 MiB is not split off (PyTorch
    CUDACachingAllocator). vsl-019 (Qwen2-14B, TP 2: qkv 35, o 25, gate_up 135, down 67.5 MiB per rank)
    keeps 3.5 MiB a layer: 13.95 GiB printed, 13.81 predicted before, and its KV tokens were +1.4%."""
    from smartrun.memory import allocator_block_bytes

    mib = 1 << 20
    assert allocator_block_bytes(35 * mib) == 36 * mib  # 1 MiB tail: kept
    assert allocator_block_bytes(int(67.5 * mib)) == 68 * mib
    assert allocator_block_bytes(int(24.5 * mib)) == int(24.5 * mib)  # 1.5 MiB tail: split off
    assert allocator_block_bytes(32 * mib) == 32 * mib and allocator_block_bytes(5 * mib) == 5 * mib
    row = HELD_OUT["vsl-019"]
    assert row.w_pred == pytest.approx(row.w_real, abs=0.02)
    assert 100 * (row.tok_pred / row.tok_real - 1) <= 1.0
    v0 = [r for r in HELD_OUT.values() if r.profile == "0.6" and r.w_real and r.quant == "none"]
    assert len(v0) >= 9 and all(r.w_pred == pytest.approx(r.w_real, rel=0.01) for r in v0)


def test_no_reference_startup_over_predicts_kv_tokens_by_more_than_1pct():
    """Issue 18: every startup with printed KV tokens (the 0.19 sweep and the held-out ones)."""
    over = {
        r.id: 100 * (r.tok_pred / r.tok_real - 1)
        for r in ALL_ROWS
        if r.tok_real and r.tok_pred > 1.01 * r.tok_real
    }
    assert set(over) <= set(OPEN_CLASSES), over  # none open: pub-110 (0.11.0 on a T4) is -0.4% now


def test_cli_reads_estimator_flags_as_model_run_does(capsys):
    """The estimator's flags come from the knob catalogue: 32k, aliases and vLLM's synonyms as in `model run`."""
    rc = cli_main(["model", "estimate", LLAMA_DIR, "--gpu", "H100", "--gpus", "2", "-tp", "2", "--max-model-len", "32k",
                   "--dtype", "half", "--no-enable-prefix-caching", "--vllm-version", "0.19", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["max_model_len"] == 32000
    rc = cli_main(["model", "estimate", LLAMA_DIR, "--gpu", "H100", "--dtype", "float8"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("localaistack: --dtype: 'float8'") and err.count("\n") == 1


def test_qwen_vl_encoder_is_profiled_on_one_largest_image():
    """vLLM 0.9-0.10 profile Qwen2.5-VL's ViT on one 16384-token image (65536 patches): the fp32 pixel
    values and the larger of the attention block (13 H, its rotary runs in fp32) and the gated MLP
    (2 H + 3 I) over every patch (qwen2_5_vl.py, 0.9.2). Before this the estimate counted mnbt text
    embeddings only and over-predicted pub-108's KV cache by 79%. Its mrope cos/sin cache covers 4 x
    max_position_embeddings (MRotaryEmbedding)."""
    from smartrun.memory.activation import qwen_vl_encoder_peak_bytes, qwen_vl_profile_image

    vl = evidence.facts_for(CONFIGS["qwen/qwen2.5-vl-7b-instruct"], "Qwen/Qwen2.5-VL-7B-Instruct")
    assert qwen_vl_profile_image(vl) == (16384, 65536)
    assert qwen_vl_profile_image(LLAMA8) is None
    peak = qwen_vl_encoder_peak_bytes(vl, "bfloat16", 1, 65536)
    assert peak == 65536 * 3 * 2 * 14 * 14 * 4 + 65536 * 13 * 1280 * 2  # attention with the fp32 rotary
    row = HELD_OUT["pub-108"]
    assert -3 <= 100 * (row.tok_pred / row.tok_real - 1) <= 1 and row.tok_low <= row.tok_real
    assert row.w_pred == pytest.approx(row.w_real, rel=0.01)  # with the 4 x max_position mrope cache


def test_tp_without_nvlink_on_0_9_and_0_10_uses_the_printed_pcie_figure():
    """0.9-0.10 snapshot before NCCL init, and a PCIe group has no custom all-reduce or NVLS buffers:
    0.10.2 printed 0.21 GiB non-torch for 8 L40S at TP 8 (search-index file 38962983769). pub-109
    (2x L4, TP 2, 0.9.0.1; never used for the figure) was -21.6% with the NVLink-class 2.1 GiB term."""
    flags = EngineFlags(tensor_parallel_size=2, max_model_len=4096)
    assert estimate(LLAMA8, [GpuSpec.from_name("L4")] * 2, flags, "0.10.2").non_torch_gib == 0.21
    assert estimate(LLAMA8, [H100] * 2, flags, "0.10.2").non_torch_gib > 2  # NVLink: unmeasured, errs low
    row = HELD_OUT["pub-109"]
    assert -3 <= 100 * (row.tok_pred - row.tok_real) / row.tok_real <= 0


R1 = evidence.facts_for(CONFIGS["deepseek-ai/deepseek-r1"], "deepseek-ai/DeepSeek-R1")
H200 = GpuSpec.from_name("H200")
R1_FLAGS = EngineFlags(
    tensor_parallel_size=8, gpu_memory_utilization=0.85, max_model_len=128000, max_num_seqs=1024,
    max_num_batched_tokens=32000,
)


def test_v0_fp8_mla_requantizes_its_absorbed_matrices():
    """0.7.3 mla/utils.py: an fp8 checkpoint's W_Q_UK and W_UV_O are requantized to fp8 with block
    scales, W_QR stays in the model dtype and the dequantized kv_b_proj stays alive (W_UK/W_UV views).
    DeepSeek-R1 at TP 8 (pub-201) printed 83.88 GiB; 16-bit copies would make it 87.7."""
    assert HELD_OUT["pub-201"].w_pred == pytest.approx(83.88, rel=0.002)
    heads, q_in, r, h = 128 // 8, 1536, 512, 7168
    fp8 = (q_in * heads * r + heads * r * h) + heads * q_in * 64 * 2 + r * heads * 256 * 2
    v073 = estimate(R1, [H200] * 8, R1_FLAGS, "0.7.3").weights_gib
    v070 = estimate(R1, [H200] * 8, R1_FLAGS, "0.7.0").weights_gib  # no absorption before 0.7.1
    assert v073 - v070 == pytest.approx(61 * fp8 / GIB, abs=0.02)


def test_v0_moe_caches_are_per_call_and_a_layer_is_dense_or_moe():
    """V0 fused_experts_impl frees its caches on return, so the sampler phase does not hold them, and
    DeepSeek's dense layers and MoE layers peak apart: pub-017 printed 0.36 GiB activation (0.42 when
    the two MLPs were summed), pub-016 4.02 (5.86 summed; 4.50 now, 1.09 of it the offloaded layer's
    weights copied in for its forward). V1 keeps the fitted, summed form."""
    assert HELD_OUT["pub-017"].act_pred == pytest.approx(0.36, abs=0.01)
    assert 4.02 <= HELD_OUT["pub-016"].act_pred <= 4.02 + 0.5  # was 5.86
    mnbt = 40000
    moe_ws = mnbt * 6 * (3 * 1408 + 2048) * 2
    held = mnbt * 4 * 2048 * 2
    assert activation(DSV2, "bfloat16", 1, 256, mnbt, True, 36.8, per_call_moe=True) == moe_ws + held
    assert activation(DSV2, "bfloat16", 1, 256, mnbt, True, 36.8) == moe_ws + held + mnbt * 3 * 10944 * 2
    # an fp8 checkpoint's first MoE GEMM quantizes its input while the caches are held (R1, TP 8):
    r1_ws = 32000 * 8 * (3 * 256 + 7168) * 2 + 32000 * 7168 + 32000 * 56 * 4
    assert activation(R1, "bfloat16", 8, 1024, 32000, True, 36.8, per_call_moe=True) == r1_ws + 32000 * 4 * 7168 * 2


def test_cpu_offload_holds_the_largest_offloaded_layer_while_it_runs():
    """models/utils.py maybe_offload_to_cpu: functional_call over `v.to(device)` copies of the layer's
    state_dict, so one offloaded layer is on the GPU at a time (DeepSeek-V2-Lite: an MoE layer, 1.09 GiB)."""
    flags = EngineFlags(max_model_len=4096, enforce_eager=True)
    base = estimate(DSV2, [GpuSpec.from_name("L40S")], flags, "0.7.2").activation_gib
    off = estimate(DSV2, [GpuSpec.from_name("L40S")], flags.model_copy(update={"cpu_offload_gb": 30}), "0.7.2")
    assert off.activation_gib - base == pytest.approx(1.09, abs=0.02)
    small = estimate(DSV2, [GpuSpec.from_name("L40S")], flags.model_copy(update={"cpu_offload_gb": 0.5}), "0.7.2")
    assert small.activation_gib - base == pytest.approx(0.5, abs=0.01)  # never more than was offloaded


def test_v0_tp_on_hopper_nvswitch_counts_nvls_and_the_gather_roots_p2p_buffers():
    """V0 (baseline before NCCL init) on 8x H200: NVLS buffers per GPU of the group (vllm#9699: 4.91-5.00
    GiB at TP 8, the upper end) and, on rank 0, NCCL p2p receive buffers for the logits gather
    (7 peers x 16 channels x 9.19 MiB on Hopper). Not on two GPUs (NCCL: NVLS needs 3+), not on
    A100s (no NVLS; P2P read keeps SIMPLE on the sender), not on V1 (all_gather, no p2p)."""
    from smartrun import vllm_profiles
    from smartrun.memory.activation import v0_gather_root_bytes

    base = FITTED.non_torch_tp_base + FITTED.non_torch_tp_slope * 8
    root = 7 * 16 * (8 * 512 * 8 * 16 + 120 * 640 * 8 * 8 + (4 << 20))
    est = estimate(R1, [H200] * 8, R1_FLAGS, "0.7.3")
    assert est.non_torch_gib == pytest.approx(base + 5.0 + root / GIB, abs=0.01)
    assert v0_gather_root_bytes(8, "8.0") == 7 * 16 * (8 * 512 * 8 * 16 + 120 * 640 * 8 * 8)
    two = estimate(LLAMA8, [H200] * 2, EngineFlags(tensor_parallel_size=2, max_model_len=4096), "0.7.3")
    assert two.non_torch_gib == pytest.approx(FITTED.non_torch_tp_base + 2 * FITTED.non_torch_tp_slope
                                              + v0_gather_root_bytes(2, "9.0") / GIB, abs=0.01)
    a100 = GpuSpec.from_name("A100-SXM4-80GB")
    eight = EngineFlags(tensor_parallel_size=8, max_model_len=4096)
    assert not a100.nvls_capable and H200.nvls_capable and not GpuSpec.from_name("H100 PCIe").nvls_capable
    v1 = estimate(LLAMA8, [H200] * 8, eight, "0.19.0").non_torch_gib
    assert v1 < est.non_torch_gib - 5  # the V1 profiles do not take the V0 terms
    # 0.9-0.10 (snapshot before the pynccl communicator is created): that one communicator's NVLS
    # buffers, half the V0 figure, and no gather root (V1 all-gathers the logits)
    v10 = estimate(LLAMA8, [H200] * 8, eight, "0.10.1").non_torch_gib
    assert v10 == pytest.approx(v1 + 8 * vllm_profiles.NVLS_2_26_GIB_PER_RANK, abs=0.01)


def test_nvls_buffers_have_one_code_path_counted_per_communicator():
    """One size per NCCL communicator times the communicators a profile's budget counts beyond its base
    TP term: V0 both (snapshot before NCCL init; vllm#9699's V0 measurement, 5.00 GiB a GPU for two at
    TP 8), 0.9-0.10 pynccl's (the device group's is in the 0.19-fitted term, since 0.11+ create it during
    the profile too) at NCCL 2.26's own size (16 NVLS channels x 2 x 128 KiB x 8 steps a rank), 0.11+
    none; never on two GPUs (NCCL needs 3+ for NVLS)."""
    from smartrun import vllm_profiles
    from smartrun.memory.activation import nvls_bytes

    assert abs(vllm_profiles.NVLS_9699_GIB_PER_RANK * 2 * 8 - 5.0) < 1e-9
    assert vllm_profiles.NVLS_2_26_GIB_PER_RANK * (1 << 30) == 16 * 2 * (128 << 10) * 8  # 32 MiB a rank
    v0 = vllm_profiles.PROFILES["0.6"]
    assert v0.nvls_gib_per_rank_per_communicator == vllm_profiles.NVLS_9699_GIB_PER_RANK
    counted = {name: p.nvls_communicators for name, p in vllm_profiles.PROFILES.items()}
    assert counted == {"0.6": 2, "0.8": 0, "0.9": 1, "0.11": 0, "0.19": 0, "0.20": 0, "0.33": 0}
    sizes = {"0.7.3": vllm_profiles.NVLS_9699_GIB_PER_RANK, "0.10.0": vllm_profiles.NVLS_2_26_GIB_PER_RANK}
    for version, comms in (("0.7.3", 2), ("0.9.2", 1), ("0.10.0", 1), ("0.10.2", 1), ("0.11.0", 0), ("0.19.0", 0)):
        profile = vllm_profiles.resolve(version, "9.0")
        size = sizes.get(version, vllm_profiles.NVLS_2_26_GIB_PER_RANK)
        for tp in (2, 4, 8):
            want = comms * size * tp * GIB if tp > 2 else 0
            assert nvls_bytes(tp, profile, True) == int(want), (version, tp)
            assert nvls_bytes(tp, profile, False) == 0
    on = estimate(LLAMA8, [H200] * 4, EngineFlags(tensor_parallel_size=4, max_model_len=4096), "0.10.0")
    a100 = [GpuSpec.from_name("A100-SXM4-80GB")] * 4
    off = estimate(LLAMA8, a100, EngineFlags(tensor_parallel_size=4, max_model_len=4096), "0.10.0")
    assert on.non_torch_gib - off.non_torch_gib == pytest.approx(4 * vllm_profiles.NVLS_2_26_GIB_PER_RANK, abs=0.01)
    for cid in ("pub-114", "pub-201"):  # the two Hopper NVSwitch startups stay on the safe side, within -3%
        row = HELD_OUT[cid]
        assert -3 <= 100 * (row.tok_pred / row.tok_real - 1) <= 0 and row.tok_low <= row.tok_real, cid


def test_0_8_tp_without_p2p_stays_plan_safe_when_its_figure_is_held_out():
    """The 0.8 no-P2P TP figure is read from pub-014/015 (0.8.4's source predicts about the TP 1
    figure: no custom all-reduce buffer, NCCL's SHM FIFOs in host memory). Re-predicted with the
    figure the other one needs, each still has a plan-safe low end below what vLLM had."""
    rows = evidence.leave_one_out_rows(CONFIGS)
    assert set(rows) == {"pub-014", "pub-015"}
    for cid, row in rows.items():
        assert row.tok_low <= row.tok_real, cid
        assert abs(100 * (row.tok_pred / row.tok_real - 1)) <= 3, cid


def test_one_ada_gpu_grows_the_non_torch_memory_its_startups_printed():
    """Every single-GPU V1 startup on an L4 or L40S that printed its non-torch growth printed 0.02 GiB
    (pub-006, pub-101..107); the one 0.9-0.10 print on another GPU (an H100 at 0.10.2, outside the set)
    0.07, used for 0.9-0.10 on every other GPU; 0.11 keeps the fitted 0.26 there (pub-110's data-parallel
    communicator). The Ada startups without a breakdown agree (pub-108 0.9.0.1 L4, pub-111 0.11.0 L4)."""
    flags = EngineFlags(max_model_len=4096)
    l4, a100 = GpuSpec.from_name("L4"), GpuSpec.from_name("A100-SXM4-40GB")
    assert estimate(LLAMA8, [l4], flags, "0.10.2").non_torch_gib == 0.02
    assert estimate(LLAMA8, [l4], flags, "0.11.0").non_torch_gib == 0.02
    assert estimate(LLAMA8, [a100], flags, "0.10.2").non_torch_gib == 0.07
    assert estimate(LLAMA8, [a100], flags, "0.11.0").non_torch_gib > 0.25
    assert estimate(LLAMA8, [l4], flags, "0.19.0").non_torch_gib > 0.25  # no Ada print on 0.12+: errs low
    for cid in ("pub-108", "pub-111"):
        row = HELD_OUT[cid]
        assert -3 <= 100 * (row.tok_pred / row.tok_real - 1) <= 1, cid


def test_the_dummy_sampler_sorts_the_logits_until_0_17():
    """topk_topp_sampler.py: FlashInfer's sampler is used by default only in 0.8-0.11.0 when installed
    (0.11.0's wheel has it as an extra), opt-in from 0.11.1; the Triton top-k/top-p kernel came in
    0.17. So 0.8-0.16 sort the logits in the profile's dummy sampler unless FlashInfer's sampler runs."""
    from smartrun.vllm_profiles import NATIVE_TOPK_TOPP_BYTES, resolve

    versions = ("0.8.4", "0.10.1", "0.11.0", "0.11.2", "0.14.0", "0.16.0")
    assert {resolve(v, "9.0").native_topk_topp_bytes for v in versions} == {NATIVE_TOPK_TOPP_BYTES}
    by_default = {v: resolve(v, "9.0").flashinfer_sampler_by_default for v in versions}
    assert by_default == {"0.8.4": True, "0.10.1": True, "0.11.0": True, "0.11.2": False, "0.14.0": False,
                          "0.16.0": False}
    assert resolve("0.17.0", "9.0").native_topk_topp_bytes == resolve("0.19.0", "9.0").native_topk_topp_bytes == 0
    row = HELD_OUT["pub-115"]  # 0.11.2 on an H200, 1024 sequences: +2.6% without the sort
    assert -3 <= 100 * (row.tok_pred / row.tok_real - 1) <= 1 and row.tok_low <= row.tok_real


def test_the_native_sort_is_counted_as_torch_allocates_it():
    """The native top-k/top-p peaks inside logits.sort: fp32 logits 4 B + sorted values 4 + int64 indices 8
    + torch's segmented radix sort buffers 20 (int64 reverse indices, CUB's alternate key/value buffers)
    = 36 B a logit beyond the model-dtype logits, of which the fitted sampler holds 12.96. On Qwen3-8B's
    256 x 151936 dummy logits that is 0.84 GiB over the Triton/FlashInfer path; the same A100 40GB ran
    0.9.2 (native) and 0.19.1 (Triton kernel) 0.67 GiB apart, the rest the 0.19 sweep's larger non-torch."""
    from smartrun.vllm_profiles import NATIVE_TOPK_TOPP_BYTES

    assert NATIVE_TOPK_TOPP_BYTES + FITTED.sampler_extra_bytes == 4 + 4 + 8 + 8 + 12
    flags = EngineFlags(max_model_len=4096)
    a100 = [GpuSpec.from_name("A100-SXM4-40GB")]
    native = estimate(QWEN3_8B, a100, flags, "0.10.1").activation_gib
    flashinfer = estimate(QWEN3_8B, a100, flags.model_copy(update={"flashinfer_sampler": True}), "0.10.1")
    assert native - flashinfer.activation_gib == pytest.approx(256 * 151936 * NATIVE_TOPK_TOPP_BYTES / GIB, abs=0.01)
    from smartrun.vllm_profiles import native_topk_topp_bytes

    # fewer than 128 rows take torch's full-sort path (32 B of its own buffers), one row a plain sort
    assert native_topk_topp_bytes(256) == NATIVE_TOPK_TOPP_BYTES
    assert native_topk_topp_bytes(64) + FITTED.sampler_extra_bytes == 4 + 4 + 8 + 16 + 4 + 12
    assert native_topk_topp_bytes(1) + FITTED.sampler_extra_bytes == 4 + 4 + 8 + 4 + 2 + 4
    few = flags.model_copy(update={"max_num_seqs": 64, "max_num_batched_tokens": 256})
    extra = estimate(QWEN3_8B, a100, few, "0.10.1").activation_gib - estimate(
        QWEN3_8B, a100, few.model_copy(update={"flashinfer_sampler": True}), "0.10.1").activation_gib
    assert extra == pytest.approx(64 * 151936 * native_topk_topp_bytes(64) / GIB, abs=0.01)
    for cid in ("pub-001", "pub-005", "pub-110", "pub-112", "pub-114"):  # native, printed or the default
        row = HELD_OUT[cid]
        assert -1.5 <= 100 * (row.tok_pred / row.tok_real - 1) <= 0.5, cid


def test_flashinfer_sampler_skips_the_sort_where_the_install_uses_it(monkeypatch):
    """vLLM 0.8-0.11.0 sample with FlashInfer (no sort) whenever the flashinfer package is installed and
    VLLM_USE_FLASHINFER_SAMPLER is not 0; 0.11.1+ only with =1. Known (the log says it, or the installed
    vllm is the one estimated): no sort counted; unknown: counted (the safe side). Compiled 0.10.2+
    startups peaked as high as the sort with it (pub-105..107), so there it stays counted."""
    from importlib import metadata

    from smartrun.memory import types as memtypes
    from smartrun.vllm_profiles import resolve

    flags = EngineFlags(max_model_len=4096)
    a100 = [GpuSpec.from_name("A100-SXM4-80GB")]
    eager = flags.model_copy(update={"enforce_eager": True})
    unknown = estimate(QWEN3_8B, a100, flags, "0.10.1.1").activation_gib
    told = estimate(QWEN3_8B, a100, flags.model_copy(update={"flashinfer_sampler": True}), "0.10.1.1").activation_gib
    assert told < unknown - 0.5
    for version in ("0.10.2", "0.11.0"):  # compiled: the sort-sized peak stays; eager: gone
        on = flags.model_copy(update={"flashinfer_sampler": True})
        assert estimate(QWEN3_8B, a100, on, version).activation_gib == estimate(QWEN3_8B, a100, flags, version).activation_gib
        eager_on = eager.model_copy(update={"flashinfer_sampler": True})
        assert estimate(QWEN3_8B, a100, eager_on, version).activation_gib < estimate(QWEN3_8B, a100, eager, version).activation_gib - 0.5

    def fake_version(name: str) -> str:
        if name in ("vllm", "flashinfer-python"):
            return {"vllm": "0.10.1.1", "flashinfer-python": "0.2.11"}[name]
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", fake_version)
    monkeypatch.delenv("VLLM_USE_FLASHINFER_SAMPLER", raising=False)
    assert memtypes.installed_flashinfer_sampler(resolve("0.10.1.1", "8.0"))
    assert not memtypes.installed_flashinfer_sampler(resolve("0.10.1.1", "8.0"), {"VLLM_USE_FLASHINFER_SAMPLER": "0"})
    assert not memtypes.installed_flashinfer_sampler(resolve("0.11.2", "8.0"))  # opt-in from 0.11.1
    assert memtypes.installed_flashinfer_sampler(resolve("0.11.2", "8.0"), {"VLLM_USE_FLASHINFER_SAMPLER": "1"})
    detected = estimate(QWEN3_8B, a100, flags)  # the installed vllm, whose environment has flashinfer
    assert detected.activation_gib == pytest.approx(told) and detected.sampler == "FlashInfer's (no sort counted)"
    assert "not known" in estimate(QWEN3_8B, a100, flags, "0.10.1").sampler
    assert estimate(QWEN3_8B, a100, flags, "0.10.1").activation_gib == pytest.approx(unknown)  # another version
