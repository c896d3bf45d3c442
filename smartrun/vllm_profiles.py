"""vLLM behaviour profiles by era: which terms of the startup memory budget changed where.

Each profile was read from vLLM's own Python sources at the versions named in `checked_in`
(the release wheels' sources: `vllm/worker/worker.py` determine_num_available_blocks (V0),
`vllm/v1/worker/gpu_worker.py` init_device / determine_available_memory (V1), the engine-args
defaults and the V1 oracle in `vllm/engine/arg_utils.py`), and says what it was checked against:
the reference startups (fixtures/reference/vllm_startup_logs.jsonl, fixtures/startups/public.jsonl)
whose errors the benchmark prints per profile. `margin` is the profile's plan-safe band (see
`Profile.margin_for`): how much more non-KV memory than predicted a startup of that era may take,
measured on its startups and wider where it has few.
"""

from __future__ import annotations

import re

from smartrun.errors import EstimateError
from smartrun.frozen import Frozen


class Profile(Frozen):
    """vLLM behaviour that changes the memory budget: defaults, what the worker subtracts, how it counts tokens."""

    name: str
    versions: str  # the range it covers, in words
    default_util: float
    cudagraph_subtracted: bool  # VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS default on
    tokens_group_aware: bool  # "GPU KV cache size" = concurrency x max_model_len for hybrid models
    has_160gib_tier: bool
    v0_engine: bool = False  # V0: no free-memory check, chunked prefill off <= 32K, one prompt per profile step
    sampler_extra_bytes: float | None = None  # per logit element beyond the dtype copy; None = fitted
    # PyTorch-native top-k/top-p in the profile's dummy sampler run: bytes per logit element beyond the
    # fitted sampler (NATIVE_TOPK_TOPP_BYTES where this era sorts, 0 where it does not).
    native_topk_topp_bytes: float = 0.0
    # vLLM uses FlashInfer's top-k/top-p sampler (rejection sampling, no sort) whenever the flashinfer
    # package is installed, unless VLLM_USE_FLASHINFER_SAMPLER=0 (topk_topp_sampler.py: V1 reads None as
    # True; 0.8.4, 0.9.2, 0.10.1.1, 0.10.2, 0.11.0). False: opt-in (=1) from 0.11.1.
    flashinfer_sampler_by_default: bool = False
    # Compiled (CUDA-graph) startups that peak as high as the native sort even with FlashInfer's sampler:
    # 0.10.2 (torch 2.8) on three L40S lifetimes, pub-105..107 (1.19 GiB printed, 0.56 without the sort);
    # not explained by vLLM's sampler source (0.10.1.1 -> 0.10.2 changed only the logprobs-mode plumbing),
    # so the sort-sized term stays there; 0.10.1.1 compiled (pub-120..124) and every eager startup do not.
    compiled_peak_as_sort: bool = False
    # Non-torch growth counted in the budget (GiB per GPU); None = the fitted 0.19 terms.
    non_torch_single_gib: float | None = None
    non_torch_tp_gib: float | None = None
    # TP >= 2 on GPUs known to have no NVLink (None = use the figure above / the fitted one)
    non_torch_tp_no_nvlink_gib: float | None = None
    no_nvlink_fitted_on: tuple[str, ...] = ()  # public startups that figure was read from (in-sample)
    # One GPU of compute capability 8.9 (Ada: L4, L40S, RTX 4090): the non-torch growth V1 printed there
    # (None = the figure above / the fitted one, which A100 and H100 startups need)
    non_torch_single_ada_gib: float | None = None
    # NCCL communicators whose NVLink SHARP buffers (TP groups of 3+ NVLS-capable GPUs, HGX Hopper) the
    # budget counts beyond its base TP term: those created after the memory snapshot that the base term
    # does not already hold (memory.activation.nvls_bytes says which and why; V0 2, 0.9-0.10 1, else 0).
    nvls_communicators: int = 0
    # NVLS buffers of one communicator, GiB per rank of the group: vllm#9699's measurement (V0) by default;
    # the 0.9-0.10 profile takes NCCL 2.26's own size (memory.activation.nvls_bytes says why).
    nvls_gib_per_rank_per_communicator: float = 0.3125  # NVLS_9699_GIB_PER_RANK
    big_tier_includes_a100: bool = False  # 0.8: >= 70 GiB gets 8192/1024 whatever the name
    # A sliding-window (or chunked) group holds window - 1 + this many max_num_batched_tokens batches
    # per request in vLLM's concurrency / max-model-len arithmetic: 1 in SlidingWindowSpec and
    # ChunkedLocalAttentionSpec.max_memory_usage_bytes of 0.8.4, 0.9.2, 0.10.1.1, 0.10.2 and 0.11.0
    # (vllm/v1/kv_cache_interface.py); 2 where the 0.19 fit was made (the default).
    sliding_in_flight_batches: int = 2
    mla_latent_cache: bool = True  # False before 0.7.1: DeepSeek MLA cached full heads padded to 256
    # V0 0.7.2-0.7.3 (VLLM_CUDA_MEM_ALIGN_KV_CACHE, default on) pads the MLA entry to 256 bytes of the
    # model dtype: 576 -> 640 elements (vllm/worker/cache_engine.py; absent in 0.7.1 and 0.8.5.post1)
    mla_align_bytes: int = 0
    mla_absorbed_weights: bool = False  # V0 0.7.1-0.7.3: absorbed W_Q_UK / W_UV_O / W_QR copies (mla/utils.py)
    # Weights as "Loading model weights took" counts them: tensor bytes plus the caching allocator's
    # kept segment tails (memory.allocator_rounding_bytes) instead of the fitted 0.19 load slack.
    allocator_rounding: bool = False
    checked_in: tuple[str, ...] = ()  # vLLM releases whose source this profile was read from
    source: str = ""  # what the budget is, in vLLM's own terms
    # Plan-safe band: fraction of the predicted non-KV memory (weights + activation + non-torch
    # [+ graphs]) a startup of this era may exceed it by; floor in GiB. Measured per profile by
    # the band table of benchmarks/estimator_accuracy.py --summary-only (tests check the shipped values cover it).
    margin: float = 0.05
    margin_floor_gib: float = 0.25
    evidence: str = "no measured startup"  # what the band rests on

    def margin_bytes(self, non_kv_bytes: int) -> int:
        """The non-KV memory a plan keeps back beyond the estimate (the low end of the KV band)."""
        return int(max(self.margin * non_kv_bytes, self.margin_floor_gib * (1 << 30)))


