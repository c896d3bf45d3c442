"""Stage 3, estimate: what vLLM's startup will do with memory, per GPU rank, version by version.

CONTRACT (types below are shared by rules, validate, launch and the CLI; add fields, do not rename).

The budget follows vLLM's own worker (vllm_facts.md 1.2-1.6):
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
H100 reference logs (benchmarks/estimator_accuracy.py: --fit refits them, --cross-validate
leaves one model family out, the default run reports the error).

Calibration: `estimate(..., calibration=)` takes a smartrun.calibration.Correction (learned from this
machine's own startups), adds its GiB to every GPU's non-KV memory and sets the plan-safe band from
those startups once enough agree (Correction.margin_bytes); the caller looks it up.

Profiles: "0.6" (V0 engine, < 0.8), "0.19" (V1, 0.8-0.19), "0.20" (graph estimate subtracted,
util 0.92, 0.20-0.27), "0.33" (0.28+: 160 GiB tier, group-aware token count).
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Sequence
from functools import lru_cache
from importlib import resources
from typing import Any

from smartrun import vllm_profiles
from smartrun.calibration import Correction
from smartrun.errors import EstimateError
from smartrun.frozen import Frozen
from smartrun.hardware import GpuInfo, HardwareSnapshot
from smartrun.model import ModelFacts, QuantFacts
from smartrun.vllm_profiles import NEWEST_VERSION, PROFILES, Profile  # noqa: F401  (re-exported)

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
    "NVIDIA GeForce RTX 3090": 24576 - 23.58 * 1024,  # vsl-001/002
    "NVIDIA L40S": 46068 - 44.39 * 1024,  # an L40 (same 46068 MiB part) V0 log (search-index file 60430572081)
    "NVIDIA L40": 46068 - 44.39 * 1024,
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
            return _match_gpu(self.name).get("nvlink") is False
        except EstimateError:
            return False

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
        row = _match_gpu(name)
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
    # The plan-safe low end of the profile's uncertainty band (None in records made before it existed).
    kv_cache_tokens_low: int | None = None
    max_concurrency_low: float | None = None
    largest_max_model_len_low: int | None = None
    margin_gib: float = 0.0  # non-KV memory kept back per GPU for the band
    uncertainty: str = ""  # the profile, its band and what the band rests on
    calibration: Correction | None = None  # the correction learned from this machine's startups, if one was applied


# ---------------------------------------------------------------------------------------------
# Version profiles (smartrun/vllm_profiles.py: eras, source read, evidence, plan-safe band)


def _version_tuple(version: str) -> tuple[int, int]:
    return vllm_profiles.version_tuple(version)[:2]


def installed_vllm_version() -> str | None:
    """The installed vllm's version, if any (never imports vllm itself)."""
    from importlib import metadata

    try:
        return metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return None


def resolve_version(
    vllm_version: str | None, compute_capability: str | None = None, kv_cache_dtype: str = "auto"
) -> tuple[str, Profile]:
    """Explicit version, else the installed vllm, else the newest; and the profile it runs with on
    a GPU of `compute_capability` (0.8-0.10 fall back to the V0 engine below 8.0)."""
    version = vllm_version or installed_vllm_version() or NEWEST_VERSION
    return version, vllm_profiles.resolve(version, compute_capability, kv_cache_dtype)


# ---------------------------------------------------------------------------------------------
# GPU table


@lru_cache(maxsize=1)
def gpu_table() -> tuple[dict[str, Any], ...]:
    """The shipped GPU rows that have a memory size."""
    text = resources.files("smartrun.data").joinpath("gpus.json").read_text()
    return tuple(row for row in json.loads(text) if row.get("memory_total_mib") and row.get("nvml_name"))


def _norm(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower().replace("nvidia", "").replace("geforce", ""))


def _match_gpu(name: str) -> dict[str, Any]:
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


# ---------------------------------------------------------------------------------------------
# Inputs normalised


def _cc_key(cc: str) -> tuple[int, ...]:
    return tuple(int(part) for part in cc.split(".") if part.isdigit())


def _dtype_name(flag: str, model: ModelFacts, cc: str) -> str:
    """The dtype vLLM will run in: config dtype for auto (fp32 configs are downcast), fp16 below cc 8.0."""
    name = DTYPE_ALIASES.get(flag.lower(), flag.lower())
    if name == "auto":
        name = DTYPE_ALIASES.get(model.torch_dtype, model.torch_dtype or "bfloat16")
        if name == "float32":
            name = "bfloat16"
        if name not in DTYPE_BYTES:
            name = "bfloat16"
        if name == "bfloat16" and float(cc) < 8.0:
            name = "float16"
    if name not in DTYPE_BYTES:
        raise EstimateError(f"--dtype {flag!r}: unknown dtype (auto, bfloat16, float16/half, float32/float)")
    if name == "bfloat16" and float(cc) < 8.0:
        raise EstimateError(
            f"Bfloat16 is only supported on GPUs with compute capability of at least 8.0. Your GPU has compute "
            f"capability {cc}. You can use float16 instead by explicitly setting the `dtype` flag, e.g. --dtype=half."
        )
    return name


def _kv_bytes_per_element(flag: str, dtype: str) -> int:
    value = flag.lower()
    if value not in KV_DTYPES:
        raise EstimateError(
            f"--kv-cache-dtype {flag!r}: not one the estimator budgets ({', '.join(KV_DTYPES)})"
        )
    return 1 if value in FP8_KV else DTYPE_BYTES[dtype]


def _gpu_list(gpus: Sequence[GpuSpec] | HardwareSnapshot) -> list[GpuSpec]:
    if isinstance(gpus, HardwareSnapshot):
        return [GpuSpec.from_gpu(g) for g in gpus.gpus]
    return list(gpus)


def _check_parallel(model: ModelFacts, flags: EngineFlags, gpu_count: int) -> None:
    tp, pp = flags.tensor_parallel_size, flags.pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise EstimateError(f"--tensor-parallel-size {tp} / --pipeline-parallel-size {pp}: must be >= 1")
    if tp * pp > gpu_count:
        raise EstimateError(
            f"World size ({tp * pp}) is larger than the number of available GPUs ({gpu_count}) in this node."
        )
    if model.num_attention_heads % tp:
        raise EstimateError(
            f"Total number of attention heads ({model.num_attention_heads}) must be divisible by "
            f"tensor parallel size ({tp})."
        )
    kv = model.num_kv_heads
    if model.mla is None and ((kv >= tp and kv % tp) or (kv < tp and tp % kv)):
        raise EstimateError(
            f"--tensor-parallel-size {tp}: the model's {kv} KV heads can neither be split evenly nor replicated"
        )
    if pp > model.num_hidden_layers:
        raise EstimateError(
            f"--pipeline-parallel-size {pp}: more stages than the {model.num_hidden_layers} layers"
        )
    for flag, value in (("--max-num-seqs", flags.max_num_seqs), ("--max-num-batched-tokens", flags.max_num_batched_tokens)):
        if value is not None and value < 1:
            raise EstimateError(f"{flag} {value}: must be >= 1")
    util = flags.gpu_memory_utilization
    if util is not None and not 0 < util <= 1:
        raise EstimateError(f"--gpu-memory-utilization {util}: must be in (0, 1]")


def pp_layer_ranges(num_layers: int, pp: int) -> list[range]:
    """vLLM's get_pp_indices: equal shares, the remainder given to the stages before the last."""
    parts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        parts[-i] += 1
    ranges, start = [], 0
    for size in parts:
        ranges.append(range(start, start + size))
        start += size
    return ranges


