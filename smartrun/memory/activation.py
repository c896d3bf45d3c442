"""Activation peak, non-torch memory and CUDA graphs: physical formulas with fitted coefficients."""

from __future__ import annotations

import math

from smartrun.frozen import Frozen
from smartrun.memory.types import DTYPE_BYTES, GIB
from smartrun.memory.weights import _is_moe_layer
from smartrun.model import ModelFacts
from smartrun.vllm_profiles import Profile


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
    # cache is over-predicted by 3% without it).
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
    per_call_moe: bool = False,
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
    residual states it sends on or receives. `per_call_moe`: see activation_terms (V0).
    """
    fixed, per_logit = activation_terms(model, dtype, tp, max_num_seqs, mnbt, last, first, per_call_moe)
    pp_hold = pp_buffers * pp_buffer_bytes(model, dtype, mnbt) if pp > 1 else 0
    return int(max(fixed[0] + per_logit * sampler_extra, fixed[1]) + pp_hold)


def pp_buffer_bytes(model: ModelFacts, dtype: str, mnbt: int) -> int:
    """One mnbt x hidden buffer in the model dtype (the unit of the PP term)."""
    return mnbt * model.hidden_size * DTYPE_BYTES[dtype]


def activation_terms(
    model: ModelFacts,
    dtype: str,
    tp: int,
    max_num_seqs: int,
    mnbt: int,
    last: bool,
    first: bool = True,
    per_call_moe: bool = False,
) -> tuple[tuple[int, int], int]:
    """((sampler phase without the fitted part, forward phase), logit elements) in bytes/elements.

    The sampler phase is fixed[0] + logit_elements x sampler_extra_bytes; kept apart so the fit
    routine sees the same physical features the estimate uses.

    `per_call_moe` (V0, 0.6-0.7.3): fused_experts_impl allocates its three caches on every call and
    frees them on return (vllm/model_executor/layers/fused_moe/fused_moe.py, 0.7.2 l.1172-1182), so
    they are gone when the sampler runs; and a decoder layer is either dense or MoE (DeepSeek's
    first_k_dense_replace layers), so the forward peak is the larger of the two MLPs, not their sum.
    pub-016 (DeepSeek-V2-Lite, 40k tokens) printed 4.02 GiB against 5.86 summed; pub-017 0.36 against
    0.42. The V1 estimate keeps the summed, held form its 0.19 coefficients were fitted with.
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
    vision = qwen_vl_profile_image(model) if first else None
    if vision is not None:  # the encoder's outputs for the dummy image stay cached through the profile
        encoder_cache = vision[0] * h * dtype_bytes
    else:
        encoder_cache = mnbt * h * dtype_bytes if model.is_multimodal and first else 0
    held += encoder_cache
    sampler_fixed = logits * dtype_bytes + held + moe_ws
    if per_call_moe and model.moe is not None:
        dense_inter = model.moe.dense_intermediate_size or model.intermediate_size
        dense = 3 * dense_inter // tp * mnbt * dtype_bytes if _has_dense_layer(model) else 0
        forward = max(dense, moe_ws + _fp8_moe_input_bytes(model, mnbt)) + mnbt * 4 * h * dtype_bytes + encoder_cache
        sampler_fixed -= moe_ws
    else:
        forward = mnbt * (3 * model.intermediate_size // tp + 4 * h) * dtype_bytes + moe_ws + encoder_cache
    if vision is not None:
        forward = max(forward, qwen_vl_encoder_peak_bytes(model, dtype, tp, vision[1]) + encoder_cache)
    return (sampler_fixed, forward), logits


# Qwen2-VL / Qwen2.5-VL: vLLM profiles the encoder on one image of the processor's largest size
# (max_pixels 12845056 = 16384 x 28 x 28 in the published preprocessor_config.json; vLLM's log says
# "Encoder cache will be initialized with a budget of 16384 tokens, and profiled with 1 image items").
QWEN_VL_MAX_IMAGE_TOKENS = 16384
QWEN_VL_TYPES = ("qwen2_vl", "qwen2_5_vl")


def qwen_vl_profile_image(model: ModelFacts) -> tuple[int, int] | None:
    """(merged image tokens, ViT patches) of the profile's dummy image, for the Qwen2-VL family."""
    config = model.config or {}
    vc = config.get("vision_config")
    if config.get("model_type") not in QWEN_VL_TYPES or not isinstance(vc, dict):
        return None
    merge = int(vc.get("spatial_merge_size") or 2)
    return QWEN_VL_MAX_IMAGE_TOKENS, QWEN_VL_MAX_IMAGE_TOKENS * merge * merge


def qwen_vl_encoder_peak_bytes(model: ModelFacts, dtype: str, tp: int, patches: int) -> int:
    """Peak of the ViT pass over the dummy image (vllm/model_executor/models/qwen2_5_vl.py and
    qwen2_vl.py apply_rotary_pos_emb_vision, 0.9.2; the same code in 0.10.2).

    The fp32 pixel values stay referenced by the caller through the pass (patches x 3 x temporal_patch
    x patch^2). Inside a block the residual and the norm output (2 H) stay while attention holds the
    qkv projection (3 H; with TP gathered whole, the local part 3 H / TP), its contiguous q/k/v copies
    and, while q and k are rotated, an fp32 copy of one, the fp32 result and its cast back (5 H): the
    peak of the block, above the gated MLP's activated gate, up projection and product (3 I / TP).
    The memory-efficient attention kernels keep no seq x seq matrix.
    """
    vc = (model.config or {}).get("vision_config") or {}
    hv = int(vc.get("hidden_size") or vc.get("embed_dim") or 0)
    iv = int(vc.get("intermediate_size") or 4 * hv)
    pixel = int(vc.get("in_chans") or vc.get("in_channels") or 3) * int(vc.get("temporal_patch_size") or 2)
    pixel *= int(vc.get("patch_size") or 14) ** 2
    dtype_bytes = DTYPE_BYTES[dtype]
    qkv = 3 * hv + (3 * hv // tp if tp > 1 else 0)  # TP gathers the whole qkv beside its local part
    attention = 2 * hv + qkv + 3 * hv // tp + 5 * hv // tp
    mlp = 2 * hv + 3 * iv // tp
    return patches * pixel * 4 + patches * max(attention, mlp) * dtype_bytes


def _fp8_moe_input_bytes(model: ModelFacts, mnbt: int) -> int:
    """An fp8 (w8a8) checkpoint's fused-MoE first GEMM quantizes its input while the caches are held:
    one byte a hidden element plus fp32 scales per 128-element group with block quantization
    (invoke_fused_moe_kernel -> per_token_group_quant_fp8 / scaled_fp8_quant, 0.7.3)."""
    if model.quantization is None or model.quantization.method != "fp8":
        return 0
    block = (model.quantization.raw.get("weight_block_size") or [0, 0])[-1] or 0
    scales = mnbt * math.ceil(model.hidden_size / block) * 4 if block else 0
    return mnbt * model.hidden_size + scales


def _has_dense_layer(model: ModelFacts) -> bool:
    """Whether any decoder layer runs a plain MLP instead of the experts."""
    return any(not _is_moe_layer(model, i) for i in range(model.num_hidden_layers))


def non_torch_bytes(
    tp: int,
    pp: int,
    v0_engine: bool = False,
    coeffs: Coefficients = FITTED,
    profile: Profile | None = None,
    without_nvlink: bool = False,
    nvls: bool = False,
) -> int:
    """Non-torch growth during profiling: CUDA context/cuBLAS workspaces (~0.25 GiB on one GPU).

    With TP >= 2 NCCL and the custom all-reduce IPC buffers add about 1.8 GiB, growing a little
    with the group size (0.19 logs: 2.06-2.11 GiB at tp2, 2.13-2.21 at tp4). With PP only, NCCL
    is set up before the snapshot, so the growth is smaller (0.07 GiB). Older eras measured other
    figures (their profile's `non_torch_*_gib`, from their public startups): 0.9-0.10 grew far
    less with TP, 0.8 counts the whole CUDA context. A TP group known to have no NVLink uses its
    profile's `non_torch_tp_no_nvlink_gib` where one was measured (NCCL over PCIe/shared memory,
    no custom all-reduce without P2P); elsewhere the fitted NVLink-class figure (errs low).
    `nvls`: the group can use NVLink SHARP (GpuSpec.nvls_capable); see `nvls_bytes`.
    """
    return _non_torch_base(tp, pp, v0_engine, coeffs, profile, without_nvlink) + nvls_bytes(tp, profile, nvls)


def nvls_bytes(tp: int, profile: Profile | None, nvls: bool) -> int:
    """NVLS buffers of the NCCL communicators a profile's budget counts beyond its base TP term.

    When NCCL allocates them: at communicator init. vLLM sets NCCL_CUMEM_ENABLE=0 (vllm/env_override.py,
    0.7-0.11), so NCCL's cuMemSupport is 0 and runtimeConn (= cuMemSupport && NCCL_RUNTIME_CONNECT) is
    off: ncclCommInitRank connects rings and trees and runs ncclNvlsSetup + ncclNvlsBufferSetup
    (NCCL 2.26.2 src/init.cc l.1135-1158); the lazy path (src/group.cc: ncclNvlsBufferSetup on the first
    NVLS collective) needs cuMem, and NCCL 2.20/2.21 (vLLM 0.6-0.8) have no lazy path at all. NVLS
    needs 3+ GPUs (src/transport/nvls.cc ncclNvlsInit: gpuCount <= 2 turns it off).

    Which communicators a TP group has by the end of the profile run (0.10.0 and 0.11.0 read): pynccl's
    (device_communicators/cuda_communicator.py -> PyNcclCommunicator: ncclCommInitRank and a warm-up
    all_reduce, in init_worker_distributed_environment), and torch's ProcessGroupNCCL on the group's
    device_group, created by the first collective on it: the logits all_gather of the dummy sampler run
    (LogitsProcessor.use_all_gather under V1 -> base_device_communicator.all_gather ->
    dist.all_gather_into_tensor; CudaCommunicator does not override all_gather), V0's logits gather.
    Which ones a budget counts: those created after the memory snapshot. V0 and 0.9-0.10 take it before
    NCCL init (worker.py / v1/worker/gpu_worker.py init_device): both. 0.11+ take it after: only torch's,
    so the 0.19-fitted TP term (H100 sweep, NVLS at TP 4) already holds that one. So beyond the base
    term: V0 counts two (its measured figure is both communicators), 0.9-0.10 one (pynccl's), 0.11+ none
    (Profile.nvls_communicators).

    The size of one communicator's buffers (Profile.nvls_gib_per_rank_per_communicator, per rank of the
    group): NCCL's own formula where it fits, the measured figure where the startups need more. NCCL
    2.26-2.27 (torch 2.7-2.8, vLLM 0.9-0.11.0): 16 NVLS channels x 2 x 1 MiB (vllm_profiles.
    NVLS_2_26_GIB_PER_RANK: 0.25 GiB a communicator at TP 8); Qwen3-32B on 8x H100 (0.10.0, pub-114) needs
    0.08 GiB beyond the 0.19 term with the native sort counted from source, so one formula-sized
    communicator (0.25) holds it at -0.3% (vllm#9699's size: -4.4%). V0 keeps #9699's measurement
    (vllm_profiles.NVLS_9699_GIB_PER_RANK: NCCL 2.20's 4 MiB steps): NCCL 2.21's formula (vLLM 0.6.4-0.8:
    nChannels x 2 x (1 MiB + 2 MiB), 1.125 GiB a communicator at 24 channels) leaves DeepSeek-R1 on 8x H200
    (0.7.3, pub-201, 7.16 GiB of non-torch memory printed) 1.56 GiB short - +7% KV over - where #9699's
    size is 1.19 GiB over (-2.7%), the safe end.
    """
    if not nvls or tp <= 2 or profile is None:
        return 0
    return int(profile.nvls_communicators * profile.nvls_gib_per_rank_per_communicator * tp * GIB)


def _non_torch_base(
    tp: int, pp: int, v0_engine: bool, coeffs: Coefficients, profile: Profile | None, without_nvlink: bool
) -> int:
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


# One NCCL p2p receive connection's buffers (NCCL 2.21, torch 2.5; cudaMalloc'd, vLLM sets
# NCCL_CUMEM_ENABLE=0): LL 8 lines x 512 threads x 8 steps x 16 B, LL128 120 x 640 x 8 x 8 B, and the
# 4 MiB SIMPLE buffer unless P2P read puts it on the sender (NVLink between compute capability 8.0
# GPUs only): src/include/device.h, src/init.cc DEFAULT_*_BUFFSIZE, src/transport/p2p.cc p2pRecvSetup,
# src/graph/paths.cc ncclTopoCheckP2p.
P2P_RECV_BYTES = 8 * 512 * 8 * 16 + 120 * 640 * 8 * 8
P2P_SIMPLE_BYTES = 4 << 20
# Channels NCCL connects per peer on first send/recv (enqueue.cc pre-connects all p2pnChannelsPerPeer):
# nextPow2(min(comm channels up to 32, 2 x NVLinks to the peer)), at least 16 on NVLink boards
# (A100 12 links, H100/H200 18); the lower bound is used.
P2P_CHANNELS_PER_NVLINK_PEER = 16


def v0_gather_root_bytes(tp: int, compute_capability: str) -> int:
    """V0 TP over NVLink: rank 0 (the driver, whose budget is the smallest) receives every rank's logits.

    vLLM 0.6-0.7 gathers the logits to rank 0 with torch.distributed.gather on the TP device group
    (distributed/device_communicators/base_device_communicator.py gather, 0.7.3); torch's NCCL process
    group runs it as one ncclRecv per peer, so the profile run connects tp-1 peers x the channels per
    peer on rank 0, each with its receive buffers (non-torch memory, after V0's baseline snapshot).
    V1 gathers with all_gather (a collective: no p2p connections)."""
    if tp < 2:
        return 0
    read = compute_capability.split(".")[:2] == ["8", "0"]
    per_connection = P2P_RECV_BYTES + (0 if read else P2P_SIMPLE_BYTES)
    return (tp - 1) * P2P_CHANNELS_PER_NVLINK_PEER * per_connection


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
