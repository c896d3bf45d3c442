"""The run's shared state: the outside world (Sources), the growing result, the recorder, RunContext."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from smartrun import __version__
from smartrun.calibration import NoCalibration
from smartrun.clock import SYSTEM, Clock
from smartrun.contracts import Bounds, Plan
from smartrun.errors import InputError
from smartrun.hardware import HardwareSnapshot
from smartrun.memory import Correction, MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.plan_cache import CacheEntry, CacheKey
from smartrun.request import EventSink, RunRequest, no_events
from smartrun.secrets import redact_argv, redact_line, secret_values
from smartrun.session import (
    Decision,
    LLMInfo,
    SessionRecord,
    sha256_text,
    to_jsonable,
    utc_iso,
    write_record,
)


@dataclass(frozen=True)
class BoundsInput:
    """The bounds file as read: path (None for the built-in default), its text and the loaded object."""

    path: str | None
    text: str
    loaded: Any
    builtin: bool = False

    @property
    def sha256(self) -> str:
        return sha256_text(self.text)


class CacheSource(Protocol):
    def lookup(self, key: CacheKey) -> CacheEntry | None: ...
    def store(self, entry: CacheEntry) -> Any: ...


@dataclass
class Sources:
    """Everything the pipeline takes from the outside world, injectable for tests and replay."""

    hardware: Callable[[], HardwareSnapshot]
    model: Callable[[str], ModelFacts]
    bounds: Callable[[], BoundsInput]
    transport: Any | None  # advisor Transport; None = no LLM configured
    launcher: Callable[..., Any]  # (request, hardware, vllm version, on_event) -> launch.Launcher
    cache: CacheSource
    vllm: Callable[[], tuple[str | None, str | None]]  # (version, binary path)
    clock: Clock = SYSTEM  # record timestamps, and the time every timeout and budget of the run is read from
    llm_info: LLMInfo = field(default_factory=LLMInfo)
    secrets: tuple[str, ...] = ()  # values to redact from the record (API keys)
    tune: Callable[..., Any] | None = None  # the --tune stage; None = smartrun.tune.tune_after_launch
    supervise: bool = True  # wait on a healthy server (replay: False)
    replaying: bool = False
    calibration: Any = field(default_factory=NoCalibration)  # calibration.Store: correction(), add(), problems


@dataclass
class RunResult:
    """What `run` produced, for the CLI to print. `record` is what was (or would be) written.

    The stages' results live in the record, written once; the properties read them from there.
    """

    record: SessionRecord
    request: RunRequest
    hardware: HardwareSnapshot | None = None  # the machine as planned for (--gpus applied; the record: as detected)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    advice: list[Any] = field(default_factory=list)
    launch_report: Any = None
    server: Any = None  # the running vllm serve (launch.Server) while supervised
    session_path: Path | None = None
    cache_key: CacheKey | None = None
    exit_code: int = 0  # non-zero when a healthy server later died (status "died")
    command: str = ""  # the shell line to rerun the healthy launch by hand (env prefix + argv)
    secrets: tuple[str, ...] = ()  # values the CLI must not print either (API keys)
    debug_lines: list[str] = field(default_factory=list)
    placement: Any = None  # cluster.ClusterPlacement when the hardware is a cluster

    @property
    def facts(self) -> ModelFacts | None:
        return self.record.model

    @property
    def bounds(self) -> Bounds | None:
        return self.record.bounds

    @property
    def baseline(self) -> Plan | None:
        return self.record.baseline

    @property
    def plan(self) -> Plan | None:
        """The plan chosen before the launch, then the one the launch (and tuning) ended on."""
        return self.record.final_plan

    @property
    def argv(self) -> list[str]:
        return list(self.record.final_argv or [])

    @property
    def estimate(self) -> MemoryEstimate | None:
        return self.record.estimate

    @property
    def calibration(self) -> Correction | None:
        """The correction every estimate of this run used."""
        return self.record.calibration.used

    def json_summary(self) -> dict[str, Any]:
        """The one object `--json` prints: the plan (source, params, provenance, reason), argv, bounds,
        rejections, estimate, LLM decisions, warnings, outcome and the session record's path."""
        return {
            "source": self.plan.source if self.plan else None,
            "params": to_jsonable(self.plan.params) if self.plan else {},
            "argv": self.argv,
            "bounds": to_jsonable(self.bounds.to_json()) if self.bounds is not None else {},
            "rejected": self.rejected,
            "estimate": to_jsonable(self.estimate) if self.estimate is not None else None,
            **({"placement": to_jsonable(self.placement)} if self.placement is not None else {}),
            "provenance": dict(self.plan.provenance) if self.plan else {},
            "reason": self.plan.reason if self.plan else None,
            "llm": [_advice_summary(a) for a in self.advice],
            "warnings": list(self.record.warnings),
            "outcome": self.record.outcome.summary(),
            "session": str(self.session_path) if self.session_path else None,
        }


