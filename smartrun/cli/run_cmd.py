"""CLI: `localaistack model run MODEL [--smart-run ...] [vLLM flags ...] [-- extra vllm args]`.

Parses and prints only; smartrun.pipeline composes the stages and decides.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from smartrun.cli import positive_seconds
from smartrun.rules import GOALS


def register(subparsers) -> None:
    """Add `model run`."""
    p = subparsers.add_parser(
        "run",
        help="plan and start vllm serve for MODEL (smart-run: inside hard bounds)",
        description="Plan `vllm serve` flags for MODEL inside hard bounds and start it. vLLM flags typed with "
        "vLLM's own names are your pins; everything after `--` is passed to vllm untouched.",
        allow_abbrev=False,
    )
    p.add_argument("model", metavar="MODEL", help="local model directory or a Hugging Face repo id in the HF cache")
    p.add_argument("--smart-run", action="store_true", help="ask the LLM (if configured) and use saved parameters")
    p.add_argument("--smart-run-debug", action="store_true", help="print source=... reason=..., LLM latency, tokens")
    p.add_argument("--smart-run-refresh", action="store_true", help="ignore saved parameters for this model")
    p.add_argument("--smart-run-strict", action="store_true", help="fail (exit 3) instead of falling back")
    p.add_argument("--dry-run", action="store_true", help="print the plan and the vllm serve command; start nothing")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--explain", action="store_true", help="print every bound, decision and rejection with its source")
    p.add_argument("--hardware", metavar="SNAPSHOT.json", help="plan for the machine this snapshot describes")
    p.add_argument("--bounds", metavar="FILE", help="bounds file (default: smartrun.toml upward, else built-in)")
    p.add_argument("--goal", choices=GOALS, default="stable", help="what the plan favours (default stable)")
    p.add_argument("--force", action="store_true", help="accept pins outside other sources' bounds")
    p.add_argument("--host", default="127.0.0.1",
                   help="address vllm listens on (default 127.0.0.1: local only; vLLM's own default is all interfaces)")
    p.add_argument("--port", type=int, default=8000, help="port vllm listens on (default 8000)")
    p.add_argument("--vllm-version", metavar="V", help="plan for this vLLM version (default: the installed one)")
    p.add_argument("--vllm-bin", metavar="PATH", help="the vllm executable (default: from PATH)")
    p.add_argument("--startup-timeout", type=positive_seconds, default=900.0, metavar="S",
                   help="seconds to wait for each start to become healthy (default 900: big models load slowly)")
    p.add_argument("--max-attempts", type=int, default=3, metavar="N",
                   help="starts, recoveries included, before giving up (default 3)")
    p.add_argument("--llm-base-url", metavar="URL",
                   help="OpenAI-compatible endpoint (else SMARTRUN_LLM_BASE_URL, OPENAI_BASE_URL, [llm] config)")
    p.add_argument("--llm-model", metavar="NAME", help="model name at that endpoint (default: its first)")
    p.add_argument("--llm-timeout", type=positive_seconds, metavar="S", help="seconds per LLM request")
    p.add_argument("--session-out", metavar="FILE", help="write the session record here instead of the data dir "
                   "(`session list` shows only the data dir; use `session show FILE`)")
    from smartrun import tune

    tune.add_arguments(p)  # --tune and its --tune-*/--probe-* options, owned by the tune stage
    p.set_defaults(func=run_command, accepts_extra=True)


def split_extra(extra: list[str]) -> tuple[list[str], list[str]]:
    """(vLLM flags before `--`, args after `--`), from what the top-level parser left unparsed."""
    if "--" in extra:
        cut = extra.index("--")
        return list(extra[:cut]), list(extra[cut + 1:])
    return list(extra), []


def request_from_args(args: argparse.Namespace) -> Any:
    from smartrun.errors import InputError
    from smartrun.pipeline import RunRequest

    if args.max_attempts < 1:
        raise InputError(f"--max-attempts {args.max_attempts}: must be at least 1")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: not a TCP port")
    user, extra = split_extra(list(getattr(args, "extra", []) or []))
    tune_options: dict[str, Any] = {}
    given = [f"--{name.replace('_', '-')}" for name in ("tune_rounds", "tune_min_gain", "slo_p95_ms",
             "probe_concurrency", "probe_duration", "probe_prompt_tokens", "probe_output_tokens",
             "probe_max_requests") if getattr(args, name, None) is not None]
    if given and not args.tune:  # silently not tuning would surprise whoever typed them
        raise InputError(f"{given[0]}: only used with --tune")
    if args.tune:
        from smartrun import tune

        tune_options = tune.settings_from_args(args).model_dump(mode="json")
    return RunRequest(
        model=args.model, user_args=tuple(user), extra_args=tuple(extra), smart_run=args.smart_run,
        debug=args.smart_run_debug, refresh=args.smart_run_refresh, strict=args.smart_run_strict,
        dry_run=args.dry_run, goal=args.goal, force=args.force, host=args.host, port=args.port,
        vllm_version=args.vllm_version, vllm_bin=args.vllm_bin, startup_timeout=args.startup_timeout,
        max_attempts=args.max_attempts, hardware_path=args.hardware, bounds_path=args.bounds, tune=args.tune,
        tune_options=tune_options,
        llm_base_url=args.llm_base_url, llm_model=args.llm_model, llm_timeout=args.llm_timeout,
    )


def run_command(args: argparse.Namespace) -> int:
    from smartrun import pipeline
    from smartrun.secrets import redact_text

    request = request_from_args(args)
    sources = pipeline.live_sources(request)
    started: list[Any] = []

    def summary(planned: Any) -> None:  # before any launch, so a long-running server does not hide it
        if not args.json:
            text = render_text(planned, explain=args.explain, debug=args.smart_run_debug)
            print(redact_text(text, planned.secrets), flush=True)

    try:
        result = pipeline.run(request, sources, on_event=_printer(args.json), session_out=_path(args.session_out),
                              on_planned=summary, on_started=started.append)
    except BaseException:  # a failed or interrupted run still names its record (session show FILE explains it)
        if not args.json:  # stdout: stderr keeps its one `localaistack: ...` line
            _print_session_path(started[0].session_path if started else None, to_stderr=False)
        raise
    if args.json:
        print(redact_text(json.dumps(result.json_summary(), indent=2), result.secrets))
    elif not request.dry_run:
        print(f"outcome: {result.record.outcome.get('status')}; final command: "
              f"{redact_text(result.command or ' '.join(result.argv), result.secrets)}")
    _print_session_path(result.session_path, to_stderr=args.json)
    if result.exit_code:
        print(f"localaistack: {result.record.outcome.get('message', 'vllm serve exited')}", file=sys.stderr)
    return result.exit_code


def _print_session_path(path: Path | None, to_stderr: bool) -> None:
    """`session record: PATH`, only when the record is really there (a write can fail: it is warned about)."""
    if path is not None and path.is_file():
        print(f"session record: {path}", file=sys.stderr if to_stderr else sys.stdout, flush=True)


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _printer(quiet: bool):
    """Progress as it happens: vLLM's own lines as they are, ours marked; all on stderr under --json."""
    seen: set[str] = set()

    def show(kind: str, text: str) -> None:
        if kind == "warning":
            if text in seen:
                return
            seen.add(text)
            print(f"warning: {text}", file=sys.stderr, flush=True)
            return
        line = text if kind == "vllm" else f"[smartrun] {text}"
        print(line, file=sys.stderr if quiet else sys.stdout, flush=True)

    return show


