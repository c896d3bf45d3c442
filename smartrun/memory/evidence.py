"""The estimator against what vLLM really did at startup: the reference startups as typed cases.

Reads the repo's evidence (fixtures/reference: models.json and extra_configs.json for the configs,
vllm_startup_logs.jsonl with the 0.19 H100 sweep the coefficients are fitted on; fixtures/startups/
public.jsonl for the public startups, never fitted on), turns a case into the flags and GPUs it implies,
runs the estimator on it into a typed EstimateRow (beside the naive formula and LocalAIStack's fixed tiers) and derives the
figures a tolerance is judged on: fit samples, leave-one-out rows, plan-safe bands, the issue's
acceptance figures. The tests and benchmarks/estimator_accuracy.py (which only prints) share it, so the
startup records have one reader. Not imported by the CLI.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from smartrun import vllm_profiles
from smartrun.errors import SmartRunError
from smartrun.memory import fit
from smartrun.memory.activation import FITTED, Coefficients, activation_bytes, activation_terms
from smartrun.memory.budget import estimate, plan_safe_kv_tokens
from smartrun.memory.kv import kv_bytes_per_token_layer
from smartrun.memory.types import GIB, EngineFlags, GpuSpec, MemoryEstimate
from smartrun.memory.weights import dtype_name, family, weights_per_rank
from smartrun.model import ModelFacts, facts_from_config, inspect
from smartrun.vllm_log import parse_startup

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
REF = FIXTURES / "reference"
PUBLIC = FIXTURES / "startups" / "public.jsonl"
FIT_SUBSET = "0.19.0 H100"
# models.json fields that describe the row, not the model's config.json
# Keys of a models.json entry that are not config.json keys (provenance, copies, wrappers); so is any `*_source`.
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
    "text_config_defaults_from_transformers",
    "hf_quant_config",
}


class StartupCase(BaseModel):
    """One real vLLM startup: where it was seen, the settings it ran with, what its log printed.

    A figure the log did not print is None. Fields no code reads (reporter, notes, launch_command...)
    are kept as extras."""

    model_config = ConfigDict(extra="allow", frozen=True)

    id: str
    source: str = ""
    model: str = ""
    date: str | None = None
    vllm_version: str | None = None
    quantization: str | None = None
    quantization_config: dict[str, Any] | None = None
    dtype: str | None = None
    kv_cache_dtype: str | None = None
    gpu: str | None = None
    gpu_count: int | None = None
    total_gpu_memory_gib: float | None = None
    nvlink: bool | None = None
    tensor_parallel_size: int | None = None
    pipeline_parallel_size: int | None = None
    gpu_memory_utilization: float | str | None = None  # a string where the log names no figure
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool | None = None
    cpu_offload_gb: float | None = None
    sampler: str | None = None
    weights_gib: float | None = None
    activation_peak_gib: float | None = None
    non_torch_gib: float | None = None
    kv_cache_gib: float | None = None
    kv_cache_tokens: int | None = None
    num_gpu_blocks: int | None = None
    max_concurrency: float | None = None
    max_concurrency_tokens_per_request: int | None = None
    startup_succeeded: bool | None = None
    extra_printed: dict[str, Any] | None = None
    log_lines: list[str] = []
    inferred: list[Any] | None = None


def load_cases() -> list[StartupCase]:
    """The shared reference startups (fixtures/reference/vllm_startup_logs.jsonl), the 0.19 sweep included."""
    return _load(REF / "vllm_startup_logs.jsonl")


def load_public() -> list[StartupCase]:
    """Real startups beyond the 0.19 sweep, gathered from public logs (fixtures/startups/public.jsonl):
    each with its source, quoted lines and the settings that were inferred. Never fitted on."""
    return _load(PUBLIC)


def _load(path: Path) -> list[StartupCase]:
    return [StartupCase.model_validate_json(line) for line in path.read_text().splitlines() if line.strip()]


def facts_for(config: dict[str, Any], name: str) -> ModelFacts:
    """ModelFacts from a reference config, with its side hf_quant_config.json (ModelOpt) when recorded."""
    side = config.get("hf_quant_config")
    return facts_from_config(config, name, hf_quant_config=side if isinstance(side, dict) else None)


def config_from_reference(entry: dict[str, Any]) -> dict[str, Any]:
    """The config.json of one models.json entry, as the model ships it: the entry's own keys less provenance and
    the keys its source lacks, moe/mla blocks flattened, the full quantization_config. An explicit null stays
    (Mistral-7B-v0.3's `"sliding_window": null` means no window; left out, its model type's default 4096 would
    apply). The model fixtures' config.json files are written from it."""
    absent = set(entry.get("keys_absent_in_source") or ())
    config = {k: v for k, v in entry.items() if k not in META_KEYS and not k.endswith("_source") and k not in absent}
    if config.get("text_config") is None:
        config.pop("text_config", None)
    for block in ("moe", "mla"):
        config.update(entry.get(block) or {})
    if entry.get("quantization_config_full"):
        config["quantization_config"] = entry["quantization_config_full"]
    return config


