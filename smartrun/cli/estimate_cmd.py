"""`localaistack model estimate`: print vLLM's memory budget for a model on a machine. Decides nothing."""

from __future__ import annotations

import argparse
import json
import sys

from smartrun.errors import EstimateError
from smartrun.hardware import load_snapshot
from smartrun.knobs import CATALOGUE, parse_value
from smartrun.memory import EngineFlags, GpuSpec, estimate, plan_safe_kv_tokens, plan_safe_max_model_len
from smartrun.model import inspect
from smartrun.vllm_profiles import PROFILES

MAX_GPUS = 4096  # far above any node; a typo like --gpus 99999999 must not build a list that size


def engine_knobs() -> list:
    """The catalogue's entries for the estimator's flags (memory.EngineFlags): declared once, in smartrun.knobs."""

    return [CATALOGUE[name] for name in EngineFlags.model_fields if name in CATALOGUE]


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
    for k in engine_knobs():  # vLLM's spelling, aliases and domain, as `model run` reads them
        if k.type == "bool":
            p.add_argument(k.flag, *k.aliases, dest=k.name, action="store_const", const=True, default=None,
                           help=k.help)
            for negative in k.negative_flags:
                p.add_argument(negative, dest=k.name, action="store_const", const=False, help=argparse.SUPPRESS)
        else:
            p.add_argument(k.flag, *k.aliases, dest=k.name, default=None, metavar=k.type.upper(), help=k.help)
    p.add_argument(
        "--vllm-version", default=None, metavar="V", help="default: the installed vllm, else the newest"
    )
    p.add_argument("--no-calibration", action="store_true",
                   help="ignore what this machine's startups taught the estimator (with --hardware)")
    p.add_argument("--json", action="store_true", help="print one JSON object with the MemoryEstimate fields")
    p.set_defaults(func=run)


def _flags(args: argparse.Namespace):
    """EngineFlags from the typed flags, each value read as `model run` reads it (32k, auto, half)."""

    values = {}
    for k in engine_knobs():
        given = getattr(args, k.name, None)
        if given is not None:
            values[k.name] = given if k.type == "bool" else parse_value(k, given)
    return EngineFlags(**values)


def _gpus(args: argparse.Namespace, flags):
    if args.hardware:
        snapshot = load_snapshot(args.hardware)
        if not snapshot.gpus:
            raise EstimateError(f"{args.hardware}: the snapshot has no GPU")
        return snapshot
    for flag, value in (("--tensor-parallel-size", flags.tensor_parallel_size),
                        ("--pipeline-parallel-size", flags.pipeline_parallel_size), ("--gpus", args.gpus)):
        if value is not None and not 1 <= value <= MAX_GPUS:
            raise EstimateError(f"{flag} {value}: must be between 1 and {MAX_GPUS}")
    count = args.gpus if args.gpus is not None else flags.tensor_parallel_size * flags.pipeline_parallel_size
    return [GpuSpec.from_name(args.gpu)] * count


def graphs_subtracted(est) -> bool:
    """Whether the estimate's profile takes CUDA graph memory out of the KV cache (0.20+) or not (it comes on top)."""
    profile = PROFILES.get(est.profile)
    return profile is not None and profile.cudagraph_subtracted


def _low(est) -> str:
    """The low end of the band: what a plan counts on (memory.plan_safe_*)."""

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
        ("sampler (top-k/top-p)", est.sampler or "-"),
        ("non-torch", f"{est.non_torch_gib:.2f} GiB"),
        (
            "CUDA graphs",
            f"{est.cudagraph_gib:.2f} GiB" + ("" if graphs_subtracted(est) else " (not taken from KV)"),
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

    from smartrun import calibration

    correction, problems = calibration.for_machine(gpus, args.vllm_version)
    for problem in problems:
        print(f"localaistack: warning: {problem}", file=sys.stderr)
    return correction


def run(args: argparse.Namespace) -> int:
    facts = inspect(args.model)
    flags = _flags(args)
    gpus = _gpus(args, flags)
    est = estimate(facts, gpus, flags, args.vllm_version, calibration=_correction(args, gpus))
    if args.json:
        print(json.dumps(est.model_dump()))
    else:
        print(f"{facts.name}: {flags.tensor_parallel_size * flags.pipeline_parallel_size} GPU(s)")
        print(_table(est))
    return 0
