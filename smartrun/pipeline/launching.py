"""The launch stages: start with recovery, tune, save the plan, learn from the startup, supervise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smartrun import __version__, advisor, calibration, launch, tune, validate
from smartrun.contracts import LaunchEvent, Plan, Proposal
from smartrun.errors import LaunchError, SmartRunError
from smartrun.pipeline.context import Recorder, RunContext, save_record
from smartrun.pipeline.planning import (
    advice_context,
    estimate_for,
    provenance_line,
    take_advice,
    without_security,
)
from smartrun.pipeline.recording import RecordingLauncher, RecordingTransport, attempt_outcome
from smartrun.plan_cache import CacheEntry
from smartrun.request import RunRequest
from smartrun.secrets import redact_argv, redact_text
from smartrun.session import Outcome, to_jsonable
from smartrun.tune.report import TuningOutcome, TuningReport


def _observe_startups(ctx: RunContext) -> None:
    """Every healthy start's measured figures next to the uncalibrated estimate: on record and into the
    calibration data (replay: on record only). A problem is a warning; the server keeps running."""
    sources, rec, result, version = ctx.sources, ctx.rec, ctx.result, ctx.version
    facts, hw = result.facts, result.hardware
    assert facts is not None and hw is not None
    record = rec.record
    observations = []
    for entry in record.launch_attempts:
        startup, params = entry.attempt.facts, entry.attempt.params
        if not entry.healthy or startup is None:
            continue
        try:
            raw = estimate_for(Plan(params=params), facts, hw, version)
            seen = calibration.observe(raw, startup, model=facts.name, params=params,
                                       at=record.started_at, tool_version=__version__,
                                       session=str(result.session_path) if result.session_path else None)
        except SmartRunError:
            continue
        if seen is not None:
            observations.append(seen)
    if not observations:
        record.calibration.note = "vLLM printed no KV cache figure: nothing to calibrate from"
        return
    record.calibration.observations = observations
    try:
        sources.calibration.add(*calibration.key(hw, version), [g.name for g in hw.gpus], observations)
    except SmartRunError as err:
        rec.warn(f"calibration data not stored: {err.message}")
        return
    for problem in getattr(sources.calibration, "problems", []) or []:
        rec.warn(problem)
    record.calibration.stored = not sources.replaying
    last = observations[-1]
    rec.on_event("calibration", f"vLLM measured {last.measured.kv_cache_gib:.2f} GiB KV cache per GPU, the "
                                f"estimate said {last.estimated.kv_cache_gib:.2f} GiB"
                                + ("; kept for calibration" if record.calibration.stored else ""))


def launch_stages(ctx: RunContext) -> None:
    """Start the plan with recovery; once healthy, tune, save and supervise (Ctrl+C leaves no vllm behind)."""

    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    bounds, fit, plan, hw = ctx.bounds, ctx.fit, result.plan, result.hardware
    assert bounds is not None and plan is not None and hw is not None
    launcher = RecordingLauncher(sources.launcher(request, hw, ctx.version, ctx.on_event), rec, sources.clock.monotonic)

    def check(proposal: Proposal, base: Plan | None = None) -> Any:
        return validate.check(bounds, base or plan, proposal, fit_check=fit)

    advisor_recover = None
    if request.smart_run and sources.transport is not None:
        advisor_recover = _recover_advisor(ctx, check)
    try:
        report = launch.run_with_recovery(plan, bounds, launcher, check=check, advisor_recover=advisor_recover,
                                          max_attempts=request.max_attempts, on_event=_launch_events(rec),
                                          model_path=ctx.model_path, passthrough=ctx.passthrough)
    except LaunchError as err:
        _record_final(ctx, getattr(err, "report", None), plan, healthy=False)
        raise
    final = _record_final(ctx, report, plan, healthy=True)
    try:
        _after_healthy(ctx, final, report.server, launcher, check)
    except KeyboardInterrupt:  # Ctrl+C anywhere after the start: no vllm left behind
        if result.server is not None and not sources.replaying:
            result.server.stop()
        raise


def _after_healthy(ctx: RunContext, final: Plan, server: Any, launcher: Any, check: Callable[..., Any]) -> None:
    """Tune (if asked), save the plan, print the final command, then supervise the server until it ends."""
    request, sources, rec, result, on_event = ctx.request, ctx.sources, ctx.rec, ctx.result, ctx.on_event
    record = rec.record
    result.server = server
    if request.tune:
        launcher.phase = "tune"
        try:
            record.tuning, final, server = _tune_stage(ctx, final, server, launcher, check)
        finally:
            launcher.phase = "launch"
        result.server = server
        if record.launch_attempts:  # the server now runs the tuned plan: its command is the one to show

            last = record.launch_attempts[-1]
            record.final_argv = last.argv
            result.command = launch.command_line(last.argv, last.env)
    _observe_startups(ctx)
    if request.smart_run:
        _store(ctx, final)
    record.outcome = Outcome(status="running", exit_code=0)
    if not (sources.supervise and server is not None):
        on_event("ready", "final command: " + (result.command or " ".join(result.argv)))
        if server is not None and not sources.replaying:
            server.stop()
        record.outcome = Outcome(status="ok", exit_code=0)
        return
    if result.session_path:
        save_record(record, result.session_path, sources)  # a long-running server still leaves its record now
    on_event("ready", "final command: " + (result.command or " ".join(result.argv)))
    code = server.wait()
    died = getattr(server, "failure", None)
    if died is not None:  # not a decision: replay does not supervise, so nothing is appended to decisions
        result.exit_code = 4
        record.outcome = Outcome(status="died", exit_code=4, server_exit=code,
                                 message=f"vllm serve died after it was ready: {getattr(died, 'evidence', died)}")
    else:
        record.outcome = Outcome(status="stopped", exit_code=0, server_exit=code)


def _record_final(ctx: RunContext, report: Any, plan: Plan, healthy: bool) -> Plan:
    """The plan the launch stage ended on (healthy or not), its argv and estimate, as the `final` decision."""
    rec, result = ctx.rec, ctx.result
    record = rec.record
    final = record.final_plan = getattr(report, "plan", None) or plan
    result.launch_report = report
    argv = list(getattr(report, "argv", None) or (record.launch_attempts[-1].argv if record.launch_attempts else []))
    record.final_argv = redact_argv(argv)
    result.command = redact_text(getattr(report, "command_line", "") or "", rec.secrets)
    if final.params != plan.params:
        assert result.facts is not None and result.hardware is not None
        record.estimate = estimate_for(final, result.facts, result.hardware, ctx.version, result.calibration)
    rec.decide("final", {"healthy": healthy, "source": final.source, "params": final.params},
               provenance_line(final))
    return final


def _launch_events(rec: Recorder) -> Callable[[LaunchEvent], None]:
    """The launch stage's events: its warnings go on record; the rest to the CLI as progress.

    Its command line is left out: the pipeline prints the final command once, after any tuning.
    """
    def forward(event: LaunchEvent) -> None:
        if event.kind == "warning":
            rec.warn(event.text)
        elif event.kind == "progress":
            rec.on_event("launch", event.text)
    return forward


def _recover_advisor(ctx: RunContext, check: Callable[..., Any]) -> Callable[..., Any]:
    """The advisor's `recover` prompt as a callable for run_with_recovery: (plan, attempts) -> Plan | None."""

    rec, result = ctx.rec, ctx.result
    transport = RecordingTransport(ctx.sources.transport, rec, ctx.sources.clock.monotonic)
    transport.kind = "recover"

    def recover(plan: Plan, attempts: tuple[Any, ...] = (), failure: Any = None, *_: Any) -> Plan | None:
        assert ctx.bounds is not None and result.hardware is not None and result.facts is not None
        tried = tuple(_attempt_summary(a, rec.secrets) for a in attempts)
        context = advice_context(ctx.request, ctx.bounds, plan, None, result.hardware, result.facts,
                                  attempts=tried, failure=_failure_summary(failure, attempts, rec.secrets))
        advice = advisor.advise(context, transport, lambda p: check(p, plan), kind="recover", strict=False)
        taken = take_advice(advice, rec, result, plan, "recover")
        if taken.source != "llm":
            return None
        # launch re-validates the change under source "llm", which prefixes "llm: " again: hand it the bare reason
        return taken.model_copy(update={"provenance": {k: v.removeprefix("llm: ") for k, v in taken.provenance.items()}})

    return recover


