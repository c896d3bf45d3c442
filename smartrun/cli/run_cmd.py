"""CLI: `localaistack model run MODEL [--smart-run ...] [vLLM flags ...] [-- extra vllm args]`.

Parses and prints only; smartrun.pipeline composes the stages and decides.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from smartrun import hardware, tune
from smartrun.cli.estimate_cmd import graphs_subtracted
from smartrun.errors import InputError, SmartRunError
from smartrun.request import RunRequest, add_options
from smartrun.secrets import redact_text
from smartrun.tune.options import given as tune_flags_given


def register(subparsers) -> None:
    """Add `model run`."""
    p = subparsers.add_parser(
        "run",
        help="plan and start vllm serve for MODEL (smart-run: inside hard bounds)",
        description="Plan `vllm serve` flags for MODEL inside hard bounds and start it. vLLM flags typed with "
        "vLLM's own names (or LocalAIStack's --vllm-max-model-len, --vllm-gpu-memory-utilization, "
        "--vllm-trust-remote-code) are your pins; a flag the vLLM that will run does not accept is refused with the "
        "nearest one; everything after `--` is passed to vllm untouched and unchecked.",
        allow_abbrev=False,
    )
    p.add_argument("model", metavar="MODEL", help="local model directory or a Hugging Face repo id in the HF cache")

    add_options(p)  # smartrun's own options, declared once with the request they set
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--explain", action="store_true", help="print every bound, decision and rejection with its source")
    p.add_argument("--session-out", metavar="FILE", help="write the session record here instead of the data dir "
                   "(`session list` shows only the data dir; use `session show FILE`)")

    tune.add_arguments(p)  # the --tune-*/--probe-* options (tune.TUNE_OPTIONS); --tune itself is in OPTIONS
    own = tuple(sorted(flag for action in p._actions for flag in action.option_strings if flag.startswith("--")))
    p.set_defaults(func=run_command, accepts_extra=True, own_flags=own)


def split_extra(extra: list[str]) -> tuple[list[str], list[str]]:
    """(vLLM flags before `--`, args after `--`), from what the top-level parser left unparsed."""
    if "--" in extra:
        cut = extra.index("--")
        return list(extra[:cut]), list(extra[cut + 1:])
    return list(extra), []


def request_from_args(args: argparse.Namespace) -> RunRequest:
    if args.max_attempts < 1:
        raise InputError(f"--max-attempts {args.max_attempts}: must be at least 1")
    if not 0 < args.port < 65536:
        raise InputError(f"--port {args.port}: not a TCP port")
    user, extra = split_extra(list(getattr(args, "extra", []) or []))
    tune_options: dict[str, Any] = {}
    given = tune_flags_given(args)
    if given and not args.tune:  # silently not tuning would surprise whoever typed them
        raise InputError(f"{given[0]}: only used with --tune")
    if args.smart_run_strict and not args.smart_run:  # as LocalAIStack: strict without smart-run is an error
        raise InputError("--smart-run-strict: only used with --smart-run (it makes a failed LLM consultation fatal)")
    if args.tune:
        tune_options = tune.settings_from_args(args).model_dump(mode="json")
    return RunRequest(model=args.model, user_args=tuple(user), extra_args=tuple(extra), tune_options=tune_options,
                      visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"), **RunRequest.fields_from_args(args))


def run_command(args: argparse.Namespace) -> int:
    """Warnings and progress go to stderr as they happen (stdout too for vLLM's log in text mode); the result
    goes to stdout: the command first, then a short summary (or, under --json, one object); the session
    record's path always ends on stderr."""
    from smartrun import pipeline

    request = request_from_args(args)
    pipeline.check_vllm_flags(request, getattr(args, "own_flags", ()))  # a typo: exit 2, nothing recorded
    session_out = _path(args.session_out)
    sources = pipeline.live_sources(request)
    started: list[Any] = []

    def summary(planned: Any) -> None:  # before any launch, so a long-running server does not hide it
        if not args.json:
            text = render_text(planned, explain=args.explain, debug=args.smart_run_debug)
            print(redact_text(text, planned.secrets), flush=True)

    try:
        result = pipeline.run(request, sources, on_event=_printer(args.json), session_out=session_out,
                              on_planned=summary, on_started=started.append)
    except BaseException as err:  # a failed or interrupted run still names its record (session show FILE explains it)
        path = _written(started[0].session_path if started else None)
        if isinstance(err, SmartRunError):
            err.session_record = path  # type: ignore[attr-defined]  # main puts it in the --json error object
        else:
            args.session_record = path
        _print_session_path(path)
        raise
    if args.json:
        summary_json = result.json_summary()
        if result.exit_code:  # a server that died after it was ready: the error keys every --json failure has
            summary_json.update(error=result.record.outcome.message or "vllm serve exited",
                                exit=result.exit_code, session_record=str(_written(result.session_path) or "") or None)
        print(redact_text(json.dumps(summary_json, indent=2), result.secrets), flush=True)
    elif not request.dry_run:
        print(f"outcome: {result.record.outcome.status}; final command: "
              f"{redact_text(result.command or ' '.join(result.argv), result.secrets)}", flush=True)
    _print_session_path(_written(result.session_path))
    if result.exit_code:
        print(f"localaistack: {result.record.outcome.message or 'vllm serve exited'}", file=sys.stderr)
    return result.exit_code


def _written(path: Path | None) -> Path | None:
    """The record's path, only when the record is really there (a write can fail: it is warned about)."""
    return path if path is not None and path.is_file() else None


def _print_session_path(path: Path | None) -> None:
    """`session record: PATH` on stderr (a line of its own), in text and --json mode alike."""
    if path is not None:
        sys.stdout.flush()
        print(f"session record: {path}", file=sys.stderr, flush=True)


def _path(value: str | None) -> Path | None:
    """--session-out FILE: its folder must exist (a typo must not create directories), checked before the run."""
    if not value:
        return None
    path = Path(value)
    if not path.parent.is_dir():
        what = "is not a directory" if path.parent.exists() else "does not exist"
        raise InputError(f"--session-out {value}: folder {path.parent} {what} (create it first)")
    if path.is_dir():
        raise InputError(f"--session-out {value}: is a directory; name a file")
    return path


def _printer(quiet: bool):
    """Progress as it happens: warnings always on stderr; vLLM's own lines as they are and ours marked, on
    stdout in text mode and stderr under --json (stdout then holds only the JSON object)."""
    seen: set[str] = set()

    def show(kind: str, text: str) -> None:
        if kind == "warning":
            if text in seen:
                return
            seen.add(text)
            sys.stdout.flush()
            print(f"warning: {text}", file=sys.stderr, flush=True)
            return
        line = text if kind == "vllm" else f"[smartrun] {text}"
        print(line, file=sys.stderr if quiet else sys.stdout, flush=True)

    return show


def render_text(result: Any, explain: bool = False, debug: bool = False) -> str:
    """What a dry run (or a launch, before it starts) prints: the command to copy, then one line per choice
    that matters (context, concurrency, GPUs, memory) with where it came from; --explain adds every bound,
    decision and LLM exchange in full."""
    out: list[str] = []
    if result.argv:
        out.append(" ".join(_quote(a) for a in result.argv))
    out += summary_lines(result)
    if result.rejected and not explain:
        out.append(f"  rejected     {len(result.rejected)} proposed value(s): "
                   + ", ".join(f"{r.get('knob')}={r.get('value')!r}" for r in result.rejected)
                   + " (--explain says why)")
    if debug:
        why = "baseline (no --smart-run)" if not result.request.smart_run else "baseline"
        source = result.plan.source if result.plan else "static"
        out += [f"debug: {line}" for line in result.debug_lines] or [f'debug: source={source} reason="{why}"']
    if explain:
        out += explain_lines(result)
    return "\n".join(out)


def summary_lines(result: Any) -> list[str]:
    """Context, concurrency, GPUs, memory and the plan's source: one line each, with the value's provenance."""
    plan, est, hw = result.plan, result.estimate, result.hardware
    if plan is None:
        return []
    params, prov = plan.params, plan.provenance

    def where(*knobs: str) -> str:
        found = [f"{k}: {prov[k]}" if len(knobs) > 1 else prov[k] for k in knobs if prov.get(k)]
        return f"  <- {'; '.join(found)}" if found else ""

    out = []
    mml = params.get("max_model_len")
    if mml is not None:
        shown = "auto (vLLM fits it)" if mml == -1 else f"{mml:,} tokens per request"
        out.append(f"  context      {shown}{where('max_model_len')}")
    seqs = params.get("max_num_seqs")
    room = (f"; KV cache holds {est.kv_cache_tokens:,} tokens = {est.max_concurrency:.1f} full-length requests"
            if est is not None else "")
    out.append(f"  concurrency  {'vLLM default' if seqs is None else f'up to {seqs} requests'} at once{room}"
               f"{where('max_num_seqs')}")
    tp, pp = int(params.get("tensor_parallel_size") or 1), int(params.get("pipeline_parallel_size") or 1)
    dp = int(params.get("data_parallel_size") or 1)
    if hw is not None:
        out.append(f"  GPUs         {_gpu_words(result, tp, pp, dp)}"
                   f"{where('tensor_parallel_size', 'pipeline_parallel_size', 'data_parallel_size')}")
    if getattr(result, "placement", None) is not None:  # a cluster: which node holds which stage
        from smartrun import cluster_plan

        lines = cluster_plan.placement_lines(result.placement)
        out += [f"  nodes        {lines[0]}{where('distributed_executor_backend', 'data_parallel_backend')}",
                *[f"               {line}" for line in lines[1:]]]
    util = params.get("gpu_memory_utilization")
    if est is not None:
        fits = "" if est.fits else f"; does NOT fit: {est.reason}"
        out.append(f"  memory       {util if util is not None else est.requested_gib / est.total_gib:.2f} x "
                   f"{est.total_gib:.1f} GiB per GPU = {_memory_terms(est)}{fits}{where('gpu_memory_utilization')}")
    reason = f" ({plan.reason})" if plan.reason else ""
    out.append(f"  plan         source={plan.source}{reason}")
    return out


def _memory_terms(est: Any) -> str:
    """The terms that add up to util x total: CUDA graphs only where the profile takes them from the KV cache
    (else they come on top), and this machine's calibration where one was applied."""
    graphs = f"{est.cudagraph_gib:.2f}"
    inside = f" + CUDA graphs {graphs}" if graphs_subtracted(est) else ""
    calibrated = f" + calibration {est.calibration.non_kv_gib:+.2f}" if est.calibration is not None else ""
    terms = (f"weights {est.weights_gib:.2f} + KV cache {est.kv_cache_gib:.2f} + activations "
             f"{est.activation_gib:.2f}{inside} + other {est.non_torch_gib:.2f}{calibrated} GiB")
    return terms if inside else f"{terms}; CUDA graphs {graphs} GiB on top (not taken from the KV cache)"


def _gpu_words(result: Any, tp: int, pp: int, dp: int = 1) -> str:
    """Which GPUs the launch uses (their nvidia-smi indices), how they split the model, and over what link."""
    from smartrun.gpus import select_gpus

    hw = result.hardware
    n = tp * pp * dp
    try:
        chosen = select_gpus(hw, n)
    except SmartRunError:
        return f"{n} needed, {len(hw.gpus)} available"  # the plan then failed: its error says so
    ids = ",".join(str(hardware.physical_index(hw, g.index)) for g in chosen)
    split = "whole model on one GPU" if n == 1 else " x ".join(
        part for part in (f"{dp} replicas (data parallel)" if dp > 1 else "",
                          f"tensor parallel {tp}" if tp > 1 else "", f"pipeline parallel {pp}" if pp > 1 else "")
        if part)
    link = ""
    if n > 1:
        groups = [chosen[i:i + tp] for i in range(0, n, tp)] if len(hw.nodes) > 1 else [chosen]
        linked = all(hw.nvlinked(a.index, b.index) for g in groups for i, a in enumerate(g) for b in g[i + 1:])
        link = (", NVLink" if linked else ", PCIe (no NVLink)") + (" inside each node" if len(groups) > 1 else "")
    names = sorted({g.name for g in chosen})
    allowed = (f"allowed {','.join(map(str, hw.physical_indices))}" if hw.physical_indices
               else f"{len(hw.gpus)} on {len(hw.nodes)} nodes" if len(hw.nodes) > 1 else f"{len(hw.gpus)} on the machine")
    return f"{ids} ({allowed}): {' + '.join(names)}{link}; {split}"


def explain_lines(result: Any) -> list[str]:
    """Everything behind the plan, untruncated: machine, model, bounds with sources, baseline, per-knob
    provenance, every decision (what replay compares), LLM exchanges, rejections, the estimate."""
    out: list[str] = []
    if result.hardware is not None:
        out += ["== hardware", *format_hardware(result.hardware)]
    if result.facts is not None:
        out += ["== model", *format_model(result.facts)]
    if result.bounds is not None:
        out += ["== effective bounds (with sources)", *format_bounds(result.bounds, explain=True)]
    if result.baseline is not None:
        out += ["== baseline (source=static)", "  " + _params(result.baseline.params)]
    if result.plan is not None:
        same = result.baseline is not None and result.plan.params == result.baseline.params
        why = f": {result.plan.reason}" if result.plan.reason else ""
        out += [f"== plan (source={result.plan.source}){why}",
                "  the baseline, unchanged" if same else "  " + _params(result.plan.params)]
        out += ["== provenance (per knob)"]
        out += [f"  {k} = {result.plan.params[k]!r}  <- {v}" for k, v in sorted(result.plan.provenance.items())
                if k in result.plan.params]
        out += ["== decisions (in order; what replay compares)"]
        out += [f"  {i:>2}. {d.step:<16} {_full(d.value)}" + (f"  <- {d.provenance}" if d.provenance and
                                                                d.step not in ("baseline", "plan") else "")
                for i, d in enumerate(result.record.decisions, 1)]
        out += _advice_lines(result)
    out += [f"== rejected ({len(result.rejected)})"]
    out += [f"  {r.get('knob')}={r.get('value')!r}: {r.get('reason')} [source: {r.get('source')}]"
            for r in result.rejected]
    if result.estimate is not None:
        e = result.estimate
        out += ["== estimate", f"  weights {e.weights_gib:.2f} GiB, KV cache {e.kv_cache_gib:.2f} GiB "
                f"({e.kv_cache_tokens} tokens), max concurrency {e.max_concurrency:.2f}x at "
                f"{e.max_model_len} tokens, fits={e.fits}" + (f" ({e.reason})" if e.reason else "")]
        if getattr(e, "calibration", None) is not None:
            out += [f"  {e.calibration.describe()}"]
    return out


def format_hardware(hw: Any) -> list[str]:
    from smartrun import cluster

    return ["  " + line for line in cluster.summary(hw).splitlines()]


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


def _full(value: Any) -> str:
    """A decision's value as one line of JSON, never cut (--explain is where a person reads all of it)."""
    return json.dumps(value, sort_keys=True, default=str)


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
    return shlex.quote(arg)