def reference_configs() -> dict[str, dict[str, Any]]:
    """model id (lower case) -> config dict, from models.json and extra_configs.json; a ModelOpt entry's side
    hf_quant_config.json rides along under "hf_quant_config" (facts_for reads it)."""
    configs: dict[str, dict[str, Any]] = {}
    for row in json.loads((REF / "models.json").read_text()):
        config = config_from_reference(row)
        if row.get("hf_quant_config"):
            config["hf_quant_config"] = row["hf_quant_config"]
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


def inferred_version(case: StartupCase) -> str:
    """For a case whose version is not stated: the printed version, else the release current at the
    post's date (V0 wording keeps it on the V0 profile), else V0 (0.6) or 0.19 by the log's wording.
    These cases land in the "other" subset."""
    lines = case.log_lines
    printed = parse_startup(lines).version
    if printed and printed[:1].isdigit():
        return printed
    v0 = any(w in line for line in lines for w in V0_WORDING)
    dated = [version for day, version in RELEASES if case.date and day <= case.date]
    if dated:
        return "0.7.3" if v0 and dated[-1] >= "0.8" else dated[-1]
    return "0.6.0" if v0 else "0.19.0"


def case_flags(case: StartupCase) -> EngineFlags:
    """The engine flags a startup ran with, as its record states them."""
    util = case.gpu_memory_utilization
    dtype = (case.dtype or "auto").replace("torch.", "")
    return EngineFlags(
        tensor_parallel_size=case.tensor_parallel_size or 1,
        pipeline_parallel_size=case.pipeline_parallel_size or 1,
        gpu_memory_utilization=util if isinstance(util, (int, float)) else None,
        max_model_len=case.max_model_len,
        max_num_seqs=case.max_num_seqs,
        max_num_batched_tokens=case.max_num_batched_tokens,
        dtype=dtype,
        kv_cache_dtype=case.kv_cache_dtype or "auto",
        enforce_eager=bool(case.enforce_eager),
        quantization="fp8" if case.quantization == "fp8" else None,
        cpu_offload_gb=case.cpu_offload_gb or 0.0,
        flashinfer_sampler={"flashinfer": True, "native": False}.get(case.sampler or ""),
    )


def case_gpus(case: StartupCase) -> list[GpuSpec]:
    """The GPUs a startup ran on: its named GPU, as many as it used (at least TP x PP)."""
    assert case.gpu, case.id
    spec = GpuSpec.from_name(case.gpu)
    if case.nvlink is not None:  # the log says (e.g. custom all-reduce off: no P2P)
        spec = spec.model_copy(update={"nvlink": case.nvlink})
    count = max(case.gpu_count or 1, (case.tensor_parallel_size or 1) * (case.pipeline_parallel_size or 1))
    return [spec] * count


def pct(pred: float, real: float | None) -> float | None:
    """Signed error of `pred` against `real`, in %; None without a measured figure."""
    return None if not real else 100.0 * (pred - real) / real


def naive(
    facts: ModelFacts, gpus: list[GpuSpec], flags: EngineFlags, util: float, dtype_bytes: int
) -> tuple[float, int]:
    """params x dtype x 1.2 split over the GPUs; what is left of util x NVML total is KV."""
    params = sum(w.bytes for w in weights_per_rank(facts, "bfloat16", 1, 1)) / 2
    n = flags.tensor_parallel_size * flags.pipeline_parallel_size
    per_gpu = params * dtype_bytes * 1.2 / n
    kv = gpus[0].memory_total_mib * 2**20 * util - per_gpu
    page = kv_bytes_per_token_layer(
        facts, 1 if "fp8" in flags.kv_cache_dtype else dtype_bytes, flags.tensor_parallel_size
    )
    per_token = page * facts.num_hidden_layers / flags.pipeline_parallel_size
    return kv / GIB, int(max(0, kv) / per_token)


