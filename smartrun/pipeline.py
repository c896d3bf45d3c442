"""The orchestrator: composes the stages for `model run`; decides nothing a stage should decide.

hardware -> model -> pins -> bounds file -> effective bounds -> baseline -> saved parameters ->
advisor -> validate -> (dry-run stops) -> launch with recovery -> cache -> tune hook -> supervise,
and a session record written always (also on failure and dry-run).

The outside world comes in through `Sources` (hardware, model facts, bounds file, LLM transport,
launcher, saved-parameters cache, vLLM discovery, clock). `live_sources` reads the real machine;
`replay_sources` serves what a session record holds. Recording and replaying are the same `run`,
so a record cannot drift from what the code does.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

from smartrun import __version__, calibration
from smartrun.calibration import Correction, NoCalibration
from smartrun.contracts import Bounds, Change, Plan, Proposal
from smartrun.errors import InputError, SmartRunError
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.secrets import redact_argv, redact_env, redact_text, redact_tree, secret_values
from smartrun.session import (
    AdviceRecord,
    CacheEntry,
    CacheKey,
    CacheRecord,
    Decision,
    LaunchAttemptRecord,
    LLMExchangeRecord,
    RecordError,
    SavedParams,
    SessionRecord,
    check_replay,
    default_session_path,
    sha256_text,
    to_jsonable,
    utc_iso,
    validation_problem,
    write_record,
)

EventSink = Callable[[str, str], None]  # (kind, one line) -> the CLI prints it


def _no_events(kind: str, text: str) -> None:
    return None


class RunRequest(Frozen):
    """What the user asked for; recorded (redacted) so replay can ask the same."""

    model: str
    user_args: tuple[str, ...] = ()  # vLLM flags typed after MODEL, then "--" passthrough, as typed
    extra_args: tuple[str, ...] = ()  # everything after "--": passed through untouched
    smart_run: bool = False
    debug: bool = False
    refresh: bool = False
    strict: bool = False
    dry_run: bool = False
    goal: str = "stable"
    force: bool = False
    host: str = "127.0.0.1"
    port: int = 8000
    vllm_version: str | None = None
    vllm_bin: str | None = None
    startup_timeout: float = 900.0
    max_attempts: int = 3
    hardware_path: str | None = None
    more_hardware: tuple[str, ...] = ()  # the other nodes' snapshots (--hardware given once per node)
    ray_address: str | None = None  # --ray-address: launch on this Ray cluster
    bounds_path: str | None = None
    tune: bool = False
    tune_options: dict[str, Any] = {}  # TuneSettings fields from the --tune-*/--probe-* flags
    llm_base_url: str | None = None
    llm_model: str | None = None
    llm_timeout: float | None = None
    gpus: str | None = None  # --gpus 0,2: nvidia-smi indices (or UUIDs) of the GPUs to use
    visible_devices: str | None = None  # CUDA_VISIBLE_DEVICES as it was when the run started (None: unset)

    def command_line(self) -> list[str]:
        """The `model run` command this request stands for (options that differ from their defaults)."""
        defaults = RunRequest(model=self.model)
        flags = {"smart_run": "--smart-run", "debug": "--smart-run-debug", "refresh": "--smart-run-refresh",
                 "strict": "--smart-run-strict", "dry_run": "--dry-run", "force": "--force", "tune": "--tune",
                 "goal": "--goal", "host": "--host", "port": "--port", "vllm_version": "--vllm-version",
                 "vllm_bin": "--vllm-bin", "startup_timeout": "--startup-timeout", "max_attempts": "--max-attempts",
                 "hardware_path": "--hardware", "bounds_path": "--bounds", "llm_base_url": "--llm-base-url",
                 "llm_model": "--llm-model", "llm_timeout": "--llm-timeout", "gpus": "--gpus"}
        out = ["localaistack", "model", "run", self.model]
        for name, flag in flags.items():
            value = getattr(self, name)
            if value == getattr(defaults, name):
                continue
            out += [flag] if value is True else [flag, str(value)]
        for path in self.more_hardware:
            out += ["--hardware", path]
        if self.ray_address:
            out += ["--ray-address", self.ray_address]
        out += list(self.user_args)
        return out + (["--", *self.extra_args] if self.extra_args else [])


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
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(timezone.utc))
    monotonic: Callable[[], float] = time.monotonic
    llm_info: dict[str, Any] = field(default_factory=dict)  # {"configured", "base_url", "model"}; no key
    secrets: tuple[str, ...] = ()  # values to redact from the record (API keys)
    tune: Callable[..., Any] | None = None  # the --tune stage; None = smartrun.tune.tune_after_launch
    supervise: bool = True  # wait on a healthy server (replay: False)
    replaying: bool = False
    calibration: Any = field(default_factory=NoCalibration)  # calibration.Store: correction(), add(), problems


@dataclass
class RunResult:
    """What `run` produced, for the CLI to print. `record` is what was (or would be) written."""

    record: SessionRecord
    request: RunRequest
    hardware: HardwareSnapshot | None = None
    facts: ModelFacts | None = None
    bounds: Any = None
    baseline: Plan | None = None
    plan: Plan | None = None
    argv: list[str] = field(default_factory=list)
    estimate: Any = None
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
    calibration: Correction | None = None  # the correction every estimate of this run used
    placement: Any = None  # cluster.ClusterPlacement when the hardware is a cluster

    def json_summary(self) -> dict[str, Any]:
        """The one object `--json` prints (issue 6 shape, plus warnings and session)."""
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
            "outcome": self.record.outcome,
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


# ---------------------------------------------------------------------------- recording


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


class RecordingTransport:
    """Wraps the advisor's transport: every call's messages, max_tokens, reply or error, latency and tokens go
    on record, then what the advisor made of the reply (`judged`): accepted, or why not."""

    def __init__(self, inner: Any, recorder: Recorder, monotonic: Callable[[], float]):
        self.inner = inner
        self.recorder = recorder
        self.monotonic = monotonic
        self.kind = "propose"
        self._last: LLMExchangeRecord | None = None

    def complete(self, messages: Any, schema: Any = None, **options: Any) -> Any:
        messages = redact_tree(list(messages), self.recorder.secrets)  # nothing secret goes to the LLM
        entry = LLMExchangeRecord(kind=self.kind, messages=to_jsonable(list(messages)),
                                  schema=to_jsonable(schema) if schema is not None else None,
                                  max_tokens=options.get("max_tokens"))
        self.recorder.record.llm_exchanges.append(entry)
        self._last = entry
        started = self.monotonic()
        try:
            reply = self.inner.complete(messages, schema, **options)
        except Exception as err:
            entry.error = {"type": f"{type(err).__module__}.{type(err).__qualname__}", "message": str(err)}
            entry.latency_s = _recorded_latency(err, self.monotonic() - started)
            raise
        finally:
            self._note_model()
        entry.reply = to_jsonable(reply)
        entry.latency_s = _recorded_latency(reply, self.monotonic() - started)
        entry.tokens = _tokens_of(reply)
        return reply

    def judged(self, exchange: Any) -> None:
        """The advisor's verdict on the last reply: a reply it did not use carries why, as an error."""
        entry = self._last
        if entry is None or entry.reply is None:
            return
        entry.accepted = bool(exchange.accepted)
        if not exchange.accepted or exchange.error:
            from smartrun import advisor

            entry.error = {"type": "smartrun.advisor.ReplyRejected", "message": advisor.rejection_text(exchange)}

    def _note_model(self) -> None:
        """The model name into the record once the transport knows it (discovered from /models)."""
        name = getattr(self.inner, "model_name", None)
        if isinstance(name, str) and name and not self.recorder.record.llm.get("model"):
            self.recorder.record.llm["model"] = name
            self.recorder.record.llm["model_origin"] = "discovered from the server's /models"

    def __getattr__(self, name: str) -> Any:  # settings, model name etc. of the inner transport
        return getattr(self.inner, name)


