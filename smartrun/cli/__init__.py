"""The `localaistack` command: parses arguments, calls the stages, prints. Decides nothing.

Each command group registers itself from its own module (`register(subparsers)`), so the
stages' owners can add commands without touching each other. A command's stage modules (pipeline,
session, calibration, ...) are imported inside its function, so the CLI starts without them; every
other import is at the top of its module (tests/test_layout.py).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any, NoReturn

from smartrun import __version__
from smartrun.cli import (
    bounds_cmd,
    calibration_cmd,
    estimate_cmd,
    hardware_cmd,
    inspect_cmd,
    probe_cmd,
    run_cmd,
    session_cmd,
)
from smartrun.errors import SmartRunError
from smartrun.secrets import redact_text, secret_values


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (`localaistack <cmd>: <problem>`, exit 2), like every other error.

    Subparsers inherit the class, so every command behaves the same; `-h` still prints the full usage.
    Under `--json` the error is also the one JSON object on stdout (`json_errors` is set by `main`).
    """

    json_errors = False
    secrets: tuple[str, ...] = ()  # secret values on the command line (`probe URL --api-key K` echoes K)

    def error(self, message: str) -> NoReturn:
        text = _hidden(f"{self.prog}: {message} (see {self.prog} -h)", OneLineParser.secrets)
        if OneLineParser.json_errors:
            print_json_error(text, 2)
        self.exit(2, text + "\n")


def _hidden(text: str, secrets: tuple[str, ...]) -> str:
    """A message for the terminal: the command line's secret values and key-shaped text redacted."""

    return redact_text(text, secrets)


def print_json_error(message: str, code: int, session_record: Any = None) -> None:
    """The one object `--json` prints on stdout when a command fails: {"error", "exit"[, "session_record"]}."""
    out: dict[str, Any] = {"error": message, "exit": code}
    if session_record is not None:
        out["session_record"] = str(session_record)
    print(json.dumps(out), flush=True)


def wants_json(argv: list[str]) -> bool:
    """`--json` among the options (not a value after `--`, which goes to vllm untouched)."""
    head = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in head


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="localaistack",
        description="Start vllm serve with flags that fit the machine and the model (smart-run).",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"localaistack (smartrun) {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="{model,hardware,bounds,session,probe,calibration}")
    groups.required = True

    model = groups.add_parser("model", help="run, inspect or estimate a model", allow_abbrev=False)
    model_cmds = model.add_subparsers(dest="command", metavar="COMMAND")
    model_cmds.required = True
    run_cmd.register(model_cmds)
    inspect_cmd.register(model_cmds)
    estimate_cmd.register(model_cmds)
    session_cmd.register_cache(model_cmds)

    hardware_cmd.register(groups)
    bounds_cmd.register(groups)
    session_cmd.register(groups)
    probe_cmd.register(groups)
    calibration_cmd.register(groups)
    return parser


def _reader_gone() -> int:
    """stdout's reader closed the pipe (`localaistack ... | head`): stop quietly, as a command killed by SIGPIPE
    would, and point stdout at /dev/null so that flushing it at exit cannot fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 128 + int(signal.SIGPIPE)


def main(argv: list[str] | None = None) -> int:
    """Parse, run the command, and turn every deliberate error into one line on stderr (and, under `--json`,
    one JSON object on stdout naming the error, the exit status and the session record when one was written)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = wants_json(argv)
    OneLineParser.json_errors = as_json

    hidden = OneLineParser.secrets = secret_values(argv)
    try:
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra and not getattr(args, "accepts_extra", False):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    finally:
        OneLineParser.json_errors = False
    args.extra = extra
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a reader that went away (`| head`) is met here, not in the interpreter's exit
        return code
    except BrokenPipeError:
        return _reader_gone()
    except SmartRunError as err:
        message = _hidden(err.message, hidden)
        print(f"localaistack: {message}", file=sys.stderr, flush=True)
        if as_json:
            print_json_error(message, err.exit_code, getattr(err, "session_record", None))
        return err.exit_code
    except KeyboardInterrupt:
        print("localaistack: interrupted", file=sys.stderr, flush=True)
        if as_json:
            print_json_error("interrupted", 130, getattr(args, "session_record", None))
        return 130
