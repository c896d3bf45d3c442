"""Stage 8, record: session records, replay comparison and the saved-parameters cache.

A session record says what a smart-run saw, asked, was answered, decided and what happened.
It is written for every `model run` (also on failure and dry-run) and is the input of
`session replay`, which re-runs the same pipeline code with recorded sources and compares the
ordered decisions. The schema is documented in docs/session-record.md; bump SCHEMA_VERSION on
any incompatible change.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from smartrun import fileio
from smartrun.errors import InputError, ReplayDivergence
from smartrun.fileio import smartrun_home, write_user_file
from smartrun.secrets import redact_tree


class RecordError(InputError):
    """A session record (or a part of it) that cannot be read back; names the file or the part."""


SCHEMA_VERSION = 1
CACHE_SCHEMA_VERSION = 1



# ---------------------------------------------------------------------------- paths and atomic writes


def sessions_dir() -> Path:
    return smartrun_home() / "sessions"


def cache_dir() -> Path:
    return smartrun_home() / "smart-run-cache"


def validation_problem(err: ValidationError) -> str:
    """pydantic's first problem as `at <field path>: <message>`, for one-line errors about hand-edited records."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top)"
    return f"at {where}: {first['msg']}"


def to_jsonable(value: Any) -> Any:
    """Plain JSON types (tuples become lists, models become dicts) so recorded and replayed values compare."""
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=_json_default, sort_keys=True))


def _json_default(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


# ---------------------------------------------------------------------------- the record


class RecordModel(BaseModel):
    """Record parts: plain data, unknown keys refused so a typo in a hand-edited record is caught."""

    model_config = ConfigDict(extra="forbid")


class Decision(RecordModel):
    """One step the pipeline decided; replay compares `step` and `value` (and provenance) in order."""

    step: str
    value: Any = None
    provenance: str = ""


class LLMExchangeRecord(RecordModel):
    """One call of the LLM transport: what was sent, what came back (or the error), and how long it took."""

    kind: str = "propose"  # "propose" | "recover" (as the advisor was called)
    messages: list[dict[str, Any]] = Field(default_factory=list)
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    reply: dict[str, Any] | None = None  # the transport's LLMReply (model, finish_reason, tokens...), as JSON
    # {"type": class path, "message": ...}: the call raised (no reply), or the advisor did not use the reply
    # (cut off, no JSON, rejected by the bounds...; type smartrun.advisor.ReplyRejected)
    error: dict[str, str] | None = None
    latency_s: float | None = None
    tokens: dict[str, int] | None = None
    max_tokens: int | None = None  # the reply's cap the request carried
    accepted: bool | None = None  # whether the advisor used the reply (None: not judged, e.g. a tune step)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AdviceRecord(RecordModel):
    """What the advisor made of its exchanges: parsed proposal, validation result, fallback reason."""

    kind: str = "propose"
    source: str = "static"
    reason: str = ""
    proposal: Any = None
    rejections: list[Any] = Field(default_factory=list)
    accepted: bool = False
    fallback: str | None = None
    detail: dict[str, Any] = Field(default_factory=dict)


class LaunchAttemptRecord(RecordModel):
    """One `vllm serve` start: argv, env changes, classified outcome, log excerpt, duration."""

    number: int
    phase: str = "launch"  # "launch" (start and recovery: decisions) or "tune" (restarts while tuning)
    argv: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    outcome: str = ""  # "ready" or a failure class
    healthy: bool = False
    log_excerpt: list[str] = Field(default_factory=list)
    duration_s: float | None = None
    attempt: dict[str, Any] = Field(default_factory=dict)  # the launcher's LaunchAttempt, as JSON (replayed)


class CacheRecord(RecordModel):
    """The saved-parameters lookup: key, whether it hit, and the entry used (replayed as recorded)."""

    key: dict[str, Any] = Field(default_factory=dict)
    looked_up: bool = False
    hit: bool = False
    entry: dict[str, Any] | None = None
    note: str | None = None
    stored: bool = False


class CalibrationRecord(RecordModel):
    """Calibration in this session: the correction the plan was made with and what the healthy starts measured."""

    used: dict[str, Any] | None = None  # calibration.Correction the estimates used (replay uses this one)
    observations: list[dict[str, Any]] = Field(default_factory=list)  # calibration.Observation per healthy start
    stored: bool = False  # the observations went into the calibration data
    note: str | None = None


class SessionRecord(RecordModel):
    """Everything one `model run` saw, asked, decided and what happened. See docs/session-record.md."""

    schema_version: int = SCHEMA_VERSION
    tool_version: str
    started_at: str
    finished_at: str | None = None
    command_line: list[str] = Field(default_factory=list)
    request: dict[str, Any] = Field(default_factory=dict)  # the RunRequest (redacted), the replay input
    llm: dict[str, Any] = Field(default_factory=dict)  # {"configured", "base_url", "model"}; never a key
    vllm: dict[str, Any] = Field(default_factory=dict)  # {"version", "bin"}
    hardware: dict[str, Any] | None = None  # HardwareSnapshot
    model: dict[str, Any] | None = None  # ModelFacts
    bounds_file: dict[str, Any] | None = None  # {"path", "text", "sha256", "builtin"}
    bounds: dict[str, Any] | None = None  # Bounds.to_json() with sources
    baseline: dict[str, Any] | None = None  # Plan
    baseline_estimate: dict[str, Any] | None = None
    cache: CacheRecord = Field(default_factory=CacheRecord)
    llm_exchanges: list[LLMExchangeRecord] = Field(default_factory=list)
    advice: list[AdviceRecord] = Field(default_factory=list)
    launch_attempts: list[LaunchAttemptRecord] = Field(default_factory=list)
    final_plan: dict[str, Any] | None = None
    final_argv: list[str] | None = None
    estimate: dict[str, Any] | None = None
    tuning: dict[str, Any] | None = None  # filled by the tune stage (issue 10) when --tune ran
    calibration: CalibrationRecord = Field(default_factory=CalibrationRecord)  # absent in older records
    outcome: dict[str, Any] = Field(default_factory=dict)  # {"status", "exit_code", "message"}
    warnings: list[str] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)


