"""How close smartrun's memory estimator comes to what vLLM really did at startup.

Runs smartrun.memory.estimate over every case of fixtures/reference/vllm_startup_logs.jsonl it can
(a config for the model in fixtures/reference/models.json or extra_configs.json, a known GPU, a
version) and prints, per case, predicted vs measured weights, KV GiB, KV tokens and max
concurrency, then a summary per subset. Side by side: the naive formula (params x dtype bytes x
1.2, the rest is KV), LocalAIStack's fixed max_model_len tiers, and llm-d-planner's published
errors (fixed reference figures). No model name or case id is special-cased.

    .venv/bin/python benchmarks/estimator_accuracy.py [--summary-only] [--json]
    .venv/bin/python benchmarks/estimator_accuracy.py --fit             # refit smartrun.memory.FITTED
    .venv/bin/python benchmarks/estimator_accuracy.py --cross-validate  # leave one model family out
    .venv/bin/python benchmarks/estimator_accuracy.py --sanity [--vllm-version V]  # models without logs
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from smartrun import memory, vllm_profiles
from smartrun.errors import SmartRunError
from smartrun.memory import GIB, Coefficients, EngineFlags, GpuSpec, estimate, fit, weights_per_rank
from smartrun.memory.fit import fit_coefficients
from smartrun.model import ModelFacts, facts_from_config

REPO = Path(__file__).resolve().parent.parent
REF = REPO / "fixtures" / "reference"
META_KEYS = {
    "model_id",
    "keys_absent_in_source",
    "total_params",
    "total_params_source",
    "safetensors_total_size_bytes",
    "safetensors_total_size_source",
    "source",
    "source_kind",
    "notes",
    "moe",
    "mla",
    "quantization_config_full",
}
# llm-d-planner capacity planner, its own vLLM 0.19.0 H100 sweep (published mean errors).
LLM_D_PUBLISHED = {
    "kv_cache_gib_mean_abs_pct": 6.6,
    "max_concurrency_mean_abs_pct": 15.0,
    "activation_mean_pct": 195.0,
}


def facts_for(config: dict[str, Any], name: str) -> ModelFacts:
    """ModelFacts from a reference config, with its side hf_quant_config.json (ModelOpt) when recorded."""
    side = config.get("hf_quant_config")
    return facts_from_config(config, name, hf_quant_config=side if isinstance(side, dict) else None)


def reference_configs() -> dict[str, dict[str, Any]]:
    """model id (lower case) -> config dict, from models.json and extra_configs.json."""
    configs: dict[str, dict[str, Any]] = {}
    for row in json.loads((REF / "models.json").read_text()):
        config = {k: v for k, v in row.items() if k not in META_KEYS and v is not None}
        for part in ("moe", "mla"):
            config.update(row.get(part) or {})
        if row.get("quantization_config_full"):
            config["quantization_config"] = row["quantization_config_full"]
        if row.get("text_config"):
            config["text_config"] = row["text_config"]
        configs[row["model_id"].lower()] = config
    extra = json.loads((REF / "extra_configs.json").read_text())
    pending = {k: v for k, v in extra.items() if not k.startswith("_")}
    while pending:  # bases may be other extra entries
        for key, entry in list(pending.items()):
            if "config" in entry:
                configs[key.lower()] = entry["config"]
            elif entry["base"].lower() in configs:
                config = json.loads(json.dumps(configs[entry["base"].lower()]))
                config.update(entry.get("override", {}))
                if "quantization_config" in entry:
                    config["quantization_config"] = entry["quantization_config"]
                configs[key.lower()] = config
            else:
                continue
            del pending[key]
    return configs


V0_WORDING = (
    "non_torch_memory takes",
    "reserved for KV Cache is",
    "CPU blocks:",
    "# CUDA blocks:",
    "Memory profiling results:",
    "Loading model weights took",
    "can be stored in KV cache",
)


# vLLM releases by date (PyPI upload dates), for cases that state a date but no version.
RELEASES = (
    ("2024-09-05", "0.6.0"), ("2024-11-15", "0.6.4"), ("2025-01-27", "0.7.0"), ("2025-03-18", "0.8.0"),
    ("2025-04-28", "0.8.5"), ("2025-05-15", "0.9.0"), ("2025-07-24", "0.10.0"), ("2025-10-02", "0.11.0"),
)


def inferred_version(case: dict[str, Any]) -> str:
    """For a case whose version is not stated: the printed version, else the release current at the
    post's date (V0 wording keeps it on the V0 profile), else V0 (0.6) or 0.19 by the log's wording.
    These cases land in the "other" subset."""
    from smartrun.vllm_log import parse_startup

    lines = case.get("log_lines") or []
    printed = parse_startup(lines).version
    if printed and printed[:1].isdigit():
        return printed
    v0 = any(w in line for line in lines for w in V0_WORDING)
    dated = [version for day, version in RELEASES if case.get("date") and day <= case["date"]]
    if dated:
        return "0.7.3" if v0 and dated[-1] >= "0.8" else dated[-1]
    return "0.6.0" if v0 else "0.19.0"


def case_flags(case: dict[str, Any]) -> EngineFlags:
    util = case.get("gpu_memory_utilization")
    quant = case.get("quantization")
    dtype = (case.get("dtype") or "auto").replace("torch.", "")
    return EngineFlags(
        tensor_parallel_size=case.get("tensor_parallel_size") or 1,
        pipeline_parallel_size=case.get("pipeline_parallel_size") or 1,
        gpu_memory_utilization=util if isinstance(util, (int, float)) else None,
        max_model_len=case.get("max_model_len"),
        max_num_seqs=case.get("max_num_seqs"),
        max_num_batched_tokens=case.get("max_num_batched_tokens"),
        dtype=dtype,
        kv_cache_dtype=case.get("kv_cache_dtype") or "auto",
        enforce_eager=bool(case.get("enforce_eager")),
        quantization="fp8" if quant == "fp8" else None,
        cpu_offload_gb=case.get("cpu_offload_gb") or 0.0,
    )


def case_gpus(case: dict[str, Any]) -> list[GpuSpec]:
    spec = GpuSpec.from_name(case["gpu"])
    if case.get("nvlink") is not None:  # the log says (e.g. custom all-reduce off: no P2P)
        spec = spec.model_copy(update={"nvlink": case["nvlink"]})
    count = max(
        case.get("gpu_count") or 1,
        (case.get("tensor_parallel_size") or 1) * (case.get("pipeline_parallel_size") or 1),
    )
    return [spec] * count


def pct(pred: float, real: float | None) -> float | None:
    return None if not real else 100.0 * (pred - real) / real


def naive(
    facts: ModelFacts, gpus: list[GpuSpec], flags: EngineFlags, util: float, dtype_bytes: int
) -> tuple[float, int]:
    """params x dtype x 1.2 split over the GPUs; what is left of util x NVML total is KV."""
    params = sum(w.bytes for w in weights_per_rank(facts, "bfloat16", 1, 1)) / 2
    n = flags.tensor_parallel_size * flags.pipeline_parallel_size
    per_gpu = params * dtype_bytes * 1.2 / n
    kv = gpus[0].memory_total_mib * 2**20 * util - per_gpu
    from smartrun.memory import kv_bytes_per_token_layer

    page = kv_bytes_per_token_layer(
        facts, 1 if "fp8" in flags.kv_cache_dtype else dtype_bytes, flags.tensor_parallel_size
    )
    per_token = page * facts.num_hidden_layers / flags.pipeline_parallel_size
    return kv / GIB, int(max(0, kv) / per_token)


def localaistack_tier(gpu_name: str) -> int:
    """Our reading of LocalAIStack: memory from the GPU name, fixed max_model_len tiers."""
    import re

    match = re.search(r"(\d+)\s*GB", gpu_name, re.I)
    mem = int(match.group(1)) if match else 0
    return 32768 if mem >= 80 else 16384 if mem >= 40 else 8192 if mem >= 24 else 4096


def run_case(
    case: dict[str, Any], configs: dict[str, dict[str, Any]], coeffs: Coefficients = memory.FITTED
) -> dict[str, Any] | str:
    model_id = (case.get("model") or "").split(" ")[0].lower()
    config = configs.get(model_id)
    if config is None:
        return "no config for the model"
    if case.get("quantization_config"):  # the checkpoint's own quantization (e.g. a bnb re-upload)
        config = {**config, "quantization_config": case["quantization_config"]}
    if not case.get("gpu"):
        return "GPU not named"
    if case.get("gpu_memory_utilization") is None:
        return "utilization not shown (vLLM's default not assumed)"
    stated = str(case.get("vllm_version") or "")
    version = stated.split()[0] if stated[:1].isdigit() else inferred_version(case)
    try:
        facts = facts_for(config, case["model"])
        gpus = case_gpus(case)
        flags = case_flags(case)
        est = estimate(facts, gpus, flags, version, coeffs)
    except SmartRunError as err:
        return f"not estimable: {err.message}"
    util = flags.gpu_memory_utilization or vllm_profiles.PROFILES[est.profile].default_util
    dtype_bytes = 4 if "float32" in (case.get("dtype") or "") else 2
    naive_kv, naive_tokens = naive(facts, gpus, flags, util, dtype_bytes)
    real_tokens = case.get("kv_cache_tokens")
    # one request at full length must fit: the measured KV tokens bound the largest max_model_len
    true_fit = min(facts.derived_max_model_len, real_tokens) if real_tokens else None
    tier = localaistack_tier(case.get("gpu") or "")
    return {
        "id": case["id"],
        "model": case["model"],
        "version": stated or f"not stated ({version} assumed)",
        "subset": (
            "0.19.0 H100"
            if stated == "0.19.0" and "H100" in (case.get("gpu") or "")
            else "public" if case["id"].startswith("pub-") else "other"
        ),
        "family": memory.family(facts),
        "gpu_class": gpus[0].name,
        "quant": facts.quantization.method if facts.quantization else (flags.quantization or "none"),
        "tp": flags.tensor_parallel_size,
        "pp": flags.pipeline_parallel_size,
        "w_pred": est.weights_gib,
        "w_real": case.get("weights_gib"),
        "act_pred": logged_stage_activation(facts, flags, est, gpus, coeffs),
        "act_real": case.get("activation_peak_gib"),
        "kv_pred": est.kv_cache_gib,
        "kv_real": case.get("kv_cache_gib"),
        "tok_pred": est.kv_cache_tokens,
        "tok_low": memory.plan_safe_kv_tokens(est),
        "nonkv_pred": est.requested_gib - est.kv_cache_gib,
        "profile": est.profile,
        "tok_real": real_tokens,
        "cg_pred": est.cudagraph_gib,
        "cg_real": (case.get("extra_printed") or {}).get("cuda_graph_gib"),
        "blocks_pred": est.num_gpu_blocks,
        "blocks_real": case.get("num_gpu_blocks"),
        "conc_pred": est.max_concurrency,
        "conc_real": case.get("max_concurrency"),
        "naive_kv": naive_kv,
        "naive_tok": naive_tokens,
        "tier_len": tier,
        "true_fit_len": true_fit,
        "log_disagreements": log_cross_check(case),
        "fits_pred": est.fits,
        "fits_real": case.get("startup_succeeded"),
    }


def logged_stage_activation(
    facts: ModelFacts, flags: EngineFlags, est: Any, gpus: list[GpuSpec], coeffs: Coefficients
) -> float:
    """The activation of the stage whose log line was recorded: the estimate's (tightest) one, or
    with PP the first stage's (rank 0 prints; it runs no sampler)."""
    if flags.pipeline_parallel_size == 1:
        return est.activation_gib
    dtype = memory.dtype_name(flags.dtype, facts, gpus[0].compute_capability)
    first = memory.activation_bytes(
        facts,
        dtype,
        flags.tensor_parallel_size,
        est.max_num_seqs,
        est.max_num_batched_tokens,
        last=False,
        sampler_extra=coeffs.sampler_extra_bytes,
        pp=flags.pipeline_parallel_size,
        pp_buffers=coeffs.pp_hidden_buffers,
    )
    return round(first / GIB, 2)


