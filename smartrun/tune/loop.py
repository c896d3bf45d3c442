"""The tuning loop: measure, step, keep what helps, restart on the best plan; the yardstick round."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smartrun import probe as probe_mod
from smartrun.clock import SYSTEM, Clock
from smartrun.contracts import Bounds, Plan
from smartrun.errors import LaunchError, SmartRunError
from smartrun.probe import ProbeResult, ProbeSettings
from smartrun.tune.ladder import rules_step
from smartrun.tune.report import (
    Check,
    ProbeFn,
    Proposer,
    Restart,
    RoundSource,
    TuneRound,
    TuneSettings,
    TuneState,
    TuningOutcome,
    TuningReport,
    _fmt,
    healthy,
    improvement,
    meets_slo,
    round_outcome,
)


def run_tuning(
    plan: Plan,
    bounds: Bounds,
    server: Any,
    restart: Restart,
    settings: TuneSettings | None = None,
    *,
    check: Check | None = None,
    probe: ProbeFn | None = None,
    propose: Proposer | None = None,
    say: Callable[[str], None] = print,
    clock: Clock = SYSTEM,
) -> TuningOutcome:
    """Tune a healthy `server` running `plan`; returns the report and the server left running (on the best plan).

    `restart(plan)` must stop the running server and start one on `plan`, returning (True, server) when it is
    healthy or (False, why) when it is not. Raises LaunchError only if even the best known plan cannot restart.
    Without a `probe`, each round is measured by smartrun.probe timed by `clock`.
    """
    settings = settings or TuneSettings()
    live = {"server": server}

    def tracked(next_plan: Plan) -> tuple[bool, Any]:
        ok, got = restart(next_plan)
        live["server"] = got if ok else None
        return ok, got

    try:
        return _tuning_loop(plan, bounds, server, tracked, settings, check or _default_check(bounds),
                            _guarded(probe or _default_probe(settings, clock=clock)), propose or rules_step, say)
    except KeyboardInterrupt:  # Ctrl+C while tuning: stop the server we started, leave no orphan
        running = live["server"]
        if running is not None and hasattr(running, "stop"):
            running.stop()
        raise


def _tuning_loop(plan: Plan, bounds: Bounds, server: Any, restart: Restart, settings: TuneSettings, check: Check,
                 probe: Callable[[Any], ProbeResult | str], propose: Proposer,
                 say: Callable[[str], None]) -> TuningOutcome:
    say(f"tune: probing the running server ({_load_line(settings.probe)})")
    first = _measured(TuneRound(index=0, source="baseline", params=dict(plan.params), reason="launched plan"),
                      probe(server), settings)
    first = first.model_copy(update={"kept": first.failure is None})
    rounds = [first]
    say(f"tune: round 0 baseline: {_result_line(first)}")
    best_i, best_plan, running_plan = 0, plan, plan
    defaults = None
    if settings.vs_defaults and first.result is not None:
        defaults, server, running_plan = _measure_defaults(plan, bounds, restart, probe, settings, say)
    stopped = f"{settings.rounds} round(s) done"
    if first.result is None:
        stopped = "the running server could not be measured"
    for index in range(1, settings.rounds + 1 if first.result is not None else 1):
        state = TuneState(bounds=bounds, baseline=plan, best=best_plan, best_round=best_i,
                          rounds=tuple(rounds), settings=settings)
        proposal = propose(state)
        if proposal is None or not proposal.changes:
            stopped = "no step left that could gain" if index > 1 else "no step to try inside the bounds"
            break
        source: RoundSource = "llm" if proposal.source == "llm" else "rules"
        changes = {c.knob: c.value for c in proposal.changes}
        attempt = TuneRound(index=index, source=source, params={**best_plan.params, **changes}, changes=changes,
                            previous={k: best_plan.params.get(k) for k in changes}, step=proposal.reason,
                            reason="; ".join(c.reason for c in proposal.changes if c.reason) or proposal.reason)
        verdict = check(proposal, best_plan)
        if not verdict.accepted:
            why = "; ".join(r.reason for r in verdict.rejections) or "rejected"
            rounds.append(attempt.model_copy(update={"started": False, "failure": f"rejected: {why}"}))
            say(f"tune: round {index}: {_changes_line(attempt)} rejected by the validator: {why}")
            continue
        candidate: Plan = verdict.plan
        attempt = attempt.model_copy(update={"params": dict(candidate.params)})
        say(f"tune: round {index}: restarting with {_changes_line(attempt)}")
        ok, started = restart(candidate)
        running_plan = candidate
        if not ok:
            why = _failure_text(started)
            rounds.append(attempt.model_copy(update={"started": False, "failure": f"did not start: {why}"}))
            say(f"tune: round {index}: did not start ({why}); back to the best known configuration")
            server = _restart_best(restart, best_plan, say)
            running_plan = best_plan
            continue
        server = started
        measured = _measured(attempt, probe(server), settings)
        gain = improvement(measured, rounds[best_i]) if measured.failure is None else None
        kept = gain is not None and gain > 0
        tokens_gain = None if gain is None else (
            measured.tokens_per_s / max(rounds[best_i].tokens_per_s or 0.0, 1e-9) - 1.0)  # type: ignore[operator]
        measured = measured.model_copy(update={"gain": gain, "kept": kept, "tokens_gain": tokens_gain})
        rounds.append(measured)
        say(f"tune: round {index}: {_result_line(measured)} -> {round_outcome(measured, settings.slo_p95_ms)}")
        if kept:
            best_i, best_plan = index, candidate
    fell_back = False
    if running_plan.params != best_plan.params:
        say(f"tune: restarting on the best configuration (round {best_i})")
        server = _restart_best(restart, best_plan, say)
        fell_back = True
    chosen = best_plan if best_i == 0 else best_plan.model_copy(update={"source": "tune"})
    report = TuningReport(rounds=tuple(rounds), chosen=chosen, chosen_round=best_i,
                          slo_p95_ms=settings.slo_p95_ms,
                          slo_met=settings.slo_p95_ms is None or rounds[best_i].meets_slo,
                          stopped_because=stopped, fell_back=fell_back, settings=settings, defaults=defaults)
    for line in report.table().splitlines():
        say(f"tune: {line}")
    return TuningOutcome(report=report, server=server)


def _measure_defaults(plan: Plan, bounds: Bounds, restart: Restart, probe: Callable[[Any], ProbeResult | str],
                      settings: TuneSettings, say: Callable[[str], None]) -> tuple[TuneRound, Any, Plan]:
    """The yardstick: plain `vllm serve` with only the flags the user typed (their pins) and vLLM's defaults
    for the rest, measured with the same probe; then back on the plan. Never a candidate for the choice."""
    mine = {k: v for k, v in plan.params.items() if (b := bounds.knobs.get(k)) is not None and b.pinned}
    yardstick = TuneRound(index=0, source="defaults", params=mine, reason="plain vllm serve with your flags only")
    say("tune: measuring plain vLLM defaults (your flags only) as the yardstick")
    ok, started = restart(Plan(params=mine, source=plan.source, reason="plain vLLM defaults"))
    if ok:
        yardstick = _measured(yardstick, probe(started), settings)
        say(f"tune: plain vLLM defaults: {_result_line(yardstick)}")
    else:
        why = _failure_text(started)
        yardstick = yardstick.model_copy(update={"started": False, "failure": f"did not start: {why}"})
        say(f"tune: plain vLLM defaults did not start ({why})")
    return yardstick, _restart_best(restart, plan, say), plan


def _measured(r: TuneRound, result: ProbeResult | str, settings: TuneSettings) -> TuneRound:
    if isinstance(result, str):
        return r.model_copy(update={"failure": result})
    return r.model_copy(update={"result": result, "failure": healthy(result),
                                "meets_slo": meets_slo(result, settings.slo_p95_ms)})


def _guarded(probe: ProbeFn) -> Callable[[Any], ProbeResult | str]:
    """The probe, with a probe that cannot run at all (no model listed, server gone) turned into a reason."""

    def run(server: Any) -> ProbeResult | str:
        try:
            return probe(server)
        except SmartRunError as err:
            return f"probe failed: {err.message}"

    return run


def _restart_best(restart: Restart, best: Plan, say: Callable[[str], None], tries: int = 2) -> Any:
    """Bring the best known configuration back; never leave the user without a server."""
    why = "not tried"
    for _ in range(tries):
        ok, server = restart(best)
        if ok:
            return server
        why = _failure_text(server)
        say(f"tune: restarting the best configuration failed ({why}); trying again")
    raise LaunchError(f"tuning: the best known configuration did not restart after {tries} tries ({why})")


def _failure_text(value: Any) -> str:
    if value is None:
        return "no server"
    if isinstance(value, str):
        return value
    if isinstance(value, SmartRunError):
        return value.message
    for attr in ("failure", "failure_class", "summary", "evidence"):
        got = getattr(value, attr, None)
        if got:
            return str(getattr(got, "klass", got))
    return type(value).__name__


def _load_line(s: ProbeSettings) -> str:
    return (f"concurrency {s.concurrency}, prompt {s.prompt_tokens} / output {s.output_tokens} tokens, "
            f"up to {s.duration_s:g}s or {s.max_requests} requests")


def _result_line(r: TuneRound) -> str:
    if r.result is None:
        return r.failure or "no result"
    return r.result.summary() + (f" [{r.failure}]" if r.failure else "")


def _changes_line(r: TuneRound) -> str:
    return ", ".join(f"{k} {_fmt(r.previous.get(k))} -> {_fmt(v)}" for k, v in r.changes.items())


def _default_check(bounds: Bounds) -> Check:
    from smartrun import validate

    return lambda proposal, base: validate.check(bounds, base, proposal)


def _default_probe(settings: TuneSettings, api_key: str | None = None, clock: Clock = SYSTEM) -> ProbeFn:
    def run(server: Any) -> ProbeResult:
        line = probe_mod.ProgressLine()
        try:
            return probe_mod.run_probe(server.base_url, settings.probe, on_progress=line, api_key=api_key,
                                       clock=clock)
        finally:
            line.finish()

    return run