def effective_batch_defaults(
    flags: EngineFlags, total_bytes: int, gpu_name: str, profile: Profile, max_model_len: int
) -> tuple[int, int]:
    """max_num_seqs, max_num_batched_tokens as vLLM fills unset ones for `vllm serve` (facts 4.3)."""
    total_gib = total_bytes / GIB
    if profile.v0_engine:  # V0: 256 seqs; chunked prefill only above 32K, else one prompt per step
        seqs = 256
        chunked = flags.enable_chunked_prefill
        chunked = max_model_len > 32768 if chunked is None else chunked
        mnbt = 2048 if chunked else max(max_model_len, 2048)
        if flags.max_num_batched_tokens is not None:
            mnbt = flags.max_num_batched_tokens
        return (flags.max_num_seqs or seqs), mnbt
    if profile.has_160gib_tier and total_gib >= 160:
        mnbt, seqs = 16384, 1024
    elif total_gib >= 70 and (profile.big_tier_includes_a100 or "a100" not in gpu_name.lower()):
        mnbt, seqs = 8192, 1024
    else:
        mnbt, seqs = 2048, 256
    if flags.max_num_batched_tokens is None:
        if flags.enable_chunked_prefill is False:
            mnbt = max(max_model_len, mnbt)
        mnbt = min((flags.max_num_seqs or seqs) * max_model_len, mnbt)
    else:
        mnbt = flags.max_num_batched_tokens
    if flags.max_num_seqs is None:
        seqs = min(seqs, mnbt)
    else:
        seqs = flags.max_num_seqs
    return seqs, mnbt


# ---------------------------------------------------------------------------------------------
# Parameters, per rank, counted from the architecture


class _Shape(Frozen):
    """One linear layer (per rank): its input and output sizes and whether it is quantizable."""

    n_in: int
    n_out: int
    count: int = 1  # how many identical matrices (experts)
    quantized: bool = True
    expert: bool = False
    gate_up: bool = False  # the fused gate/up projection (hidden -> 2 x intermediate)


def _tc(model: ModelFacts) -> dict[str, Any]:
    return model.text_config or model.config or {}


def _family(model: ModelFacts) -> str:
    """The text model's model_type (multimodal wrappers nest it in text_config)."""
    return str(_tc(model).get("model_type") or model.model_type)


def _is_moe_layer(model: ModelFacts, idx: int) -> bool:
    moe = model.moe
    if moe is None:
        return False
    only_dense = _tc(model).get("mlp_only_layers") or []
    if idx in only_dense or idx < moe.first_dense_layers:
        return False
    freq = max(1, moe.moe_layer_freq)
    if "interleave_moe_layer_step" in _tc(model) or "decoder_sparse_step" in _tc(model):
        return (idx + 1) % freq == 0  # Llama-4 / Qwen-MoE count from 1
    return idx % freq == 0  # DeepSeek: after first_k_dense_replace, every moe_layer_freq-th


