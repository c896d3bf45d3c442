"""The estimator's inputs and output (GpuSpec, EngineFlags, MemoryEstimate), version profiles, the GPU table."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from functools import lru_cache
from importlib import metadata, resources
from typing import Any

from smartrun import vllm_profiles
from smartrun.errors import EstimateError
from smartrun.frozen import Frozen
from smartrun.hardware import GpuInfo
from smartrun.memory.correction import Correction
from smartrun.vllm_profiles import NEWEST_VERSION, Profile

GIB = 1 << 30
MIB = 1 << 20

# cudaMemGetInfo's total is NVML memory.total minus what the driver keeps for itself.
# Derived from the reference H100 80GB logs: NVML 81559 MiB vs vLLM "total_memory=79.19GiB"
# (81090.6 MiB) -> 468.6 MiB. Applied as a constant to every GPU (the reservation is a
# driver/firmware carve-out, not a fraction of capacity; RTX 3090: 24576 MiB -> 23.54 GiB
# predicted vs 23.58 printed).
CUDA_RESERVED_MIB = 81559 - 79.19 * 1024
# The carve-out differs by GPU (and driver): NVML memory.total minus the total vLLM printed
# (V0 "total_gpu_memory (X GiB)") in public startups of that GPU (fixtures/startups/public.jsonl
# and the search-index files named there). GPUs without a printed total use the H100 figure.
CUDA_RESERVED_MIB_BY_GPU = {
    "Tesla T4": 15360 - 14.74 * 1024,  # pub-003/pub-004 (Colab): 14.74 GiB
    "NVIDIA A100-SXM4-40GB": 40960 - 39.39 * 1024,  # 8 x A100 40GB V0 log (search-index file 3706561278)
    "NVIDIA A100-PCIE-40GB": 40960 - 39.39 * 1024,  # same memory part as the SXM4 40GB
    # an A100-SXM4-80GB (0.8.2 V0 log, search-index file 6934259882: torch "Max memory: 79.151 GB"
    # and "total_gpu_memory (79.15GiB)"); an "NVIDIA A100 80GB PCIe" printed the same 79.151
    # (search-index file 2805250333)
    "NVIDIA A100-SXM4-80GB": 81920 - 79.15 * 1024,
    "NVIDIA A100 80GB PCIe": 81920 - 79.15 * 1024,
    "NVIDIA GeForce RTX 3090": 24576 - 23.58 * 1024,  # vsl-001/002
    "NVIDIA L40S": 46068 - 44.39 * 1024,  # an L40 (same 46068 MiB part) V0 log (search-index file 60430572081)
    "NVIDIA L40": 46068 - 44.39 * 1024,
    "NVIDIA H200": 143771 - 139.81 * 1024,  # 8 x H200 V0 log (search-index file 20903468563): 139.81 GiB
}

# GPU models whose cards have no peer access to each other with the stock driver (so neither NVLink
# nor custom all-reduce; NCCL goes through host memory), with where that was seen.
NO_PEER_ACCESS = {
    "NVIDIA GeForce RTX 4090": (
        "https://github.com/sgl-project/sglang/issues/4814 (8x RTX 4090: 'peer access is not supported "
        "between these two devices'); vsl-019's 2x4090 TP 2 grew 0.25 GiB non-torch"
    ),
}

DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DTYPE_ALIASES = {
    "half": "float16",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "fp32": "float32",
}
FP8_KV = ("fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc")
KV_DTYPES = ("auto", "bfloat16", "float16", *FP8_KV)
VOCAB_PADDING = 64  # vLLM's DEFAULT_VOCAB_PADDING_SIZE (VocabParallelEmbedding)


class GpuSpec(Frozen):
    """One GPU as the estimator needs it."""

    name: str
    memory_total_mib: int  # NVML memory.total
    memory_free_mib: int | None = None  # None = all free
    compute_capability: str = "9.0"
    # NVLink to its TP peers: None = unknown (the GPU table's figure where it has one). TP groups
    # without NVLink measured far less non-torch growth on 0.8 (Profile.non_torch_tp_no_nvlink_gib).
    nvlink: bool | None = None

    @property
    def without_nvlink(self) -> bool:
        """True only where known: said so, a GPU model the table lists as having no NVLink, or one
        without peer access between cards at all (NO_PEER_ACCESS)."""
        if self.nvlink is not None:
            return not self.nvlink
        if self.name in NO_PEER_ACCESS:
            return True
        try:
            return match_gpu(self.name).get("nvlink") is False
        except EstimateError:
            return False

    @property
    def has_nvlink(self) -> bool:
        """True only where known: said so, or a GPU model the table lists with NVLink (SXM boards)."""
        if self.nvlink is not None:
            return self.nvlink
        try:
            return match_gpu(self.name).get("nvlink") is True
        except EstimateError:
            return False

    @property
    def nvls_capable(self) -> bool:
        """NVLink SHARP (NCCL's NVLS algorithm) is possible: an SXM board of compute capability 9.0+ with
        NVLink (the HGX NVSwitch nodes). NCCL turns it on by itself for groups of more than two GPUs
        there (src/transport/nvls.cc ncclNvlsInit: NVLS_ENABLE default 2 = when the device reports
        multicast support). Unknown GPUs: False."""
        if self.nvlink is False:
            return False
        try:
            row = match_gpu(self.name)
        except EstimateError:
            return False
        major = int((self.compute_capability or "0").split(".")[0])
        return str(row.get("form_factor") or "").startswith("SXM") and major >= 9 and row.get("nvlink") is not False

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
        """From the shipped GPU table (smartrun/data/gpus.json). EstimateError lists close matches."""
        row = match_gpu(name)
        return cls(
            name=row["nvml_name"],
            memory_total_mib=int(row["memory_total_mib"]),
            compute_capability=row.get("compute_capability") or "9.0",
        )

    @property
    def cuda_total_bytes(self) -> int:
        """Total memory as torch/CUDA reports it (what vLLM multiplies by util)."""
        reserved = CUDA_RESERVED_MIB_BY_GPU.get(self.name, CUDA_RESERVED_MIB)
        return int((self.memory_total_mib - reserved) * MIB)

    @property
    def cuda_free_bytes(self) -> int:
        """Free memory at start as CUDA sees it (all of it when the snapshot says nothing else)."""
        if self.memory_free_mib is None:
            return self.cuda_total_bytes
        used = self.memory_total_mib - self.memory_free_mib
        return max(0, self.cuda_total_bytes - int(used * MIB))


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
    quantization: str | None = None  # --quantization (e.g. "fp8" online) when the checkpoint has none
    cpu_offload_gb: float = 0.0  # --cpu-offload-gb: GiB of weights per GPU kept in CPU memory (UVA)
    # Whether the engine's top-k/top-p sampler is FlashInfer's (the log's "Using FlashInfer for top-p &
    # top-k sampling"): set by the install (the flashinfer package) and VLLM_USE_FLASHINFER_SAMPLER, not a
    # serve flag. None = not known: the installed vllm's environment is looked at when it is the version
    # estimated (installed_flashinfer_sampler), else the estimate counts the native sort (the safe side).
    flashinfer_sampler: bool | None = None


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
    # The plan-safe low end of the profile's uncertainty band (None in a recorded estimate without one).
    kv_cache_tokens_low: int | None = None
    max_concurrency_low: float | None = None
    largest_max_model_len_low: int | None = None
    margin_gib: float = 0.0  # non-KV memory kept back per GPU for the band
    uncertainty: str = ""  # the profile, its band and what the band rests on
    calibration: Correction | None = None  # the correction learned from this machine's startups, if one was applied
    sampler: str = ""  # the dummy sampler's top-k/top-p as counted (native sort or not, and why)




def _version_tuple(version: str) -> tuple[int, int]:
    return vllm_profiles.version_tuple(version)[:2]


def installed_vllm_version() -> str | None:
    """The installed vllm's version, if any (never imports vllm itself)."""

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def installed_flashinfer_sampler(profile: Profile, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the installed vllm, run with this environment, samples with FlashInfer (no sort).

    topk_topp_sampler.py: FlashInfer's sampler needs the flashinfer package (flashinfer-python); 0.8-0.11.0
    use it unless VLLM_USE_FLASHINFER_SAMPLER=0, 0.11.1+ only with =1 (Profile.flashinfer_sampler_by_default).
    """
    env = os.environ if environ is None else environ
    setting = env.get("VLLM_USE_FLASHINFER_SAMPLER")
    wanted = profile.flashinfer_sampler_by_default if setting is None else setting.strip() not in ("", "0")
    if not wanted:
        return False
    for dist in ("flashinfer-python", "flashinfer"):
        try:
            metadata.version(dist)
            return True
        except metadata.PackageNotFoundError:
            continue
    return False


def resolve_version(
    vllm_version: str | None, compute_capability: str | None = None, kv_cache_dtype: str = "auto"
) -> tuple[str, Profile]:
    """Explicit version, else the installed vllm, else the newest; and the profile it runs with on
    a GPU of `compute_capability` (0.8-0.10 fall back to the V0 engine below 8.0)."""
    version = vllm_version or installed_vllm_version() or NEWEST_VERSION
    return version, vllm_profiles.resolve(version, compute_capability, kv_cache_dtype)




@lru_cache(maxsize=1)
def gpu_table() -> tuple[dict[str, Any], ...]:
    """The shipped GPU rows that have a memory size."""
    text = resources.files("smartrun.data").joinpath("gpus.json").read_text()
    return tuple(row for row in json.loads(text) if row.get("memory_total_mib") and row.get("nvml_name"))


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("nvidia", "").replace("geforce", ""))


def match_gpu(name: str) -> dict[str, Any]:
    """Exact key/NVML name first, then an unambiguous short form ("H100", "A100-80GB", "RTX 4090")."""
    rows = gpu_table()
    wanted = _norm(name)
    if not wanted:
        raise EstimateError(f"--gpu {name!r}: empty GPU name")
    for row in rows:
        if wanted in (_norm(row["key"]), _norm(row["nvml_name"])):
            return row
    tokens = [t for t in re.split(r"[^a-z0-9]+", name.lower()) if t and t not in ("nvidia", "geforce")]

    def words(row: dict[str, Any]) -> set[str]:
        return set(re.split(r"[^a-z0-9]+", f"{row['key']} {row['nvml_name']}".lower()))

    hits = [row for row in rows if set(tokens) <= words(row)]
    same_size = len({(row["memory_total_mib"], row["compute_capability"]) for row in hits}) == 1
    if len(hits) > 1 and (same_size or not any(t.endswith("gb") for t in tokens)):
        # Same memory either way, or a bare family name ("H100"): the table's first-listed part.
        return hits[0]
    if len(hits) > 1:
        names = ", ".join(row["key"] for row in hits)
        raise EstimateError(f"--gpu {name!r} is ambiguous: matches {names}")
    if hits:
        return hits[0]
    keys = [row["key"] for row in rows] + [row["nvml_name"] for row in rows]
    close = difflib.get_close_matches(name, keys, n=4, cutoff=0.4)
    hint = (
        f"; close matches: {', '.join(close)}" if close else f"; known: {', '.join(r['key'] for r in rows)}"
    )
    raise EstimateError(f"--gpu {name!r}: unknown GPU{hint}")
