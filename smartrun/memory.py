"""Stage 3, estimate: what vLLM's startup will do with memory, per GPU rank, version by version.

CONTRACT (types below are shared by rules, validate, launch and the CLI; add fields, do not rename).
TODO(helper-memory): implement estimate(), largest_fitting_model_len(), GpuSpec.from_name().
"""

from __future__ import annotations

from collections.abc import Sequence

from smartrun.hardware import GpuInfo, HardwareSnapshot
from smartrun.model import ModelFacts
from smartrun.plan import Frozen


class GpuSpec(Frozen):
    """One GPU as the estimator needs it."""

    name: str
    memory_total_mib: int  # NVML memory.total
    memory_free_mib: int | None = None  # None = all free
    compute_capability: str = "9.0"

    @classmethod
    def from_gpu(cls, gpu: GpuInfo) -> GpuSpec:
        return cls(
            name=gpu.name,
            memory_total_mib=gpu.memory_total_mib,
            memory_free_mib=gpu.memory_free_mib,
            compute_capability=gpu.compute_capability,
        )

    @classmethod
    def from_name(cls, name: str) -> GpuSpec:
        """From the shipped GPU table (a copy of reference/gpus.json). EstimateError lists close matches."""
        raise NotImplementedError


class EngineFlags(Frozen):
    """The vLLM flags that matter for memory. None = vLLM's default for that version and GPU."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None  # -1 = auto (fit)
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    enforce_eager: bool = False
    optimization_level: int | None = None
    block_size: int | None = None
    enable_chunked_prefill: bool | None = None
    enable_prefix_caching: bool | None = None
    disable_custom_all_reduce: bool = False


class MemoryEstimate(Frozen):
    """The budget vLLM will compute. GiB figures are per GPU (the tightest rank); tokens are engine-wide."""

    vllm_version: str
    profile: str  # which behaviour profile was used, e.g. "0.19", "0.33"
    total_gib: float  # total memory as CUDA reports it (not NVML memory.total)
    requested_gib: float  # util x total
    free_gib: float  # free at start, for the startup check
    weights_gib: float
    activation_gib: float
    non_torch_gib: float
    cudagraph_gib: float
    kv_cache_gib: float
    kv_cache_tokens: int
    kv_bytes_per_token: int  # per GPU
    block_size: int
    num_gpu_blocks: int
    max_model_len: int  # effective
    max_num_seqs: int  # effective (after vLLM defaults)
    max_num_batched_tokens: int  # effective
    max_concurrency: float
    fits: bool
    reason: str | None = None  # why not, with the shortfall in GiB
    largest_max_model_len: int  # largest max_model_len that fits (vLLM's own estimate)


def estimate(
    model: ModelFacts,
    gpus: Sequence[GpuSpec] | HardwareSnapshot,
    flags: EngineFlags,
    vllm_version: str | None = None,
) -> MemoryEstimate:
    """Budget one startup. `gpus` are the GPUs the engine will use (first tp*pp of them)."""
    raise NotImplementedError


def largest_fitting_model_len(
    model: ModelFacts,
    gpus: Sequence[GpuSpec] | HardwareSnapshot,
    flags: EngineFlags,
    vllm_version: str | None = None,
) -> int:
    """The largest max_model_len that fits (0 if none), as vLLM's auto-fit would find it."""
    raise NotImplementedError
