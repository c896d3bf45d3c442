"""`localaistack calibration show|reset`: what the estimator learned from this machine's startups. Decides nothing."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from smartrun.memory import resolve_version


def register(groups) -> None:
    """Add the `calibration` command group."""
    group = groups.add_parser("calibration", help="show or reset what the estimator learned from this machine's "
                                                  "startups", allow_abbrev=False)
    cmds = group.add_subparsers(dest="command", metavar="{show,reset}")
    cmds.required = True
    show = cmds.add_parser("show", help="per machine and vLLM version: the correction and the startups it comes from",
                           allow_abbrev=False)
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=run_show)
    reset = cmds.add_parser("reset", help="forget calibration data (all of it, or one machine / vLLM version)",
                            allow_abbrev=False)
    reset.add_argument("--machine", metavar="FINGERPRINT", help="only this machine (as `calibration show` lists it)")
    reset.add_argument("--vllm-version", metavar="V", help="only this vLLM version")
    reset.add_argument("--json", action="store_true", help="print one JSON object")
    reset.set_defaults(func=run_reset)


def _warn(problems: list[str]) -> None:
    for problem in problems:
        print(f"localaistack: warning: {problem}", file=sys.stderr)


def run_show(args: argparse.Namespace) -> int:
    from smartrun.calibration import Store

    store = Store()
    entries = store.entries()
    _warn(store.problems)
    if args.json:
        print(json.dumps({"directory": str(store.directory), "calibrations": [_entry_json(p, d) for p, d in entries],
                          "problems": list(store.problems)}, indent=2))
        return 0
    if not entries:
        print(f"no calibration data in {store.directory}: every healthy `model run` adds vLLM's startup figures")
        return 0
    print(f"calibration data: {store.directory}")
    for _path, data in entries:
        correction = data.correction()
        gpus = ", ".join(sorted(set(data.gpus))) or "GPUs unknown"
        print(f"machine {data.machine} ({len(data.gpus)}x {gpus}), vLLM {data.vllm_version}, "
              f"{len(data.observations)} startup(s) kept")
        if correction is not None:
            print(f"  {correction.describe()}")
        for seen in data.observations:
            print(f"    {seen.describe()}")
    return 0


def _entry_json(path: Any, data: Any) -> dict[str, Any]:
    correction = data.correction()
    return {"file": str(path), "machine": data.machine, "vllm_version": data.vllm_version, "gpus": data.gpus,
            "correction": correction.model_dump(mode="json") if correction is not None else None,
            "summary": correction.describe() if correction is not None else None,
            "observations": [o.model_dump(mode="json") for o in data.observations]}


def run_reset(args: argparse.Namespace) -> int:
    from smartrun.calibration import Store, check_machine

    if args.machine is not None:
        check_machine(args.machine)
    if args.vllm_version is not None:
        resolve_version(args.vllm_version)  # a version like 0.19.0, or one line and exit 2
    store = Store()
    removed = store.reset(args.machine, args.vllm_version)
    if args.json:
        print(json.dumps({"directory": str(store.directory), "removed": [str(p) for p in removed]}, indent=2))
        return 0
    what = " ".join(f"{flag} {value}" for flag, value in (("--machine", args.machine),
                                                          ("--vllm-version", args.vllm_version)) if value)
    print(f"removed {len(removed)} calibration file(s)" + (f" matching {what}" if what else "")
          + f" from {store.directory}")
    for path in removed:
        print(f"  {path}")
    return 0