def localaistack_tier(gpu_name: str) -> int:
    """Our reading of LocalAIStack: memory from the GPU name, fixed max_model_len tiers."""
    match = re.search(r"(\d+)\s*GB", gpu_name, re.I)
    mem = int(match.group(1)) if match else 0
    return 32768 if mem >= 80 else 16384 if mem >= 40 else 8192 if mem >= 24 else 4096


class EstimateRow(BaseModel):
    """One startup's row: each figure the estimator predicts (`*_pred`) beside the one vLLM printed (`*_real`,
    None where the log did not print it), with the naive formula's and LocalAIStack's tier for comparison."""

    model_config = ConfigDict(frozen=True)

    id: str
    model: str
    version: str  # as stated, or "not stated (X assumed)"
    subset: str  # FIT_SUBSET (the sweep the terms are fitted on), "public" or "other"
    family: str
    gpu_class: str
    quant: str
    tp: int
    pp: int
    w_pred: float  # weights, GiB per GPU
    w_real: float | None
    act_pred: float  # activation peak of the logged stage, GiB
    act_real: float | None
    kv_pred: float  # KV cache, GiB per GPU
    kv_real: float | None
    tok_pred: int  # KV cache tokens
    tok_low: int  # the plan-safe low end
    nonkv_pred: float  # requested memory less the KV cache, GiB
    profile: str
    tok_real: int | None
    cg_pred: float  # CUDA graphs, GiB
    cg_real: float | None
    blocks_pred: int
    blocks_real: int | None
    conc_pred: float  # max concurrency at max_model_len
    conc_real: float | None
    naive_kv: float
    naive_tok: int
    tier_len: int  # LocalAIStack's tier for the GPU
    true_fit_len: int | None  # the largest max_model_len vLLM's KV tokens allowed
    log_disagreements: int  # figures our log parser reads differently from the record
    fits_pred: bool
    fits_real: bool | None


def run_case(
    case: StartupCase, configs: dict[str, dict[str, Any]], coeffs: Coefficients = FITTED
) -> EstimateRow | str:
    """One startup's row, or why the case cannot be estimated."""
    model_id = case.model.split(" ")[0].lower()
    config = configs.get(model_id)
    if config is None:
        return "no config for the model"
    if case.quantization_config:  # the checkpoint's own quantization (e.g. a bnb re-upload)
        config = {**config, "quantization_config": case.quantization_config}
    if not case.gpu:
        return "GPU not named"
    if case.gpu_memory_utilization is None:
        return "utilization not shown (vLLM's default not assumed)"
    stated = str(case.vllm_version or "")
    version = stated.split()[0] if stated[:1].isdigit() else inferred_version(case)
    try:
        facts = facts_for(config, case.model)
        gpus = case_gpus(case)
        flags = case_flags(case)
        est = estimate(facts, gpus, flags, version, coeffs)
    except SmartRunError as err:
        return f"not estimable: {err.message}"
    util = flags.gpu_memory_utilization or vllm_profiles.PROFILES[est.profile].default_util
    dtype_bytes = 4 if "float32" in (case.dtype or "") else 2
    naive_kv, naive_tokens = naive(facts, gpus, flags, util, dtype_bytes)
    real_tokens = case.kv_cache_tokens
    # one request at full length must fit: the measured KV tokens bound the largest max_model_len
    true_fit = min(facts.derived_max_model_len, real_tokens) if real_tokens else None
    tier = localaistack_tier(case.gpu)
    return EstimateRow(
        id=case.id,
        model=case.model,
        version=stated or f"not stated ({version} assumed)",
        subset=(
            FIT_SUBSET
            if stated == "0.19.0" and "H100" in case.gpu
            else "public" if case.id.startswith("pub-") else "other"
        ),
        family=family(facts),
        gpu_class=gpus[0].name,
        quant=facts.quantization.method if facts.quantization else (flags.quantization or "none"),
        tp=flags.tensor_parallel_size,
        pp=flags.pipeline_parallel_size,
        w_pred=est.weights_gib,
        w_real=case.weights_gib,
        act_pred=logged_stage_activation(facts, flags, est, gpus, coeffs),
        act_real=case.activation_peak_gib,
        kv_pred=est.kv_cache_gib,
        kv_real=case.kv_cache_gib,
        tok_pred=est.kv_cache_tokens,
        tok_low=plan_safe_kv_tokens(est),
        nonkv_pred=est.requested_gib - est.kv_cache_gib,
        profile=est.profile,
        tok_real=real_tokens,
        cg_pred=est.cudagraph_gib,
        cg_real=(case.extra_printed or {}).get("cuda_graph_gib"),
        blocks_pred=est.num_gpu_blocks,
        blocks_real=case.num_gpu_blocks,
        conc_pred=est.max_concurrency,
        conc_real=case.max_concurrency,
        naive_kv=naive_kv,
        naive_tok=naive_tokens,
        tier_len=tier,
        true_fit_len=true_fit,
        log_disagreements=log_cross_check(case),
        fits_pred=est.fits,
        fits_real=case.startup_succeeded,
    )


