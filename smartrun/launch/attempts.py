"""run_with_recovery: launch, classify a failure, take the advisor's or the ladder's next plan through the validator."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from smartrun import recovery
from smartrun.contracts import Change, LaunchEvent, Plan, Proposal
from smartrun.errors import InputError, LaunchError
from smartrun.knobs import build_argv as catalogue_argv
from smartrun.launch.command import shown_command_line
from smartrun.launch.process import LaunchAttempt, Launcher
from smartrun.vllm_log import Failure


class LaunchReport(BaseModel):
    """What run_with_recovery did: every attempt, the final plan and argv, and the running server."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ok: bool
    attempts: tuple[LaunchAttempt, ...]
    plan: Plan
    argv: tuple[str, ...] = ()
    env_changes: dict[str, str] = Field(default_factory=dict)
    command_line: str = ""
    summary: str = ""
    server: Any = Field(default=None, exclude=True)


def _cumulative(original: Plan, current: Plan, changes: Sequence[Change], source: str, reason: str) -> Proposal:
    """All differences from the validated original plan plus the new changes, so `check` sees the whole step."""
    merged: dict[str, Change] = {}
    for knob, value in current.params.items():
        if original.params.get(knob) != value:
            merged[knob] = Change(knob=knob, value=value, reason=current.provenance.get(knob, "earlier recovery"))
    for change in changes:
        merged[change.knob] = change
    return Proposal(changes=tuple(merged.values()), reason=reason, source=source)


def _as_changes(current: Plan, suggestion: Any) -> tuple[list[Change], str]:
    if isinstance(suggestion, Proposal):
        return list(suggestion.changes), suggestion.reason
    if isinstance(suggestion, Plan):
        changes = [Change(knob=k, value=v, reason=suggestion.provenance.get(k, suggestion.reason or "advisor"))
                   for k, v in suggestion.params.items() if current.params.get(k) != v]
        return changes, suggestion.reason or "advisor recover"
    return [], ""


def _summary(attempts: Sequence[LaunchAttempt], stop: str | None) -> str:
    parts = [f"#{a.number} {a.failure_class or a.outcome}: {(a.evidence or '')[:160]}" for a in attempts]
    text = f"vllm serve did not become healthy after {len(attempts)} attempt(s): " + "; ".join(parts)
    return text + (f". Stopped: {stop}" if stop else ". Attempt limit reached: raise --max-attempts or widen the bounds")


def _describe_change(before: Plan, after: Plan) -> str:
    diffs = [f"{k} {before.params.get(k)} -> {v} ({after.provenance.get(k, after.source)})"
             for k, v in after.params.items() if before.params.get(k) != v]
    return "; ".join(diffs) or "no change"