def _recorded_latency(obj: Any, measured: float) -> float:
    """The transport's own latency figure when it has one (LLMReply.latency_s), else what we measured."""
    latency = getattr(obj, "latency_s", None)
    return round(float(latency if isinstance(latency, (int, float)) else measured), 4)


def _tokens_of(reply: Any) -> dict[str, int] | None:
    """Token usage of an LLMReply: {"prompt_tokens", "completion_tokens"} as the server reported them."""
    keys = ("prompt_tokens", "completion_tokens")
    found = {k: getattr(reply, k) for k in keys if isinstance(getattr(reply, k, None), int)}
    return found or None


class RecordingLauncher:
    """Wraps the launcher: each start's argv, env changes, classified outcome, log excerpt and duration.

    The decision for attempt N holds the argv the pipeline asked for (before the launcher adapts it to
    the installed vllm), the plan's params and the classified outcome; the record also keeps the argv
    and environment really used.
    """

    def __init__(self, inner: Any, recorder: Recorder, monotonic: Callable[[], float]):
        self.inner = inner
        self.recorder = recorder
        self.monotonic = monotonic
        self._asked: list[str] | None = None
        self.phase = "launch"  # "tune" while the tune stage restarts the server: recorded, not a decision

    def prepare(self, plan: Plan, argv: Any) -> tuple[list[str], dict[str, str], list[str]]:
        self._asked = list(argv)
        prepare = getattr(self.inner, "prepare", None)
        if prepare is None:
            return list(argv), {}, []
        return prepare(plan, argv)

    def start(self, plan: Plan, argv: list[str], env: dict[str, str]) -> Any:
        asked = self._asked if self._asked is not None else list(argv)
        self._asked = None
        started = self.monotonic()
        attempt, server = self.inner.start(plan, argv, env)
        number = len(self.recorder.record.launch_attempts) + 1
        raw = to_jsonable(attempt)
        outcome = _attempt_outcome(attempt)
        entry = LaunchAttemptRecord(
            number=number,
            phase=self.phase,
            argv=redact_argv(argv),
            env=redact_env(dict(env or {})),
            outcome=outcome,
            healthy=server is not None,
            log_excerpt=[redact_text(str(x), self.recorder.secrets)
                         for x in (getattr(attempt, "log_excerpt", None) or [])][-40:],
            duration_s=_recorded_latency_attr(attempt, "duration_s", self.monotonic() - started),
            attempt=raw if isinstance(raw, dict) else {"value": raw},
        )
        self.recorder.record.launch_attempts.append(entry)
        if self.phase != "launch":  # the tune stage is replayed from its recorded report, not re-run
            return attempt, server
        self.recorder.decide(f"launch.{number}", {"argv": redact_argv(asked), "params": plan.params,
                                                  "outcome": outcome}, str(plan.source))
        return attempt, server

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _recorded_latency_attr(obj: Any, name: str, measured: float) -> float:
    value = getattr(obj, name, None)
    return round(float(value if isinstance(value, (int, float)) else measured), 3)


def _attempt_outcome(attempt: Any) -> str:
    """"ready", "interrupted", or the failure class vllm_log gave a failed start (e.g. "oom_cuda_graph")."""
    return str(getattr(attempt, "failure_class", None) or getattr(attempt, "outcome", None) or "unknown")


# ---------------------------------------------------------------------------- the run


def new_record(request: RunRequest, sources: Sources) -> SessionRecord:
    """An empty record for this request, to be filled by `run`."""
    return SessionRecord(
        tool_version=__version__,
        started_at=utc_iso(sources.clock()),
        command_line=redact_argv(request.command_line()),
        request=_redacted_request(request),
        llm=dict(sources.llm_info),
    )


def run(request: RunRequest, sources: Sources, *, on_event: EventSink = _no_events,
        session_out: Path | None = None, write: bool = True, record: SessionRecord | None = None,
        on_planned: Callable[[RunResult], None] | None = None,
        on_started: Callable[[RunResult], None] | None = None) -> RunResult:
    """Run the whole pipeline once; the session record is written at the end whatever happens.

    `on_started(result)` is called at once (the CLI keeps it, to name the record of a run that raises);
    `on_planned(result)` once the plan and argv are chosen, before anything is launched
    (the CLI prints its summary there, so a long-running server does not hide it).
    `result.session_path` is None after the run when the record could not be written.
    """
    started = sources.clock()
    ctx = context(request, sources, on_event=on_event, record=record)
    record, result = ctx.rec.record, ctx.result
    recorder = ctx.rec
    path = session_out or default_session_path(started, Path(request.model.rstrip("/")).name or request.model)
    result.session_path = path if write else None
    if on_started is not None:
        on_started(result)
    try:
        _run_stages(ctx, on_planned)
        if record.outcome.get("status") is None:
            record.outcome = {"status": "dry-run" if request.dry_run else "ok", "exit_code": 0}
    except SmartRunError as err:
        recorder.decide("error", {"type": type(err).__name__, "message": err.message})
        record.outcome = {"status": "error", "exit_code": err.exit_code, "message": err.message,
                          "error_type": type(err).__name__}
        raise
    except KeyboardInterrupt:
        record.outcome = {"status": "interrupted", "exit_code": 130}
        raise
    finally:
        record.finished_at = utc_iso(sources.clock())
        if write and not _write(record, path, sources):
            result.session_path = None
    return result


def _redacting(sink: EventSink, secrets: tuple[str, ...]) -> EventSink:
    """The event sink with every line capped and redacted before the CLI prints it."""
    from smartrun.secrets import redact_line

    def show(kind: str, text: str) -> None:
        sink(kind, redact_line(str(text), secrets))

    return show


def _write(record: SessionRecord, path: Path, sources: Sources) -> bool:
    """Write the record; False (after one warning line) when it cannot be written."""
    try:
        write_record(record, path, sources.secrets)
    except InputError as err:  # never hide the run's own outcome behind a failure to write its record
        print(f"localaistack: warning: session record not written: {err.message}", file=sys.stderr)
        return False
    return True


def _redacted_request(request: RunRequest) -> dict[str, Any]:
    data = request.model_dump(mode="json")
    data["user_args"] = redact_argv(request.user_args)
    data["extra_args"] = redact_argv(request.extra_args)
    return data


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
    bounds: Bounds | None = None
    baseline: Plan | None = None
    base_estimate: MemoryEstimate | None = None
    fit: Callable[[dict[str, Any]], str | None] | None = None
    key: CacheKey | None = None
    model_path: str = ""


def context(request: RunRequest, sources: Sources, *, on_event: EventSink = _no_events,
            record: SessionRecord | None = None) -> RunContext:
    """A fresh context for `request`: a new record (or `record`), a recorder and an empty result."""
    record = record if record is not None else new_record(request, sources)
    on_event = _redacting(on_event, (*sources.secrets, *request_secrets(request)))
    rec = Recorder(record, on_event, sources.secrets)
    result = RunResult(record=record, request=request, secrets=sources.secrets)
    return RunContext(request=request, sources=sources, rec=rec, result=result, on_event=on_event)