def render_text(result: Any, explain: bool = False, debug: bool = False) -> str:
    """The human-readable summary: machine, model, bounds, baseline, chosen plan, final argv."""
    out: list[str] = []
    if result.hardware is not None:
        out += ["== hardware", *format_hardware(result.hardware)]
    if result.facts is not None:
        out += ["== model", *format_model(result.facts)]
    if result.bounds is not None:
        out += ["== effective bounds" + (" (with sources)" if explain else ""),
                *format_bounds(result.bounds, explain=explain)]
    if result.baseline is not None:
        out += ["== baseline (source=static)", "  " + _params(result.baseline.params)]
    if result.plan is not None:
        out += [f"== plan (source={result.plan.source})", "  " + _params(result.plan.params)]
        if explain:
            out += ["== provenance (per knob)"]
            out += [f"  {k} = {result.plan.params[k]!r}  <- {v}" for k, v in sorted(result.plan.provenance.items())
                    if k in result.plan.params]
            out += ["== decisions (in order; what replay compares)"]
            out += [f"  {i:>2}. {d.step:<16} {_short(d.value)}" + (f"  <- {d.provenance}" if d.provenance and
                                                                    d.step not in ("baseline", "plan") else "")
                    for i, d in enumerate(result.record.decisions, 1)]
            out += _advice_lines(result)
    if explain or result.rejected:
        out += [f"== rejected ({len(result.rejected)})"]
        out += [f"  {r.get('knob')}={r.get('value')!r}: {r.get('reason')} [source: {r.get('source')}]"
                for r in result.rejected]
    if result.estimate is not None:
        e = result.estimate
        out += ["== estimate", f"  weights {e.weights_gib:.2f} GiB, KV cache {e.kv_cache_gib:.2f} GiB "
                f"({e.kv_cache_tokens} tokens), max concurrency {e.max_concurrency:.2f}x at "
                f"{e.max_model_len} tokens, fits={e.fits}" + (f" ({e.reason})" if e.reason else "")]
    if debug:
        why = "baseline (no --smart-run)" if not result.request.smart_run else "baseline"
        source = result.plan.source if result.plan else "static"
        out += [f"debug: {line}" for line in result.debug_lines] or [f'debug: source={source} reason="{why}"']
    if result.argv:
        out += ["== command", "  " + " ".join(_quote(a) for a in result.argv)]
    return "\n".join(out)