def _advice_summary(advice: Any) -> dict[str, Any]:
    """One LLM decision for --json: outcome, budget, and each exchange's size, finish reason and latency."""
    exchanges = []
    for ex in advice.exchanges:
        reply = ex.reply
        exchanges.append({"kind": ex.kind, "accepted": ex.accepted, "error": ex.error, "max_tokens": ex.max_tokens,
                          "prompt_tokens_est": ex.prompt_tokens_est,
                          "prompt_tokens": reply.prompt_tokens if reply else None,
                          "completion_tokens": reply.completion_tokens if reply else None,
                          "finish_reason": reply.finish_reason if reply else None,
                          "latency_s": reply.latency_s if reply else None,
                          "server_timings": reply.server_timings if reply else None})
    return {"source": advice.plan.source, "kept_baseline": advice.kept_baseline, "fallback": advice.fallback_reason,
            "budget_s": advice.budget_s, "spent_s": advice.spent_s, "exchanges": exchanges}


class Recorder:
    """Collects decisions, exchanges and attempts into the session record as the pipeline runs."""

    def __init__(self, record: SessionRecord, on_event: EventSink, secrets: tuple[str, ...] = ()):
        self.record = record
        self.on_event = on_event
        self.secrets = secrets

    def decide(self, step: str, value: Any, provenance: str = "") -> None:
        self.record.decisions.append(Decision(step=step, value=to_jsonable(value), provenance=provenance))

    def warn(self, text: str) -> None:
        if text not in self.record.warnings:
            self.record.warnings.append(text)
            self.on_event("warning", text)


def new_record(request: RunRequest, sources: Sources) -> SessionRecord:
    """An empty record for this request, to be filled by `run`."""
    return SessionRecord(
        tool_version=__version__,
        started_at=utc_iso(sources.clock.now()),
        command_line=redact_argv(request.command_line()),
        request=request.model_copy(update={"user_args": tuple(redact_argv(request.user_args)),
                                           "extra_args": tuple(redact_argv(request.extra_args))}),
        llm=sources.llm_info.model_copy(),  # the record's own: the transport may name the model later
    )


def _redacting(sink: EventSink, secrets: tuple[str, ...]) -> EventSink:
    """The event sink with every line capped and redacted before the CLI prints it."""

    def show(kind: str, text: str) -> None:
        sink(kind, redact_line(str(text), secrets))

    return show


def save_record(record: SessionRecord, path: Path, sources: Sources) -> bool:
    """Write the record; False (after one warning line) when it cannot be written."""
    try:
        write_record(record, path, sources.secrets)
    except InputError as err:  # never hide the run's own outcome behind a failure to write its record
        print(f"localaistack: warning: session record not written: {err.message}", file=sys.stderr)
        return False
    return True


@dataclass
class RunContext:
    """One run's inputs and its growing state: what every stage after planning reads.

    `plan_stages` fills the planning fields; the launch, tune and cache stages read them.
    """

    request: RunRequest
    sources: Sources
    rec: Recorder
    result: RunResult
    on_event: EventSink
    pins: dict[str, Any] = field(default_factory=dict)
    passthrough: tuple[str, ...] = ()
    version: str | None = None
    fit: Callable[[dict[str, Any]], str | None] | None = None
    key: CacheKey | None = None
    model_path: str = ""

    @property
    def bounds(self) -> Bounds | None:
        return self.rec.record.bounds

    @property
    def baseline(self) -> Plan | None:
        return self.rec.record.baseline

    @property
    def base_estimate(self) -> MemoryEstimate | None:
        return self.rec.record.baseline_estimate


def context(request: RunRequest, sources: Sources, *, on_event: EventSink = no_events,
            record: SessionRecord | None = None) -> RunContext:
    """A fresh context for `request`: a new record (or `record`), a recorder and an empty result."""
    record = record if record is not None else new_record(request, sources)
    on_event = _redacting(on_event, (*sources.secrets, *request_secrets(request)))
    rec = Recorder(record, on_event, sources.secrets)
    result = RunResult(record=record, request=request, secrets=sources.secrets)
    return RunContext(request=request, sources=sources, rec=rec, result=result, on_event=on_event)


def request_secrets(request: RunRequest, env: dict[str, str] | None = None, more: Any = ()) -> tuple[str, ...]:
    """Every secret of a run: values of secret flags before and after `--`, credential-like env vars, `more`."""
    found = (*more, *secret_values(request.user_args), *secret_values(request.extra_args, env))
    return tuple(dict.fromkeys(v for v in found if v))
