"""The replay composition root: a session record served back as the run's sources, then compared."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

from smartrun import advisor, bounds, errors
from smartrun.clock import FakeClock
from smartrun.contracts import Plan
from smartrun.errors import ReplayDivergence, SmartRunError
from smartrun.memory import Correction
from smartrun.pipeline.context import BoundsInput, RunResult, Sources, new_record
from smartrun.pipeline.run import run
from smartrun.plan_cache import CacheEntry, CacheKey
from smartrun.session import (
    CacheRecord,
    LaunchAttemptRecord,
    LLMExchangeRecord,
    RecordError,
    SessionRecord,
    check_replay,
)
from smartrun.tune.report import TuningOutcome

T = TypeVar("T")


class _RecordedLLMError(SmartRunError):
    """Stands in for an LLM transport error whose class could not be re-created in replay."""


class ReplayTransport:
    """Serves the recorded LLM replies (or errors) in order; asking for more than was recorded diverges."""

    def __init__(self, exchanges: list[LLMExchangeRecord], budget_s: float | None = None):
        self._items: Iterator[LLMExchangeRecord] = iter(list(exchanges))
        if isinstance(budget_s, int | float) and budget_s > 0:
            self.budget_s = float(budget_s)  # the recorded --llm-timeout: the advisor charges the same times

    def complete(self, messages: Any, schema: Any = None, **_options: Any) -> Any:
        item = next(self._items, None)
        if item is None:
            raise ReplayDivergence("replay diverged: the pipeline asked the LLM more often than the record holds")
        if item.error is not None and item.reply is None:  # with a reply, the error is the advisor's verdict
            raise _rebuild_error(item.error)
        if item.reply is None:
            raise RecordError("session record: an LLM exchange has neither a reply nor an error")
        return item.reply


def _replayable_errors() -> dict[str, type[Exception]]:
    """The only errors a recorded LLM exchange may name: what the advisor's transport raises on purpose."""

    classes = (errors.AdvisorError, advisor.LLMUnavailable, advisor.ReplyParseError)
    return {f"{cls.__module__}.{cls.__qualname__}": cls for cls in classes}


def _rebuild_error(error: dict[str, str]) -> Exception:
    """The recorded error, rebuilt from an allow-list by name: a record is data, so nothing it names is
    imported or instantiated (`os.system`, `builtins.OSError`...); anything else replays as a recorded error."""
    message = str(error.get("message", "recorded LLM error"))
    cls = _replayable_errors().get(str(error.get("type", "")))
    return cls(message) if cls is not None else _RecordedLLMError(message)


class ReplayServer:
    """A healthy server in replay: nothing runs, so nothing to wait for or stop."""

    def wait(self) -> int:
        return 0

    def stop(self) -> None:
        return None


class ReplayLauncher:
    """Serves the recorded launch attempts in order (prepare: the argv and env that were really used)."""

    def __init__(self, attempts: list[LaunchAttemptRecord]):
        self._all = list(attempts)
        self._items: Iterator[LaunchAttemptRecord] = iter(self._all)
        self._prepared = 0

    def prepare(self, plan: Plan, argv: Any) -> tuple[list[str], dict[str, str], list[str]]:
        item = self._all[self._prepared] if self._prepared < len(self._all) else None
        self._prepared += 1
        return (list(item.argv), dict(item.env), []) if item else (list(argv), {}, [])

    def start(self, plan: Plan, argv: list[str], env: dict[str, str]) -> Any:
        item = next(self._items, None)
        if item is None:
            raise ReplayDivergence("replay diverged: the pipeline launched more often than the record holds")
        return item.attempt, (ReplayServer() if item.healthy else None)


class RecordedCache:
    """The saved-parameters lookup as it was at record time; stores go nowhere."""

    def __init__(self, cache: CacheRecord):
        self.cache = cache

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        return self.cache.entry

    def store(self, entry: CacheEntry) -> None:
        return None


class RecordedCalibration:
    """The correction the record planned with (none in records older than calibration); stores go nowhere."""

    problems: list[str] = []

    def __init__(self, record: SessionRecord):
        self.used = record.calibration.used

    def correction(self, machine: str, vllm_version: str) -> Correction | None:
        return self.used

    def add(self, *_: Any) -> None:
        return None


def replay_sources(record: SessionRecord) -> Sources:
    """Sources that serve exactly what the record holds."""
    try:
        started = datetime.fromisoformat(record.started_at.replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(f"session record: started_at {record.started_at!r} is not an ISO time") from None
    return Sources(
        hardware=lambda: _recorded(record.hardware, record),
        model=lambda _model: _recorded(record.model, record),
        bounds=lambda: _recorded_bounds(record),
        transport=ReplayTransport(record.llm_exchanges, record.llm.timeout_s) if record.llm.configured else None,
        launcher=lambda *_: ReplayLauncher(record.launch_attempts),
        cache=RecordedCache(record.cache),
        vllm=lambda: (record.vllm.version, record.vllm.bin),
        clock=FakeClock(wall=started),  # stands still at the recorded start: nothing replayed takes time
        llm_info=record.llm,
        tune=lambda server=None, **_: TuningOutcome(report=_recorded(record.tuning, record), server=server),
        supervise=False,
        replaying=True,
        calibration=RecordedCalibration(record),
    )


def _recorded(part: T | None, record: SessionRecord) -> T:
    """A stage's recorded result; none recorded means the run failed before that stage: fail the same way."""
    if part is None:
        raise _recorded_failure(record)
    return part


def _recorded_failure(record: SessionRecord) -> SmartRunError:
    cls = getattr(errors, str(record.outcome.error_type), SmartRunError)
    if not (isinstance(cls, type) and issubclass(cls, SmartRunError)):
        cls = SmartRunError
    return cls(record.outcome.message or "recorded failure")


def _recorded_bounds(record: SessionRecord) -> BoundsInput:
    """The recorded file text, loaded under its recorded name so `bounds:<file>:<line>` provenance matches."""

    info = _recorded(record.bounds_file, record)
    name = bounds.BUILTIN_NAME if info.builtin else str(info.path)
    return BoundsInput(path=info.path, text=info.text, loaded=bounds.load_text(info.text, name), builtin=info.builtin)


@dataclass
class ReplayResult:
    record: SessionRecord  # the original
    replayed: SessionRecord  # what the replay produced
    divergence: str | None = None
    result: RunResult | None = None
    error: SmartRunError | None = None


def replay(record: SessionRecord) -> ReplayResult:
    """Re-run the pipeline from the record's sources and compare every decision; ReplayDivergence on the first miss."""

    if record.request is None:
        raise RecordError("session record: no request to replay")
    request = record.request
    sources = replay_sources(record)
    replayed = new_record(request, sources)
    out = ReplayResult(record=record, replayed=replayed)
    try:
        out.result = run(request, sources, write=False, record=replayed)
    except (ReplayDivergence, RecordError):
        raise
    except SmartRunError as err:  # a recorded failure replays as the same failure
        out.error = err
    except (ValueError, TypeError, AttributeError, KeyError, ArithmeticError) as err:
        # a record written by a run never gets here; a hand-edited value that fits the schema but not the stages does
        raise RecordError(f"session record: replay cannot use a recorded value ({type(err).__name__}: {err}); "
                          "was the record edited by hand?") from None
    check_replay(record.decisions, out.replayed.decisions)
    if out.error is not None and record.outcome.status != "error":
        raise ReplayDivergence(f"replay failed where the record succeeded: {out.error.message}")
    return out
