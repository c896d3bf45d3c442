"""`localaistack probe URL`: measure any running OpenAI-compatible server with a short, bounded load."""

from __future__ import annotations

import argparse
import json
import os

from smartrun import probe
from smartrun.probe import PROBE_OPTIONS, ProbeSettings


def register(subparsers) -> None:
    """Add `probe` to `subparsers`."""
    parser = subparsers.add_parser(
        "probe",
        help="measure throughput and latency of a running OpenAI-compatible server",
        description="Send a closed loop of completion requests to URL (server root or .../v1) and report "
        "output tokens/s, requests/s, time to first token and latency p50/p95, and errors. "
        "Stops by itself after --duration seconds or --max-requests requests.",
        allow_abbrev=False,
    )
    parser.add_argument("url", metavar="URL", help="e.g. http://127.0.0.1:8000 or http://127.0.0.1:8000/v1")
    parser.add_argument("--model", help="model name to request (default: the first one /v1/models lists)")
    defaults = ProbeSettings()
    for option in PROBE_OPTIONS:  # None: not typed, the setting's default (make_settings)
        parser.add_argument(option.flag, type=option.type, default=None, metavar=option.metavar,
                            help=option.help.format(default=getattr(defaults, option.field)))
    parser.add_argument("--api-key", metavar="KEY",
                        help="bearer token for a server started with --api-key (default: env VLLM_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run_probe_command)


def run_probe_command(args: argparse.Namespace) -> int:
    settings = probe.make_settings(model=args.model, **{o.field: getattr(args, o.dest) for o in PROBE_OPTIONS})
    line = probe.ProgressLine()
    try:
        result = probe.run_probe(args.url, settings, on_progress=line,
                                 api_key=args.api_key or os.environ.get("VLLM_API_KEY"))
    finally:
        line.finish()
    if args.json:
        if result.ok:  # else the one object on stdout is the error (cli.main), not a result of zeros before it
            print(json.dumps(result.model_dump(mode="json"), indent=2))
    else:
        print(f"{result.url}  model {result.model}  concurrency {settings.concurrency}  "
              f"prompt {settings.prompt_tokens} / output {settings.output_tokens} tokens  "
              f"{result.elapsed_s:.1f}s (stopped by {result.stopped_by.replace('_', ' ')})")
        print(result.summary())
        if result.error_kinds:
            print("errors: " + ", ".join(f"{k} x{n}" for k, n in sorted(result.error_kinds.items())))
    if result.ok == 0:  # nothing measured: say so and fail, so a script does not take zeros for a measurement
        kinds = ", ".join(f"{k} x{n}" for k, n in sorted(result.error_kinds.items())) or "no request was sent"
        raise probe.ProbeError(f"{result.url}: no request succeeded ({kinds})")
    return 0