# The PyTorch-native top-k/top-p of the dummy sampler run (vllm/v1/sample/ops/topk_topp_sampler.py
# apply_top_k_top_p: logits.sort, 0.8.4-0.16.0; Sampler.forward holds the fp32 copy of the logits) peaks
# inside the sort, per logit element beyond the model-dtype logits: the fp32 logits 4 B + sorted values
# 4 B + int64 indices 8 B + torch's segmented radix sort's own buffers 20 B (aten/src/ATen/native/cuda/
# SortStable.cu segmented_sort_pairs, 128+ rows: int64 reverse indices 8 B, and CUB's
# DeviceSegmentedRadixSort::SortPairs without a DoubleBuffer keeps alternate key and value buffers, 4 + 8 B)
# = 36 B. The dummy run has min(max_num_seqs, max_num_batched_tokens) rows: 128+ at every default. The
# fitted sampler (Coefficients.sampler_extra_bytes, 12.96 B: fp32 copy, probabilities, the exponential
# draw) is what the other paths hold at their peak, so the sort adds 36 - 12.96. (16 B, counted before,
# left out the fp32 copy and the sort's own buffers: it held 0.11.0 on a T4 0.2 GiB short, pub-110.)
NATIVE_TOPK_TOPP_BYTES = 36.0 - 12.96


def native_topk_topp_bytes(rows: int) -> float:
    """The native sort's bytes per logit beyond the fitted sampler, for the dummy run's `rows` (see above).

    torch picks the sort by the number of rows (SortStable.cu launch_stable_sort_kernel): 128+ rows
    segmented_sort_pairs (20 B of its own buffers, NATIVE_TOPK_TOPP_BYTES); 2-127 rows
    segmented_sort_pairs_by_full_sort (two int2 index/segment arrays 16 B, the keys it allocates 4 B and
    CUB's alternate buffers 12 B: 32 B); one row a single radix sort whose buffers are one row's, so the
    later peak of apply_top_k_top_p holds (fp32 logits, sorted values and indices, the top-p softmax,
    two masks, the scattered result: 26 B).
    """
    if rows >= 128:
        return NATIVE_TOPK_TOPP_BYTES
    if rows >= 2:
        return 4 + 4 + 8 + 32 - 12.96
    return 26 - 12.96
