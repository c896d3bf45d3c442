"""Stage 3, estimate: what vLLM's startup will do with memory, per GPU rank, version by version.

CONTRACT (types below are shared by rules, validate, launch and the CLI; add fields, do not rename).

The budget follows vLLM's own worker (vllm/v1/worker/gpu_worker.py determine_available_memory; V0:
vllm/worker/worker.py determine_num_available_blocks):
    total     = NVML memory.total - CUDA_RESERVED_MIB (what cudaMemGetInfo/torch report)
    requested = ceil(util x total); start fails if free-at-start < requested (V1 only)
    kv        = requested - weights - activation peak - non-torch [- CUDA graph estimate, 0.20+]
    blocks    = kv // bytes_per_block (largest KV group x page), min over TP/PP ranks
    tokens    = blocks x block_size, or the hybrid manager's group-aware figure.
Weights are exact when safetensors sizes are known (split across ranks in the proportion the
counted layout gives), else counted from the architecture: dense/MoE/MLA layers, biases,
vision towers, vocab padded to 64 and sharded, norms replicated, quantized layouts with their
scales, plus vLLM's RoPE cos/sin cache. Activation, non-torch and CUDA-graph terms are physical
formulas whose few coefficients (Coefficients/FITTED) are the least-squares fit on the vLLM 0.19
H100 reference logs (smartrun.memory.fit; benchmarks/estimator_accuracy.py --fit refits them,
--cross-validate leaves one model family out, the default run reports the error).

Calibration: `estimate(..., calibration=)` takes a Correction (smartrun.memory.correction; learned by
smartrun.calibration from this machine's own startups), adds its GiB to every GPU's non-KV memory and sets the plan-safe band from
those startups once enough agree (Correction.margin_bytes); the caller looks it up.

Profiles (smartrun/vllm_profiles.py): "0.6" (V0 engine, < 0.8 and the V0 fallbacks), "0.8", "0.9" (V1,
0.9-0.10), "0.11", "0.19" (0.12-0.19), "0.20" (graph estimate subtracted, util 0.92, 0.20-0.27), "0.33"
(0.28+: 160 GiB tier, group-aware token count).
"""

from __future__ import annotations

from smartrun.memory.activation import (
    FITTED,
    Coefficients,
    activation_bytes,
    activation_terms,
    cudagraph_bytes,
    cudagraph_features,
    non_torch_bytes,
    pp_buffer_bytes,
)
from smartrun.memory.budget import (
    StageMemory,
    estimate,
    largest_fitting_model_len,
    plan_safe_fits,
    plan_safe_kv_tokens,
    plan_safe_max_model_len,
    stage_memory,
)
from smartrun.memory.correction import Correction
from smartrun.memory.kv import KVGroup, blocks_per_request, kv_bytes_per_token_layer, kv_groups, layer_kinds
from smartrun.memory.types import (
    DTYPE_BYTES,
    GIB,
    KV_DTYPES,
    MIB,
    EngineFlags,
    GpuSpec,
    MemoryEstimate,
    gpu_table,
    installed_flashinfer_sampler,
    installed_vllm_version,
    match_gpu,
    resolve_version,
)
from smartrun.memory.weights import (
    RankWeights,
    allocator_block_bytes,
    allocator_rounding_bytes,
    dtype_name,
    effective_batch_defaults,
    family,
    pp_layer_ranges,
    rope_cache_params,
    weights_per_rank,
)

__all__ = [
    "DTYPE_BYTES",
    "FITTED",
    "GIB",
    "KV_DTYPES",
    "MIB",
    "Coefficients",
    "Correction",
    "EngineFlags",
    "GpuSpec",
    "KVGroup",
    "MemoryEstimate",
    "RankWeights",
    "StageMemory",
    "activation_bytes",
    "activation_terms",
    "allocator_block_bytes",
    "allocator_rounding_bytes",
    "blocks_per_request",
    "cudagraph_bytes",
    "cudagraph_features",
    "dtype_name",
    "effective_batch_defaults",
    "estimate",
    "family",
    "gpu_table",
    "installed_flashinfer_sampler",
    "installed_vllm_version",
    "kv_bytes_per_token_layer",
    "kv_groups",
    "largest_fitting_model_len",
    "layer_kinds",
    "match_gpu",
    "non_torch_bytes",
    "plan_safe_fits",
    "plan_safe_kv_tokens",
    "plan_safe_max_model_len",
    "pp_buffer_bytes",
    "pp_layer_ranges",
    "resolve_version",
    "rope_cache_params",
    "stage_memory",
    "weights_per_rank",
]
