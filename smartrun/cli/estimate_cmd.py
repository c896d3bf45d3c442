"""`localaistack model estimate`: print vLLM's memory budget for a model on a machine. Decides nothing."""

from __future__ import annotations

import argparse
import json

from smartrun.errors import EstimateError

MAX_GPUS = 4096  # far above any node; a typo like --gpus 99999999 must not build a list that size


def _model_len(text: str) -> int:
    """N, or auto/-1 for vLLM's auto-fit."""
    if text.lower() in ("auto", "-1"):
        return -1
    try:
        value = int(text)
    except ValueError:
        raise EstimateError(f"--max-model-len {text!r}: expected an integer or auto") from None
    if value <= 0:
        raise EstimateError(f"--max-model-len {text!r}: expected a positive integer or auto")
    return value


def register(subparsers) -> None:
    """Add `estimate` to the `model` command group."""
    p = subparsers.add_parser(
        "estimate",
        help="estimate vLLM's memory budget (weights, activation, KV cache) for a model on a machine",
        allow_abbrev=False,
    )
    p.add_argument("model", metavar="MODEL", help="model directory or cached Hugging Face repo id")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--hardware", metavar="FILE", help="hardware snapshot JSON (localaistack hardware detect)"
    )
    where.add_argument(
        "--gpu", metavar="NAME", help='GPU name from the shipped table, e.g. "H100", "RTX 4090"'
    )
    p.add_argument("--gpus", type=int, default=None, metavar="N", help="number of such GPUs (with --gpu)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N")
    p.add_argument("--gpu-memory-utilization", type=float, default=None, metavar="F")
    p.add_argument("--max-model-len", default=None, metavar="N|auto")
    p.add_argument("--max-num-seqs", type=int, default=None, metavar="N")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, metavar="N")
    p.add_argument("--dtype", default="auto", metavar="D")
    p.add_argument("--kv-cache-dtype", default="auto", metavar="D")
    p.add_argument("--quantization", default=None, metavar="Q", help="online quantization, e.g. fp8")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument(
        "--vllm-version", default=None, metavar="V", help="default: the installed vllm, else the newest"
    )
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore what this machine's startups taught the estimator (with --hardware)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the MemoryEstimate fields")
    p.set_defaults(func=run)


def _gpus(args: argparse.Namespace):
    from smartrun.memory import GpuSpec

    if args.hardware:
        from smartrun.hardware import load_snapshot

        snapshot = load_snapshot(args.hardware)
        if not snapshot.gpus:
            raise EstimateError(f"{args.hardware}: the snapshot has no GPU")
        return snapshot
    for flag, value in (("--tensor-parallel-size", args.tensor_parallel_size),
                        ("--pipeline-parallel-size", args.pipeline_parallel_size), ("--gpus", args.gpus)):
        if value is not None and not 1 <= value <= MAX_GPUS:
            raise EstimateError(f"{flag} {value}: must be between 1 and {MAX_GPUS}")
    count = args.gpus if args.gpus is not None else args.tensor_parallel_size * args.pipeline_parallel_size
    return [GpuSpec.from_name(args.gpu)] * count


def _graphs_subtracted(est) -> bool:
    from smartrun.vllm_profiles import PROFILES

    profile = PROFILES.get(est.profile)
    return profile is not None and profile.cudagraph_subtracted


def _low(est) -> str:
    """The low end of the band: what a plan counts on (memory.plan_safe_*)."""
    from smartrun.memory import plan_safe_kv_tokens, plan_safe_max_model_len

    return (
        f"{plan_safe_kv_tokens(est):,} (low end: {est.margin_gib:.2f} GiB kept back; concurrency "
        f"{est.max_concurrency_low or 0:.2f}x, largest max_model_len {plan_safe_max_model_len(est):,})"
    )


def _table(est) -> str:
    rows = [
        ("vLLM version (profile)", f"{est.vllm_version} ({est.profile})"),
        ("total (CUDA)", f"{est.total_gib:.2f} GiB"),
        ("requested (util x total)", f"{est.requested_gib:.2f} GiB"),
        ("free at start", f"{est.free_gib:.2f} GiB"),
        ("weights", f"{est.weights_gib:.2f} GiB"),
        ("activation peak", f"{est.activation_gib:.2f} GiB"),
        ("non-torch", f"{est.non_torch_gib:.2f} GiB"),
        (
            "CUDA graphs",
            f"{est.cudagraph_gib:.2f} GiB" + ("" if _graphs_subtracted(est) else " (not taken from KV)"),
        ),
        ("KV cache", f"{est.kv_cache_gib:.2f} GiB"),
        ("KV cache tokens", f"{est.kv_cache_tokens:,} ({est.num_gpu_blocks:,} blocks of {est.block_size})"),
        ("plan-safe KV tokens", _low(est)),
        ("KV bytes per token (GPU)", f"{est.kv_bytes_per_token:,}"),
        ("max_model_len", f"{est.max_model_len:,}"),
        ("max_num_seqs / batched tokens", f"{est.max_num_seqs} / {est.max_num_batched_tokens}"),
        ("max concurrency", f"{est.max_concurrency:.2f}x"),
        ("largest max_model_len", f"{est.largest_max_model_len:,}"),
        ("fits", "yes" if est.fits else f"no: {est.reason}"),
        ("uncertainty", est.uncertainty or "-"),
        ("calibration", est.calibration.describe() if est.calibration is not None else "none"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _correction(args: argparse.Namespace, gpus):
    """The correction learned from startups on the snapshot's machine (none for a --gpu name: no machine)."""
    if not args.hardware or args.no_calibration:
        return None
    import sys

    from smartrun import calibration

    correction, problems = calibration.for_machine(gpus, args.vllm_version)
    for problem in problems:
        print(f"localaistack: warning: {problem}", file=sys.stderr)
    return correction


def run(args: argparse.Namespace) -> int:
    from smartrun.memory import EngineFlags, estimate
    from smartrun.model import inspect

    facts = inspect(args.model)
    flags = EngineFlags(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        gpu_memory_utilization=args.gpu_memory_utilization,
        max_model_len=None if args.max_model_len is None else _model_len(args.max_model_len),
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        enforce_eager=args.enforce_eager,
        quantization=args.quantization,
    )
    gpus = _gpus(args)
    est = estimate(facts, gpus, flags, args.vllm_version, calibration=_correction(args, gpus))
    if args.json:
        print(json.dumps(est.model_dump()))
    else:
        print(f"{facts.name}: {flags.tensor_parallel_size * flags.pipeline_parallel_size} GPU(s)")
        print(_table(est))
    return 0