def format_hardware(hw: Any) -> list[str]:
    from smartrun import hardware

    return ["  " + line for line in hardware.summary(hw).splitlines()]


def format_model(facts: Any) -> list[str]:
    quant = f", {facts.quantization.method} {facts.quantization.weight_bits or ''}bit" if facts.quantization else ""
    weights = f"{facts.weight_bytes / 2**30:.2f} GiB weights" if facts.weight_bytes else "weights unknown"
    kinds = [k for k, v in (("MoE", facts.moe), ("MLA", facts.mla), ("multimodal", facts.is_multimodal)) if v]
    return [f"  {facts.name}: {facts.architecture}, {facts.num_hidden_layers} layers, hidden {facts.hidden_size}, "
            f"{facts.num_attention_heads} heads / {facts.num_kv_heads} KV heads, {facts.torch_dtype}{quant}",
            f"  {weights}, derived max_model_len {facts.derived_max_model_len}"
            + (f" ({', '.join(kinds)})" if kinds else "")]


def format_bounds(bounds: Any, explain: bool = False) -> list[str]:
    """The rules' own formatter (the one `bounds show` uses); sources always, notes with --explain."""
    from smartrun import rules

    return ["  " + line for line in rules.format_bounds(bounds, notes=explain)]


def _short(value: Any, limit: int = 100) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _advice_lines(result: Any) -> list[str]:
    if not result.advice:
        return []
    from smartrun import advisor

    out = ["== LLM exchanges"]
    for advice in result.advice:
        out += ["  " + line for line in advisor.explain_lines(advice)]
    return out


def _params(params: dict[str, Any]) -> str:
    """knob=value pairs; a multi-value flag (e.g. --api-key, nargs) shows its values comma-separated."""
    def shown(value: Any) -> str:
        return ",".join(map(str, value)) if isinstance(value, list | tuple) else str(value)

    return " ".join(f"{k}={shown(v)}" for k, v in sorted(params.items()))


def _quote(arg: str) -> str:
    import shlex

    return shlex.quote(arg)