def logged_stage_activation(
    facts: ModelFacts, flags: EngineFlags, est: MemoryEstimate, gpus: list[GpuSpec], coeffs: Coefficients
) -> float:
    """The activation of the stage whose log line was recorded: the estimate's (tightest) one, or
    with PP the first stage's (rank 0 prints; it runs no sampler)."""
    if flags.pipeline_parallel_size == 1:
        return est.activation_gib
    dtype = dtype_name(flags.dtype, facts, gpus[0].compute_capability)
    first = activation_bytes(
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


def log_cross_check(case: StartupCase) -> int:
    """Figures where smartrun.vllm_log.parse_startup reads the log lines differently from the record's fields."""
    parsed = parse_startup(case.log_lines)
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
        and getattr(case, theirs) is not None
        and getattr(parsed, ours) != getattr(case, theirs)
    )


def leave_one_out_errors(configs: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """KV-token error of each public startup a profile figure was read from, re-predicted with the
    figure the other startups need (the larger need, as shipped): the held-out error for those."""
    return {k: pct(row.tok_pred, row.tok_real) for k, row in leave_one_out_rows(configs).items()}


def leave_one_out_rows(configs: dict[str, dict[str, Any]]) -> dict[str, EstimateRow]:
    """The rows of those startups re-predicted leave-one-out (plan-safe low end included)."""
    cases = {c.id: c for c in load_public()}
    out: dict[str, EstimateRow] = {}
    for name, profile in list(vllm_profiles.PROFILES.items()):
        fitted = [cases[i] for i in profile.no_nvlink_fitted_on if i in cases]
        if len(fitted) < 2:
            continue
        needs = {}
        for case in fitted:  # the figure that would make this startup exact
            assert case.vllm_version and case.kv_cache_tokens, case.id
            assert profile.non_torch_tp_no_nvlink_gib is not None, name
            facts = facts_for(configs[case.model.lower()], case.model)
            est = estimate(facts, case_gpus(case), case_flags(case), case.vllm_version)
            real_kv = case.kv_cache_tokens * est.kv_bytes_per_token / GIB
            needs[case.id] = profile.non_torch_tp_no_nvlink_gib - (real_kv - est.kv_cache_gib)
        try:
            for case in fitted:
                figure = round(max(v for k, v in needs.items() if k != case.id), 2)
                vllm_profiles.PROFILES[name] = profile.model_copy(update={"non_torch_tp_no_nvlink_gib": figure})
                row = run_case(case, configs)
                assert not isinstance(row, str)
                out[case.id] = row
        finally:
            vllm_profiles.PROFILES[name] = profile
    return out


def done_when(rows: list[EstimateRow], loo: dict[str, float | None] | None = None) -> dict[str, Any]:
    """The issue's acceptance figures over the held-out startups with KV tokens: n, median |error|,
    cases over by > 1% and > 5%, the GPU classes and vLLM versions they span. Startups a profile
    figure was read from count with their leave-one-out error (`loo`)."""
    loo = loo or {}
    held = [r for r in rows if r.subset != FIT_SUBSET and r.tok_real]
    errs = [loo.get(r.id, pct(r.tok_pred, r.tok_real)) for r in held]
    return {
        "leave_one_out": {k: round(v, 2) for k, v in loo.items() if v is not None},
        "n": len(errs),
        "median_abs_pct": statistics.median(abs(e) for e in errs if e is not None) if errs else None,
        "over_1pct": sum(1 for e in errs if e is not None and e > 1),
        "over_5pct": sum(1 for e in errs if e is not None and e > 5),
        "worst_over_pct": max(e for e in errs if e is not None) if errs else None,
        "gpu_classes": sorted({r.gpu_class for r in held}),
        "versions": sorted({r.version for r in held}),
    }


def fit_samples(cases: list[StartupCase], configs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The physical features (smartrun.memory.fit) and measured figures of every 0.19.0 H100 case, for the fit."""
    samples = []
    for case in cases:
        row = run_case(case, configs)
        if isinstance(row, str) or row.subset != FIT_SUBSET:
            continue
        facts = facts_for(configs[case.model.split(" ")[0].lower()], case.model)
        flags, gpus = case_flags(case), case_gpus(case)
        samples.append({
            "id": case.id,
            "family": row.family,
            **fit.features(facts, flags, gpus),
            "act": case.activation_peak_gib,
            "non_torch": case.non_torch_gib,
            "graph": row.cg_real if not flags.enforce_eager else None,
            "w_real": case.weights_gib,
        })
    return samples


def over_gib(row: EstimateRow) -> float | None:
    """How much more KV the estimate promised than vLLM had, in GiB per GPU (negative: under).

    The engine-wide token count is the truth when printed (a quoted KV GiB may be another rank's:
    with V0 TP only rank 0 runs the sampler, and the blocks are the minimum over ranks)."""
    if row.tok_real and row.tok_pred:
        return float((row.tok_pred - row.tok_real) / row.tok_pred * row.kv_pred)
    if row.kv_real is not None:
        return float(row.kv_pred - row.kv_real)
    return None


def profile_bands(rows: list[EstimateRow]) -> dict[str, tuple[float, int]]:
    """Per profile: (band, n). The band is the largest KV over-prediction seen, widened by
    (1 + 2/sqrt(n)) for the few-sample case, as a fraction of the predicted non-KV memory; 0 when
    never over, or when the widened over-prediction is within the profile's floor in GiB (the plan
    keeps back max(band x non-KV, floor): Profile.margin_bytes)."""
    bands: dict[str, tuple[float, int]] = {}
    for name in sorted({r.profile for r in rows}):
        part = [(o, n) for o, n in ((over_gib(r), r.nonkv_pred) for r in rows if r.profile == name)
                if o is not None and n > 0]
        if not part:
            continue
        widen = 1 + 2 / len(part) ** 0.5
        floor = vllm_profiles.PROFILES[name].margin_floor_gib
        worst = max(0.0, *(o * widen / n for o, n in part if o * widen > floor), 0.0)
        bands[name] = (worst, len(part))
    return bands


def sanity_models(configs: dict[str, dict[str, Any]]) -> list[ModelFacts]:
    """Every fixtures/models/* directory (inspected) and every reference config (config.json alone)."""
    models = [inspect(str(d)) for d in sorted((FIXTURES / "models").iterdir()) if d.is_dir()]
    return models + [facts_for(cfg, name) for name, cfg in sorted(configs.items())]


def implausible(est: MemoryEstimate, facts: ModelFacts, tp: int) -> list[str]:
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
    dtype = dtype_name("auto", facts, "9.0")
    seqs, mnbt = est.max_num_seqs, est.max_num_batched_tokens
    (_, forward), _ = activation_terms(facts, dtype, tp, seqs, mnbt, last=True)
    if forward / GIB > est.weights_gib:
        flags.append("forward activation > weights")
    if facts.moe is not None:
        dense = facts.model_copy(update={"moe": None})
        if forward <= activation_terms(dense, dtype, tp, seqs, mnbt, last=True)[0][1]:
            flags.append("MoE activation ignores the experts")
    if est.fits and est.kv_cache_tokens <= 0:
        flags.append("fits with no KV tokens")
    return flags
