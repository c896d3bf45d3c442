"""Which GPUs a plan runs on, and what those GPUs and the model allow there.

One place, so that the bounds, the baseline, the estimate and launch's CUDA_VISIBLE_DEVICES agree on
the GPUs (`select_gpus`), on which tensor-parallel sizes split a model (`tp_divides`) and on the dtype a
model runs in on given GPUs (`choose_dtype`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

from smartrun import cluster
from smartrun.errors import InfeasibleError, InputError
from smartrun.hardware import GpuInfo, HardwareSnapshot
from smartrun.model import ModelFacts

FLOAT16_QUANT = ("awq", "gptq")  # vllm serve --help: "half ... Recommended for AWQ quantization"
# vLLM 0.33 config/model.py _FLOAT16_NOT_SUPPORTED_MODELS: "Numerical instability. Please use bfloat16 or float32"
FLOAT16_REFUSED = ("gemma2", "gemma3", "gemma3_text", "plamo2", "glm4")
MIN_CC = {"awq": (7, 5), "fp8": (7, 5), "gptq": (6, 0)}  # vLLM's minimum capability per quantization method


def select_gpus(hardware: HardwareSnapshot, count: int) -> list[GpuInfo]:
    """The `count` GPUs to run on, in index order: an NVLink-connected set when one exists, then the
    set with the most free memory (its tightest GPU first, then in total). One place, so that the
    bounds, the estimate and launch's CUDA_VISIBLE_DEVICES agree."""
    if count < 1:
        raise InputError(f"cannot select {count} GPUs")
    if len(hardware.nodes) > 1:  # a cluster: whole nodes in order, so no stage straddles two nodes
        return cluster.select_gpus(hardware, count)
    gpus = sorted(hardware.gpus, key=lambda g: g.index)
    if count > len(gpus):
        raise InfeasibleError(f"{count} GPUs needed; the machine has {len(gpus)}")

    def score(combo: tuple[GpuInfo, ...]) -> tuple:
        linked = all(hardware.nvlinked(a.index, b.index) for a, b in itertools.combinations(combo, 2))
        frees = [g.memory_free_mib for g in combo]
        return (linked, min(frees), sum(frees), [-g.index for g in combo])

    if math.comb(len(gpus), count) <= MAX_GPU_COMBINATIONS:
        combos: list[tuple[GpuInfo, ...]] = list(itertools.combinations(gpus, count))
        best_combo = max(combos, key=score)
        return list(best_combo)
    sets = _greedy_gpu_sets(hardware, gpus, count)
    best = max(sets, key=score)
    return sorted(best, key=lambda g: g.index)


MAX_GPU_COMBINATIONS = 20_000  # every subset up to here (16 GPUs choose 8 is 12,870); greedy beyond


def _greedy_gpu_sets(hardware: HardwareSnapshot, gpus: list[GpuInfo], count: int) -> list[tuple[GpuInfo, ...]]:
    """Candidate sets for big machines, where trying every subset would not finish: the most free
    memory, and from each GPU the NVLink-connected set grown by most free memory."""
    by_free = sorted(gpus, key=lambda g: (-g.memory_free_mib, g.index))
    candidates = [tuple(by_free[:count])]
    for seed in by_free:
        chosen = [seed]
        for gpu in by_free:
            if len(chosen) == count:
                break
            if gpu not in chosen and all(hardware.nvlinked(gpu.index, c.index) for c in chosen):
                chosen.append(gpu)
        if len(chosen) == count:
            candidates.append(tuple(chosen))
    return candidates


def all_linked(hardware: HardwareSnapshot, gpus: Sequence[GpuInfo]) -> bool:
    return all(hardware.nvlinked(a.index, b.index) for a, b in itertools.combinations(gpus, 2))


def describe_gpus(gpus: Sequence[GpuInfo]) -> str:
    """"2x NVIDIA A100-SXM4-80GB" / "the NVIDIA L4", for messages."""
    names = sorted({g.name for g in gpus})
    return f"{len(gpus)}x {' / '.join(names)}" if len(gpus) > 1 else f"the {names[0]}"


def min_cc(gpus: Sequence[GpuInfo]) -> tuple[int, int]:
    return min(g.cc for g in gpus)


def tp_divides(facts: ModelFacts, tp: int) -> bool:
    """vLLM: heads divisible by tp; KV heads split evenly or replicated (MLA has no KV heads to split)."""
    if facts.num_attention_heads % tp:
        return False
    kv = facts.num_kv_heads
    return facts.mla is not None or not ((kv >= tp and kv % tp) or (kv < tp and tp % kv))


def choose_dtype(allowed: Sequence[Any] | None, facts: ModelFacts, gpus: Sequence[GpuInfo]) -> tuple[str, str]:
    """bfloat16 when the GPU has cc >= 8.0 and the model is bf16, else float16, among `allowed` (None: any);
    (value, why)."""
    model_dtype = {"bf16": "bfloat16", "fp16": "float16", "half": "float16"}.get(facts.torch_dtype,
                                                                                 facts.torch_dtype)
    cc = min_cc(gpus)
    method = facts.quantization.method if facts.quantization else None
    if facts.model_type in FLOAT16_REFUSED and (cc < (8, 0) or model_dtype not in ("bfloat16", "float32")):
        want = "bfloat16" if cc >= (8, 0) else "float32"
        why = (f"model: vLLM refuses float16 for {facts.model_type} (numerical instability); {want}"
               + (f", as compute capability {cc[0]}.{cc[1]} has no bfloat16" if cc < (8, 0) else ""))
    elif method in FLOAT16_QUANT:
        want, why = "float16", f"model: {method} checkpoints run in float16 (vLLM's recommendation)"
    elif cc >= (8, 0) and model_dtype == "bfloat16":
        want, why = "bfloat16", "hardware/model: bf16 model on compute capability >= 8.0"
    elif cc < (8, 0):
        want, why = "float16", f"hardware: compute capability {cc[0]}.{cc[1]} has no bfloat16"
    else:
        want, why = "float16", f"model: weights are {model_dtype}"
    choices = list(allowed or ()) or [want]
    if want not in choices:
        other = next((c for c in choices if c in ("bfloat16", "float16")), choices[0])
        return other, f"{why}, but the bounds allow {list(choices)}"
    return want, why
