"""The estimate: vLLM's per-rank budget, the largest fitting max_model_len, the plan-safe band."""

from __future__ import annotations

import math
from collections.abc import Sequence

from smartrun import vllm_profiles
from smartrun.errors import EstimateError
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.memory.activation import (
    FITTED,
    Coefficients,
    activation_bytes,
    cudagraph_bytes,
    non_torch_bytes,
    v0_gather_root_bytes,
)
from smartrun.memory.correction import Correction
from smartrun.memory.kv import KVGroup, blocks_per_request, kv_bytes_per_token_layer, kv_groups, layer_kinds
from smartrun.memory.types import (
    DTYPE_ALIASES,
    DTYPE_BYTES,
    GIB,
    EngineFlags,
    GpuSpec,
    MemoryEstimate,
    installed_flashinfer_sampler,
    installed_vllm_version,
    resolve_version,
)
from smartrun.memory.weights import (
    _after_cpu_offload,
    _cc_key,
    _check_parallel,
    _gpu_list,
    _kv_bytes_per_element,
    _mla_absorbed_bytes,
    _offloaded_layer_bytes,
    _quant_layout,
    _rank_weight_bytes,
    allocator_rounding_bytes,
    dtype_name,
    effective_batch_defaults,
    pp_layer_ranges,
    weights_per_rank,
)
from smartrun.model import ModelFacts, QuantFacts
from smartrun.vllm_profiles import Profile


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
            (coeffs.sampler_extra_bytes if sampler is None else sampler) + _native_sort_bytes(profile, flags, min(seqs, mnbt)),
            stage.first,
            pp,
            coeffs.pp_hidden_buffers,
            profile.v0_engine,
        )
        if profile.v0_engine:  # V1 maps offloaded weights through UVA instead of copying them in
            activation += _offloaded_layer_bytes(model, dtype, tp, stage, flags.cpu_offload_gb)
        group = gpus[stage_idx * tp : (stage_idx + 1) * tp]
        non_torch = non_torch_bytes(
            tp,
            pp,
            profile.v0_engine,
            coeffs,
            profile,
            bool(group) and all(g.without_nvlink for g in group),
            bool(group) and all(g.nvls_capable for g in group),
        )
        ada = bool(group) and all(g.compute_capability == "8.9" for g in group)
        if tp == 1 and pp == 1 and ada and profile.non_torch_single_ada_gib is not None:
            non_torch = int(profile.non_torch_single_ada_gib * GIB)
        if profile.v0_engine and stage.last and group and all(g.has_nvlink for g in group):
            non_torch += v0_gather_root_bytes(tp, min((g.compute_capability for g in group), key=_cc_key))
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


def _native_sort_bytes(profile: Profile, flags: EngineFlags, rows: int = 256) -> float:
    """The native top-k/top-p sort's bytes per logit the dummy sampler adds for its `rows`, unless
    FlashInfer's sampler runs instead (no sort): known from flags.flashinfer_sampler (resolved from the
    install by `_estimate`), and not on compiled startups of the versions whose compiled peak was
    measured as high as the sort."""
    if not profile.native_topk_topp_bytes:
        return 0.0
    if flags.flashinfer_sampler and (flags.enforce_eager or not profile.compiled_peak_as_sort):
        return 0.0
    return vllm_profiles.native_topk_topp_bytes(rows)


def _sampler_text(profile: Profile, flags: EngineFlags) -> str:
    """What the estimate counted for the dummy sampler's top-k/top-p, and why (shown by `model estimate`)."""
    if profile.sampler_extra_bytes is not None:  # V0: its measured sampler figure includes the sort
        return (f"V0's full top-k/top-p path, sort included ({profile.sampler_extra_bytes:g} B a logit, "
                "measured)")
    if not profile.native_topk_topp_bytes:
        return "the version's own top-k/top-p kernel (no sort; the fitted sampler)"
    if _native_sort_bytes(profile, flags) == 0:
        return "FlashInfer's (no sort counted)"
    if flags.flashinfer_sampler:
        return "FlashInfer's, but compiled startups of this version peaked as high as the native sort (counted)"
    if flags.flashinfer_sampler is None:
        return "PyTorch-native sort counted (whether the install samples with FlashInfer is not known)"
    return "PyTorch-native sort counted"


def _budget(model: ModelFacts, gpus: list[GpuSpec], flags: EngineFlags, profile: Profile, dtype: str,
            kv_elem: int, util: float, seqs: int, mnbt: int, block_size: int, coeffs: Coefficients = FITTED,
            mxfp4_pad: tuple[int, int] | None = None, calibrated: int = 0) -> _Budget:
    """The engine's budget: the rank with the fewest KV blocks decides (vLLM takes the minimum)."""
    stages = _stage_budgets(model, gpus, flags, profile, dtype, kv_elem, util, seqs, mnbt, block_size, coeffs,
                            mxfp4_pad, calibrated)
    return min(stages, key=lambda b: (b.num_blocks, b.kv))


def _request_blocks(b: _Budget, max_model_len: int, block_size: int, mnbt: int, in_flight: int = 2) -> int:
    return sum(blocks_per_request(g, max_model_len, block_size, mnbt, in_flight) for g in b.groups)


def _largest_len(b: _Budget, derived: int, block_size: int, mnbt: int, in_flight: int = 2) -> int:
    """Binary search, as vLLM's auto-fit / estimated maximum model length (one null block kept back)."""
    usable = b.num_blocks - 1
    if usable <= 0 or _request_blocks(b, 1, block_size, mnbt, in_flight) > usable:
        return 0
    lo, hi = 1, derived
    if _request_blocks(b, hi, block_size, mnbt, in_flight) <= usable:
        return hi
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _request_blocks(b, mid, block_size, mnbt, in_flight) <= usable:
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
    if flags.flashinfer_sampler is None and profile.native_topk_topp_bytes and version == installed_vllm_version():
        flags = flags.model_copy(update={"flashinfer_sampler": installed_flashinfer_sampler(profile)})
    mxfp4_pad = vllm_profiles.mxfp4_padding(version, low_cc)
    dtype = dtype_name(flags.dtype, model, low_cc)
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
    largest = _largest_len(b, derived, block_size, mnbt, profile.sliding_in_flight_batches)
    if auto and largest > 0:
        max_model_len = largest
        seqs, mnbt = effective_batch_defaults(
            flags, tightest.cuda_total_bytes, tightest.name, profile, max_model_len
        )
        b = _budget(model, used, flags, profile, dtype, kv_elem, util, seqs, mnbt, block_size, coefficients, mxfp4_pad,
                    calibrated)
    per_request = _request_blocks(b, max_model_len, block_size, mnbt, profile.sliding_in_flight_batches)
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
    largest_low = _largest_len(low, derived, block_size, mnbt, profile.sliding_in_flight_batches)
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
        sampler=_sampler_text(profile, flags),
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