def _attempt_summary(attempt: Any, secrets: tuple[str, ...]) -> dict[str, Any]:
    """What the recover prompt sees of an earlier attempt: params, failure class, a short log excerpt."""
    return {"params": to_jsonable(getattr(attempt, "params", {})), "outcome": attempt_outcome(attempt),
            "evidence": redact_text(str(getattr(attempt, "evidence", None) or ""), secrets),
            "log_excerpt": _excerpt(attempt, 8, secrets)}


def _failure_summary(failure: Any, attempts: tuple[Any, ...], secrets: tuple[str, ...]) -> dict[str, Any] | None:
    if failure is None:
        return None
    return {"class": getattr(failure, "klass", str(failure)),
            "evidence": redact_text(str(getattr(failure, "evidence", "") or ""), secrets),
            "estimated_max_model_len": getattr(failure, "estimated_max_model_len", None),
            "log_excerpt": _excerpt(attempts[-1], 12, secrets) if attempts else []}


def _excerpt(attempt: Any, lines: int, secrets: tuple[str, ...]) -> list[str]:
    """The last log lines, with secrets (a served --api-key echoed in vLLM's args line) redacted."""
    return [redact_text(str(x), secrets) for x in list(getattr(attempt, "log_excerpt", ()) or ())[-lines:]]


