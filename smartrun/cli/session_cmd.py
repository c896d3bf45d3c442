"""CLI: `session show|list|replay` and `model smart-run-cache list|rm`. Parses and prints only."""

from __future__ import annotations

import argparse
import json
import sys

from smartrun.errors import InputError


def register(subparsers) -> None:
    """Add `session ...` commands."""
    group = subparsers.add_parser("session", help="show, list or replay recorded smart-run sessions",
                                  allow_abbrev=False)
    cmds = group.add_subparsers(dest="command", metavar="COMMAND")
    cmds.required = True

    show = cmds.add_parser("show", help="print a session record as a readable timeline", allow_abbrev=False)
    show.add_argument("file", metavar="FILE")
    show.add_argument("--json", action="store_true", help="print the record itself")
    show.set_defaults(func=show_command)

    lst = cmds.add_parser("list", help="list recent sessions (newest first)", allow_abbrev=False,
                          description="List the newest session records in the data dir ($SMARTRUN_HOME/sessions, "
                          "else the user data dir). Dry runs are recorded too but listed only with --all. "
                          "Records written with `model run --session-out FILE` are kept only in FILE and are "
                          "not listed here: open them with `session show FILE`.")
    lst.add_argument("--limit", type=int, default=20, metavar="N")
    lst.add_argument("--all", action="store_true", help="also list dry runs")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=list_command)

    rep = cmds.add_parser("replay", help="re-run a session from its record and check every decision",
                          allow_abbrev=False)
    rep.add_argument("file", metavar="FILE")
    rep.add_argument("--json", action="store_true")
    rep.set_defaults(func=replay_command)


def register_cache(model_subparsers) -> None:
    """Add `model smart-run-cache list [MODEL]` and `model smart-run-cache rm MODEL`."""
    group = model_subparsers.add_parser("smart-run-cache", help="saved smart-run parameters", allow_abbrev=False)
    cmds = group.add_subparsers(dest="cache_command", metavar="COMMAND")
    cmds.required = True
    lst = cmds.add_parser("list", help="list saved parameters", allow_abbrev=False)
    lst.add_argument("model", nargs="?", metavar="MODEL")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=cache_list_command)
    rm = cmds.add_parser("rm", help="forget the saved parameters of MODEL", allow_abbrev=False)
    rm.add_argument("model", metavar="MODEL")
    rm.add_argument("--json", action="store_true", help="print one JSON object")
    rm.set_defaults(func=cache_rm_command)


def show_command(args: argparse.Namespace) -> int:
    from smartrun.cli.timeline import timeline
    from smartrun.session import load_record

    record = load_record(args.file)  # a part of the wrong shape is refused here, naming it
    if args.json:
        print(json.dumps(record.model_dump(mode="json", by_alias=True), indent=2))
        return 0
    print("\n".join(timeline(record)))
    return 0


def list_command(args: argparse.Namespace) -> int:
    from smartrun.session import list_sessions, sessions_dir

    if args.limit < 1:
        raise InputError(f"--limit {args.limit}: must be at least 1")
    rows = list_sessions(limit=args.limit, include_dry_runs=args.all)
    if args.json:  # one object, like every --json answer
        print(json.dumps({"directory": str(sessions_dir()), "dry_runs_included": args.all,
                          "sessions": [_list_row(path, rec) for path, rec in rows]}, indent=2))
        return 0
    if not rows:
        hidden = "" if args.all or not list_sessions(limit=1) else " (dry runs are listed with --all)"
        print(f"no sessions in {sessions_dir()}{hidden}")
        return 0
    from smartrun.cli.timeline import printable

    for path, rec in rows:
        row = _list_row(path, rec)
        print(printable(f"{row['started_at'] or '?':<26} {row['status'] or '?':<12} {row['source'] or '-':<8} "
                        f"{row['model'] or '?':<32} {path}"))
    return 0


def _list_row(path, rec) -> dict:
    if isinstance(rec, str):
        return {"path": str(path), "started_at": None, "status": "unreadable", "source": None, "model": None,
                "error": rec}
    return {"path": str(path), "started_at": rec.started_at, "status": rec.outcome.status,
            "source": rec.final_plan.source if rec.final_plan else None,
            "model": rec.model.name if rec.model else rec.request.model if rec.request else None}


def replay_command(args: argparse.Namespace) -> int:
    from smartrun.pipeline import replay
    from smartrun.session import RecordError, load_record

    record = load_record(args.file)
    try:
        out = replay(record)  # ReplayDivergence (exit 5) names the first differing decision
    except RecordError as err:  # a recorded part that cannot be read back: name the file too
        raise RecordError(f"{args.file}: {err.message}") from None
    n = len(record.decisions)
    status = record.outcome.status
    if args.json:
        print(json.dumps({"file": args.file, "match": True, "decisions": n, "outcome": record.outcome.summary(),
                          "replayed_outcome": out.replayed.outcome.summary()}, indent=2))
    else:
        print(f"replay: {args.file}: all {n} decisions match (recorded outcome: {status})")
    return 0


def cache_list_command(args: argparse.Namespace) -> int:
    from smartrun.plan_cache import SavedParams

    cache = SavedParams()
    entries = cache.entries(args.model)
    for problem in cache.problems:
        print(f"localaistack: warning: {problem}", file=sys.stderr)
    if args.json:  # one object, like every --json answer
        print(json.dumps({"entries": [{"path": str(p), **e.model_dump(mode="json")} for p, e in entries],
                          "problems": list(cache.problems)}, indent=2))
        return 0
    if not entries:
        print("no saved parameters" + (f" for {args.model}" if args.model else ""))
        return 0
    for _path, e in entries:
        params = " ".join(f"{k}={v}" for k, v in sorted(e.params.items()))
        print(f"{e.key.model}  hw={e.key.hardware_fingerprint}  bounds={e.key.bounds_sha256[:12]}  "
              f"vllm={e.key.vllm_version or '?'}  goal={e.key.goal}  saved={e.saved_at}\n  {params}")
    return 0


def cache_rm_command(args: argparse.Namespace) -> int:
    from smartrun.plan_cache import SavedParams

    cache = SavedParams()
    removed = cache.remove(args.model)
    if args.json:
        print(json.dumps({"model": args.model, "removed": [str(p) for p in removed]}, indent=2))
        return 0
    print(f"removed {len(removed)} saved parameter set(s) for {args.model}")
    return 0