# NCCL's NVLS buffers of one communicator per rank of the group, measured on V0 in vllm-project/vllm#9699
# (8x H200, TP 8): NCCL_NVLS_ENABLE=0 raised the GPU blocks of Llama-3.1-405B from 17595 to 227xx
# (1,032,192 B a block), 4.91-5.00 GiB a GPU for the two communicators V0 counts; the upper end, 5.00 / 2 / 8.
NVLS_9699_GIB_PER_RANK = 0.3125
# NCCL 2.26-2.27 (torch 2.7-2.8: vLLM 0.9-0.11.0) NVLS buffers of one communicator per rank of the group:
# NVLS_NCHANNELS_SM90 (16) x 2 x NCCL_NVLS_CHUNKSIZE (128 KiB) x NCCL_STEPS (8) (src/transport/nvls.cc
# ncclNvlsBufferSetup: nvlsPerRankSize = nChannels x 2 x buffSize; total = that x nHeads, a head per GPU).
NVLS_2_26_GIB_PER_RANK = 16 * 2 * (128 << 10) * 8 / (1 << 30)

# The bands cover what `benchmarks/estimator_accuracy.py` prints as "needed" per profile: the
# largest KV over-prediction seen on the profile's startups as a share of the predicted non-KV
# memory, widened by (1 + 2/sqrt(n)); profiles with few or no startups get the widest band (6%).
PROFILES: dict[str, Profile] = {
    "0.6": Profile(
        name="0.6",
        versions="0.6.0-0.7.3 (V0 default); 0.8-0.10 where V1 is unsupported (compute capability < 8.0, ...)",
        default_util=0.90,
        cudagraph_subtracted=False,
        tokens_group_aware=False,
        has_160gib_tier=False,
        v0_engine=True,
        allocator_rounding=True,
        # V0's dummy sampler (SamplingParams(top_p=0.99, top_k=vocab-1)) runs the full top-k/top-p
        # path on every row: fp32 logits, sort values + int64 indices, softmax, cumsum, probs and
        # logprobs (vllm/model_executor/layers/sampler.py). Measured on two T4 startups
        # (pub-003: 0.90 GiB for 192 x 128256 logits, pub-004: 0.74 GiB for 160 x 128256): 36.8 B
        # per element beyond the fp16 copy (each predicts the other within 0.1 B).
        sampler_extra_bytes=36.8,
        non_torch_single_gib=0.25,
        # TP: over PCIe without peer access 0.25 GiB (vsl-019: 2x RTX 4090, 0.7.x); with NVLink the
        # NVLink-class fitted figure (pub-017: 8x A100 SXM4 40GB, 0.7.1, TP 8 printed 2.10 GiB; the
        # earlier 0.25 for every TP group over-predicted that startup's KV cache by 7%)
        non_torch_tp_no_nvlink_gib=0.25,
        # TP of 3+ on NVLS-capable GPUs (HGX H100/H200): the snapshot precedes NCCL init, so both NCCL
        # communicators' NVLS buffers count (pynccl's and the device group's, created by the logits
        # gather); the measured figure (vllm#9699, V0) is both. memory.activation.nvls_bytes. DeepSeek-R1
        # on 8x H200 (0.7.3) printed non-torch 7.16 GiB: 2.35 + 5.00 + the gather root 1.00 = 8.35 predicted.
        nvls_communicators=2,
        checked_in=("0.6.6.post1", "0.7.1", "0.7.2", "0.7.3", "0.8.5.post1", "0.10.1.1"),
        source=(
            "vllm/worker/worker.py determine_num_available_blocks: KV = total x util - (weights + "
            "non_torch_increase + torch_peak_increase); baseline snapshot before NCCL init; no free-memory check"
        ),
        margin=0.06,
        margin_floor_gib=0.35,
        evidence=(
            "12 held-out V0 startups with KV tokens (4 T4 0.6.6-0.8.2, 2 RTX 3090 ~0.6.4/0.6.6, L40 0.7.2, "
            "V100 32GB 0.7.1, 2x RTX 4090 TP 2 0.7.x, DeepSeek-V2-Lite MLA on an L40S 0.7.2 and on 8x A100 "
            "TP 8 0.7.1, DeepSeek-R1 fp8 MLA on 8x H200 TP 8 0.7.3): KV tokens -7.8% to +0.0%, median -2.7%; "
            "single-GPU non-torch prints 0.01-0.11 GiB from 0.6.6 (0.35 on ~0.6.4), below the 0.25 used "
            "(errs low); R1 printed 0.66 GiB more activation than the source count (not explained) and "
            "1.2 GiB less non-torch than the NVLS + gather-root terms"
        ),
    ),
    "0.8": Profile(
        name="0.8",
        sliding_in_flight_batches=1,
        versions="0.8.0-0.8.5 (V1 default where supported)",
        default_util=0.90,
        cudagraph_subtracted=False,
        tokens_group_aware=False,
        has_160gib_tier=False,
        big_tier_includes_a100=True,
        # 0.8 counts the whole device use minus torch's as non-KV, so part of the CUDA context is in
        # it: 0.33 GiB, read from pub-013 (one RTX 3090; in-sample), with the native sort counted from
        # source (NATIVE_TOPK_TOPP_BYTES; 0.55 when 16 B a logit were counted). TP over PCIe without P2P:
        # 0.71 GiB, the larger of the two figures two TP 2 startups on RTX 3090s need (pub-014 0.71,
        # pub-015 0.47; read from them, so those two are in-sample for this term: leave-one-out
        # +2.4% / -2.35%, and the plan-safe low end stays below what vLLM had either way - tested).
        # Not derivable from 0.8.4's source: non-torch there is device used minus torch *allocated*
        # after empty_cache (v1/worker/gpu_worker.py determine_available_memory), and TP without P2P
        # adds no custom all-reduce buffer (custom_all_reduce.py checks P2P before create_shared_buffer)
        # and no NCCL device buffer (NCCL 2.21.5 src/transport/shm.cc keeps the SHM FIFOs in host
        # memory unless NCCL_SHM_USE_CUDA_MEMCPY), so the source predicts about the TP 1 figure; the two
        # startups need 0.14 and 0.38 GiB more and differ from each other by 0.24 GiB with identical
        # settings on one machine (run-to-run: allocator fragmentation, other processes on the GPU,
        # which 0.8's device-wide measure counts). NVLink-class TP keeps the fitted 0.19 terms (errs low).
        non_torch_single_gib=0.33,
        non_torch_tp_no_nvlink_gib=0.71,
        no_nvlink_fitted_on=("pub-014", "pub-015"),
        native_topk_topp_bytes=NATIVE_TOPK_TOPP_BYTES,
        flashinfer_sampler_by_default=True,
        checked_in=("0.8.4", "0.8.5.post1"),
        source=(
            "vllm/v1/worker/gpu_worker.py determine_available_memory: KV = total x util - (torch peak "
            "allocated + device used - torch allocated): the CUDA context and other processes count"
        ),
        margin=0.06,
        margin_floor_gib=0.35,
        evidence=(
            "3 public 0.8.4 startups on RTX 3090s (TP 1 and TP 2 without P2P; both figures are read from them: "
            "the TP one leave-one-out +2.4% / -2.35%): KV tokens -2.45% to +0.03%; few cases, so the widest band"
        ),
    ),
    "0.9": Profile(
        name="0.9",
        sliding_in_flight_batches=1,
        versions="0.9.0-0.10.2 (V1)",
        default_util=0.90,
        cudagraph_subtracted=False,
        tokens_group_aware=False,
        has_160gib_tier=False,
        native_topk_topp_bytes=NATIVE_TOPK_TOPP_BYTES,
        flashinfer_sampler_by_default=True,
        # TP over NVLink keeps the NVLink-class (0.19-fitted) term and adds one NCCL communicator's NVLS
        # buffers on HGX Hopper (nvls_communicators below). Read in 0.9.2, 0.10.0, 0.10.1.1: the snapshot
        # precedes init_worker_distributed_environment (v1/worker/gpu_worker.py init_device), and two NCCL
        # communicators are set up by the end of the profile run, each with every ring/tree/NVLS buffer
        # allocated at init (vLLM's NCCL_CUMEM_ENABLE=0 turns NCCL's lazy connect off): pynccl's at init
        # and the TP device group's, created by the logits all_gather. 0.11+ take the snapshot after
        # pynccl's, so the 0.19-fitted term holds the device group's; 0.9-0.10 count pynccl's on top.
        # No A100 NVLink TP startup of 0.9-0.10 with its settings was found to size the ring/tree part.
        # TP without NVLink: the snapshot precedes NCCL init, so NCCL's own buffers count, but there
        # is no custom all-reduce IPC buffer or NVLS buffer over PCIe; 0.10.2 printed "0.21 GiB for
        # non-torch memory" for 8 L40S at TP 8 (Qwen3-235B-A22B FP8 with expert parallelism; search-
        # index file 38962983769, not in the set). Checked against pub-109 (2x L4 TP 2, 0.9.0.1): -2.8%
        # (-21.6% with the NVLink-class term, which NVLink-connected and unknown groups keep).
        non_torch_tp_no_nvlink_gib=0.21,
        # One GPU: V1 0.9-0.10 grow little non-torch memory on one GPU. Every single-GPU startup on an L4
        # or L40S that printed it printed 0.02 GiB (pub-006 0.10.1; pub-101..107 0.10.2: 8 prints); the one
        # 0.9-0.10 print on another GPU, an H100 at 0.10.2 (a LLaVA-NeXT model; search-index file
        # 34680831065, not in the set), 0.07 GiB, used for every non-Ada GPU instead of the 0.19 sweep's
        # 0.26. With the native sort counted from source and FlashInfer's sampler known, the A100 startups
        # agree: pub-001 (0.9.2) +0.05%, pub-005 (0.10.1.1) -0.29%, pub-120/121 (0.10.1.1, FlashInfer)
        # -1.4% / -0.4% (they were -16.8% / -3.5% with the sort and 0.26 counted).
        non_torch_single_ada_gib=0.02,
        non_torch_single_gib=0.07,
        # TP of 3+ on NVLS-capable GPUs (HGX Hopper): pynccl's communicator, the one 0.9-0.10 count beyond
        # the 0.19-fitted term, at NCCL 2.26's own size (memory.activation.nvls_bytes). Checked on pub-114
        # (8x H100 TP 8, 0.10.0, native sort): -0.3% (+1.5% without it; -4.4% with vllm#9699's V0 size).
        nvls_communicators=1,
        nvls_gib_per_rank_per_communicator=NVLS_2_26_GIB_PER_RANK,
        checked_in=("0.9.2", "0.10.0", "0.10.1.1", "0.10.2"),
        source=(
            "vllm/v1/worker/gpu_worker.py: requested = total x util (free-memory check), snapshot taken "
            "BEFORE NCCL init; KV = requested - (weights + non_torch_increase + torch_peak_increase)"
        ),
        margin=0.04,
        margin_floor_gib=0.25,
        evidence=(
            "23 public startups (A100 40GB 0.9.2 and 0.10.1.1; A100 80GB 0.10.1.1 at TP 1 and TP 2 without P2P, "
            "and gpt-oss-120b MXFP4 (Marlin) at TP 4 across nodes; "
            "L40S-class 0.10.1 and 0.10.2 incl. compressed-tensors AWQ/GPTQ W4A16; RTX 4090 0.10.2; L4 0.9.0.1 and "
            "0.10.2; Qwen2.5-VL at TP 1 and TP 2 over PCIe; 8x H100 TP 8 0.10.0): KV tokens -3.0% to +0.6%, median "
            "-0.4%, none over by more than 0.6%; 17 printed their sampler (FlashInfer: no sort counted, except "
            "compiled 0.10.2, whose three startups pub-105..107 peaked as high as the sort)"
        ),
    ),
    "0.11": Profile(
        name="0.11",
        sliding_in_flight_batches=1,
        versions="0.11.x (V1 only; V0 removed)",
        default_util=0.90,
        cudagraph_subtracted=False,
        tokens_group_aware=False,
        has_160gib_tier=False,
        # The dummy sampler sorts the logits (PyTorch-native top-k/top-p, as 0.8-0.10) unless FlashInfer's
        # sampler runs: 0.11.0's wheel has FlashInfer only as an optional extra (its METADATA) and uses it
        # when installed; from 0.11.1 it is opt-in (VLLM_USE_FLASHINFER_SAMPLER=1; topk_topp_sampler.py of
        # 0.11.1 / 0.11.2; resolve() turns the default off), so a default 0.11 server sorts (0.17 brought a
        # Triton kernel instead).
        native_topk_topp_bytes=NATIVE_TOPK_TOPP_BYTES,
        flashinfer_sampler_by_default=True,
        compiled_peak_as_sort=True,  # torch 2.8, as 0.10.2: not measured with FlashInfer, the safe side
        # one Ada GPU: as 0.9-0.10 (a single GPU creates no NCCL communicator, so moving the snapshot
        # after NCCL init changed nothing there); pub-111 (0.11.0 L4) agrees: -5.2% -> -2.3%. Other GPUs
        # keep the 0.19-fitted 0.26 (pub-112 A100 -1.25%, pub-115 H200 -0.1%; 0.07 as 0.9 would take
        # pub-110 over): the T4 of pub-110 runs data parallel 2, and 0.11.0's DP padding all_reduce runs
        # on the DP group's device group in the profile run (forward_context.py DPMetadata, called from
        # gpu_model_runner _dummy_run unless eager), creating torch's NCCL communicator for that group
        # after the snapshot - so DP 2 does add non-torch memory per GPU; no print sizes it.
        non_torch_single_ada_gib=0.02,
        checked_in=("0.11.0", "0.11.1", "0.11.2"),
        source=(
            "as 0.19 (the snapshot after NCCL init appeared in 0.11.0: vllm/v1/worker/gpu_worker.py); "
            "V1 also on compute capability < 8.0 (FlexAttention on a T4)"
        ),
        # 4 startups, none over with the sort counted from source: the widest default band
        margin=0.06,
        margin_floor_gib=0.35,
        evidence=(
            "4 public startups (0.11.0 on a T4 with data parallel 2, an L4 and an A100 40GB, 0.11.2 on an H200): "
            "KV tokens -2.3% to -0.1% with the native sort counted from source (16 B a logit left the T4 +2.0% "
            "over; +2.6% to +7.4% without any sort on the two that were over); few cases, so the widest band"
        ),
    ),
    "0.19": Profile(
        name="0.19",
        versions="0.12.0-0.19.x (V1)",
        default_util=0.90,
        cudagraph_subtracted=False,
        tokens_group_aware=False,
        has_160gib_tier=False,
        checked_in=("0.11.0", "0.19.0"),
        source=(
            "vllm/v1/worker/gpu_worker.py: snapshot AFTER NCCL init (0.11.0); KV = requested - (weights + "
            "non_torch_increase + torch_peak_increase); CUDA-graph estimate absent/off"
        ),
        margin=0.018,
        margin_floor_gib=0.1,
        evidence=(
            "43 vLLM 0.19.0 H100 startups (fixtures/reference: KV tokens 0.08% median error, worst +0.47%) "
            "and a 0.19.1 A100 40GB one (-0.1%)"
        ),
    ),
    "0.20": Profile(
        name="0.20",
        versions="0.20-0.27",
        default_util=0.92,
        cudagraph_subtracted=True,
        tokens_group_aware=False,
        has_160gib_tier=False,
        source="as 0.19, minus the CUDA-graph pool estimate (VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1)",
        margin=0.06,
        margin_floor_gib=0.5,
        evidence="no measured startup: the 0.19 terms plus the graph estimate (4.6% median, +21% worst in-sample)",
    ),
    "0.33": Profile(
        name="0.33",
        versions="0.28+",
        default_util=0.92,
        cudagraph_subtracted=True,
        tokens_group_aware=True,
        has_160gib_tier=True,
        source="as 0.20; 160 GiB default tier; group-aware token count (the hybrid KV cache manager)",
        margin=0.06,
        margin_floor_gib=0.5,
        evidence=(
            "1 public startup (0.31.0 on an A10G, Qwen2.5-1.5B-Instruct, its report's figures): KV tokens -2.0%, "
            "weights 0.09 GiB under what it reported; otherwise the 0.19 terms plus the graph estimate (4.6% "
            "median, +21% worst in-sample)"
        ),
    ),
}
NEWEST_VERSION = "0.33.0"