def _run_stages(ctx: RunContext, on_planned: Callable[[RunResult], None] | None = None) -> None:
    plan_stages(ctx)
    if on_planned is not None:
        on_planned(ctx.result)
    if ctx.request.dry_run:
        return
    assert ctx.result.hardware is not None and ctx.result.plan is not None
    _check_cluster(ctx.request, ctx.result.hardware, ctx.result.plan)
    _launch(ctx)


def plan_stages(ctx: RunContext) -> None:
    """Everything up to the argv: hardware, model, pins, bounds file, effective bounds, baseline, saved
    parameters and the advisor (with --smart-run), then the argv and the estimate of the chosen plan.

    `model run --dry-run` stops here; `bounds show` is this with the request its options make.
    """
    from smartrun import cluster, knobs, rules
    from smartrun import hardware as hw_mod
    from smartrun.errors import InfeasibleError

    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    record = rec.record
    hw = sources.hardware()
    record.hardware = to_jsonable(hw)
    rec.decide("hardware", hw_mod.fingerprint(hw), hw.source)
    hw = _visible_gpus(request, hw, rec)
    result.hardware = hw

    facts = sources.model(request.model)
    result.facts = facts
    record.model = to_jsonable(facts)
    rec.decide("model", {"name": facts.name, "architecture": facts.architecture,
                         "weight_bytes": facts.weight_bytes}, facts.weight_bytes_source or "config")

    _refuse_planned_knobs_after_dashdash(request.extra_args)
    pins, passthrough = launch_passthrough(request)
    passthrough = (*passthrough, *_served_name_args(request, facts, pins, passthrough))
    ctx.pins, ctx.passthrough = pins, tuple(passthrough)
    rec.decide("pins", pins, "user")

    bounds_in = sources.bounds()
    record.bounds_file = {"path": bounds_in.path, "text": bounds_in.text, "sha256": bounds_in.sha256,
                          "builtin": bounds_in.builtin}
    if bounds_in.path and not request.bounds_path and not sources.replaying:  # found by searching upward
        ctx.on_event("bounds", f"bounds file in force: {bounds_in.path} (smartrun.toml found from {Path.cwd()}; "
                               "--bounds FILE picks another)")
    for line in getattr(bounds_in.loaded, "ineffective", lambda: [])():
        rec.warn(line)
    version, vllm_bin = sources.vllm()
    ctx.version = version
    record.vllm = {"version": version, "bin": vllm_bin}
    if version is None:
        rec.warn("no vLLM version known (vllm not found, no --vllm-version): planning with the estimator's "
                 "default profile")

    correction = _calibration(sources, rec, hw, version)
    result.calibration = correction
    estimate_fn = calibration.estimator(correction)
    try:
        bounds = rules.effective_bounds(facts, hw, bounds_in.loaded, pins, request.goal, vllm_version=version,
                                        force=request.force, estimate_fn=estimate_fn)
    except InfeasibleError as err:  # a model too big for these nodes: say how many would hold it
        raise InfeasibleError(cluster.refusal(err.message, facts, hw, pins, version)) from err
    result.bounds = ctx.bounds = bounds
    record.bounds = to_jsonable(bounds.to_json())
    for warning in bounds.warnings:
        rec.warn(warning)
    rec.decide("bounds", record.bounds, bounds_in.path or "builtin")

    try:
        baseline, base_estimate = rules.baseline(bounds, facts, hw, request.goal, vllm_version=version,
                                                 estimate_fn=estimate_fn)
    except InfeasibleError as err:
        raise InfeasibleError(cluster.refusal(err.message, facts, hw, pins, version)) from err
    baseline = cluster.finish_plan(baseline, hw, pins)
    result.baseline = ctx.baseline = baseline
    ctx.base_estimate = base_estimate
    record.baseline = to_jsonable(baseline)
    record.baseline_estimate = to_jsonable(base_estimate)
    rec.decide("baseline", baseline.params, _provenance_line(baseline))

    ctx.fit = rules.fit_check(facts, hw, version, estimate_fn=estimate_fn)
    plan = baseline
    ctx.key = result.cache_key = CacheKey(
        model=facts.name, hardware_fingerprint=hw_mod.fingerprint(hw), bounds_sha256=bounds_in.sha256,
        vllm_version=version, goal=request.goal)
    if request.smart_run:
        plan = _from_cache(ctx)
        if plan.source != "cache":
            plan = _advise(ctx)
    result.plan = plan
    record.final_plan = to_jsonable(plan)
    rec.decide("plan", {"source": plan.source, "params": plan.params}, _provenance_line(plan))
    _warn_without_nvlink(plan, hw, rec)

    ctx.model_path = facts.path or request.model
    argv = knobs.build_argv(ctx.model_path, plan.params, ctx.passthrough)
    result.argv = redact_argv(argv)
    record.final_argv = result.argv
    result.estimate = _estimate_for(plan, facts, hw, version, correction)
    record.estimate = to_jsonable(result.estimate) if result.estimate is not None else None
    if cluster.is_cluster(hw):  # which node holds which stage, with each stage's memory
        result.placement = cluster.placement(facts, hw, plan.params, version, correction)
    rec.decide("argv", result.argv, plan.source)


def _visible_gpus(request: RunRequest, hw: HardwareSnapshot, rec: Recorder) -> HardwareSnapshot:
    """The machine restricted to the GPUs the user allows (--gpus, CUDA_VISIBLE_DEVICES: hardware.allowed_gpus).

    A dry run against a --hardware snapshot plans for the machine it describes, so this machine's
    CUDA_VISIBLE_DEVICES does not apply there (said once). vLLM then sees the allowed GPUs as cuda:0.. and
    the launch sets CUDA_VISIBLE_DEVICES to the ones the plan uses.
    """
    from smartrun import hardware

    visible = request.visible_devices
    if len(hw.nodes) > 1:  # a cluster: Ray gives each worker its GPU on its node; whole nodes are planned
        if request.gpus is not None:
            raise InputError(f"--gpus {request.gpus}: a plan across nodes uses whole nodes; pass the snapshots of "
                             f"the nodes to use instead")
        if visible is not None:
            rec.warn(f"CUDA_VISIBLE_DEVICES={visible} of this machine ignored: the plan spans a cluster's nodes")
        return hw
    if visible is not None and request.dry_run and request.hardware_path:
        rec.warn(f"CUDA_VISIBLE_DEVICES={visible} of this machine ignored: the dry run plans for "
                 f"{request.hardware_path} (use --gpus to restrict it)")
        visible = None
    hw = hardware.allowed_gpus(hw, request.gpus, visible)
    if hw.physical_indices:
        source = "--gpus" if request.gpus is not None else "CUDA_VISIBLE_DEVICES"
        rec.decide("gpus", {"visible": list(hw.physical_indices), "fingerprint": hardware.fingerprint(hw)}, source)
    return hw


def _check_cluster(request: RunRequest, hw: HardwareSnapshot, plan: Plan) -> None:
    """Before a launch: a plan across nodes needs a Ray cluster that is up and holds it."""
    from smartrun import cluster
    from smartrun.errors import ClusterError

    spans = cluster.is_cluster(hw) and cluster.placement_nodes(hw, plan.params) > 1
    if request.ray_address:
        cluster.check_live(hw, plan.params, request.ray_address)
    elif spans:
        starts = "; ".join(cluster.ray_start_commands(hw, cluster.placement_nodes(hw, plan.params)))
        raise ClusterError(f"the plan spans {cluster.placement_nodes(hw, plan.params)} nodes and starts on a Ray "
                           f"cluster: pass --ray-address HEAD:PORT (to bring the cluster up run: {starts})")