def default_session_path(started_at: datetime, model_name: str) -> Path:
    """sessions/<UTC timestamp>-<model>.json, the model name made filename-safe."""
    stamp = started_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_name.strip("/").replace("/", "--"))[:80] or "model"
    return sessions_dir() / f"{stamp}-{safe}.json"


def dump_record(record: SessionRecord, secrets: Iterable[str] = ()) -> str:
    """The record as JSON text, with every known secret value and key-like token redacted (in every string)."""
    data = redact_tree(record.model_dump(mode="json", by_alias=True), tuple(secrets))
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def write_record(record: SessionRecord, path: Path, secrets: Iterable[str] = ()) -> Path:
    write_user_file(path, dump_record(record, secrets))
    return path


def load_record(path: str | Path) -> SessionRecord:
    """Read a session record; InputError names the file and what is wrong with it."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise InputError(f"{path}: no such session record")
    try:
        raw = fileio.read_bytes(path, error=InputError)  # a FIFO, /dev/zero, a directory: one line, no hang
    except InputError as err:
        raise InputError(f"{err.message} (session record)") from None
    try:
        data = fileio.parse_json(raw, str(path), InputError, allow_nonfinite=True)
    except InputError as err:
        raise InputError(f"{err.message} (session record)") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: a session record is a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise InputError(f"{path}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    try:
        return SessionRecord.model_validate(data)
    except ValidationError as err:
        raise InputError(f"{path}: invalid session record {validation_problem(err)}") from err


def list_sessions(directory: Path | None = None, limit: int = 20,
                  include_dry_runs: bool = True) -> list[tuple[Path, SessionRecord | str]]:
    """Newest first; an unreadable file comes back with its error text instead of a record.

    Without `include_dry_runs`, records of dry runs are skipped (they are many and launched nothing) and
    the `limit` newest of the rest are returned.
    """
    directory = directory or sessions_dir()
    if directory.exists() and not directory.is_dir():
        raise InputError(f"{directory}: not a directory (sessions are kept in a folder of that name)")
    if not directory.is_dir():
        return []
    out: list[tuple[Path, SessionRecord | str]] = []
    for path in sorted(directory.glob("*.json"), key=lambda p: p.name, reverse=True):
        if len(out) >= limit:
            break
        try:
            record: SessionRecord | str = load_record(path)
        except InputError as err:
            record = err.message
        if not include_dry_runs and is_dry_run(record):
            continue
        out.append((path, record))
    return out


def is_dry_run(record: SessionRecord | str) -> bool:
    """A record of a `--dry-run` (whatever its outcome: a dry run that failed launched nothing either)."""
    return not isinstance(record, str) and bool(record.request.get("dry_run"))


# ---------------------------------------------------------------------------- replay comparison


def first_divergence(recorded: list[Decision], replayed: list[Decision]) -> str | None:
    """The first decision that differs (step, value or provenance), as one line; None when all match."""
    for i, (old, new) in enumerate(zip(recorded, replayed, strict=False)):
        if old.step != new.step:
            error = f" ({new.value.get('message')})" if new.step == "error" and isinstance(new.value, dict) else ""
            return f"decision {i + 1}: recorded step {old.step!r}, replay reached {new.step!r}{error}"
        if to_jsonable(old.value) != to_jsonable(new.value):
            return (
                f"decision {i + 1} ({old.step}): recorded {_short(old.value)}, replay decided {_short(new.value)}"
            )
        if old.provenance != new.provenance:
            return f"decision {i + 1} ({old.step}): provenance recorded {old.provenance!r}, replay {new.provenance!r}"
    if len(recorded) != len(replayed):
        if len(recorded) > len(replayed):
            missing = recorded[len(replayed)]
            return f"decision {len(replayed) + 1} ({missing.step}): recorded but replay stopped before it"
        extra = replayed[len(recorded)]
        return f"decision {len(recorded) + 1} ({extra.step}): replay went on past the end of the record"
    return None


def check_replay(recorded: list[Decision], replayed: list[Decision]) -> None:
    """Raise ReplayDivergence naming the first differing decision."""
    divergence = first_divergence(recorded, replayed)
    if divergence:
        raise ReplayDivergence(f"replay diverged at {divergence}")


def _short(value: Any, limit: int = 160) -> str:
    text = json.dumps(to_jsonable(value), sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------------------- timeline


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
        lines.append(f"  {i:>2}. {d.step:<16} {_short(d.value, 90)}" + (f"  <- {why}" if why else ""))
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


# ---------------------------------------------------------------------------- saved-parameters cache


class CacheKey(BaseModel):
    """What a saved plan depends on: the model, the machine, the bounds file and the vLLM version."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str
    hardware_fingerprint: str
    bounds_sha256: str
    vllm_version: str | None = None
    goal: str = "stable"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.model_dump(), sort_keys=True).encode()).hexdigest()[:24]


