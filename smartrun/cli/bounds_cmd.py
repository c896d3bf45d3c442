"""`localaistack bounds check|show`: check a bounds file; print the effective bounds with their sources."""

from __future__ import annotations

import argparse
import json
import os
import sys

from smartrun.cli.run_cmd import split_extra
from smartrun.request import add_options

# The `model run` options `bounds show` plans with (declared once, in smartrun.request.OPTIONS).
PLANNING_OPTIONS = ("hardware_path", "gpus", "bounds_path", "goal", "force", "vllm_version")


def register(subparsers) -> None:
    """Add the `bounds` group with `check` and `show`."""

    group = subparsers.add_parser("bounds", help="check a bounds file or show effective bounds", allow_abbrev=False)
    commands = group.add_subparsers(dest="command", metavar="{check,show}")
    commands.required = True

    check = commands.add_parser(
        "check", help="report every problem in a bounds file, with its line", allow_abbrev=False,
        description="Check FILE (default: smartrun.toml from the current directory upward, else the built-in "
                    "default). Prints FILE:LINE: problem for each problem and exits 2 if there is any.")
    check.add_argument("file", metavar="FILE", nargs="?", help="bounds file (TOML)")
    check.add_argument("--json", action="store_true", help="print one JSON object: file, ok, problems")
    check.set_defaults(func=check_command)

    show = commands.add_parser(
        "show", help="print the effective bounds for MODEL on a machine, with the source of every limit",
        allow_abbrev=False,
        description="vLLM flags after MODEL (e.g. --max-model-len 8192) are your pins.")
    show.add_argument("model", metavar="MODEL", help="model directory or cached Hugging Face repo id")
    add_options(show, only=PLANNING_OPTIONS)
    show.add_argument("--baseline", action="store_true", help="also print the baseline plan and its argv")
    show.add_argument("--no-calibration", action="store_true",
                      help="ignore what this machine's startups taught the estimator")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=show_command, accepts_extra=True)


def check_command(args: argparse.Namespace) -> int:
    from smartrun import bounds

    if args.file:
        path, shown = args.file, args.file
    else:
        found = bounds.find()
        path, shown = (found, str(found)) if found else (bounds.BUILTIN_PATH, f"builtin ({bounds.BUILTIN_PATH})")
    found_problems = bounds.problems(path)
    if args.json:
        loaded = None if found_problems else (bounds.load(path) if args.file or path != bounds.BUILTIN_PATH
                                              else bounds.builtin())
        print(json.dumps({"file": shown, "ok": not found_problems, "exit": 2 if found_problems else 0,
                          "problems": [{"line": line, "message": message} for line, message in found_problems],
                          "summary": loaded.summary() if loaded is not None else None}, indent=2))
        return 2 if found_problems else 0
    for line, message in found_problems:
        print(f"{path}:{line}: {message}")
    if found_problems:
        print(f"localaistack: {len(found_problems)} problem(s) in {shown}")
        return 2
    loaded = bounds.load(path) if args.file or path != bounds.BUILTIN_PATH else bounds.builtin()
    for note in loaded.ineffective():
        print(f"warning: {note}")
    print(f"OK {shown}: {loaded.summary()}")
    return 0


def show_command(args: argparse.Namespace) -> int:
    """The planning stages of `model run --dry-run` (pipeline.plan_stages) with this command's options;
    vLLM flags before `--` are pins, after it passthrough, as in `model run`."""

    from smartrun import pipeline, rules
    from smartrun.calibration import NoCalibration
    from smartrun.gpus import describe_gpus

    user_args, extra_args = split_extra(list(getattr(args, "extra", None) or []))
    request = pipeline.RunRequest(
        model=args.model, user_args=tuple(user_args), extra_args=tuple(extra_args), dry_run=True,
        visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
        **pipeline.RunRequest.fields_from_args(args, only=PLANNING_OPTIONS))
    sources = pipeline.live_sources(request)
    if args.no_calibration:
        sources.calibration = NoCalibration()

    ctx = pipeline.context(request, sources)
    pipeline.plan_stages(ctx)
    result = ctx.result
    facts, machine, effective, plan = result.facts, result.hardware, ctx.bounds, result.plan
    assert facts is not None and machine is not None and effective is not None and plan is not None
    correction = result.calibration
    if args.json:
        out = {"model": facts.name, "goal": args.goal, "bounds_file": effective.bounds_file, "bounds": effective.to_json(),
               "warnings": list(ctx.rec.record.warnings), "params": plan.params, "provenance": plan.provenance,
               "argv": result.argv, "estimate": result.estimate.model_dump() if result.estimate else None,
               "calibration": correction.model_dump(mode="json") if correction is not None else None}
        print(json.dumps(out, indent=2))
        return 0
    for warning in ctx.rec.record.warnings:  # the bounds' own warnings are printed with them
        if warning not in effective.warnings:
            print(f"localaistack: warning: {warning}", file=sys.stderr)
    shown = " + ".join(args.hardware or [])
    print(f"{facts.name} on {describe_gpus(machine.gpus)} ({shown or 'detected'})")
    print("\n".join(rules.format_bounds(effective)))
    if correction is not None:
        print(f"estimate {correction.describe()}")
    if args.baseline:
        print("baseline:")
        for name, value in plan.params.items():
            print(f"  {name} = {value}    <- {plan.provenance.get(name, '')}")
        print("argv: " + " ".join(result.argv))
    return 0
