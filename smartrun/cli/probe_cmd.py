"""`localaistack probe URL`: measure any running OpenAI-compatible server with a short, bounded load."""

from __future__ import annotations

import argparse
import json


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
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending at once (default 16)")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds to keep sending (default 10)")
    parser.add_argument("--prompt-tokens", type=int, default=256, help="prompt length in tokens (default 256)")
    parser.add_argument("--output-tokens", type=int, default=128, help="tokens to generate per request (default 128)")
    parser.add_argument("--max-requests", type=int, default=1000, help="stop after this many requests (default 1000)")
    parser.add_argument("--request-timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--api-key", metavar="KEY",
                        help="bearer token for a server started with --api-key (default: env VLLM_API_KEY)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(func=run_probe_command)


def run_probe_command(args: argparse.Namespace) -> int:
    import os

    from smartrun import probe

    settings = probe.make_settings(
        concurrency=args.concurrency, duration_s=args.duration, prompt_tokens=args.prompt_tokens,
        output_tokens=args.output_tokens, max_requests=args.max_requests,
        request_timeout_s=args.request_timeout, model=args.model,
    )
    line = probe.ProgressLine()
    try:
        result = probe.run_probe(args.url, settings, on_progress=line,
                                 api_key=args.api_key or os.environ.get("VLLM_API_KEY"))
    finally:
        line.finish()
    if args.json:
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
