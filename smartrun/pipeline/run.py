"""`run`: the stages in order, with the session record written whatever happens."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smartrun.errors import SmartRunError
from smartrun.pipeline.context import RunContext, RunResult, Sources, context, save_record
from smartrun.pipeline.launching import launch_stages
from smartrun.pipeline.planning import check_cluster, plan_stages
from smartrun.request import EventSink, RunRequest, no_events
from smartrun.session import (
    Outcome,
    SessionRecord,
    default_session_path,
    utc_iso,
)


def run(request: RunRequest, sources: Sources, *, on_event: EventSink = no_events,
        session_out: Path | None = None, write: bool = True, record: SessionRecord | None = None,
        on_planned: Callable[[RunResult], None] | None = None,
        on_started: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run the whole pipeline once; the session record is written at the end whatever happens.

    `on_started(result)` is called at once (the CLI keeps it, to name the record of a run that raises);
    `on_planned(result)` once the plan and argv are chosen, before anything is launched
    (the CLI prints its summary there, so a long-running server does not hide it).
    `result.session_path` is None after the run when the record could not be written.
    """
    started = sources.clock.now()
    ctx = context(request, sources, on_event=on_event, record=record)
    record, result = ctx.rec.record, ctx.result
    recorder = ctx.rec
    path = session_out or default_session_path(started, Path(request.model.rstrip("/")).name or request.model)
    result.session_path = path if write else None
    if on_started is not None:
        on_started(result)
    try:
        _run_stages(ctx, on_planned)
        if record.outcome.status is None:
            record.outcome = Outcome(status="dry-run" if request.dry_run else "ok", exit_code=0)
    except SmartRunError as err:
        recorder.decide("error", {"type": type(err).__name__, "message": err.message})
        record.outcome = Outcome(status="error", exit_code=err.exit_code, message=err.message,
                                 error_type=type(err).__name__)
        raise
    except KeyboardInterrupt:
        record.outcome = Outcome(status="interrupted", exit_code=130)
        raise
    finally:
        record.finished_at = utc_iso(sources.clock.now())
        if write and not save_record(record, path, sources):
            result.session_path = None
    return result


def _run_stages(ctx: RunContext, on_planned: Callable[[RunResult], None] | None = None) -> None:
    plan_stages(ctx)
    if on_planned is not None:
        on_planned(ctx.result)
    if ctx.request.dry_run:
        return
    assert ctx.result.hardware is not None and ctx.result.plan is not None
    check_cluster(ctx.request, ctx.result.hardware, ctx.result.plan)
    launch_stages(ctx)