def log_cross_check(case: dict[str, Any]) -> int:
    """Figures where smartrun.vllm_log.parse_startup reads the log lines differently from the JSONL fields."""
    from smartrun.vllm_log import parse_startup

    parsed = parse_startup(case.get("log_lines") or [])
    pairs = (
        ("weights_gib", "weights_gib"),
        ("available_kv_cache_gib", "kv_cache_gib"),
        ("kv_cache_tokens", "kv_cache_tokens"),
        ("max_concurrency", "max_concurrency"),
    )
    return sum(
        1
        for ours, theirs in pairs
        if getattr(parsed, ours) is not None
        and case.get(theirs) is not None
        and getattr(parsed, ours) != case[theirs]
    )


def summary(rows: list[dict[str, Any]], pred: str, real: str) -> tuple[str, str, str, int]:
    errs = [pct(r[pred], r[real]) for r in rows if r.get(real)]
    errs = [e for e in errs if e is not None]
    if not errs:
        return "-", "-", "-", 0
    med = statistics.median(abs(e) for e in errs)
    mean = statistics.mean(abs(e) for e in errs)
    worst_over = max(errs)
    return f"{med:.2f}%", f"{mean:.2f}%", f"{worst_over:+.2f}%", len(errs)


def fmt(value: Any, spec: str = "") -> str:
    if value is None:
        return "-"
    return format(value, spec) if spec else str(value)