def version_tuple(version: str) -> tuple[int, int, int]:
    match = re.match(r"\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not match:
        raise EstimateError(f"--vllm-version {version!r}: expected a version like 0.19.0")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def v1_supported(version: tuple[int, int, int], compute_capability: str | None, kv_cache_dtype: str = "auto") -> bool:
    """vLLM 0.8-0.10's EngineArgs._is_v1_supported_oracle, for what the estimator knows.

    Read in vllm/engine/arg_utils.py (0.8.5.post1 l.1346-1374, 0.9.2 l.1353-1383, 0.10.1.1 l.1395-1414):
    compute capability < 8.0 falls back to V0 ("Compute Capability < 8.0"); an fp8 KV cache falls
    back in 0.8-0.9 unless FlashAttention supports fp8 (FA3, Hopper).
    """
    if version < (0, 8, 0):
        return False
    if version >= (0, 11, 0):  # V0 is gone
        return True
    if compute_capability and int(compute_capability.split(".")[0]) < 8:
        return False
    if version < (0, 10, 0) and kv_cache_dtype.startswith("fp8"):
        return compute_capability is not None and int(compute_capability.split(".")[0]) >= 9
    return True


def resolve(
    version: str, compute_capability: str | None = None, kv_cache_dtype: str = "auto"
) -> Profile:
    """The profile vLLM `version` runs with on a GPU of `compute_capability` (V0 fallback included)."""
    v = version_tuple(version)
    if v < (0, 8, 0) or not v1_supported(v, compute_capability, kv_cache_dtype):
        profile = PROFILES["0.6"]
        if v < (0, 7, 1):
            profile = profile.model_copy(update={"mla_latent_cache": False})
        elif v < (0, 8, 0):
            align = 256 if v >= (0, 7, 2) else 0
            profile = profile.model_copy(update={"mla_align_bytes": align, "mla_absorbed_weights": True})
        return profile
    if v < (0, 9, 0):
        return PROFILES["0.8"]
    if v < (0, 10, 2):
        return PROFILES["0.9"]
    if v < (0, 11, 0):  # 0.10.2 (torch 2.8): compiled startups peak as high as the sort (pub-105..107)
        return PROFILES["0.9"].model_copy(update={"compiled_peak_as_sort": True})
    if v < (0, 11, 1):
        return PROFILES["0.11"]
    if v < (0, 12, 0):  # the FlashInfer sampler is opt-in from 0.11.1
        return PROFILES["0.11"].model_copy(update={"flashinfer_sampler_by_default": False})
    if v < (0, 17, 0):  # the FlashInfer sampler is opt-in and the Triton top-k/top-p kernel (0.17+, what
        # the 0.19 fit saw) not there yet: the dummy sampler sorts the logits (topk_topp_sampler.py of
        # 0.12.0, 0.14.0, 0.15.0, 0.16.0 read; no startup of these versions measured)
        return PROFILES["0.19"].model_copy(update={
            "native_topk_topp_bytes": PROFILES["0.9"].native_topk_topp_bytes,
            "evidence": PROFILES["0.19"].evidence + "; on 0.12-0.16 the dummy sampler's sort is counted from their "
                        "source, and no startup of these versions was measured"})
    if v < (0, 20, 0):
        return PROFILES["0.19"]
    if v < (0, 28, 0):  # graph estimate on and util 0.92 from 0.20; the 160 GiB tier from 0.28
        return PROFILES["0.20"]
    return PROFILES["0.33"]


def mxfp4_padding(version: str, compute_capability: str | None) -> tuple[int, int]:
    """(intermediate multiple, hidden multiple) MXFP4 experts are padded to on this GPU.

    vllm/model_executor/layers/quantization/mxfp4.py (0.10.1.1 l.123-186): the Marlin MoE kernel
    (every GPU below compute capability 9.0, and Hopper while vLLM shipped torch < 2.8, i.e.
    before 0.10.2) needs intermediate % 128 and hidden % 256; FlashInfer on Blackwell (10.x)
    256/256; the Triton kernels on Hopper (0.10.2+) only intermediate % 64.
    """
    major = int((compute_capability or "9.0").split(".")[0])
    if major >= 10:
        return 256, 256
    if major < 9 or version_tuple(version) < (0, 10, 2):
        return 128, 256
    return 64, 1
