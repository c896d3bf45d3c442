"""`session show`: a session record as a readable timeline, one line per event (presentation only)."""

from __future__ import annotations

import re
from typing import Any

from smartrun.calibration import Observation
from smartrun.memory import Correction
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
        gpus = record.hardware.gpus
        names = ", ".join(f"{g.index}:{g.name} {g.memory_free_mib}/{g.memory_total_mib} MiB free" for g in gpus)
        lines.append(f"hardware {len(gpus)} GPU(s) from {record.hardware.source}: {names}")
    if record.model:
        m = record.model
        lines.append(f"model    {m.name} ({m.architecture}, {m.num_hidden_layers} layers, "
                     f"derived max len {m.derived_max_model_len})")
    if record.bounds_file:
        lines.append(f"bounds   {record.bounds_file.path or 'builtin'} (sha256 {record.bounds_file.sha256[:12]})")
    lines.append(f"goal     {req.goal if req else 'stable'}  smart-run={req.smart_run if req else None}  "
                 f"llm={'configured' if record.llm.configured else 'none'}  vllm={record.vllm.version}")
    if record.baseline:
        lines.append(f"baseline {_params(record.baseline.params)}")
    cache = record.cache
    if cache.looked_up:
        lines.append(f"cache    {'hit' if cache.hit else 'miss'}" + (f" ({cache.note})" if cache.note else ""))
    exchanges = iter(record.llm_exchanges)
    for advice in record.advice:
        lines.append(f"advice   [{advice.kind}] source={advice.source} accepted={advice.accepted} "
                     f"reason={advice.reason or '-'}")
        for rej in advice.rejections:
            lines.append(f"  reject {rej.knob}={rej.value!r}: {rej.reason}")
        if advice.fallback:
            lines.append(f"  fallback: {advice.fallback}")
    for ex in exchanges:
        state = f"error {ex.error.get('type')}: {ex.error.get('message')}" if ex.error else "reply"
        if ex.reply is not None:
            finish = ex.reply.finish_reason
            state = f"reply (finish {finish}, max_tokens {ex.max_tokens})" + (f"; {state}" if ex.error else "")
        tokens = f" tokens={ex.tokens}" if ex.tokens else ""
        lines.append(f"llm      [{ex.kind}] {state} latency={_fmt_s(ex.latency_s)}{tokens}")
    previous: dict[str, Any] | None = None
    set_by = record.final_plan.provenance if record.final_plan else {}
    final = record.final_plan.params if record.final_plan else {}
    for att in record.launch_attempts:
        params = att.attempt.params
        if previous is not None:
            for knob, value in params.items():
                if previous.get(knob) != value:
                    lines.append(f"retry    {knob} {previous.get(knob)} -> {value}" +
                                 (f"  ({set_by[knob]})" if knob in set_by and final.get(knob) == value else ""))
        previous = params
        phase = "" if att.phase == "launch" else f" [{att.phase}]"
        lines.append(f"launch   #{att.number}{phase} {att.outcome} after {_fmt_s(att.attempt.duration_s)}: {' '.join(att.argv)}")
        if att.env:
            lines.append(f"  env    {' '.join(f'{k}={v}' for k, v in att.env.items())}")
        if att.attempt.evidence:
            lines.append(f"  why    {att.attempt.evidence}")
        for line in att.attempt.log_excerpt[-3:]:
            lines.append(f"  log    {line}")
    lines += _calibration_lines(record.calibration)
    if record.final_plan:
        lines.append(f"final    source={record.final_plan.source} {_params(record.final_plan.params)}")
    if record.final_argv:
        lines.append(f"argv     {' '.join(record.final_argv)}")
    for warning in record.warnings:
        lines.append(f"warning  {warning}")
    out = record.outcome
    lines.append(f"outcome  {out.status} (exit {out.exit_code})" + (f": {out.message}" if out.message else ""))
    lines.append(f"decisions {len(record.decisions)}:")
    for i, d in enumerate(record.decisions, 1):
        why = d.provenance if len(d.provenance) <= 80 else d.provenance[:77] + "..."
        lines.append(f"  {i:>2}. {d.step:<16} {short(d.value, 90)}" + (f"  <- {why}" if why else ""))
    return lines


def _calibration_lines(cal: CalibrationRecord) -> list[str]:
    """The correction the run planned with and what its healthy starts measured."""
    parts: list[Correction | Observation] = [*([cal.used] if cal.used is not None else []), *cal.observations]
    return [f"calib    {part.describe()}" for part in parts]


def _params(params: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(params.items()))


def _fmt_s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f}s"