# ---------------------------------------------------------------------------------------------
# Fitting smartrun.memory's coefficients, and leave-one-family-out cross-validation

FIT_SUBSET = "0.19.0 H100"


PUBLIC = REPO / "fixtures" / "startups" / "public.jsonl"


def load_cases() -> list[dict[str, Any]]:
    return [json.loads(line) for line in (REF / "vllm_startup_logs.jsonl").read_text().splitlines()]


def load_public() -> list[dict[str, Any]]:
    """Real startups beyond the 0.19 sweep, gathered from public logs (fixtures/startups/public.jsonl):
    each with its source, quoted lines and the settings that were inferred. Never fitted on."""
    return [json.loads(line) for line in PUBLIC.read_text().splitlines() if line.strip()]


def grouped_errors(rows: list[dict[str, Any]], key: str) -> list[tuple[str, int, str, str, int]]:
    """(group, n, median |KV-token error|, worst over-prediction, cases over by > 1%) per value of `key`."""
    out = []
    for value in sorted({str(r[key]) for r in rows}):
        errs = [pct(r["tok_pred"], r["tok_real"]) for r in rows if str(r[key]) == value and r.get("tok_real")]
        errs = [e for e in errs if e is not None]
        if not errs:
            continue
        med = statistics.median(abs(e) for e in errs)
        out.append((value, len(errs), f"{med:.2f}%", f"{max(errs):+.2f}%", sum(1 for e in errs if e > 1)))
    return out