def _store(ctx: RunContext, plan: Plan) -> None:
    """Save the healthy plan for this key (never a security value: a served --api-key stays off disk)."""
    rec, result = ctx.rec, ctx.result
    assert ctx.key is not None and result.facts is not None
    saved, _ = without_security(plan)
    entry = CacheEntry(key=ctx.key, model_path=result.facts.path, params=to_jsonable(saved.params),
                       provenance=dict(saved.provenance), source=str(plan.source),
                       saved_at=rec.record.started_at,
                       session=str(result.session_path) if result.session_path else None)
    try:
        ctx.sources.cache.store(entry)
    except SmartRunError as err:
        rec.warn(f"saved parameters not stored: {err.message}")
        return
    rec.record.cache.stored = True
    rec.decide("cache.store", {"params": entry.params}, "healthy launch")


def _tune_stage(ctx: RunContext, plan: Plan, server: Any, launcher: Any,
                check: Callable[..., Any]) -> tuple[TuningReport | None, Plan, Any]:
    """--tune after a healthy launch: hand over to the tune stage; keep what it chose (replay: what it chose)."""
    rec, result = ctx.rec, ctx.result
    assert ctx.bounds is not None
    hook = ctx.sources.tune
    if hook is None:
        hook = tune.tune_after_launch
    request = probe_served_name(ctx.request, ctx.passthrough)
    outcome = hook(request=request, plan=plan, bounds=ctx.bounds, server=server, launcher=launcher, check=check,
                   facts=result.facts, hardware=result.hardware, transport=ctx.sources.transport,
                   on_event=ctx.on_event, model_path=ctx.model_path, passthrough=ctx.passthrough,
                   clock=ctx.sources.clock)
    report = None  # the tuner skipped (it says why)
    if isinstance(outcome, TuningOutcome):
        report, plan, server = outcome.report, outcome.report.chosen, outcome.server
    rec.decide("tune", {"chosen": plan.params, "source": plan.source}, report.stopped_because if report else "tune")
    rec.record.final_plan = plan
    return report, plan, server


def probe_served_name(request: RunRequest, passthrough: tuple[str, ...]) -> RunRequest:
    """The tuner's probe asks for the served name (not whatever /v1/models happens to list first)."""

    name = launch.served_name(passthrough)
    probe = dict((request.tune_options or {}).get("probe") or {})
    if name is None or not request.tune_options or probe.get("model"):
        return request
    return request.model_copy(update={"tune_options": {**request.tune_options, "probe": {**probe, "model": name}}})