def _refuse_planned_knobs_after_dashdash(extra_args: tuple[str, ...]) -> None:
    """A knob smartrun plans, typed after `--`, would silently override the plan in vLLM (the last flag wins),
    so the plan, its estimate and its bounds would describe another launch. Typed before `--` it is a pin."""
    if not extra_args:
        return
    from smartrun import knobs

    planned = [name for name in knobs.parse_user_args(list(extra_args)).pins if name in knobs.TUNING_KNOBS]
    if planned:
        flags = ", ".join(knobs.CATALOGUE[name].flag for name in planned)
        raise InputError(f"{flags} after `--` would override the plan; put it before `--` to pin it")


def _security_args(request: Any, passthrough: tuple[str, ...], pins: dict[str, Any] | None = None) -> tuple[str, ...]:
    """--host/--port: user-only, passed through unless given (pinned, or typed in any spelling). Default host
    127.0.0.1 (the guide's templates), not all interfaces."""
    from smartrun import argv as argv_mod

    defaults = {name: getattr(request, name, None) for name in ("host", "port") if name not in (pins or {})}
    return tuple(argv_mod.with_defaults(passthrough, defaults)[len(passthrough):])


def _warn_without_nvlink(plan: Plan, hw: HardwareSnapshot, rec: Recorder) -> None:
    """Tensor parallelism over GPUs without NVLink is slow (and vLLM's custom all-reduce unsafe): say so, but
    only when the plan really splits layers (tp > 1); at tp 1 there is no all-reduce to speak of."""
    from smartrun import hardware, rules
    from smartrun.errors import SmartRunError

    tp, pp = (int(plan.params.get(k) or 1) for k in ("tensor_parallel_size", "pipeline_parallel_size"))
    if tp < 2:
        return
    try:
        gpus = rules.select_gpus(hw, tp * pp)
    except SmartRunError:
        return
    groups = [gpus[i:i + tp] for i in range(0, len(gpus), tp)]  # the all-reduce runs inside each stage's TP group
    if all(hw.nvlinked(a.index, b.index) for g in groups for i, a in enumerate(g) for b in g[i + 1:]):
        return
    names = ", ".join(str(hardware.physical_index(hw, g.index)) for g in gpus)
    all_reduce = " vLLM's custom all-reduce is disabled." if plan.params.get("disable_custom_all_reduce") else ""
    rec.warn(f"no NVLink between GPUs {names}: tensor parallel {tp} runs its all-reduce over PCIe (slower).{all_reduce}")