class CacheEntry(BaseModel):
    """A plan that started healthy, saved for next time (re-validated against today's bounds before use)."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = CACHE_SCHEMA_VERSION
    key: CacheKey
    model_path: str | None = None
    params: dict[str, Any]
    provenance: dict[str, str] = Field(default_factory=dict)
    source: str = "static"  # where the saved plan came from originally
    saved_at: str
    session: str | None = None


class SavedParams:
    """The saved-parameters cache: one JSON file per key under cache_dir(); corrupt entries are skipped."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or cache_dir()
        self.problems: list[str] = []  # corrupt entries found by the last lookup/list, one line each

    def _path(self, key: CacheKey) -> Path:
        return self.directory / f"{key.digest()}.json"

    def lookup(self, key: CacheKey) -> CacheEntry | None:
        self.problems = []
        path = self._path(key)
        if not path.exists():
            return None
        entry = self._read(path)
        return entry if entry is not None and entry.key == key else None

    def store(self, entry: CacheEntry) -> Path:
        path = self._path(entry.key)
        write_user_file(path, json.dumps(entry.model_dump(mode="json"), indent=2, sort_keys=True) + "\n")
        return path

    def entries(self, model: str | None = None) -> list[tuple[Path, CacheEntry]]:
        self.problems = []
        if self.directory.exists() and not self.directory.is_dir():
            self.problems.append(f"{self.directory}: not a directory, so no parameters can be saved there")
            return []
        if not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            entry = self._read(path)
            if entry is not None and (model is None or _model_matches(entry, model)):
                found.append((path, entry))
        return found

    def remove(self, model: str) -> list[Path]:
        removed = []
        for path, _entry in self.entries(model):
            try:
                path.unlink(missing_ok=True)
            except OSError as err:
                raise InputError(f"{path}: cannot remove ({err.strerror or err})") from err
            removed.append(path)
        return removed

    def _read(self, path: Path) -> CacheEntry | None:
        try:
            return CacheEntry.model_validate(fileio.loads_json(fileio.read_bytes(path, 1 << 20)))
        except (OSError, UnicodeDecodeError, ValidationError, ValueError, RecursionError, InputError) as err:
            detail = err.errors()[0]["msg"] if isinstance(err, ValidationError) else str(err)
            self.problems.append(f"{path}: corrupt smart-run cache entry skipped ({detail})")
            return None


def _model_matches(entry: CacheEntry, model: str) -> bool:
    candidates = {entry.key.model, entry.model_path or ""}
    if model in candidates:
        return True
    try:
        resolved = str(Path(model).expanduser().resolve())
    except OSError:
        return False
    return resolved == entry.model_path or Path(model.rstrip("/")).name == entry.key.model


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
