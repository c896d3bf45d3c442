"""Stage 6, validate: bounds + a proposal -> an accepted Plan, or the list of rejections. Never clamps.

Knows nothing but Bounds and the catalogue. Rules for values:
- ints must be JSON integers; a float with an integral value (4096.0) is accepted as that integer,
  because the two are the same JSON number; 4096.5, "4096" and "4096; rm -rf ~" are rejected.
- floats accept JSON integers (1 -> 1.0); booleans are never numbers; NaN/inf are rejected.
- booleans must be true/false, not "true" or 1.
- choices must be strings in vLLM's domain; vLLM's own synonyms ("half") read as the canonical value.
- a change to a pinned or user-only knob is rejected unless it repeats the current value (a no-op).
- a recovery proposal (source "recovery") may use the extra room the bounds file grants the
  recovery ladder (oom_floor, last_resort), nothing else may.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from smartrun.contracts import Bounds, Change, KnobBound, Plan, Proposal, Rejection, Verdict, gpus_used
from smartrun.knobs import CATALOGUE, Knob

FitCheck = Callable[[dict[str, Any]], "str | None"]


class _Refused(Exception):
    def __init__(self, bound: str, source: str, reason: str):
        super().__init__(reason)
        self.bound, self.source, self.reason = bound, source, reason


def typed_value(k: Knob, value: Any) -> Any:
    """The value as the knob's type, or _Refused; never coerces text or lossy numbers."""
    expected = {"int": "an integer", "float": "a number", "bool": "true or false", "choice": "a string"}
    kind = expected.get(k.type, "a string")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if k.type == "int" and is_number and (isinstance(value, int) or (math.isfinite(value) and value.is_integer())):
        return int(value)
    if k.type == "float" and is_number and math.isfinite(value):
        return float(value)
    if k.type == "bool" and isinstance(value, bool):
        return value
    if k.type == "choice" and isinstance(value, str):
        return k.synonyms.get(value, value)
    listed = k.nargs != "one" and isinstance(value, (list, tuple))
    if k.type == "str" and listed and all(isinstance(v, str) for v in value):
        return tuple(value)
    if k.type == "str" and k.nargs == "one" and isinstance(value, str):
        return value
    raise _Refused(f"{kind}", "catalogue", f"{k.name} must be {kind}, got {type(value).__name__} {value!r}")


def _check_one(k: Knob, bound: KnobBound | None, base: Plan, change: Change, source: str) -> Any:
    value = typed_value(k, change.value)
    if not k.in_domain(value):
        raise _Refused(k.domain_text(), "vllm", f"{k.name}={value!r} is outside vLLM's domain {k.domain_text()}")
    unchanged = change.knob in base.params and base.params[change.knob] == value
    if bound is not None and bound.pinned and not unchanged:
        raise _Refused(bound.describe(), "pin", f"{k.name} is pinned by the user; {value!r} would change it")
    if (not k.llm_may_change or (bound is not None and not bound.llm_may_change)) and not unchanged:
        why = "security-sensitive, user only" if k.security else "user only"
        raise _Refused("unchanged", "catalogue", f"{k.name} is {why}; it is not changed by smart-run")
    if bound is None:  # a knob the effective bounds do not cover is not open to change, from any source
        if unchanged:
            return value
        raise _Refused("no bound", "bounds", f"{k.name} has no effective bound, so it is not changed by smart-run")
    inside = bound.contains_for_recovery(value) if source == "recovery" else bound.contains(value)
    if not inside:
        where = ", ".join(bound.sources) or "bounds"
        raise _Refused(bound.describe(), where, f"{k.name}={value!r} is outside {bound.describe()} ({where})")
    return value


def _combination(bounds: Bounds, params: dict[str, Any]) -> str | None:
    """Cross-knob limits the per-knob bounds cannot express."""
    if bounds.gpu_count is None:
        return None
    world = gpus_used(params)
    if world > bounds.gpu_count:
        return (f"tensor_parallel_size x pipeline_parallel_size x data_parallel_size = {world} exceeds the "
                f"{bounds.gpu_count} usable GPUs")
    return None


def check(bounds: Bounds, base: Plan, proposal: Proposal, fit_check: FitCheck | None = None) -> Verdict:
    """Accept the whole proposal on top of `base`, or reject it with every reason; never clamps.

    `fit_check(params)` (see fit.fit_check) returns why a full parameter set will not start.
    """
    rejections: list[Rejection] = []
    accepted: dict[str, Any] = {}
    for change in proposal.changes:
        k = CATALOGUE.get(change.knob)
        try:
            if k is None:
                raise _Refused("a catalogue knob", "catalogue", f"unknown knob {change.knob!r}")
            if change.knob in accepted:
                raise _Refused("one change per knob", "proposal", f"{change.knob} is proposed twice")
            accepted[change.knob] = _check_one(k, bounds.knobs.get(change.knob), base, change, proposal.source)
        except _Refused as refused:
            rejections.append(
                Rejection(knob=change.knob, value=_jsonable(change.value), bound=refused.bound,
                          source=refused.source, reason=refused.reason)
            )
    if rejections:
        return Verdict(plan=None, rejections=tuple(rejections))
    changed = {k: v for k, v in accepted.items() if base.params.get(k, object()) != v}
    params = {**base.params, **accepted}
    why_not = _combination(bounds, params) or (fit_check(params) if fit_check and changed else None)
    if why_not:
        names = "+".join(sorted(changed)) or "plan"
        rejection = Rejection(knob=names, value={k: params[k] for k in sorted(changed)},
                              bound="starts in GPU memory", source="estimate", reason=why_not)
        return Verdict(plan=None, rejections=(rejection,))
    reasons = {c.knob: c.reason for c in proposal.changes}
    why = {k: f"{proposal.source}: {reasons.get(k) or proposal.reason or 'proposed'}" for k in changed}
    plan = base.with_changes(changed, proposal.source, why)
    if proposal.reason:
        plan = plan.model_copy(update={"reason": proposal.reason})
    return Verdict(plan=plan)


def _jsonable(value: Any) -> Any:
    """Rejections are recorded in sessions: keep the offending value, but as JSON-safe data."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return repr(value)


def format_rejections(rejections: tuple[Rejection, ...] | list[Rejection]) -> list[str]:
    """One line per rejection, for --explain and logs."""
    return [f"rejected {r.knob}={r.value!r}: {r.reason} [bound {r.bound}; source {r.source}]" for r in rejections]