def run_with_recovery(plan: Plan, bounds: Any, launcher: Launcher, *, check: Callable[[Proposal], Any],
                      advisor_recover: Callable[..., Any] | None = None, max_attempts: int = 3,
                      on_event: Callable[[LaunchEvent], None] = print, model_path: str | None = None,
                      passthrough: Sequence[str] = (), build_argv: Callable[..., list[str]] | None = None,
                      ) -> LaunchReport:
    """Launch; on failure classify, ask the advisor then the ladder, validate, retry; bounded attempts.

    `check(proposal)` is the validator bound to `plan`; every retry is expressed as the full set of
    changes from `plan`, so the validator judges the whole step. `advisor_recover(current_plan, attempts,
    failure)` may return a Plan, a Proposal or None. Raises LaunchError (exit 4) with a summary when no
    attempt becomes healthy; KeyboardInterrupt after stopping the child when the user interrupts.
    """

    make_argv = build_argv if build_argv is not None else catalogue_argv
    model = model_path or getattr(launcher, "model_path", None)
    if model is None:
        raise InputError("run_with_recovery needs model_path (the model argument of vllm serve)")
    attempts: list[LaunchAttempt] = []
    current, stop_reason = plan, None
    for number in range(1, max_attempts + 1):
        argv = make_argv(model, current.params, tuple(passthrough))
        env: dict[str, str] = {}
        prepare: Callable[..., Any] | None = getattr(launcher, "prepare", None)
        if prepare is not None:
            argv, env, warnings = prepare(current, argv)
            for warning in warnings:
                on_event(LaunchEvent(kind="warning", text=warning))
        on_event(LaunchEvent(text=f"attempt {number}/{max_attempts}: {shown_command_line(argv, env)}"))
        attempt, server = launcher.start(current, list(argv), dict(env))
        attempt = attempt.model_copy(update={"number": number})
        attempts.append(attempt)
        if attempt.outcome == "interrupted":
            on_event(LaunchEvent(text=f"attempt {number} interrupted; vllm serve stopped"))
            raise KeyboardInterrupt
        if attempt.outcome == "ready" and server is not None:
            line = shown_command_line(argv, env)
            on_event(LaunchEvent(text=f"vllm serve is ready at {attempt.base_url} (attempt {number}, "
                                      f"{attempt.duration_s:.1f} s)"))
            on_event(LaunchEvent(kind="command", text=line))
            return LaunchReport(ok=True, attempts=tuple(attempts), plan=current, argv=tuple(argv), env_changes=env,
                                command_line=line, summary=f"ready after {number} attempt(s)", server=server)
        failure = attempt.failure or Failure(klass="unknown", evidence="no server handle returned")
        on_event(LaunchEvent(text=f"attempt {number} failed: {failure.klass}: {failure.evidence}"))
        if number == max_attempts:
            break
        nxt, stop_reason = _next_plan(plan, current, bounds, failure, attempts, check, advisor_recover, on_event,
                                      recovery)
        if nxt is None:
            break
        on_event(LaunchEvent(text=f"retrying with {_describe_change(current, nxt)}"))
        current = nxt
    summary = _summary(attempts, stop_reason)
    on_event(LaunchEvent(text=summary))
    error = LaunchError(summary)
    error.report = LaunchReport(ok=False, attempts=tuple(attempts), plan=current, summary=summary)  # type: ignore[attr-defined]
    raise error


def _next_plan(original: Plan, current: Plan, bounds: Any, failure: Failure, attempts: Sequence[LaunchAttempt],
               check: Callable[[Proposal], Any], advisor_recover: Callable[..., Any] | None,
               on_event: Callable[[LaunchEvent], None], recovery: Any) -> tuple[Plan | None, str | None]:
    """The advisor's proposal if the validator accepts it, else the first accepted ladder rung, else Stop."""
    tried = [dict(a.params) for a in attempts]

    def accept(changes: Sequence[Change], source: str, reason: str) -> Plan | None:
        if not changes:
            return None
        verdict = check(_cumulative(original, current, changes, source, reason))
        if not verdict.accepted:
            why = "; ".join(f"{r.knob}={r.value}: {r.reason}" for r in verdict.rejections)
            on_event(LaunchEvent(text=f"{source} proposal rejected by the bounds: {why}"))
            return None
        if dict(verdict.plan.params) in tried:
            return None
        return verdict.plan

    if advisor_recover is not None:
        try:
            suggestion = advisor_recover(current, tuple(attempts), failure)
        except Exception as err:  # the LLM is optional: fall back to the ladder
            on_event(LaunchEvent(text=f"advisor recover failed ({err}); using the recovery ladder"))
            suggestion = None
        changes, reason = _as_changes(current, suggestion)
        if (got := accept(changes, "llm", reason or "advisor recover")) is not None:
            return got, None
    proposals, stop = recovery.candidates(failure, current, bounds, attempts)
    for proposal in proposals:
        if (got := accept(proposal.changes, "recovery", proposal.reason)) is not None:
            return got, None
    on_event(LaunchEvent(text=f"no recovery: {stop.message()}"))
    return None, stop.message()