def _attention_shapes(model: ModelFacts, tp: int) -> tuple[list[_Shape], int]:
    """Linear shapes of one attention block per rank, plus its small replicated/bias params."""
    h, heads = model.hidden_size, model.num_attention_heads
    tc = _tc(model)
    extra = 0
    if model.mla is not None:
        m = model.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        shapes = []
        if m.q_lora_rank:
            shapes += [
                _Shape(n_in=h, n_out=m.q_lora_rank),
                _Shape(n_in=m.q_lora_rank, n_out=heads * qk // tp),
            ]
            extra += m.q_lora_rank
        else:
            shapes.append(_Shape(n_in=h, n_out=heads * qk // tp))
        shapes += [
            _Shape(n_in=h, n_out=m.kv_lora_rank + m.qk_rope_head_dim),  # kv_a, replicated
            _Shape(n_in=m.kv_lora_rank, n_out=heads * (m.qk_nope_head_dim + m.v_head_dim) // tp),
            _Shape(n_in=heads * m.v_head_dim // tp, n_out=h),
        ]
        return shapes, extra + m.kv_lora_rank
    hd = model.head_dim
    kv_rank = max(1, model.num_kv_heads // tp)
    q_out, kv_out = heads * hd // tp, kv_rank * hd
    shapes = [
        _Shape(n_in=h, n_out=q_out + 2 * kv_out),
        _Shape(n_in=heads * hd // tp, n_out=h),
    ]
    if tc.get("attention_bias") or _family(model).startswith("qwen2"):
        extra += q_out + 2 * kv_out
    if _family(model).startswith(("qwen3", "gemma3", "olmo2")) or tc.get("use_qk_norm"):
        extra += 2 * hd
    return shapes, extra


def _mlp_shapes(model: ModelFacts, idx: int, tp: int) -> list[_Shape]:
    h, tc = model.hidden_size, _tc(model)
    moe = model.moe
    if moe is None or not _is_moe_layer(model, idx):
        inter = (
            tc.get("intermediate_size_mlp") if moe is not None and tc.get("intermediate_size_mlp") else None
        )
        inter = inter or model.intermediate_size
        return [_Shape(n_in=h, n_out=2 * inter // tp), _Shape(n_in=inter // tp, n_out=h)]
    e_inter = moe.moe_intermediate_size
    shapes = [
        _Shape(n_in=h, n_out=moe.num_experts, quantized=False),  # router, replicated
        _Shape(n_in=h, n_out=2 * e_inter // tp, count=moe.num_experts, expert=True, gate_up=True),
        _Shape(n_in=e_inter // tp, n_out=h, count=moe.num_experts, expert=True),
    ]
    shared = moe.shared_expert_intermediate_size or moe.num_shared_experts * e_inter
    if shared:
        shapes += [_Shape(n_in=h, n_out=2 * shared // tp), _Shape(n_in=shared // tp, n_out=h)]
        if tc.get("shared_expert_intermediate_size"):  # Qwen-MoE style sigmoid gate on the shared expert
            shapes.append(_Shape(n_in=h, n_out=1, quantized=False))
    return shapes


class _QuantLayout(Frozen):
    """How a quantized linear is stored: bits per weight and the scale/zero overhead."""

    weight_bits: float
    group_size: int | None = None  # None = per output channel
    scale_bytes: float = 2
    zero_bits: int = 0
    per_tensor: bool = False
    block: tuple[int, int] | None = None
    experts_only: bool = False


def _quant_layout(model: ModelFacts) -> _QuantLayout | None:
    """Read the quantization config into a storage layout (AWQ/GPTQ int4, FP8, compressed-tensors, MXFP4)."""
    q = model.quantization
    if q is None:
        return None
    method = q.method.lower()
    raw = q.raw or {}
    if method == "mxfp4":
        return _QuantLayout(weight_bits=4, group_size=32, scale_bytes=1, experts_only=True)
    if method in ("fp8", "fbgemm_fp8", "modelopt"):
        block = raw.get("weight_block_size")
        if block:
            return _QuantLayout(weight_bits=8, scale_bytes=4, block=(int(block[0]), int(block[1])))
        return _QuantLayout(weight_bits=8, scale_bytes=4, per_tensor=method == "fp8")
    if method == "compressed-tensors":
        bits, group, strategy, symmetric = 8, None, "channel", True
        for group_cfg in (raw.get("config_groups") or {}).values():
            weights = group_cfg.get("weights") or {}
            bits = weights.get("num_bits", bits)
            group = weights.get("group_size", group)
            strategy = weights.get("strategy", strategy)
            symmetric = weights.get("symmetric", symmetric)
            break
        zero = 0 if symmetric else 8
        if strategy == "tensor":
            return _QuantLayout(weight_bits=bits, scale_bytes=4, per_tensor=True)
        if strategy == "group" and group:
            return _QuantLayout(weight_bits=bits, group_size=int(group), scale_bytes=2, zero_bits=zero)
        return _QuantLayout(weight_bits=bits, scale_bytes=4 if bits == 8 else 2, zero_bits=zero)
    if method in ("awq", "gptq", "awq_marlin", "gptq_marlin", "marlin"):
        bits = q.weight_bits or raw.get("bits") or raw.get("w_bit") or 4
        group = q.group_size or raw.get("group_size") or raw.get("q_group_size") or 128
        group = None if group == -1 else int(group)
        return _QuantLayout(weight_bits=bits, group_size=group, scale_bytes=2, zero_bits=bits)
    if method in ("bitsandbytes",):
        # vLLM's bitsandbytes loader: 4-bit NF4/FP4 packed two per byte with an fp32 absmax per 64
        # weights, or with double quantization a uint8 absmax per 64 plus an fp32 per 256 of those;
        # 8-bit LLM.int8 keeps int8 weights and an fp32 scale per output row. Embeddings and the
        # modules in llm_int8_skip_modules (lm_head) stay in the model dtype.
        bits = q.weight_bits or (4 if raw.get("load_in_4bit") or not raw.get("load_in_8bit") else 8)
        if bits == 8:
            return _QuantLayout(weight_bits=8, group_size=None, scale_bytes=4)
        nested = raw.get("bnb_4bit_use_double_quant")
        return _QuantLayout(weight_bits=4, group_size=64, scale_bytes=1 + 4 / 256 if nested else 4)
    bits = q.weight_bits or 8
    return _QuantLayout(weight_bits=bits, group_size=q.group_size, scale_bytes=2)


def _linear_bytes(shape: _Shape, dtype_bytes: int, layout: _QuantLayout | None) -> int:
    """Bytes of one (possibly quantized) linear per rank, with its scales and zero points."""
    n = shape.n_in * shape.n_out
    if layout is None or not shape.quantized or (layout.experts_only and not shape.expert):
        return n * dtype_bytes * shape.count
    size = n * layout.weight_bits / 8
    if layout.per_tensor:
        size += layout.scale_bytes
    elif layout.block:
        size += (
            math.ceil(shape.n_in / layout.block[1])
            * math.ceil(shape.n_out / layout.block[0])
            * layout.scale_bytes
        )
    elif layout.group_size:
        groups = math.ceil(shape.n_in / layout.group_size) * shape.n_out
        size += groups * (layout.scale_bytes + layout.zero_bits / 8)
    else:
        size += shape.n_out * (layout.scale_bytes + layout.zero_bits / 8)
    return int(size) * shape.count


def _vision_params(model: ModelFacts) -> int:
    """A ViT tower and its projector, counted from vision_config (0 for text-only models)."""
    vc = (model.config or {}).get("vision_config")
    if not isinstance(vc, dict):
        return 0
    hv = vc.get("hidden_size") or vc.get("embed_dim") or vc.get("width") or 0
    if not hv:
        return 0
    iv = vc.get("intermediate_size") or 4 * hv
    layers = vc.get("num_hidden_layers") or vc.get("depth") or vc.get("num_layers") or 0
    patch = vc.get("patch_size") or 14
    channels = vc.get("num_channels") or vc.get("in_channels") or 3
    image = vc.get("image_size") or 0
    image = image[0] if isinstance(image, list) else image  # [height, width]: square in the towers counted here
    gated = str(vc.get("hidden_act", "")).lower() in ("silu", "swiglu") or vc.get("model_type") == "pixtral"
    mlp = (3 if gated else 2) * hv * iv
    per_layer = 4 * hv * hv + mlp + 9 * hv + iv
    positions = (image // patch) ** 2 * hv if image else 0
    h_text = model.hidden_size
    merge = (model.config or {}).get("spatial_merge_size") or vc.get("merge_kernel_size") or 1
    merge = merge[0] * merge[1] if isinstance(merge, list) else merge * merge
    feature_layers = (model.config or {}).get("vision_feature_layer")
    merge *= len(feature_layers) if isinstance(feature_layers, list) else 1  # LLaVA-Next concatenates layers
    projector = hv * merge * h_text + h_text * h_text
    return layers * per_layer + channels * patch * patch * hv + positions + projector


def _rope_cache_params(model: ModelFacts) -> int:
    """vLLM keeps a cos/sin cache of max_position x rotary_dim per attention type (replicated)."""
    rot = model.mla.qk_rope_head_dim if model.mla else model.head_dim
    rot = int(rot * float(_tc(model).get("partial_rotary_factor") or 1.0))
    max_pos = model.max_position_embeddings or model.derived_max_model_len
    scaling = model.rope_scaling or _tc(model).get("rope_scaling") or {}
    kind = str(scaling.get("rope_type") or scaling.get("type") or "")
    factor = float(scaling.get("factor") or 1.0)
    if kind in ("linear", "dynamic"):  # the cache covers max_position x factor positions
        cached = int(max_pos * factor)
    elif kind in ("yarn", "deepseek_yarn"):
        cached = int((scaling.get("original_max_position_embeddings") or max_pos) * factor)
    else:
        cached = max_pos
    local = max_pos if _tc(model).get("rope_local_base_freq") else 0  # a second, unscaled cache (Gemma-3)
    return (cached + local) * rot


class RankWeights(Frozen):
    """Weight bytes held by one (TP, PP) rank, and which layers it holds."""

    bytes: int
    layers: tuple[int, ...]
    first: bool
    last: bool


def _mxfp4_expert_bytes(shape: _Shape, pad: tuple[int, int], h: int) -> int:
    """An MXFP4 expert matrix as vLLM holds it: 4-bit weights, one e8m0 scale per 32, a bf16 bias,
    with the intermediate size rounded up to pad[0] and the hidden size to pad[1] for the kernel
    (vllm/model_executor/layers/quantization/mxfp4.py create_weights)."""
    def up(n: int, m: int) -> int:
        return -(-n // m) * m

    n_in, n_out = shape.n_in, shape.n_out
    if shape.gate_up:  # hidden -> 2 x intermediate
        n_in, n_out = up(h, pad[1]), 2 * up(n_out // 2, pad[0])
    else:  # down: intermediate -> hidden
        n_in, n_out = up(n_in, pad[0]), up(h, pad[1])
    return (n_in * n_out // 2 + n_out * math.ceil(n_in / 32) + 2 * n_out) * shape.count


def _rank_weight_bytes(
    model: ModelFacts,
    dtype_bytes: int,
    tp: int,
    layers: range,
    first: bool,
    last: bool,
    mxfp4_pad: tuple[int, int] | None = None,
) -> int:
    layout = _quant_layout(model)
    h = model.hidden_size
    norms_per_layer = 4 if _family(model).startswith("gemma") else 2
    mxfp4 = layout is not None and layout.experts_only
    mxfp4_pad = mxfp4_pad or (1, 1)  # the checkpoint's own layout
    total = 0
    for idx in layers:
        attn, extra = _attention_shapes(model, tp)
        total += sum(_linear_bytes(s, dtype_bytes, layout) for s in attn)
        for shape in _mlp_shapes(model, idx, tp):
            if mxfp4 and shape.expert:
                total += _mxfp4_expert_bytes(shape, mxfp4_pad, h)
            else:
                total += _linear_bytes(shape, dtype_bytes, layout)
        total += (extra + norms_per_layer * h) * dtype_bytes
    vocab_rank = math.ceil(model.vocab_size / VOCAB_PADDING) * VOCAB_PADDING // tp
    if first:
        total += vocab_rank * h * dtype_bytes
        total += _vision_params(model) * dtype_bytes // tp
    if last:
        total += h * dtype_bytes
        if not model.tie_word_embeddings or not first:
            total += vocab_rank * h * dtype_bytes
    total += _rope_cache_params(model) * dtype_bytes
    return total


_MIB = 1 << 20


def _allocator_block_bytes(n: int) -> int:
    """Bytes PyTorch's CUDA caching allocator counts as allocated for one fresh n-byte tensor.

    Why: "Loading model weights took" is torch.cuda.max_memory_allocated after load minus before
    (vllm/platforms/cuda.py get_current_memory_usage, 0.7.0), and that counts whole blocks. A
    request of 10 MiB or more gets its own segment rounded up to 2 MiB, and the rest is split off
    only when it is more than 1 MiB (c10/cuda/CUDACachingAllocator.cpp get_allocation_size,
    kRoundLarge; should_split, kSmallSize); smaller requests are split from shared segments.
    Assumes PyTorch's default allocator config (expandable_segments off, as V0 leaves it).
    """
    size = -(-n // 512) * 512
    if size < 10 * _MIB:
        return size
    segment = -(-size // (2 * _MIB)) * (2 * _MIB)
    return segment if segment - size <= _MIB else size


def allocator_rounding_bytes(model: ModelFacts, dtype: str, tp: int, stage: RankWeights) -> int:
    """Bytes the caching allocator holds beyond one rank's large unquantized tensors (linears, fused
    experts, embedding, LM head, rope cache): each is its own 2 MiB-rounded segment whose tail of
    at most 1 MiB stays in the block (see _allocator_block_bytes). vsl-019 (Qwen2-14B, TP 2): 3.5
    MiB a layer, 0.16 GiB a rank. Quantized layouts are not split into tensors here: 0 (the estimate
    keeps the fitted load slack for them)."""
    if _quant_layout(model) is not None:
        return 0
    dtype_bytes = DTYPE_BYTES[dtype]
    tensors: list[int] = []
    for idx in stage.layers:
        attn, _ = _attention_shapes(model, tp)
        tensors += [s.n_in * s.n_out * s.count * dtype_bytes for s in attn + _mlp_shapes(model, idx, tp)]
    vocab = math.ceil(model.vocab_size / VOCAB_PADDING) * VOCAB_PADDING // tp * model.hidden_size * dtype_bytes
    if stage.first:
        tensors.append(vocab)
    if stage.last and (not model.tie_word_embeddings or not stage.first):
        tensors.append(vocab)
    tensors.append(_rope_cache_params(model) * dtype_bytes)
    return sum(_allocator_block_bytes(n) - n for n in tensors)


def weights_per_rank(
    model: ModelFacts, dtype: str, tp: int, pp: int, mxfp4_pad: tuple[int, int] | None = None
) -> list[RankWeights]:
    """Weight bytes per PP stage (identical across the TP ranks of a stage), as vLLM holds them.

    Exact safetensors bytes, when known, are split in the proportion the counted layout gives.
    MXFP4 experts are held padded for the kernel the GPU runs (`mxfp4_pad`, from
    vllm_profiles.mxfp4_padding): the padding is added on top of the checkpoint's bytes.
    """
    dtype_bytes = DTYPE_BYTES[dtype]
    ranges = pp_layer_ranges(model.num_hidden_layers, pp)
    counted = [
        _rank_weight_bytes(model, dtype_bytes, tp, r, i == 0, i == pp - 1) for i, r in enumerate(ranges)
    ]
    padding = [0] * pp
    if mxfp4_pad is not None and (layout := _quant_layout(model)) is not None and layout.experts_only:
        padding = [
            _rank_weight_bytes(model, dtype_bytes, tp, r, i == 0, i == pp - 1, mxfp4_pad) - c
            for i, (r, c) in enumerate(zip(ranges, counted, strict=True))
        ]
    if model.weight_bytes:
        whole = _rank_weight_bytes(model, dtype_bytes, 1, range(model.num_hidden_layers), True, True)
        exact = model.weight_bytes
        ckpt = DTYPE_BYTES.get(DTYPE_ALIASES.get(model.torch_dtype, model.torch_dtype), dtype_bytes)
        if model.quantization is None and ckpt != dtype_bytes:
            exact = exact * dtype_bytes // ckpt
        rope = _rope_cache_params(model) * dtype_bytes
        counted = [int((c - rope) * (exact / max(1, whole - rope))) + rope for c in counted]
    return [
        RankWeights(bytes=c + extra, layers=tuple(r), first=i == 0, last=i == pp - 1)
        for i, (c, r, extra) in enumerate(zip(counted, ranges, padding, strict=True))
    ]


def _mla_absorbed_bytes(model: ModelFacts, dtype: str, tp: int, layers: int, profile: Profile) -> int:
    """V0 0.7.1-0.7.3 MLA keeps matrix-absorbed copies beside the raw weights for decode
    (vllm/attention/backends/mla/utils.py process_weights_after_loading, VLLM_MLA_PERFORM_MATRIX_
    ABSORPTION on): W_Q_UK (q_in x heads*kv_lora), W_UV_O (heads*kv_lora x hidden) and W_QR (q_in x
    heads*rope) per layer, heads split by TP; counted in "Loading model weights took" (pub-017:
    3.97 GiB printed, 0.22 GiB of it these). Gone in 0.8 (views of kv_b_proj instead)."""
    if model.mla is None or not profile.mla_absorbed_weights:
        return 0
    m = model.mla
    heads = max(1, model.num_attention_heads // tp)
    q_in = m.q_lora_rank or model.hidden_size
    per_layer = heads * (q_in * m.kv_lora_rank + m.kv_lora_rank * model.hidden_size + q_in * m.qk_rope_head_dim)
    return per_layer * layers * DTYPE_BYTES.get(dtype, 2)


def _after_cpu_offload(
    weights: int, absorbed: int, offload_gib: float, model: ModelFacts, dtype: str, tp: int, stage: RankWeights
) -> int:
    """Weight bytes left on the GPU with --cpu-offload-gb: vLLM offloads the decoder layers'
    parameters only (models/utils.py make_layers -> maybe_offload_to_cpu, 0.7.2 and on), so the
    embeddings, LM head, final norm and the RoPE buffer stay (pub-016: 0.80 GiB of DeepSeek-V2-Lite
    stayed with 30 GiB of offload). MLA copies derived from an offloaded layer (`absorbed`) are made
    where its weights are, so they leave with it."""
    if offload_gib <= 0:
        return weights + absorbed
    kept = min(weights, _rank_weight_bytes(model, DTYPE_BYTES[dtype], tp, range(0), stage.first, stage.last))
    layer_bytes = weights - kept
    off = min(layer_bytes, int(offload_gib * GIB))
    share_left = 1 - off / layer_bytes if layer_bytes else 1.0
    return kept + layer_bytes - off + int(absorbed * share_left)


# ---------------------------------------------------------------------------------------------
# Activation, non-torch, CUDA graphs


class Coefficients(Frozen):
    """The few fitted numbers of the activation, non-torch and CUDA-graph terms (GiB unless bytes).

    The defaults are the least-squares fit over the distinct vLLM 0.19.0 H100 configurations of
    fixtures/reference/vllm_startup_logs.jsonl (`benchmarks/estimator_accuracy.py --fit` prints
    them; tests/test_memory.py checks they still agree). `--cross-validate` refits without one
    model family at a time and predicts it: the sampler coefficient stays within 12.92-13.00.
    """

    sampler_extra_bytes: float = 12.96  # sampler buffers per logit element beyond the dtype copy
    pp_hidden_buffers: float = 3.1  # PP: extra mnbt x hidden buffers a stage holds (sent/received states)
    non_torch_single: float = 0.263  # one GPU: CUDA context growth, cuBLAS workspaces
    non_torch_pp_only: float = 0.07  # PP without TP: NCCL set up before the snapshot
    non_torch_tp_base: float = 1.993  # TP >= 2: NCCL + custom all-reduce IPC buffers ...
    non_torch_tp_slope: float = 0.0443  # ... growing a little with the group size
    graph_base: float = 0.387  # CUDA graph pool, fixed part
    graph_per_layer: float = 0.0163  # per layer at hidden 4096 and tp 1
    graph_per_expert: float = 0.0047  # per layer and routed expert per token (MoE)
    # "Model loading took" exceeds the tensors' bytes by the allocator's rounding and the loader's
    # leftovers: the mean excess over the 0.19 logs (0-1.4%; Qwen2-72B at tp2 +0.12%, whose thin KV
    # was over-predicted by 3% without it).
    weight_load_slack: float = 0.0017


FITTED = Coefficients()

# fused_experts allocates its caches for min(tokens, VLLM_FUSED_MOE_CHUNK_SIZE) tokens and loops
# over chunks. The default has been 64K, 32K (vLLM PR 7995), 64K again and 16K; the largest is
# used, so a long unchunked prefill's MoE workspace is bounded and the estimate errs high.
FUSED_MOE_CHUNK_TOKENS = 65536


def activation_bytes(
    model: ModelFacts,
    dtype: str,
    tp: int,
    max_num_seqs: int,
    mnbt: int,
    last: bool,
    sampler_extra: float = FITTED.sampler_extra_bytes,
    first: bool = True,
    pp: int = 1,
    pp_buffers: float = FITTED.pp_hidden_buffers,
) -> int:
    """Peak transient memory of vLLM's profile run.

    Two phases, the larger wins (the forward pass is freed before the sampler runs):
    - sampler on min(max_num_seqs, mnbt) rows of full-vocab logits: the logits in the model dtype,
      their fp32 copy, softmax/log-probs and sort buffers (`sampler_extra` bytes per element
      beyond the dtype copy, fitted; logits are gathered to the full vocab on every TP rank, so
      this term does not shrink with TP); the batch's hidden states and the MoE workspaces are
      still held;
    - the forward pass over mnbt tokens: the MLP's gate/up output (2I) and activated output (I)
      alive together, about four hidden-size buffers (residual, norm, attention in/out) and,
      for MoE, the fused-MoE workspaces (topk x (2I + I + H) per token).
    Multimodal models first run their encoder on a dummy batch and keep its outputs (about mnbt
    embeddings of the text hidden size, on every TP rank of the first stage) through both phases.
    With PP, each stage also holds `pp_buffers` (fitted) mnbt x hidden buffers: the hidden and
    residual states it sends on or receives.
    """
    fixed, per_logit = activation_terms(model, dtype, tp, max_num_seqs, mnbt, last, first)
    pp_hold = pp_buffers * pp_buffer_bytes(model, dtype, mnbt) if pp > 1 else 0
    return int(max(fixed[0] + per_logit * sampler_extra, fixed[1]) + pp_hold)


def pp_buffer_bytes(model: ModelFacts, dtype: str, mnbt: int) -> int:
    """One mnbt x hidden buffer in the model dtype (the unit of the PP term)."""
    return mnbt * model.hidden_size * DTYPE_BYTES[dtype]


def activation_terms(
    model: ModelFacts, dtype: str, tp: int, max_num_seqs: int, mnbt: int, last: bool, first: bool = True
) -> tuple[tuple[int, int], int]:
    """((sampler phase without the fitted part, forward phase), logit elements) in bytes/elements.

    The sampler phase is fixed[0] + logit_elements x sampler_extra_bytes; kept apart so the fit
    routine sees the same physical features the estimate uses.
    """
    dtype_bytes = DTYPE_BYTES[dtype]
    h = model.hidden_size
    rows = min(max_num_seqs, mnbt)
    moe_ws = 0
    if model.moe is not None:
        e_inter = model.moe.moe_intermediate_size // tp
        chunk = min(mnbt, FUSED_MOE_CHUNK_TOKENS)
        moe_ws = chunk * model.moe.experts_per_token * (3 * e_inter + h) * dtype_bytes
    logits = rows * model.vocab_size if last else 0
    held = mnbt * h * dtype_bytes
    encoder_cache = mnbt * h * dtype_bytes if model.is_multimodal and first else 0
    held += encoder_cache
    forward = mnbt * (3 * model.intermediate_size // tp + 4 * h) * dtype_bytes + moe_ws + encoder_cache
    return (logits * dtype_bytes + held + moe_ws, forward), logits


def non_torch_bytes(
    tp: int,
    pp: int,
    v0_engine: bool = False,
    coeffs: Coefficients = FITTED,
    profile: Profile | None = None,
    without_nvlink: bool = False,
) -> int:
    """Non-torch growth during profiling: CUDA context/cuBLAS workspaces (~0.25 GiB on one GPU).

    With TP >= 2 NCCL and the custom all-reduce IPC buffers add about 1.8 GiB, growing a little
    with the group size (0.19 logs: 2.06-2.11 GiB at tp2, 2.13-2.21 at tp4). With PP only, NCCL
    is set up before the snapshot, so the growth is smaller (0.07 GiB). Older eras measured other
    figures (their profile's `non_torch_*_gib`, from their public startups): 0.9-0.10 grew far
    less with TP, 0.8 counts the whole CUDA context. A TP group known to have no NVLink uses its
    profile's `non_torch_tp_no_nvlink_gib` where one was measured (NCCL over PCIe/shared memory,
    no custom all-reduce without P2P); elsewhere the fitted NVLink-class figure (errs low).
    """
    if tp >= 2 and without_nvlink and profile is not None and profile.non_torch_tp_no_nvlink_gib is not None:
        return int(profile.non_torch_tp_no_nvlink_gib * GIB)
    if profile is not None and (profile.non_torch_single_gib is not None or profile.non_torch_tp_gib is not None):
        single = profile.non_torch_single_gib
        single = coeffs.non_torch_single if single is None else single
        if tp >= 2:
            multi = profile.non_torch_tp_gib
            return int((coeffs.non_torch_tp_base + coeffs.non_torch_tp_slope * tp if multi is None else multi) * GIB)
        return int(single * GIB)
    if v0_engine:  # V0's figure when no profile says otherwise
        return int(0.25 * GIB)
    if tp >= 2:
        return int((coeffs.non_torch_tp_base + coeffs.non_torch_tp_slope * tp) * GIB)
    return int((coeffs.non_torch_single if pp == 1 else coeffs.non_torch_pp_only) * GIB)


def cudagraph_features(model: ModelFacts, num_layers_rank: int, tp: int) -> tuple[float, float]:
    """(layer feature, expert feature) the graph pool grows with, per GiB of their coefficients.

    The per-layer part grows with the hidden size (sub-linearly: the largest capture is 512
    tokens, so kernel workspaces dominate) and shrinks with TP (sharded intermediates); MoE
    layers add routing/workspace buffers per routed expert.
    """
    per_layer = num_layers_rank * (0.5 + 0.5 / tp) * math.sqrt(model.hidden_size / 4096)
    per_expert = num_layers_rank * model.moe.experts_per_token if model.moe is not None else 0.0
    return per_layer, per_expert


def cudagraph_bytes(
    model: ModelFacts,
    num_layers_rank: int,
    tp: int,
    enforce_eager: bool,
    optimization_level: int | None,
    coeffs: Coefficients = FITTED,
) -> int:
    """CUDA graph pool: a fixed part plus, per layer, buffers of the captured batches.

    Fitted on the "Graph capturing finished ... took X GiB" lines of the 0.19 H100 logs.
    """
    if enforce_eager or optimization_level == 0:
        return 0
    per_layer, per_expert = cudagraph_features(model, num_layers_rank, tp)
    return int(
        (coeffs.graph_base + coeffs.graph_per_layer * per_layer + coeffs.graph_per_expert * per_expert) * GIB
    )


# ---------------------------------------------------------------------------------------------
# KV cache


class KVGroup(Frozen):
    """A KV-cache group of the hybrid manager: `layers` layers sharing one spec."""

    kind: str  # "full" | "sliding" | "chunked"
    layers: int  # layers in the group (group size, padding included)
    window: int | None = None


def layer_kinds(model: ModelFacts) -> list[tuple[str, int | None]]:
    """Per layer: (full|sliding|chunked, window). Llama-4 style chunked local attention too."""
    tc = _tc(model)
    n = model.num_hidden_layers
    if model.layer_types:
        kinds = []
        for t in model.layer_types:
            if "sliding" in t:
                kinds.append(("sliding", model.sliding_window))
            elif "chunk" in t:
                kinds.append(("chunked", tc.get("attention_chunk_size")))
            else:
                kinds.append(("full", None))
        return kinds
    chunk = tc.get("attention_chunk_size")
    if chunk:
        nope = tc.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(n)]
        return [("chunked", chunk) if nope[i] else ("full", None) for i in range(n)]
    if model.sliding_window and tc.get("use_sliding_window", True) is not False:
        return [("sliding", model.sliding_window)] * n
    return [("full", None)] * n


def kv_groups(kinds: list[tuple[str, int | None]]) -> list[KVGroup]:
    """vLLM's grouping: group size = fewest layers of one type (or the most, when close), pad the rest."""
    by_type: dict[tuple[str, int | None], int] = {}
    for layer in kinds:
        by_type[layer] = by_type.get(layer, 0) + 1
    if len(by_type) == 1:
        (kind, window), count = next(iter(by_type.items()))
        return [KVGroup(kind=kind, layers=count, window=window)]
    smallest, largest = min(by_type.values()), max(by_type.values())
    size = largest if largest < smallest * 1.25 else smallest
    groups: list[KVGroup] = []
    for (kind, window), count in by_type.items():
        groups += [KVGroup(kind=kind, layers=size, window=window)] * math.ceil(count / size)
    return groups


def kv_bytes_per_token_layer(
    model: ModelFacts, kv_elem_bytes: int, tp: int, mla_latent: bool = True, mla_align_elems: int = 0
) -> int:
    """Bytes per token per layer on one GPU: MLA latent (replicated) or K+V of the rank's KV heads.

    Before vLLM 0.7.1 (V0, no MLA backend) DeepSeek's attention cached every head's K and V padded
    to 256 (vllm/model_executor/models/deepseek_v2.py, 0.6.6.post1 l.266-312): 2 x heads/TP x 256.
    `mla_align_elems`: V0 0.7.2-0.7.3 rounds the latent entry up to 256 bytes of the model dtype
    (vllm/worker/cache_engine.py get_cache_block_size, align_to_256bytes; 576 -> 640 for 16-bit).
    """
    if model.mla is not None and not mla_latent:
        return 2 * max(1, model.num_attention_heads // tp) * 256 * kv_elem_bytes
    if model.mla is not None:
        entry = model.mla.kv_lora_rank + model.mla.qk_rope_head_dim
        if mla_align_elems:
            entry = -(-entry // mla_align_elems) * mla_align_elems
        return entry * kv_elem_bytes
    heads_rank = max(1, model.num_kv_heads // tp)
    return 2 * heads_rank * model.head_dim * kv_elem_bytes


def blocks_per_request(group: KVGroup, max_model_len: int, block_size: int, mnbt: int) -> int:
    """Blocks one request at max_model_len takes in a group (sliding/chunked capped by window + in flight)."""
    if group.kind == "full" or not group.window:
        return math.ceil(max_model_len / block_size)
    in_flight = 2 * mnbt
    span = min(group.window - 1 + in_flight, max_model_len)
    return math.ceil(span / block_size) + 1


# ---------------------------------------------------------------------------------------------
# The estimate


class _Budget(Frozen):
    """Everything that does not depend on max_model_len, for the tightest rank."""

    total: int
    requested: int
    free: int
    weights: int
    activation: int
    non_torch: int
    cudagraph: int
    kv: int
    bytes_per_block: int
    num_blocks: int
    kv_per_token: int
    groups: tuple[KVGroup, ...]


def _stage_budgets(
    model: ModelFacts,
    gpus: list[GpuSpec],
    flags: EngineFlags,
    profile: Profile,
    dtype: str,
    kv_elem: int,
    util: float,
    seqs: int,
    mnbt: int,
    block_size: int,
    coeffs: Coefficients = FITTED,
    mxfp4_pad: tuple[int, int] | None = None,
    calibrated: int = 0,
) -> list[_Budget]:
    """The tightest GPU's budget of each PP stage, in stage order (a stage's TP ranks hold the same layers)."""
    tp, pp = flags.tensor_parallel_size, flags.pipeline_parallel_size
    stages = weights_per_rank(model, dtype, tp, pp, mxfp4_pad)
    kinds = layer_kinds(model)
    align = 256 // DTYPE_BYTES.get(dtype, 2) if profile.mla_align_bytes else 0
    page = kv_bytes_per_token_layer(model, kv_elem, tp, profile.mla_latent_cache, align)
    out: list[_Budget] = []
    for stage_idx, stage in enumerate(stages):
        stage_kinds = [kinds[i] for i in stage.layers]
        groups = kv_groups(stage_kinds)
        bytes_per_block = max(g.layers for g in groups) * page * block_size
        sampler = profile.sampler_extra_bytes
        activation = activation_bytes(
            model,
            dtype,
            tp,
            seqs,
            mnbt,
            stage.last,
            (coeffs.sampler_extra_bytes if sampler is None else sampler) + profile.native_topk_topp_bytes,
            stage.first,
            pp,
            coeffs.pp_hidden_buffers,
        )
        group = gpus[stage_idx * tp : (stage_idx + 1) * tp]
        non_torch = non_torch_bytes(
            tp, pp, profile.v0_engine, coeffs, profile, bool(group) and all(g.without_nvlink for g in group)
        )
        graphs = cudagraph_bytes(
            model, len(stage.layers), tp, flags.enforce_eager, flags.optimization_level, coeffs
        )
        best: _Budget | None = None
        for gpu in gpus[stage_idx * tp : (stage_idx + 1) * tp]:
            total = gpu.cuda_total_bytes
            requested = math.ceil(total * util)
            if profile.allocator_rounding and _quant_layout(model) is None:
                weights = stage.bytes + allocator_rounding_bytes(model, dtype, tp, stage)
            else:
                weights = int(stage.bytes * (1 + coeffs.weight_load_slack))
            absorbed = _mla_absorbed_bytes(model, dtype, tp, len(stage.layers), profile)
            weights = _after_cpu_offload(weights, absorbed, flags.cpu_offload_gb, model, dtype, tp, stage)
            kv = (
                requested
                - weights
                - activation
                - non_torch
                - (graphs if profile.cudagraph_subtracted else 0)
                - calibrated
            )
            blocks = max(0, kv // bytes_per_block)
            candidate = _Budget(
                total=total,
                requested=requested,
                free=gpu.cuda_free_bytes,
                weights=weights,
                activation=activation,
                non_torch=non_torch,
                cudagraph=graphs,
                kv=kv,
                bytes_per_block=bytes_per_block,
                num_blocks=blocks,
                kv_per_token=page * len(stage.layers),
                groups=tuple(groups),
            )
            if best is None or (candidate.num_blocks, candidate.kv) < (best.num_blocks, best.kv):
                best = candidate
        assert best is not None
        out.append(best)
    return out


def _budget(model: ModelFacts, gpus: list[GpuSpec], flags: EngineFlags, profile: Profile, dtype: str,
            kv_elem: int, util: float, seqs: int, mnbt: int, block_size: int, coeffs: Coefficients = FITTED,
            mxfp4_pad: tuple[int, int] | None = None, calibrated: int = 0) -> _Budget:
    """The engine's budget: the rank with the fewest KV blocks decides (vLLM takes the minimum)."""
    stages = _stage_budgets(model, gpus, flags, profile, dtype, kv_elem, util, seqs, mnbt, block_size, coeffs,
                            mxfp4_pad, calibrated)
    return min(stages, key=lambda b: (b.num_blocks, b.kv))


def _request_blocks(b: _Budget, max_model_len: int, block_size: int, mnbt: int) -> int:
    return sum(blocks_per_request(g, max_model_len, block_size, mnbt) for g in b.groups)


def _largest_len(b: _Budget, derived: int, block_size: int, mnbt: int) -> int:
    """Binary search, as vLLM's auto-fit / estimated maximum model length (one null block kept back)."""
    usable = b.num_blocks - 1
    if usable <= 0 or _request_blocks(b, 1, block_size, mnbt) > usable:
        return 0
    lo, hi = 1, derived
    if _request_blocks(b, hi, block_size, mnbt) <= usable:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _request_blocks(b, mid, block_size, mnbt) <= usable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _online_quantized(model: ModelFacts, method: str) -> ModelFacts:
    """The model as vLLM holds it after quantizing a full-precision checkpoint at load time.

    Exact safetensors bytes are of the checkpoint's dtype: they are scaled by what the counted layout
    says the quantization keeps (Mixtral at --quantization fp8 is ~47 GiB, not its 87 GiB of bf16 files).
    """
    quantized = model.model_copy(update={"quantization": QuantFacts(method=method)})
    if not model.weight_bytes:
        return quantized
    ckpt = DTYPE_BYTES.get(DTYPE_ALIASES.get(model.torch_dtype, model.torch_dtype), 2)
    layers = range(model.num_hidden_layers)
    full = _rank_weight_bytes(model, ckpt, 1, layers, True, True)
    kept = _rank_weight_bytes(quantized, ckpt, 1, layers, True, True)
    return quantized.model_copy(update={"weight_bytes": int(model.weight_bytes * kept / max(1, full))})


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def estimate(
    model: ModelFacts,
    gpus: Sequence[GpuSpec] | HardwareSnapshot,
    flags: EngineFlags,
    vllm_version: str | None = None,
    coefficients: Coefficients = FITTED,
    calibration: Correction | None = None,
) -> MemoryEstimate:
    """Budget one startup. `gpus` are the GPUs the engine will use (first tp*pp of them).

    `coefficients` replaces the fitted terms (the benchmark's cross-validation refits them).
    `calibration` (smartrun.calibration, learned from this machine's own startups) adds its GiB to
    the non-KV memory of every GPU; the caller looks it up, so the estimate stays a pure function.
    """
    return _estimate(model, gpus, flags, vllm_version, coefficients, calibration)[0]


class StageMemory(Frozen):
    """One pipeline stage's budget on its tightest GPU (GiB per GPU): what `stage_memory` reports per stage."""

    stage: int
    layers: tuple[int, int]  # first and last decoder layer (inclusive)
    first: bool  # holds the embeddings (and, multimodal, the encoder outputs)
    last: bool  # holds the LM head and the sampler
    gpus: tuple[int, ...]  # positions in the `gpus` given (stage i uses [i*tp, (i+1)*tp))
    requested_gib: float
    weights_gib: float
    activation_gib: float
    non_torch_gib: float
    cudagraph_gib: float
    kv_cache_gib: float
    num_gpu_blocks: int
    fits: bool  # room for at least one block beyond the null block, and util x total free at start


def stage_memory(
    model: ModelFacts,
    gpus: Sequence[GpuSpec] | HardwareSnapshot,
    flags: EngineFlags,
    vllm_version: str | None = None,
    calibration: Correction | None = None,
) -> tuple[MemoryEstimate, tuple[StageMemory, ...]]:
    """The engine's estimate and each PP stage's own budget (the same budgets `estimate` takes the minimum of)."""
    return _estimate(model, gpus, flags, vllm_version, FITTED, calibration, stages=True)


def _estimate(
    model: ModelFacts,
    gpus: Sequence[GpuSpec] | HardwareSnapshot,
    flags: EngineFlags,
    vllm_version: str | None,
    coefficients: Coefficients,
    calibration: Correction | None,
    stages: bool = False,
) -> tuple[MemoryEstimate, tuple[StageMemory, ...]]:
    gpu_list = _gpu_list(gpus)
    if not gpu_list:
        raise EstimateError("no GPU given: pass --gpu NAME or a hardware snapshot with GPUs")
    _check_parallel(model, flags, len(gpu_list))
    if (
        flags.quantization and model.quantization is None
    ):  # online quantization of a full-precision checkpoint
        model = _online_quantized(model, flags.quantization)
    used = gpu_list[: flags.tensor_parallel_size * flags.pipeline_parallel_size]
    low_cc = min((g.compute_capability for g in used), key=_cc_key)
    version, profile = resolve_version(vllm_version, low_cc, flags.kv_cache_dtype.lower())
    mxfp4_pad = vllm_profiles.mxfp4_padding(version, low_cc)
    dtype = _dtype_name(flags.dtype, model, low_cc)
    kv_elem = _kv_bytes_per_element(flags.kv_cache_dtype, dtype)
    util = flags.gpu_memory_utilization if flags.gpu_memory_utilization is not None else profile.default_util
    block_size = flags.block_size or 16
    derived = model.derived_max_model_len
    auto = flags.max_model_len is not None and flags.max_model_len <= 0
    max_model_len = derived if (flags.max_model_len is None or auto) else flags.max_model_len
    if max_model_len > derived:
        raise EstimateError(
            f"User-specified max_model_len ({max_model_len}) is greater than the derived max_model_len "
            f"({derived}) in model's config.json."
        )
    tightest = min(used, key=lambda g: g.cuda_total_bytes)
    seqs, mnbt = effective_batch_defaults(
        flags, tightest.cuda_total_bytes, tightest.name, profile, max_model_len
    )
    calibrated = int(calibration.non_kv_gib * GIB) if calibration is not None else 0
    b = _budget(model, used, flags, profile, dtype, kv_elem, util, seqs, mnbt, block_size, coefficients, mxfp4_pad,
                calibrated)
    largest = _largest_len(b, derived, block_size, mnbt)
    if auto and largest > 0:
        max_model_len = largest
        seqs, mnbt = effective_batch_defaults(
            flags, tightest.cuda_total_bytes, tightest.name, profile, max_model_len
        )
        b = _budget(model, used, flags, profile, dtype, kv_elem, util, seqs, mnbt, block_size, coefficients, mxfp4_pad,
                    calibrated)
    per_request = _request_blocks(b, max_model_len, block_size, mnbt)
    concurrency = b.num_blocks / per_request if per_request else 0.0
    tokens = _tokens(b, b.num_blocks, concurrency, profile, block_size, max_model_len)
    # The plan-safe low end: the profile's band of non-KV memory kept back (vllm_profiles.Profile.margin).
    non_kv = b.weights + b.activation + b.non_torch + (b.cudagraph if profile.cudagraph_subtracted else 0)
    margin = profile.margin_bytes(non_kv)
    if calibration is not None:  # this machine's own startups: their band once enough of them agree
        margin = calibration.margin_bytes(margin)
    low = b.model_copy(update={"kv": b.kv - margin, "num_blocks": max(0, (b.kv - margin) // b.bytes_per_block)})
    concurrency_low = low.num_blocks / per_request if per_request else 0.0
    tokens_low = _tokens(low, low.num_blocks, concurrency_low, profile, block_size, max_model_len)
    largest_low = _largest_len(low, derived, block_size, mnbt)
    fits, reason = True, None
    if b.free < b.requested and not profile.v0_engine:  # V0 had no startup free-memory check
        fits = False
        reason = (
            f"Free memory on device ({_gib(b.free)}/{_gib(b.total)} GiB) on startup is less than desired GPU memory "
            f"utilization ({util}, {_gib(b.requested)} GiB); short by {_gib(b.requested - b.free)} GiB"
        )
    elif b.kv <= 0 or b.num_blocks <= 1:
        fits = False
        reason = (
            f"No available memory for the cache blocks: weights {_gib(b.weights)} + activation {_gib(b.activation)}"
            f" + non-torch {_gib(b.non_torch)}"
            + (f" + CUDA graphs {_gib(b.cudagraph)}" if profile.cudagraph_subtracted else "")
            + (f" + calibration {_gib(calibrated)}" if calibrated else "")
            + f" GiB exceed the requested {_gib(b.requested)} GiB by {_gib(2 * b.bytes_per_block - b.kv)} GiB"
        )
    elif auto and largest == 0:
        fits = False
        reason = (
            "Cannot auto-fit max_model_len: not enough GPU memory available to serve even a single token; "
            f"KV cache {_gib(b.kv)} GiB, one block needs {_gib(2 * b.bytes_per_block)} GiB with the null block"
        )
    elif per_request > b.num_blocks - 1:
        fits = False
        need = per_request * b.bytes_per_block
        estimated = (
            f" Based on the available memory, the estimated maximum model length is {largest}."
            if largest
            else ""
        )
        reason = (
            f"To serve at least one request with the model's max seq len ({max_model_len}), "
            f"({_gib(need)} GiB KV cache is needed, which is larger than the available KV cache memory "
            f"({_gib(b.kv)} GiB); short by {_gib(need - b.kv)} GiB.{estimated}"
        )
    per_stage: tuple[StageMemory, ...] = ()
    if stages:
        budgets = _stage_budgets(model, used, flags, profile, dtype, kv_elem, util, seqs, mnbt, block_size,
                                 coefficients, mxfp4_pad, calibrated)
        ranges = pp_layer_ranges(model.num_hidden_layers, flags.pipeline_parallel_size)
        tp = flags.tensor_parallel_size
        per_stage = tuple(
            StageMemory(
                stage=i, layers=(r[0], r[-1]), first=i == 0, last=i == len(budgets) - 1,
                gpus=tuple(range(i * tp, (i + 1) * tp)), requested_gib=_gib(sb.requested),
                weights_gib=_gib(sb.weights), activation_gib=_gib(sb.activation), non_torch_gib=_gib(sb.non_torch),
                cudagraph_gib=_gib(sb.cudagraph), kv_cache_gib=_gib(max(0, sb.kv)), num_gpu_blocks=int(sb.num_blocks),
                fits=sb.kv > 0 and sb.num_blocks > 1 and (profile.v0_engine or sb.free >= sb.requested),
            )
            for i, (sb, r) in enumerate(zip(budgets, ranges, strict=True))
        )
    return MemoryEstimate(
        vllm_version=version,
        profile=profile.name,
        total_gib=_gib(b.total),
        requested_gib=_gib(b.requested),
        free_gib=_gib(b.free),
        weights_gib=_gib(b.weights),
        activation_gib=_gib(b.activation),
        non_torch_gib=_gib(b.non_torch),
        cudagraph_gib=_gib(b.cudagraph),
        kv_cache_gib=_gib(max(0, b.kv)),
        kv_cache_tokens=int(tokens),
        kv_bytes_per_token=b.kv_per_token,
        block_size=block_size,
        num_gpu_blocks=int(b.num_blocks),
        max_model_len=max_model_len,
        max_num_seqs=seqs,
        max_num_batched_tokens=mnbt,
        max_concurrency=round(concurrency, 2),
        fits=fits,
        reason=reason,
        largest_max_model_len=largest,
        kv_cache_tokens_low=int(tokens_low),
        max_concurrency_low=round(concurrency_low, 2),
        largest_max_model_len_low=largest_low,
        margin_gib=_gib(margin),
        uncertainty=(
            f"profile {profile.name} (vLLM {profile.versions}): plan-safe band keeps back "
            f"{profile.margin:.1%} of the non-KV memory (at least {profile.margin_floor_gib} GiB); {profile.evidence}"
            + (f"; {calibration.band_text()}" if calibration is not None else "")
        ),
        calibration=calibration,
    ), per_stage


def _tokens(b: _Budget, blocks: int, concurrency: float, profile: Profile, block_size: int, max_model_len: int) -> int:
    """vLLM's "GPU KV cache size" for `blocks` (engine-wide: blocks are the min over ranks)."""
    if len(b.groups) == 1:
        return blocks * block_size
    if profile.tokens_group_aware:
        return int(concurrency * max_model_len)
    return blocks // len(b.groups) * block_size


def plan_safe_kv_tokens(est: MemoryEstimate) -> int:
    """The KV tokens a plan may count on: the low end of the estimate's band (never cache that is not there)."""
    return est.kv_cache_tokens if est.kv_cache_tokens_low is None else min(est.kv_cache_tokens, est.kv_cache_tokens_low)


def plan_safe_max_model_len(est: MemoryEstimate) -> int:
    """The largest max_model_len a plan may choose: vLLM's own fit at the low end of the band."""
    low = est.largest_max_model_len_low
    return est.largest_max_model_len if low is None else min(est.largest_max_model_len, low)


def plan_safe_fits(est: MemoryEstimate) -> bool:
    """Whether the estimate fits even at the low end of its band (one request at max_model_len)."""
    return est.fits and est.max_model_len <= plan_safe_max_model_len(est)


def largest_fitting_model_len(
    model: ModelFacts,
    gpus: Sequence[GpuSpec] | HardwareSnapshot,
    flags: EngineFlags,
    vllm_version: str | None = None,
) -> int:
    """The largest max_model_len that fits (0 if none), as vLLM's auto-fit would find it."""
    return estimate(model, gpus, flags, vllm_version).largest_max_model_len
