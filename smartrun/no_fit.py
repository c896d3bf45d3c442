"""When nothing fits: the moves that would, each checked by the estimator, most preferred first.

The order of moves is the policy's (smartrun/data/policy.toml `no_fit.order`): a larger tensor-parallel
size (or more GPUs of the same kind), online fp8 weights, an fp8 KV cache, eager mode, CPU offload, a
shorter context. None is applied; they end the InfeasibleError the bounds or the baseline raise.
"""

from __future__ import annotations

from typing import Any

from smartrun.contracts import Bounds
from smartrun.errors import EstimateError
from smartrun.fit import EstimateFn, PlanFit, flags_from_params
from smartrun.hardware import HardwareSnapshot
from smartrun.memory import GpuSpec
from smartrun.model import ModelFacts
from smartrun.policy import load as load_policy


def suggestions_text(bounds: Bounds, facts: ModelFacts, hardware: HardwareSnapshot, goal: str,
                     vllm_version: str | None, estimate_fn: EstimateFn, params: dict[str, Any]) -> str:
    """The no-fit suggestions for a plan the bounds stage already knows will not fit (see no_fit_suggestions)."""
    c = PlanFit(bounds, facts, hardware, goal, vllm_version, estimate_fn, load_policy())
    return no_fit_suggestions(c, params)


def no_fit_suggestions(c: PlanFit, params: dict[str, Any]) -> str:
    """'; would fit: ...' listing moves the estimator says start, most preferred first (none is applied)."""
    found = [text for text, _ in suggestions(c, params)]
    return f"; would fit: {'; '.join(found)}" if found else "; nothing smartrun knows would fit on this machine"


def suggestions(c: PlanFit, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(flag text, params) for each move in policy order that the estimator says fits a request of the floor."""
    floor, native = c.limits()
    base = {**params, "max_model_len": min(floor, native), "max_num_seqs": c.context_seqs(params), "max_num_batched_tokens": None,
            "data_parallel_size": None}
    cc = min(tuple(int(x) for x in g.compute_capability.split(".")) for g in c.hw.gpus)
    need = tuple(int(x) for x in c.policy.no_fit.fp8_min_cc.split("."))
    out: list[tuple[str, dict[str, Any]]] = []

    def fits(trial: dict[str, Any]) -> bool:
        est = c.estimate(trial)
        return est is not None and c.fits(est)

    for move in c.policy.no_fit.order:
        if move == "tensor_parallel_size":
            tp_bound = c.bound("tensor_parallel_size")
            for tp in sorted(set(tp_bound.choices or ()) if tp_bound else ()):
                if tp > int(params["tensor_parallel_size"]) and fits({**base, "tensor_parallel_size": tp}):
                    out.append((f"--tensor-parallel-size {tp}", {**base, "tensor_parallel_size": tp}))
                    break
            else:
                if len(c.hw.gpus) < 8:
                    out += _more_gpus(c, base)
        elif move == "quantization_fp8" and c.facts.quantization is None and cc >= need:
            trial = {**base, "quantization": "fp8"}
            if fits(trial):
                out.append(("--quantization fp8 (online fp8 weights)", trial))
        elif (move == "kv_cache_dtype_fp8" and cc >= need and params.get("kv_cache_dtype", "auto") == "auto"
              and ((kv_bound := c.bound("kv_cache_dtype")) is None or kv_bound.contains("fp8"))):
            trial = {**base, "kv_cache_dtype": "fp8"}
            if fits(trial):
                out.append(("--kv-cache-dtype fp8", trial))
        elif move == "enforce_eager" and not params.get("enforce_eager"):
            trial = {**base, "enforce_eager": True}
            if fits(trial):
                out.append(("--enforce-eager (no CUDA graph memory)", trial))
        elif move == "cpu_offload_gb":
            offload = _offload_that_fits(c, base)
            if offload is not None:
                out.append((f"--cpu-offload-gb {offload[0]} (slow: weights stream from CPU memory)", offload[1]))
        elif move == "max_model_len":
            est = c.estimate({**base, "max_model_len": None})
            if est is not None and 0 < c.largest(est) < min(floor, native):
                out.append((f"--max-model-len {c.largest(est)}", {**base,
                            "max_model_len": c.largest(est)}))
    return out


def _offload_that_fits(c: PlanFit, base: dict[str, Any]) -> tuple[int, dict[str, Any]] | None:
    """The smallest whole GiB of --cpu-offload-gb (tried from the shortfall up) that fits and the host RAM holds."""
    est = c.estimate(base)
    if est is None:
        return None
    short = est.weights_gib + est.activation_gib + est.non_torch_gib + est.cudagraph_gib - est.requested_gib
    ram_gib = c.hw.ram_mib / 1024 if c.hw.ram_mib else None
    ranks = int(base["tensor_parallel_size"]) * int(base.get("pipeline_parallel_size") or 1)
    gb = max(1, int(short + 1.999))
    while gb < est.weights_gib and (ram_gib is None or gb * ranks <= 0.8 * ram_gib):
        trial = {**base, "cpu_offload_gb": float(gb)}
        got = c.estimate(trial)
        if got is not None and c.fits(got):
            return gb, trial
        gb = max(gb + 1, int(gb * 1.25))
    return None


def _more_gpus(c: PlanFit, base: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """More GPUs of the same kind, tried on a copy of the machine (the estimator budgets per GPU)."""
    gpu = min(c.hw.gpus, key=lambda g: g.memory_total_mib)
    for tp in (2, 4, 8):
        if tp <= len(c.hw.gpus) or c.facts.num_attention_heads % tp:
            continue
        specs = [GpuSpec.from_gpu(gpu)] * tp
        try:
            est = c.estimate_fn(c.facts, specs, flags_from_params({**base, "tensor_parallel_size": tp}), c.version)
        except EstimateError:
            continue
        if c.fits(est):
            return [(f"{tp}x {gpu.name} with --tensor-parallel-size {tp}", {**base, "tensor_parallel_size": tp})]
    return []
