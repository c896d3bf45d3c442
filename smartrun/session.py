"""Stage 8, record: session records and the replay comparison of their decisions.

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



# ---------------------------------------------------------------------------- paths and atomic writes


def sessions_dir() -> Path:
    return smartrun_home() / "sessions"


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
                f"decision {i + 1} ({old.step}): recorded {short(old.value)}, replay decided {short(new.value)}"
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


def short(value: Any, limit: int = 160) -> str:
    """A value as compact JSON, cut to `limit` characters (for one-line messages)."""
    text = json.dumps(to_jsonable(value), sort_keys=True)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def utc_iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