def launch_passthrough(request: Any) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(pins, passthrough) for `vllm serve` as the pipeline builds them: --host/--port unless typed, the user's
    unknown flags, then everything after `--`."""
    from smartrun import knobs

    user = knobs.parse_user_args(list(getattr(request, "user_args", ()) or ()))
    given = (*user.passthrough, *(getattr(request, "extra_args", ()) or ()))
    return user.pins, (*_security_args(request, given, user.pins), *given)


def _served_name_args(request: RunRequest, facts: ModelFacts, pins: dict[str, Any],
                      passthrough: tuple[str, ...]) -> tuple[str, ...]:
    """`--served-model-name REPO` when MODEL was given as a Hugging Face repo id, so clients ask for the model by
    the name they know (vLLM would list the cache snapshot's path) - unless the user named it."""
    from smartrun import argv

    given_as_repo_id = "/" in request.model and facts.name == request.model  # model.inspect names a cached repo so
    named = "served_model_name" in pins or argv.has(argv.tokenize(passthrough), "served_model_name")
    return ("--served-model-name", request.model) if given_as_repo_id and not named else ()


def _provenance_line(plan: Plan) -> str:
    return "; ".join(f"{k}: {v}" for k, v in sorted(plan.provenance.items()))


def _estimate_for(plan: Plan, facts: ModelFacts, hw: HardwareSnapshot, version: str | None,
                  correction: Correction | None = None) -> Any:
    """The estimator's numbers for the chosen plan, on the GPUs the rules would pick."""
    from smartrun import memory, rules

    flags = rules.flags_from_params(plan.params)
    n = max(1, flags.tensor_parallel_size * flags.pipeline_parallel_size)
    gpus = [memory.GpuSpec.from_gpu(g) if not isinstance(g, memory.GpuSpec) else g
            for g in rules.select_gpus(hw, n)]
    return memory.estimate(facts, gpus, flags, version, calibration=correction)


# ---------------------------------------------------------------------------- calibration


def _calibration(sources: Sources, rec: Recorder, hw: HardwareSnapshot, version: str | None) -> Correction | None:
    """This machine's correction (replay: the recorded one), on record and as a decision when there is one.

    Unusable calibration data is a warning, never a failed run: the plan is then made uncalibrated.
    """
    try:
        correction = sources.calibration.correction(*calibration.key(hw, version))
    except RecordError:  # replay: a hand-edited recorded correction fails like every other recorded part
        raise
    except SmartRunError as err:
        rec.warn(f"calibration not used: {err.message}")
        correction = None
    for problem in getattr(sources.calibration, "problems", []) or []:
        rec.warn(problem)
    rec.record.calibration.used = to_jsonable(correction) if correction is not None else None
    if correction is not None:
        rec.decide("calibration", {"machine": correction.machine, "vllm_version": correction.vllm_version,
                                   "startups": correction.startups, "non_kv_gib": correction.non_kv_gib,
                                   "rule": correction.rule}, correction.describe())
    return correction


def _observe_startups(sources: Sources, rec: Recorder, result: RunResult, facts: ModelFacts,
                      hw: HardwareSnapshot, version: str | None) -> None:
    """Every healthy start's measured figures next to the uncalibrated estimate: on record and into the
    calibration data (replay: on record only). A problem is a warning; the server keeps running."""
    from pydantic import ValidationError

    from smartrun.vllm_log import StartupFacts

    record = rec.record
    observations = []
    for entry in record.launch_attempts:
        startup, params = entry.attempt.get("facts"), entry.attempt.get("params")
        if not entry.healthy or not isinstance(startup, dict) or not isinstance(params, dict):
            continue
        try:
            raw = _estimate_for(Plan(params=params), facts, hw, version)
            seen = calibration.observe(raw, StartupFacts.model_validate(startup), model=facts.name, params=params,
                                       at=record.started_at, tool_version=__version__,
                                       session=str(result.session_path) if result.session_path else None)
        except (SmartRunError, ValidationError):
            continue
        if seen is not None:
            observations.append(seen)
    if not observations:
        record.calibration.note = "vLLM printed no KV cache figure: nothing to calibrate from"
        return
    record.calibration.observations = [to_jsonable(o) for o in observations]
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


# ---------------------------------------------------------------------------- cache


def _from_cache(ctx: RunContext) -> Plan:
    """A saved plan for this key, re-validated against today's bounds; the baseline when none is usable."""
    from smartrun import validate

    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    bounds, baseline, fit, key = ctx.bounds, ctx.baseline, ctx.fit, ctx.key
    assert bounds is not None and baseline is not None and key is not None
    record = rec.record
    record.cache = CacheRecord(key=key.model_dump(), looked_up=not request.refresh)
    if request.refresh:
        record.cache.note = "ignored (--smart-run-refresh)"
        rec.decide("cache", {"looked_up": False}, "--smart-run-refresh")
        return baseline
    entry = sources.cache.lookup(key)
    for problem in getattr(sources.cache, "problems", []) or []:
        rec.warn(problem)
    if entry is None:
        rec.decide("cache", {"hit": False}, "saved-parameters")
        return baseline
    record.cache.hit = True
    record.cache.entry = to_jsonable(entry)
    saved, hidden = _without_security(Plan(params=entry.params, provenance=entry.provenance))
    ignored = sorted(hidden & set(entry.params))
    if ignored:  # smartrun never saves these: the entry was edited; say so rather than drop them silently
        rec.warn(f"saved parameters for {key.model} carry security settings that are never saved, ignored: "
                 f"{', '.join(ignored)} (edited entry? `model smart-run-cache rm {key.model}` forgets it)")
    changes = tuple(Change(knob=k, value=v, reason=f"saved {entry.saved_at} ({entry.provenance.get(k, entry.source)})")
                    for k, v in sorted(saved.params.items()) if baseline.params.get(k, _MISSING) != v)
    # a plan the recovery ladder reached (e.g. utilization on the OOM floor) is proof this machine needs that
    # room: re-check it with the room the bounds grant recovery, or every run would OOM and recover again
    checked_as = "recovery" if entry.source == "recovery" else "cache"
    verdict = validate.check(bounds, baseline, Proposal(changes=changes, reason="saved parameters",
                                                        source=checked_as), fit_check=fit)
    rejected = [to_jsonable(r) for r in verdict.rejections]
    result.rejected.extend(rejected)
    if not verdict.accepted:
        record.cache.note = "saved plan no longer inside today's bounds; not used"
        rec.warn(f"saved parameters for {key.model} rejected by today's bounds: "
                 + "; ".join(f"{r['knob']}={r['value']!r} ({r['reason']})" for r in rejected))
        rec.decide("cache", {"hit": True, "accepted": False, "rejected": rejected}, "saved-parameters")
        return baseline
    plan = Plan(params=verdict.plan.params, source="cache", provenance={
        **verdict.plan.provenance, **{c.knob: f"cache: {c.reason}" for c in changes}}, reason="saved parameters")
    record.cache.note = "saved plan re-validated against today's bounds"
    result.debug_lines.append(f'source=cache reason="saved {entry.saved_at} ({entry.source}), re-validated against '
                              f'today\'s bounds" latency=0.00s tokens=0/0')
    rec.decide("cache", {"hit": True, "accepted": True, "params": plan.params}, "saved-parameters")
    return plan


_MISSING = object()


# ---------------------------------------------------------------------------- advisor


def _advise(ctx: RunContext) -> Plan:
    """The LLM's proposal through the validator; the baseline (source=static) when no LLM is configured."""
    request, sources, rec, result = ctx.request, ctx.sources, ctx.rec, ctx.result
    bounds, baseline, fit = ctx.bounds, ctx.baseline, ctx.fit
    hw, facts = result.hardware, result.facts
    assert bounds is not None and baseline is not None and hw is not None and facts is not None
    if sources.transport is None:
        if request.strict:
            from smartrun.errors import AdvisorError

            raise AdvisorError("--smart-run-strict: no LLM configured (set --llm-base-url or SMARTRUN_LLM_BASE_URL)")
        text = ("--smart-run: no LLM configured (set --llm-base-url or SMARTRUN_LLM_BASE_URL); "
                "using the baseline plan (source=static)")
        rec.warn(text)
        rec.record.advice.append(AdviceRecord(kind="propose", source="static", reason="no LLM configured",
                                              fallback="no LLM configured"))
        rec.decide("advice.propose", {"source": "static", "reason": "no LLM configured"}, "no-llm")
        result.debug_lines.append("source=static reason=no LLM configured")
        return baseline
    from smartrun import advisor, validate

    transport = RecordingTransport(sources.transport, rec, sources.monotonic)
    transport.kind = "propose"
    advice_context = _advice_context(request, bounds, baseline, ctx.base_estimate, hw, facts, attempts=())

    def check(proposal: Proposal) -> Any:
        return validate.check(bounds, baseline, proposal, fit_check=fit)

    advice = advisor.advise(advice_context, transport, check, kind="propose", strict=request.strict)
    return _take_advice(advice, rec, result, baseline, "propose")


def _llm_view(bounds: Any, plan: Plan) -> tuple[Any, Plan]:
    """Bounds and plan without security knobs (api key, host, ...): the LLM cannot change them and must
    not see their values (a served --api-key would otherwise go into the prompt)."""
    view_plan, hidden = _without_security(plan)
    view_bounds = bounds.model_copy(update={"knobs": {k: v for k, v in bounds.knobs.items() if k not in hidden}})
    return view_bounds, view_plan


def _without_security(plan: Plan) -> tuple[Plan, set[str]]:
    """The plan without security knobs, and the names removed."""
    from smartrun.knobs import CATALOGUE

    hidden = {name for name, k in CATALOGUE.items() if k.security}
    kept = Plan(params={k: v for k, v in plan.params.items() if k not in hidden}, source=plan.source,
                provenance={k: v for k, v in plan.provenance.items() if k not in hidden}, reason=plan.reason)
    return kept, hidden


def _advice_context(request: RunRequest, bounds: Any, base: Plan, estimate: Any, hw: HardwareSnapshot,
                    facts: ModelFacts, attempts: tuple[Any, ...] = (), failure: dict | None = None) -> Any:
    from smartrun import advisor

    bounds, base = _llm_view(bounds, base)
    attempts = tuple({**a, "params": _llm_view(bounds, Plan(params=a.get("params", {})))[1].params}
                     if isinstance(a, dict) else a for a in attempts)
    return advisor.AdviceContext(hardware=hw, model=facts, bounds=bounds, baseline=base, estimate=estimate,
                                 goal=request.goal, attempts=tuple(to_jsonable(a) for a in attempts),
                                 failure=to_jsonable(failure) if failure is not None else None)


def _take_advice(advice: Any, rec: Recorder, result: RunResult, base: Plan, kind: str) -> Plan:
    """Record what the advisor concluded (each proposal, its validation) and return its plan."""
    from smartrun import advisor

    plan = advice.plan if advice.plan is not None and advice.plan.source == "llm" else base  # the full base
    if advice.kept_baseline:  # the LLM's answer: no change. Said so, with its reason, not as source=llm
        plan = base.model_copy(update={"reason": advice.plan.reason})
    steps = [{"proposal": to_jsonable(ex.proposal), "ignored": list(ex.ignored),
              "rejections": [to_jsonable(r) for r in ex.rejections], "accepted": ex.accepted,
              "kept_baseline": ex.kept_baseline, "error": ex.error, "max_tokens": ex.max_tokens,
              "prompt_tokens_est": ex.prompt_tokens_est} for ex in advice.exchanges]
    rejections = [r for step in steps for r in step["rejections"]]
    result.rejected.extend(rejections)
    fallback = advice.fallback_reason
    last = next((step["proposal"] for step in reversed(steps) if step["proposal"] is not None), None)
    entry = AdviceRecord(kind=kind, source=str(plan.source), reason=str(plan.reason or fallback or ""),
                         proposal=last, rejections=rejections, accepted=plan.source == "llm" or advice.kept_baseline,
                         fallback=fallback, detail={"exchanges": steps, "latency_s": advice.latency_s,
                                                    "tokens": list(advice.tokens), "kept_baseline": advice.kept_baseline,
                                                    "budget_s": advice.budget_s, "spent_s": advice.spent_s})
    rec.record.advice.append(entry)
    result.advice.append(advice)
    result.debug_lines.append(advisor.debug_line(advice))
    if fallback:
        rec.warn(f"LLM advice not used ({kind}): {fallback}; using the {plan.source} plan")
    rec.decide(f"advice.{kind}", {"source": plan.source, "params": plan.params, "rejected": rejections,
                                  "ignored": [i for step in steps for i in step["ignored"]],
                                  "fallback": fallback}, entry.reason)
    return plan


# ---------------------------------------------------------------------------- launch


def _launch(ctx: RunContext) -> None:
    from smartrun import launch, validate
    from smartrun.errors import LaunchError

    request, sources, rec, result, on_event = ctx.request, ctx.sources, ctx.rec, ctx.result, ctx.on_event
    bounds, fit, key, version = ctx.bounds, ctx.fit, ctx.key, ctx.version
    passthrough, model_path = ctx.passthrough, ctx.model_path
    hw, facts, plan = result.hardware, result.facts, result.plan
    assert bounds is not None and key is not None and hw is not None and facts is not None and plan is not None

    launcher = RecordingLauncher(sources.launcher(request, hw, version, on_event), rec, sources.monotonic)

    def check(proposal: Proposal, base: Plan | None = None) -> Any:
        return validate.check(bounds, base or plan, proposal, fit_check=fit)

    advisor_recover = None
    if request.smart_run and sources.transport is not None:
        advisor_recover = _recover_advisor(request, sources, rec, result, bounds, hw, facts, check)

    try:
        report = launch.run_with_recovery(plan, bounds, launcher, check=check, advisor_recover=advisor_recover,
                                          max_attempts=request.max_attempts, on_event=_launch_events(rec),
                                          model_path=model_path, passthrough=passthrough)
    except LaunchError as err:
        report = getattr(err, "report", None)
        _record_final(rec, result, report, plan, facts, hw, version, healthy=False)
        raise
    server = report.server
    final = _record_final(rec, result, report, plan, facts, hw, version, healthy=True)
    try:
        _after_healthy(request, sources, rec, result, bounds, final, server, launcher, check, key, facts,
                       on_event, model_path, passthrough)
    except KeyboardInterrupt:  # Ctrl+C anywhere after the start: no vllm left behind
        if result.server is not None and not sources.replaying:
            result.server.stop()
        raise


def _after_healthy(request: RunRequest, sources: Sources, rec: Recorder, result: RunResult, bounds: Any,
                   final: Plan, server: Any, launcher: Any, check: Callable[..., Any], key: CacheKey,
                   facts: ModelFacts, on_event: EventSink, model_path: str, passthrough: tuple[str, ...]) -> None:
    """Tune (if asked), save the plan, print the final command, then supervise the server until it ends."""
    record = rec.record
    result.server = server
    if request.tune:
        launcher.phase = "tune"
        try:
            record.tuning, final, server = _tune_stage(request, sources, rec, result, bounds, final, server,
                                                       launcher, check, on_event, model_path, passthrough)
        finally:
            launcher.phase = "launch"
        result.server = server
        if record.launch_attempts:  # the server now runs the tuned plan: its command is the one to show
            from smartrun import launch

            last = record.launch_attempts[-1]
            result.argv = record.final_argv = last.argv
            result.command = launch.command_line(last.argv, last.env)
    _observe_startups(sources, rec, result, facts, result.hardware, record.vllm.get("version"))
    if request.smart_run:
        _store(sources, rec, key, final, facts, result)
    record.outcome = {"status": "running", "exit_code": 0}
    if not (sources.supervise and server is not None):
        on_event("ready", "final command: " + (result.command or " ".join(result.argv)))
        if server is not None and not sources.replaying:
            server.stop()
        record.outcome = {"status": "ok", "exit_code": 0}
        return
    if result.session_path:
        _write(record, result.session_path, sources)  # a long-running server still leaves its record now
    on_event("ready", "final command: " + (result.command or " ".join(result.argv)))
    code = server.wait()
    died = getattr(server, "failure", None)
    if died is not None:  # not a decision: replay does not supervise, so nothing is appended to decisions
        result.exit_code = 4
        record.outcome = {"status": "died", "exit_code": 4, "server_exit": code,
                          "message": f"vllm serve died after it was ready: {getattr(died, 'evidence', died)}"}
    else:
        record.outcome = {"status": "stopped", "exit_code": 0, "server_exit": code}


def _record_final(rec: Recorder, result: RunResult, report: Any, plan: Plan, facts: ModelFacts,
                  hw: HardwareSnapshot, version: str | None, healthy: bool) -> Plan:
    """The plan the launch stage ended on (healthy or not), its argv and estimate, as the `final` decision."""
    record = rec.record
    final = getattr(report, "plan", None) or plan
    result.launch_report = report
    result.plan = final
    record.final_plan = to_jsonable(final)
    argv = list(getattr(report, "argv", None) or (record.launch_attempts[-1].argv if record.launch_attempts else []))
    result.argv = record.final_argv = redact_argv(argv)
    result.command = redact_text(getattr(report, "command_line", "") or "", sources_secrets(rec))
    if final.params != plan.params:
        result.estimate = _estimate_for(final, facts, hw, version, result.calibration)
        record.estimate = to_jsonable(result.estimate)
    rec.decide("final", {"healthy": healthy, "source": final.source, "params": final.params},
               _provenance_line(final))
    return final


def sources_secrets(rec: Recorder) -> tuple[str, ...]:
    return rec.secrets


def _launch_events(rec: Recorder) -> Callable[..., None]:
    """The launch stage's one-line events: its warnings go on record; the rest to the CLI as progress.

    Its "to rerun by hand" line is left out: the pipeline prints the final command once, after any tuning.
    """
    def forward(*args: Any) -> None:
        text = " ".join(str(a) for a in args)
        if text.startswith("warning: "):
            rec.warn(text[len("warning: "):])
        elif not text.startswith("to rerun by hand:"):
            rec.on_event("launch", text)
    return forward


def _recover_advisor(request: RunRequest, sources: Sources, rec: Recorder, result: RunResult, bounds: Any,
                     hw: HardwareSnapshot, facts: ModelFacts, check: Callable[..., Any]) -> Callable[..., Any]:
    """The advisor's `recover` prompt as a callable for run_with_recovery: (plan, attempts) -> Plan | None."""
    from smartrun import advisor

    transport = RecordingTransport(sources.transport, rec, sources.monotonic)
    transport.kind = "recover"

    def recover(plan: Plan, attempts: tuple[Any, ...] = (), failure: Any = None, *_: Any) -> Plan | None:
        tried = tuple(_attempt_summary(a, rec.secrets) for a in attempts)
        context = _advice_context(request, bounds, plan, None, hw, facts, attempts=tried,
                                  failure=_failure_summary(failure, attempts, rec.secrets))
        advice = advisor.advise(context, transport, lambda p: check(p, plan), kind="recover", strict=False)
        taken = _take_advice(advice, rec, result, plan, "recover")
        if taken.source != "llm":
            return None
        # launch re-validates the change under source "llm", which prefixes "llm: " again: hand it the bare reason
        return taken.model_copy(update={"provenance": {k: v.removeprefix("llm: ") for k, v in taken.provenance.items()}})

    return recover


def _attempt_summary(attempt: Any, secrets: tuple[str, ...]) -> dict[str, Any]:
    """What the recover prompt sees of an earlier attempt: params, failure class, a short log excerpt."""
    return {"params": to_jsonable(getattr(attempt, "params", {})), "outcome": _attempt_outcome(attempt),
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


def _store(sources: Sources, rec: Recorder, key: CacheKey, plan: Plan, facts: ModelFacts,
           result: RunResult) -> None:
    saved, _ = _without_security(plan)  # never a served --api-key or other user-only security value on disk
    entry = CacheEntry(key=key, model_path=facts.path, params=to_jsonable(saved.params),
                       provenance=dict(saved.provenance), source=str(plan.source),
                       saved_at=rec.record.started_at,
                       session=str(result.session_path) if result.session_path else None)
    try:
        sources.cache.store(entry)
    except SmartRunError as err:
        rec.warn(f"saved parameters not stored: {err.message}")
        return
    rec.record.cache.stored = True
    rec.decide("cache.store", {"params": entry.params}, "healthy launch")


def _tune_stage(request: RunRequest, sources: Sources, rec: Recorder, result: RunResult, bounds: Any, plan: Plan,
                server: Any, launcher: Any, check: Callable[..., Any], on_event: EventSink, model_path: str,
                passthrough: tuple[str, ...]) -> tuple[dict[str, Any] | None, Plan, Any]:
    """--tune after a healthy launch: hand over to the tune stage (issue 10); keep what it chose."""
    hook = sources.tune
    if hook is None:
        from smartrun import tune

        hook = tune.tune_after_launch
    request = _probe_served_name(request, passthrough)
    outcome = hook(request=request, plan=plan, bounds=bounds, server=server, launcher=launcher, check=check,
                   facts=result.facts, hardware=result.hardware, transport=sources.transport, on_event=on_event,
                   model_path=model_path, passthrough=passthrough)
    report = getattr(outcome, "report", None)
    value = to_jsonable(report if report is not None else outcome)
    value = value if isinstance(value, dict) else {"result": value}
    chosen = getattr(report, "chosen", None)
    if isinstance(chosen, Plan):
        plan = chosen
        server = getattr(outcome, "server", server)
    elif isinstance(value.get("chosen"), dict):  # replayed: the recorded report
        plan = Plan.model_validate(value["chosen"])
    rec.decide("tune", {"chosen": plan.params, "source": plan.source}, str(value.get("stopped_because", "tune")))
    result.plan = plan
    rec.record.final_plan = to_jsonable(plan)
    return value, plan, server


def _probe_served_name(request: RunRequest, passthrough: tuple[str, ...]) -> RunRequest:
    """The tuner's probe asks for the served name (not whatever /v1/models happens to list first)."""
    from smartrun import launch

    name = launch.served_name(passthrough)
    probe = dict((request.tune_options or {}).get("probe") or {})
    if name is None or not request.tune_options or probe.get("model"):
        return request
    return request.model_copy(update={"tune_options": {**request.tune_options, "probe": {**probe, "model": name}}})


# ---------------------------------------------------------------------------- live sources


def live_sources(request: RunRequest, env: dict[str, str] | None = None,
                 config_path: str | None = None) -> Sources:
    """The real world: NVML or a snapshot, config.json, the bounds file, the LLM, `vllm serve`, the cache."""
    import os

    env = dict(os.environ if env is None else env)
    transport, llm_info, secrets = _live_transport(request, env, config_path)
    return Sources(
        hardware=lambda: _live_hardware(request),
        model=_live_model,
        bounds=lambda: _live_bounds(request),
        transport=transport,
        launcher=_live_launcher,
        cache=SavedParams(),
        vllm=lambda: _live_vllm(request),
        calibration=calibration_store(),
        llm_info=llm_info,
        secrets=request_secrets(request, env, secrets),
    )


def request_secrets(request: RunRequest, env: dict[str, str] | None = None, more: Any = ()) -> tuple[str, ...]:
    """Every secret of a run: values of secret flags before and after `--`, credential-like env vars, `more`."""
    found = (*more, *secret_values(request.user_args), *secret_values(request.extra_args, env))
    return tuple(dict.fromkeys(v for v in found if v))


def _live_hardware(request: RunRequest) -> HardwareSnapshot:
    """--hardware (once per node: a cluster), else the Ray cluster at --ray-address, else NVML here."""
    from smartrun import cluster, hardware

    if request.hardware_path:
        paths = (request.hardware_path, *request.more_hardware)
        return cluster.combine([hardware.load_snapshot(path) for path in paths])
    if request.ray_address:
        return cluster.detect_cluster(request.ray_address)
    return hardware.detect()


def _live_model(model: str) -> ModelFacts:
    from smartrun import model as model_mod

    return model_mod.inspect(model)


def _live_bounds(request: RunRequest) -> BoundsInput:
    """--bounds FILE, else smartrun.toml searched upward from the current directory, else the built-in default."""
    from smartrun import bounds

    if request.bounds_path:
        return _bounds_from_path(Path(request.bounds_path))
    found = bounds.find(Path.cwd())
    if found is not None:
        return _bounds_from_path(Path(found))
    return _builtin_bounds()


def _bounds_from_path(path: Path) -> BoundsInput:
    from smartrun import bounds

    text = bounds.read_text(path)
    return BoundsInput(path=str(path), text=text, loaded=bounds.load_text(text, str(path)))


def _builtin_bounds() -> BoundsInput:
    from smartrun import bounds

    text = bounds.BUILTIN_PATH.read_text(encoding="utf-8")
    return BoundsInput(path=None, text=text, loaded=bounds.load_text(text, bounds.BUILTIN_NAME), builtin=True)


def _live_transport(request: RunRequest, env: dict[str, str],
                    config_path: str | None) -> tuple[Any | None, dict[str, Any], list[str]]:
    if not request.smart_run:
        return None, {"configured": False}, []
    from smartrun import advisor

    settings = advisor.resolve_settings(request.llm_base_url, request.llm_model, request.llm_timeout, env,
                                        config_path)
    if settings is None:
        return None, {"configured": False}, []
    key = getattr(settings, "api_key", None)
    key_text = key.get_secret_value() if hasattr(key, "get_secret_value") else key
    info = {"configured": True, "base_url": getattr(settings, "base_url", None),
            "model": getattr(settings, "model", None), "timeout_s": getattr(settings, "timeout_s", None)}
    return advisor.OpenAITransport(settings), info, [key_text] if key_text else []


def _live_vllm(request: RunRequest) -> tuple[str | None, str | None]:
    """--vllm-version wins; else the installed vllm's version. A dry run plans without vllm installed."""
    if request.dry_run and request.vllm_version:
        return request.vllm_version, request.vllm_bin
    from smartrun import launch

    try:
        found = launch.find_vllm(request.vllm_bin)
    except SmartRunError:
        if request.dry_run:
            return request.vllm_version, request.vllm_bin
        raise
    return request.vllm_version or found.version, found.path


def check_vllm_flags(request: RunRequest, own: tuple[str, ...] = ()) -> None:
    """Refuse flags typed before `--` that the vLLM which will run does not accept (InputError, exit 2, with
    the nearest flag), before anything else happens; after `--` flags go to vllm unchecked.

    The flag list is the installed vllm's `serve --help=all` (the one --vllm-bin or PATH names); a dry run
    without it, or planning for another --vllm-version, uses the 0.33.0 list shipped with smartrun. A launch
    without vllm is left to fail on that (vllm not found), not on a flag.
    """
    from smartrun import argv, launch

    if not request.user_args:
        return
    try:
        found: launch.VllmInfo | None = launch.find_vllm(request.vllm_bin)
    except SmartRunError:
        found = None
    planned_other = request.dry_run and request.vllm_version and found and request.vllm_version != found.version
    if found is None or not found.flags or planned_other:
        if not request.dry_run and found is None:
            return
        found = launch.shipped_vllm_info()
        where = "vLLM 0.33.0 (the flag list shipped with smartrun; no vllm " + (
            f"{request.vllm_version} " if request.vllm_version and request.vllm_version != "0.33.0" else "") + \
            "installed)"
    else:
        where = f"vllm {found.version or '?'} ({found.path})"
    argv.refuse_unknown(request.user_args, found.flags, own, found.arity_of, where)


def _live_launcher(request: RunRequest, hw: HardwareSnapshot, version: str | None,
                   on_event: EventSink = _no_events) -> Any:
    """`vllm serve` as a child process; its log lines and startup phases go to the CLI's event sink."""
    from smartrun import launch

    return launch.ProcessLauncher(vllm_bin=request.vllm_bin, hardware=hw, host=request.host, port=request.port,
                                  startup_timeout=request.startup_timeout, ray_address=request.ray_address,
                                  printer=lambda line: on_event("vllm", line),
                                  progress=lambda text: on_event("phase", text))


# ---------------------------------------------------------------------------- replay


class _RecordedLLMError(SmartRunError):
    """Stands in for an LLM transport error whose class could not be re-created in replay."""


class ReplayTransport:
    """Serves the recorded LLM replies (or errors) in order; asking for more than was recorded diverges."""

    def __init__(self, exchanges: list[LLMExchangeRecord], budget_s: float | None = None):
        self._items: Iterator[LLMExchangeRecord] = iter(list(exchanges))
        if isinstance(budget_s, int | float) and budget_s > 0:
            self.budget_s = float(budget_s)  # the recorded --llm-timeout: the advisor charges the same times

    def complete(self, messages: Any, schema: Any = None, **_options: Any) -> Any:
        from smartrun import advisor
        from smartrun.errors import ReplayDivergence

        item = next(self._items, None)
        if item is None:
            raise ReplayDivergence("replay diverged: the pipeline asked the LLM more often than the record holds")
        if item.error is not None and item.reply is None:  # with a reply, the error is the advisor's verdict
            raise _rebuild_error(item.error)
        return _validated(advisor.LLMReply, item.reply, "llm_exchanges[].reply")


def _replayable_errors() -> dict[str, type[Exception]]:
    """The only errors a recorded LLM exchange may name: what the advisor's transport raises on purpose."""
    from smartrun import advisor, errors

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
        from smartrun import launch
        from smartrun.errors import ReplayDivergence

        item = next(self._items, None)
        if item is None:
            raise ReplayDivergence("replay diverged: the pipeline launched more often than the record holds")
        attempt = _validated(launch.LaunchAttempt, item.attempt, "launch_attempts[].attempt")
        return attempt, (ReplayServer() if item.healthy else None)


class RecordedCache:
    """The saved-parameters lookup as it was at record time; stores go nowhere."""

    def __init__(self, cache: CacheRecord):
        self.cache = cache

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        if self.cache.entry is None:
            return None
        return _validated(CacheEntry, self.cache.entry, "cache.entry")

    def store(self, entry: CacheEntry) -> None:
        return None


class RecordedCalibration:
    """The correction the record planned with (none in records older than calibration); stores go nowhere."""

    problems: list[str] = []

    def __init__(self, record: SessionRecord):
        self.used = record.calibration.used

    def correction(self, machine: str, vllm_version: str) -> Correction | None:
        return None if self.used is None else _validated(Correction, self.used, "calibration.used")

    def add(self, *_: Any) -> None:
        return None


def calibration_store() -> Any:
    """The user's calibration data (calibration.Store under the data dir)."""
    return calibration.Store()


def replay_sources(record: SessionRecord) -> Sources:
    """Sources that serve exactly what the record holds."""
    try:
        started = datetime.fromisoformat(record.started_at.replace("Z", "+00:00"))
    except ValueError:
        raise RecordError(f"session record: started_at {record.started_at!r} is not an ISO time") from None
    for key in ("version", "bin"):
        if not isinstance(record.vllm.get(key), str | None):
            raise RecordError(f"session record: vllm.{key} {record.vllm.get(key)!r} is not text")
    return Sources(
        hardware=lambda: _recorded(HardwareSnapshot, record.hardware, record),
        model=lambda _model: _recorded(ModelFacts, record.model, record),
        bounds=lambda: _recorded_bounds(record),
        transport=(ReplayTransport(record.llm_exchanges, record.llm.get("timeout_s"))
                   if record.llm.get("configured") else None),
        launcher=lambda *_: ReplayLauncher(record.launch_attempts),
        cache=RecordedCache(record.cache),
        vllm=lambda: (record.vllm.get("version"), record.vllm.get("bin")),
        clock=lambda: started,
        monotonic=lambda: 0.0,
        llm_info=dict(record.llm),
        tune=lambda **_: record.tuning or {},
        supervise=False,
        replaying=True,
        calibration=RecordedCalibration(record),
    )


def _recorded(cls: type, data: dict[str, Any] | None, record: SessionRecord) -> Any:
    if data is None:  # the recorded run failed before this stage: fail the same way
        raise _recorded_failure(record)
    return _validated(cls, data, cls.__name__)


def _validated(cls: Any, data: Any, what: str) -> Any:
    """A recorded part as its model; a hand-edited part that no longer fits is an InputError, not a traceback."""
    from pydantic import ValidationError

    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise RecordError(f"session record: {what} is invalid {validation_problem(err)}") from err


def _recorded_failure(record: SessionRecord) -> SmartRunError:
    from smartrun import errors

    cls = getattr(errors, str(record.outcome.get("error_type")), SmartRunError)
    if not (isinstance(cls, type) and issubclass(cls, SmartRunError)):
        cls = SmartRunError
    return cls(str(record.outcome.get("message", "recorded failure")))


def _recorded_bounds(record: SessionRecord) -> BoundsInput:
    """The recorded file text, loaded under its recorded name so `bounds:<file>:<line>` provenance matches."""
    from smartrun import bounds

    info = record.bounds_file
    if info is None:
        raise _recorded_failure(record)
    if not isinstance(info.get("text"), str) or not isinstance(info.get("path"), str | None):
        raise RecordError("session record: bounds_file needs its text (and path) as strings")
    name = bounds.BUILTIN_NAME if info.get("builtin") else info.get("path")
    return BoundsInput(path=info.get("path"), text=info["text"], loaded=bounds.load_text(info["text"], name),
                       builtin=bool(info.get("builtin")))


@dataclass
class ReplayResult:
    record: SessionRecord  # the original
    replayed: SessionRecord  # what the replay produced
    divergence: str | None = None
    result: RunResult | None = None
    error: SmartRunError | None = None


def replay(record: SessionRecord) -> ReplayResult:
    """Re-run the pipeline from the record's sources and compare every decision; ReplayDivergence on the first miss."""
    from smartrun.errors import ReplayDivergence

    request = _validated(RunRequest, record.request, "request")
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
    if out.error is not None and record.outcome.get("status") != "error":
        raise ReplayDivergence(f"replay failed where the record succeeded: {out.error.message}")
    return out
