"""Parameters per rank, counted from the architecture (dense, MoE, MLA, vision, quantized layouts)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from smartrun.errors import EstimateError
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.memory.types import (
    DTYPE_ALIASES,
    DTYPE_BYTES,
    FP8_KV,
    GIB,
    KV_DTYPES,
    VOCAB_PADDING,
    EngineFlags,
    GpuSpec,
)
from smartrun.model import ModelFacts
from smartrun.vllm_profiles import Profile


def _cc_key(cc: str) -> tuple[int, ...]:
    return tuple(int(part) for part in cc.split(".") if part.isdigit())


def dtype_name(flag: str, model: ModelFacts, cc: str) -> str:
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


def family(model: ModelFacts) -> str:
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
    if tc.get("attention_bias") or family(model).startswith("qwen2"):
        extra += q_out + 2 * kv_out
    if family(model).startswith(("qwen3", "gemma3", "olmo2")) or tc.get("use_qk_norm"):
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
    merge = (model.config or {}).get("spatial_merge_size") or vc.get("spatial_merge_size") or vc.get("merge_kernel_size") or 1
    merge = merge[0] * merge[1] if isinstance(merge, list) else merge * merge
    feature_layers = (model.config or {}).get("vision_feature_layer")
    merge *= len(feature_layers) if isinstance(feature_layers, list) else 1  # LLaVA-Next concatenates layers
    projector = hv * merge * h_text + h_text * h_text
    return layers * per_layer + channels * patch * patch * hv + positions + projector


def rope_cache_params(model: ModelFacts) -> int:
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
    elif kind == "mrope" or "mrope_section" in scaling:  # MRotaryEmbedding: cache_max_position_num = 4 x
        cached = 4 * max_pos  # (rotary_embedding.py 0.9.2, rotary_embedding/mrope.py 0.10.2 and 0.11.0)
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
    norms_per_layer = 4 if family(model).startswith("gemma") else 2
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
    total += rope_cache_params(model) * dtype_bytes
    return total


_MIB = 1 << 20


def allocator_block_bytes(n: int) -> int:
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
    at most 1 MiB stays in the block (see allocator_block_bytes). vsl-019 (Qwen2-14B, TP 2): 3.5
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
    tensors.append(rope_cache_params(model) * dtype_bytes)
    return sum(allocator_block_bytes(n) - n for n in tensors)


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
        rope = rope_cache_params(model) * dtype_bytes
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
    3.97 GiB printed, 0.22 GiB of it these). Gone in 0.8 (views of kv_b_proj instead).

    An fp8 checkpoint (DeepSeek-V3/R1) requantizes W_Q_UK and W_UV_O to fp8 with the checkpoint's
    block scales (VLLM_MLA_DISABLE_REQUANTIZATION off), keeps W_QR in the model dtype, and keeps the
    dequantized kv_b_proj alive (W_UK/W_UV are views of get_and_maybe_dequant_weights' new tensor):
    DeepSeek-R1 at TP 8 on 0.7.3 printed 83.88 GiB, 87.73 predicted with 16-bit copies, 83.92 so."""
    if model.mla is None or not profile.mla_absorbed_weights:
        return 0
    m = model.mla
    act = DTYPE_BYTES.get(dtype, 2)
    heads = max(1, model.num_attention_heads // tp)
    q_in = m.q_lora_rank or model.hidden_size
    q_uk, uv_o = q_in * heads * m.kv_lora_rank, heads * m.kv_lora_rank * model.hidden_size
    qr = heads * q_in * m.qk_rope_head_dim
    if model.quantization is None or model.quantization.method != "fp8":
        return (q_uk + uv_o + qr) * layers * act
    block = (model.quantization.raw.get("weight_block_size") or [0, 0])[0] or 0
    scales = 4 * (math.ceil(q_in / block) * math.ceil(heads * m.kv_lora_rank / block)
                  + math.ceil(heads * m.kv_lora_rank / block) * math.ceil(model.hidden_size / block)) if block else 8
    kv_b = m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim) * act
    return (q_uk + uv_o + scales + qr * act + kv_b) * layers


def _offloaded_layer_bytes(model: ModelFacts, dtype: str, tp: int, stage: RankWeights, offload_gib: float) -> int:
    """GPU bytes an offloaded decoder layer takes while it runs: maybe_offload_to_cpu wraps the layer's
    forward in functional_call over `v.to(device)` copies of its whole state_dict, freed when the
    layer returns (vllm/model_executor/models/utils.py, 0.7.2 l.487-540), so the profile's peak holds
    the largest offloaded layer once (pub-016: DeepSeek-V2-Lite, 1.09 GiB for an MoE layer). V0 only:
    the V1 engine maps the pinned CPU copy into the GPU's address space (UVA, get_cuda_view_from_cpu_tensor,
    0.9.2 l.567-603) and copies nothing in."""
    if offload_gib <= 0 or not stage.layers:
        return 0
    db = DTYPE_BYTES[dtype]
    rope = rope_cache_params(model) * db
    largest = max(_rank_weight_bytes(model, db, tp, range(i, i + 1), False, False) - rope for i in stage.layers)
    return min(largest, int(offload_gib * GIB))


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