def print_grouped(rows: list[dict[str, Any]], title: str) -> None:
    print(f"\n{title}: KV-token error (median |err|; worst over; over >1%; n)")
    for key, label in (("profile", "profile"), ("gpu_class", "GPU"), ("family", "family"), ("quant", "quantization")):
        for value, n, med, worst, over in grouped_errors(rows, key):
            print(f"  {label:12} {value:28} median {med:>7}  worst over {worst:>8}  over>1%: {over}  n={n}")


def leave_one_out_errors(configs: dict[str, dict[str, Any]]) -> dict[str, float]:
    """KV-token error of each public startup a profile figure was read from, re-predicted with the
    figure the other startups need (the larger need, as shipped): the held-out error for those."""
    return {k: pct(row["tok_pred"], row["tok_real"]) for k, row in leave_one_out_rows(configs).items()}


def leave_one_out_rows(configs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The benchmark rows of those startups re-predicted leave-one-out (plan-safe low end included)."""
    from smartrun import vllm_profiles

    cases = {c["id"]: c for c in load_public()}
    out: dict[str, dict[str, Any]] = {}
    for name, profile in list(vllm_profiles.PROFILES.items()):
        fitted = [cases[i] for i in profile.no_nvlink_fitted_on if i in cases]
        if len(fitted) < 2:
            continue
        needs = {}
        for case in fitted:  # the figure that would make this startup exact
            facts = facts_for(configs[case["model"].lower()], case["model"])
            est = estimate(facts, case_gpus(case), case_flags(case), case["vllm_version"])
            real_kv = case["kv_cache_tokens"] * est.kv_bytes_per_token / GIB
            needs[case["id"]] = profile.non_torch_tp_no_nvlink_gib - (real_kv - est.kv_cache_gib)
        try:
            for case in fitted:
                figure = round(max(v for k, v in needs.items() if k != case["id"]), 2)
                vllm_profiles.PROFILES[name] = profile.model_copy(update={"non_torch_tp_no_nvlink_gib": figure})
                row = run_case(case, configs)
                assert not isinstance(row, str)
                out[case["id"]] = row
        finally:
            vllm_profiles.PROFILES[name] = profile
    return out


def done_when(rows: list[dict[str, Any]], loo: dict[str, float] | None = None) -> dict[str, Any]:
    """The issue's acceptance figures over the held-out startups with KV tokens: n, median |error|,
    cases over by > 1% and > 5%, the GPU classes and vLLM versions they span. Startups a profile
    figure was read from count with their leave-one-out error (`loo`)."""
    loo = loo or {}
    held = [r for r in rows if r["subset"] != FIT_SUBSET and r.get("tok_real")]
    errs = [loo.get(r["id"], pct(r["tok_pred"], r["tok_real"])) for r in held]
    return {
        "leave_one_out": {k: round(v, 2) for k, v in loo.items()},
        "n": len(errs),
        "median_abs_pct": statistics.median(abs(e) for e in errs) if errs else None,
        "over_1pct": sum(1 for e in errs if e > 1),
        "over_5pct": sum(1 for e in errs if e > 5),
        "worst_over_pct": max(errs) if errs else None,
        "gpu_classes": sorted({r["gpu_class"] for r in held}),
        "versions": sorted({r["version"] for r in held}),
    }


def fit_samples(cases: list[dict[str, Any]], configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The physical features (smartrun.memory.fit) and measured figures of every 0.19.0 H100 case, for the fit."""
    samples = []
    for case in cases:
        row = run_case(case, configs)
        if isinstance(row, str) or row["subset"] != FIT_SUBSET:
            continue
        facts = facts_for(configs[case["model"].split(" ")[0].lower()], case["model"])
        flags, gpus = case_flags(case), case_gpus(case)
        samples.append({
            "id": case["id"],
            "family": row["family"],
            **fit.features(facts, flags, gpus),
            "act": case.get("activation_peak_gib"),
            "non_torch": case.get("non_torch_gib"),
            "graph": row["cg_real"] if not flags.enforce_eager else None,
            "w_real": case.get("weights_gib"),
        })
    return samples


def over_gib(row: dict[str, Any]) -> float | None:
    """How much more KV the estimate promised than vLLM had, in GiB per GPU (negative: under).

    The engine-wide token count is the truth when printed (a quoted KV GiB may be another rank's:
    with V0 TP only rank 0 runs the sampler, and the blocks are the minimum over ranks)."""
    if row.get("tok_real") and row["tok_pred"]:
        return (row["tok_pred"] - row["tok_real"]) / row["tok_pred"] * row["kv_pred"]
    if row.get("kv_real") is not None:
        return row["kv_pred"] - row["kv_real"]
    return None


def profile_bands(rows: list[dict[str, Any]]) -> dict[str, tuple[float, int]]:
    """Per profile: (band, n). The band is the largest KV over-prediction seen, widened by
    (1 + 2/sqrt(n)) for the few-sample case, as a fraction of the predicted non-KV memory; 0 when
    never over, or when the widened over-prediction is within the profile's floor in GiB (the plan
    keeps back max(band x non-KV, floor): Profile.margin_bytes)."""
    bands: dict[str, tuple[float, int]] = {}
    for name in sorted({r["profile"] for r in rows}):
        part = [(over_gib(r), r["nonkv_pred"]) for r in rows if r["profile"] == name]
        part = [(o, n) for o, n in part if o is not None and n > 0]
        if not part:
            continue
        widen = 1 + 2 / len(part) ** 0.5
        floor = vllm_profiles.PROFILES[name].margin_floor_gib
        worst = max(0.0, *(o * widen / n for o, n in part if o * widen > floor), 0.0)
        bands[name] = (worst, len(part))
    return bands


CV_METRICS = (
    ("activation GiB", "act_pred", "act_real"),
    ("KV cache tokens", "tok_pred", "tok_real"),
    ("max concurrency", "conc_pred", "conc_real"),
    ("CUDA graph GiB", "cg_pred", "cg_real"),
)


def cross_validate(cases: list[dict[str, Any]], configs: dict[str, dict[str, Any]]) -> None:
    """Leave one model family out: refit without it, predict it; in-sample figures beside."""
    samples = fit_samples(cases, configs)
    by_id = {c["id"]: c for c in cases}
    full = fit_coefficients(samples)
    print(f"full-data fit:    {full!r}")
    print(f"shipped (FITTED): {memory.FITTED!r}\n")
    head = f"{'left out':14} {'n':>2} {'sampler B':>9} | " + " | ".join(
        f"{label[:14]:>14} in/out (worst+)" for label, _, _ in CV_METRICS
    )
    print(head)
    print("-" * len(head))
    loo_rows, in_rows = [], []
    for family in sorted({s["family"] for s in samples}):
        coeffs = fit_coefficients([s for s in samples if s["family"] != family])
        ids = [s["id"] for s in samples if s["family"] == family]
        out = [run_case(by_id[i], configs, coeffs) for i in ids]
        ins = [run_case(by_id[i], configs, full) for i in ids]
        loo_rows += out
        in_rows += ins
        cells = []
        for _, pred, real in CV_METRICS:
            med_in, _, _, n = summary(ins, pred, real)
            med_out, _, worst_out, _ = summary(out, pred, real)
            cells.append(f"{med_in:>7}/{med_out:>7} ({worst_out:>7})" if n else f"{'-':>30}")
        print(f"{family:14} {len(ids):>2} {coeffs.sampler_extra_bytes:9.2f} | " + " | ".join(f"{c:>30}" for c in cells))
    print("\nall families (abs error median / mean; worst over-prediction; n)")
    for label, pred, real in (("weights GiB", "w_pred", "w_real"), *CV_METRICS, ("KV cache GiB", "kv_pred", "kv_real")):
        med, mean, worst, n = summary(in_rows, pred, real)
        omed, omean, oworst, _ = summary(loo_rows, pred, real)
        print(f"  {label:18} in-sample {med} / {mean}; {worst}   out-of-family {omed} / {omean}; {oworst}   n={n}")
    signed = [pct(r["tok_pred"], r["tok_real"]) for r in loo_rows if r["tok_real"]]
    over = [e for e in signed if e is not None and e > 0]
    under = [e for e in signed if e is not None and e < 0]
    print(
        f"  KV tokens out-of-family, by sign: {len(over)} over (largest {max(over, default=0):+.2f}%), "
        f"{len(under)} under (largest {min(under, default=0):+.2f}%)"
    )


# ---------------------------------------------------------------------------------------------
# Sanity on models without logs

SANITY_GPUS = ("H100-SXM-80GB", "A100-SXM4-40GB")


def sanity_models(configs: dict[str, dict[str, Any]]) -> list[ModelFacts]:
    """Every fixtures/models/* directory (inspected) and every reference config (config.json alone)."""
    from smartrun.model import inspect

    models = [inspect(str(d)) for d in sorted((REPO / "fixtures" / "models").iterdir()) if d.is_dir()]
    return models + [facts_for(cfg, name) for name, cfg in sorted(configs.items())]


def implausible(est: Any, facts: ModelFacts, tp: int) -> list[str]:
    """What about one estimate looks wrong on its face.

    The sampler phase (min(seqs, mnbt) rows x vocab) may exceed a small model's weights (that is
    what vLLM measures), so "activation > weights" is only flagged for the forward phase.
    """
    flags = []
    for field in ("weights_gib", "activation_gib", "non_torch_gib", "kv_cache_gib"):
        if getattr(est, field) < 0:
            flags.append(f"negative {field}")
    if est.activation_gib <= 0:
        flags.append("zero activation")
    dtype = memory.dtype_name("auto", facts, "9.0")
    seqs, mnbt = est.max_num_seqs, est.max_num_batched_tokens
    (_, forward), _ = memory.activation_terms(facts, dtype, tp, seqs, mnbt, last=True)
    if forward / GIB > est.weights_gib:
        flags.append("forward activation > weights")
    if facts.moe is not None:
        dense = facts.model_copy(update={"moe": None})
        if forward <= memory.activation_terms(dense, dtype, tp, seqs, mnbt, last=True)[0][1]:
            flags.append("MoE activation ignores the experts")
    if est.fits and est.kv_cache_tokens <= 0:
        flags.append("fits with no KV tokens")
    return flags


def sanity(configs: dict[str, dict[str, Any]], version: str) -> int:
    """Estimate every model at tp 1/2/4 on H100 80GB and A100 40GB; flag implausible values."""
    models = sanity_models(configs)
    print(f"vLLM {version}, default flags (max_model_len = the model's, util and batch defaults)")
    head = (
        f"{'model':46} {'gpu':15} {'tp':>2} | {'W/rank':>6} {'act':>5} {'KV GiB':>7} {'KV tokens':>10} "
        f"{'seqs':>5} {'mnbt':>5} {'fits':>4} | flags"
    )
    print(head)
    print("-" * len(head))
    problems, by_setup = 0, {}
    for facts in models:
        for gpu_name in SANITY_GPUS:
            for tp in (1, 2, 4):
                gpus = [GpuSpec.from_name(gpu_name)] * tp
                try:
                    est = estimate(facts, gpus, EngineFlags(tensor_parallel_size=tp), version)
                except SmartRunError as err:
                    print(f"{facts.name[:46]:46} {gpu_name:15} {tp:>2} | not estimable: {err.message[:70]}")
                    continue
                flags = implausible(est, facts, tp)
                problems += bool(flags)
                by_setup.setdefault((gpu_name, tp, memory.family(facts)), []).append((facts.name, est))
                print(
                    f"{facts.name[:46]:46} {gpu_name:15} {tp:>2} | {est.weights_gib:6.2f} {est.activation_gib:5.2f} "
                    f"{est.kv_cache_gib:7.2f} {est.kv_cache_tokens:>10} {est.max_num_seqs:>5} "
                    f"{est.max_num_batched_tokens:>5} {'yes' if est.fits else 'no':>4} | {', '.join(flags)}"
                )
    order = 0
    for (gpu_name, tp, family), rows in sorted(by_setup.items()):
        rows.sort(key=lambda r: r[1].weights_gib)
        for (small, a), (big, b) in itertools.pairwise(rows):
            if b.weights_gib > a.weights_gib + 0.5 and b.kv_cache_gib > a.kv_cache_gib + 0.05:
                order += 1
                print(f"  KV not decreasing with size ({family}, {gpu_name}, tp{tp}): {small} -> {big}")
    print(f"\n{problems} estimates flagged; {order} family size-order inversions")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--summary-only", action="store_true")
    parser.add_argument("--fit", action="store_true", help="refit smartrun.memory.FITTED on the 0.19 H100 cases")
    parser.add_argument(
        "--cross-validate", action="store_true", help="refit without each model family and predict it"
    )
    parser.add_argument("--sanity", action="store_true", help="estimate every fixture/reference model, flag oddities")
    parser.add_argument("--vllm-version", default="0.19.0", help="version for --sanity (default 0.19.0)")
    args = parser.parse_args(argv)
    configs = reference_configs()
    if args.sanity:
        return sanity(configs, args.vllm_version)
    if args.fit:
        print(repr(fit_coefficients(fit_samples(load_cases(), configs))))
        return 0
    if args.cross_validate:
        cross_validate(load_cases(), configs)
        return 0
    rows, skipped = [], []
    for case in load_cases() + load_public():
        result = run_case(case, configs)
        if isinstance(result, str):
            skipped.append((case["id"], case.get("model"), result))
        else:
            rows.append(result)
    if args.json:
        print(json.dumps({"rows": rows, "skipped": skipped}, indent=1))
        return 0
    if not args.summary_only:
        head = f"{'id':8} {'model':52} {'tp':>2} {'pp':>2} | {'W pred':>6} {'W real':>6} {'err':>6} | {'KV pred':>7} {'KV real':>7} {'err':>6} | {'tok pred':>9} {'tok real':>9} {'err':>6} | {'conc p':>7} {'conc r':>7} {'err':>6}"
        print(head)
        print("-" * len(head))
        for r in rows:
            print(
                f"{r['id']:8} {r['model'][:52]:52} {r['tp']:>2} {r['pp']:>2} | "
                f"{r['w_pred']:6.2f} {fmt(r['w_real'], '6.2f'):>6} {fmt(pct(r['w_pred'], r['w_real']), '+6.1f'):>6} | "
                f"{r['kv_pred']:7.2f} {fmt(r['kv_real'], '7.2f'):>7} {fmt(pct(r['kv_pred'], r['kv_real']), '+6.1f'):>6} | "
                f"{r['tok_pred']:9d} {fmt(r['tok_real'], '9d'):>9} {fmt(pct(r['tok_pred'], r['tok_real']), '+6.1f'):>6} | "
                f"{r['conc_pred']:7.2f} {fmt(r['conc_real'], '7.2f'):>7} {fmt(pct(r['conc_pred'], r['conc_real']), '+6.1f'):>6}"
            )
        print(f"\nskipped {len(skipped)} cases:")
        for sid, model, why in skipped:
            print(f"  {sid} {str(model)[:50]}: {why}")
    print("\nSummary (abs error: median / mean; worst over-prediction; n)")
    print(f"{'subset':12} {'metric':24} {'smartrun':>36} {'naive x1.2':>36}")
    for subset in ("0.19.0 H100", "public", "other"):
        part = [r for r in rows if r["subset"] == subset]
        for label, pred, real, naive_key in (
            ("weights GiB", "w_pred", "w_real", None),
            ("activation GiB", "act_pred", "act_real", None),
            ("KV cache GiB", "kv_pred", "kv_real", "naive_kv"),
            ("KV cache tokens", "tok_pred", "tok_real", "naive_tok"),
            ("max concurrency", "conc_pred", "conc_real", None),
            ("GPU blocks", "blocks_pred", "blocks_real", None),
            ("CUDA graph GiB (0.19 actual)", "cg_pred", "cg_real", None),
        ):
            med, mean, worst, n = summary(part, pred, real)
            ours = f"{med} / {mean}; {worst}; n={n}"
            theirs = "-"
            if naive_key:
                nmed, nmean, nworst, nn = summary(part, naive_key, real)
                theirs = f"{nmed} / {nmean}; {nworst}; n={nn}"
            print(f"{subset:12} {label:24} {ours:>36} {theirs:>36}")
    print_grouped([r for r in rows if r["subset"] == "0.19.0 H100"], "in-sample (the 0.19 H100 sweep the terms are fitted on)")
    print_grouped(
        [r for r in rows if r["subset"] != "0.19.0 H100"],
        "held out (public startups + other shared cases; pub-014/015 are in-sample for the 0.8 no-NVLink TP figure, "
        "pub-006/101-107 printed the 0.9-0.11 one-Ada-GPU non-torch figure (all 0.02 GiB: leave-one-out is the same))",
    )
    done = done_when(rows, leave_one_out_errors(configs))
    print(
        f"\nissue 21 'Done when' (held out, KV tokens; leave-one-out for {', '.join(done['leave_one_out']) or 'none'}, "
        f"the startups a figure was read from: {done['leave_one_out']}): "
        f"n={done['n']}, median |err| {done['median_abs_pct']:.2f}% (target <= 3%), "
        f"over by >1%: {done['over_1pct']} (target <= n/20 = {done['n'] / 20:.2f}), over by >5%: {done['over_5pct']} (target 0), "
        f"worst over {done['worst_over_pct']:+.2f}%; {len(done['gpu_classes'])} GPU classes (target >= 6): "
        f"{', '.join(done['gpu_classes'])}; versions: {', '.join(done['versions'])}"
    )
    bands = profile_bands(rows)
    print("\nper-profile plan-safe band (shipped vs what the startups need), evidence:")
    for name, profile in vllm_profiles.PROFILES.items():
        need, n = bands.get(name, (0.0, 0))
        print(
            f"  {name:5} vLLM {profile.versions[:60]:60} band {profile.margin:6.1%} (floor {profile.margin_floor_gib} GiB)"
            f"  needed {need:6.1%}  startups {n:3}  source read: {', '.join(profile.checked_in) or '-'}"
        )
    print(
        "\nllm-d-planner (published, its own vLLM 0.19.0 H100 sweep): KV-cache memory "
        f"{LLM_D_PUBLISHED['kv_cache_gib_mean_abs_pct']}% mean error, max concurrency "
        f"{LLM_D_PUBLISHED['max_concurrency_mean_abs_pct']}%, activation +{LLM_D_PUBLISHED['activation_mean_pct']:.0f}%"
    )
    print(
        f"\nlog cross-check (smartrun.vllm_log.parse_startup on log_lines vs the JSONL fields): "
        f"{sum(r['log_disagreements'] for r in rows)} figures disagree over {len(rows)} cases"
    )
    tiers = [r for r in rows if r["tok_real"]]
    print("\nLocalAIStack fixed tiers (our reading: memory from the GPU name; >=80GB 32768, >=40GB 16384,")
    print(">=24GB 8192, else 4096) vs the largest max_model_len the measured KV tokens really hold:")
    too_big = sum(1 for r in tiers if r["tier_len"] > r["true_fit_len"])
    wasted = [r["true_fit_len"] / r["tier_len"] for r in tiers if r["tier_len"] <= r["true_fit_len"]]
    ours_bad = sum(1 for r in tiers if r["tok_pred"] > r["tok_real"] * 1.05)
    print(
        f"  cases {len(tiers)}: tier too large (would not start) {too_big}; "
        f"where it starts, the real fit is a median {statistics.median(wasted) if wasted else 0:.1f}x the tier"
    )
    print(
        f"  smartrun KV tokens over the measured tokens by >5% (a plan that would not start): {ours_bad} cases"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
