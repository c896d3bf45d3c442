"""`session show`: a session record as a readable timeline, one line per event (presentation only)."""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from smartrun.session import CalibrationRecord, SessionRecord, short

_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def printable(text: str) -> str:
    """Text from a record made safe for a terminal: control characters (escape sequences, newlines, bidi
    overrides) shown as \\xNN / \\uNNNN instead of acting on the screen or faking extra lines."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def timeline(record: SessionRecord) -> list[str]:
    """`session show`: what happened, in order, one line per event (control characters escaped)."""
    return [printable(line) for line in _timeline(record)]


def _timeline(record: SessionRecord) -> list[str]:
    req = record.request
    lines = [
        f"session  {record.started_at}  smartrun {record.tool_version}  schema {record.schema_version}",
        f"command  {' '.join(record.command_line)}",
    ]
    if record.hardware:
        gpus = record.hardware.get("gpus") or []
        names = ", ".join(f"{g.get('index')}:{g.get('name')} {g.get('memory_free_mib')}/"
                          f"{g.get('memory_total_mib')} MiB free" for g in gpus)
        lines.append(f"hardware {len(gpus)} GPU(s) from {record.hardware.get('source')}: {names}")
    if record.model:
        m = record.model
        lines.append(f"model    {m.get('name')} ({m.get('architecture')}, {m.get('num_hidden_layers')} layers, "
                     f"derived max len {m.get('derived_max_model_len')})")
    if record.bounds_file:
        lines.append(f"bounds   {record.bounds_file.get('path') or 'builtin'} "
                     f"(sha256 {str(record.bounds_file.get('sha256'))[:12]})")
    lines.append(f"goal     {req.get('goal', 'stable')}  smart-run={req.get('smart_run')}  "
                 f"llm={'configured' if record.llm.get('configured') else 'none'}  vllm={record.vllm.get('version')}")
    if record.baseline:
        lines.append(f"baseline {_params(record.baseline.get('params', {}))}")
    cache = record.cache
    if cache.looked_up:
        lines.append(f"cache    {'hit' if cache.hit else 'miss'}" + (f" ({cache.note})" if cache.note else ""))
    exchanges = iter(record.llm_exchanges)
    for advice in record.advice:
        lines.append(f"advice   [{advice.kind}] source={advice.source} accepted={advice.accepted} "
                     f"reason={advice.reason or '-'}")
        for rej in advice.rejections:
            if isinstance(rej, dict):
                lines.append(f"  reject {rej.get('knob')}={rej.get('value')!r}: {rej.get('reason')}")
        if advice.fallback:
            lines.append(f"  fallback: {advice.fallback}")
    for ex in exchanges:
        state = f"error {ex.error.get('type')}: {ex.error.get('message')}" if ex.error else "reply"
        if ex.reply is not None:
            finish = ex.reply.get("finish_reason") if isinstance(ex.reply, dict) else None
            state = f"reply (finish {finish}, max_tokens {ex.max_tokens})" + (f"; {state}" if ex.error else "")
        tokens = f" tokens={ex.tokens}" if ex.tokens else ""
        lines.append(f"llm      [{ex.kind}] {state} latency={_fmt_s(ex.latency_s)}{tokens}")
    previous: dict[str, Any] | None = None
    why = (record.final_plan or {}).get("provenance", {})
    for att in record.launch_attempts:
        params = att.attempt.get("params") or {}
        if previous is not None:
            for knob, value in params.items():
                if previous.get(knob) != value:
                    lines.append(f"retry    {knob} {previous.get(knob)} -> {value}" +
                                 (f"  ({why[knob]})" if knob in why else ""))
        previous = params
        phase = "" if att.phase == "launch" else f" [{att.phase}]"
        lines.append(f"launch   #{att.number}{phase} {att.outcome} after {_fmt_s(att.duration_s)}: {' '.join(att.argv)}")
        if att.env:
            lines.append(f"  env    {' '.join(f'{k}={v}' for k, v in att.env.items())}")
        if att.attempt.get("evidence"):
            lines.append(f"  why    {att.attempt['evidence']}")
        for line in att.log_excerpt[-3:]:
            lines.append(f"  log    {line}")
    lines += _calibration_lines(record.calibration)
    if record.final_plan:
        lines.append(f"final    source={record.final_plan.get('source')} {_params(record.final_plan.get('params', {}))}")
    if record.final_argv:
        lines.append(f"argv     {' '.join(record.final_argv)}")
    for warning in record.warnings:
        lines.append(f"warning  {warning}")
    out = record.outcome
    lines.append(f"outcome  {out.get('status')} (exit {out.get('exit_code')})" +
                 (f": {out.get('message')}" if out.get("message") else ""))
    lines.append(f"decisions {len(record.decisions)}:")
    for i, d in enumerate(record.decisions, 1):
        why = d.provenance if len(d.provenance) <= 80 else d.provenance[:77] + "..."
        lines.append(f"  {i:>2}. {d.step:<16} {short(d.value, 90)}" + (f"  <- {why}" if why else ""))
    return lines


def _calibration_lines(cal: CalibrationRecord) -> list[str]:
    """The correction the run planned with and what its healthy starts measured (hand-edited parts skipped)."""
    from smartrun.calibration import Correction, Observation

    lines = []
    parts: list[tuple[str, Any, type[Correction] | type[Observation]]] = [
        ("used", cal.used, Correction), *(("measured", o, Observation) for o in cal.observations)]
    for kind, data, model in parts:
        try:
            lines.append(f"calib    {model.model_validate(data).describe()}" if data is not None else "")
        except ValidationError:
            lines.append(f"calib    {kind}: unreadable")
    return [line for line in lines if line]


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"
