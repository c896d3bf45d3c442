"""Stage 8, record: session records and the replay comparison of their decisions.

A session record says what a smart-run saw, asked, was answered, decided and what happened.
It is written for every `model run` (also on failure and dry-run) and is the input of
`session replay`, which re-runs the same pipeline code with recorded sources and compares the
ordered decisions. The schema is documented in docs/session-record.md; bump SCHEMA_VERSION on
any incompatible change.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from smartrun import fileio
from smartrun.advisor.transport import LLMReply
from smartrun.calibration import Observation
from smartrun.contracts import Bounds, Plan, Proposal, Rejection
from smartrun.errors import InputError, ReplayDivergence
from smartrun.fileio import smartrun_home, write_user_file
from smartrun.hardware import HardwareSnapshot
from smartrun.launch.process import LaunchAttempt
from smartrun.memory import Correction, MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.plan_cache import CacheEntry, CacheKey
from smartrun.request import RunRequest
from smartrun.secrets import redact_tree
from smartrun.tune.report import TuningReport


class RecordError(InputError):
    """A session record (or a part of it) that cannot be read back; names the file or the part."""


SCHEMA_VERSION = 2  # 2: the stage models themselves; 1 is migrated on load (`migrate`)


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
    reply: LLMReply | None = None  # what the transport returned (replay serves it back)
    # {"type": class path, "message": ...}: the call raised (no reply), or the advisor did not use the reply
    # (cut off, no JSON, rejected by the bounds...; type smartrun.advisor.ReplyRejected)
    error: dict[str, str] | None = None
    latency_s: float | None = None
    tokens: dict[str, int] | None = None
    max_tokens: int | None = None  # the reply's cap the request carried
    accepted: bool | None = None  # whether the advisor used the reply (None: not judged, e.g. a tune step)

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class AdviceStep(RecordModel):
    """What became of one reply of an advisor call (its messages and the reply itself are in llm_exchanges)."""

    proposal: Proposal | None = None  # as parsed from the reply; None when it held none
    ignored: list[str] = Field(default_factory=list)  # keys of the reply the advisor does not use
    rejections: list[Rejection] = Field(default_factory=list)  # the changes the validator refused
    accepted: bool = False
    kept_baseline: bool = False  # the reply changed nothing: the baseline stands, with its reason
    error: str | None = None  # why the reply could not be used (cut off, no JSON...)
    max_tokens: int | None = None
    prompt_tokens_est: int | None = None


class AdviceRecord(RecordModel):
    """One advisor call: the source and reason of the plan it returned, each reply's fate, the fallback, the cost."""

    kind: str = "propose"
    source: str = "static"
    reason: str = ""
    accepted: bool = False
    fallback: str | None = None
    steps: list[AdviceStep] = Field(default_factory=list)
    kept_baseline: bool = False
    latency_s: float | None = None
    tokens: list[int] = Field(default_factory=list)  # prompt, completion
    budget_s: float | None = None  # --llm-timeout: the whole decision's budget
    spent_s: float | None = None

    @property
    def proposal(self) -> Proposal | None:
        """The last proposal parsed (the one accepted, when one was)."""
        return next((s.proposal for s in reversed(self.steps) if s.proposal is not None), None)

    @property
    def rejections(self) -> list[Rejection]:
        return [r for step in self.steps for r in step.rejections]


class LaunchAttemptRecord(RecordModel):
    """One `vllm serve` start: the launcher's LaunchAttempt (argv and env really used, outcome, log excerpt,
    duration; redacted, replayed as is), numbered in the order of the whole run, with its phase."""

    number: int
    phase: str = "launch"  # "launch" (start and recovery: decisions) or "tune" (restarts while tuning)
    healthy: bool = False
    attempt: LaunchAttempt

    @property
    def argv(self) -> list[str]:
        return list(self.attempt.argv)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.attempt.env_changes)

    @property
    def outcome(self) -> str:
        """"ready", "interrupted", or the failure class vllm_log gave a failed start (e.g. "oom_cuda_graph")."""
        return self.attempt.failure_class or self.attempt.outcome


class CacheRecord(RecordModel):
    """The saved-parameters lookup: key, whether it hit, and the entry used (replayed as recorded)."""

    key: CacheKey | None = None
    looked_up: bool = False
    hit: bool = False
    entry: CacheEntry | None = None
    note: str | None = None
    stored: bool = False


class CalibrationRecord(RecordModel):
    """Calibration in this session: the correction the plan was made with and what the healthy starts measured."""

    used: Correction | None = None  # the correction the estimates used (replay uses this one)
    observations: list[Observation] = Field(default_factory=list)  # one per healthy start
    stored: bool = False  # the observations went into the calibration data
    note: str | None = None


class LLMInfo(RecordModel):
    """The LLM the run was configured with; never its key."""

    configured: bool = False
    base_url: str | None = None
    model: str | None = None
    model_origin: str | None = None  # said when the model name was discovered from the server's /models
    timeout_s: float | None = None  # --llm-timeout: one decision's budget, which replay charges the recorded times


class VllmRecord(RecordModel):
    """The vLLM version planned for and the binary used (None: not known / not found)."""

    version: str | None = None
    bin: str | None = None


class BoundsFileRecord(RecordModel):
    """The bounds file as read, whole, so replay does not need it on disk (path None: the built-in one)."""

    path: str | None = None
    text: str
    sha256: str
    builtin: bool = False


class Outcome(RecordModel):
    """How the run ended: status "dry-run" | "ok" | "running" | "stopped" | "died" | "error" | "interrupted"."""

    status: str | None = None  # None while the run is still going
    exit_code: int | None = None
    message: str | None = None
    error_type: str | None = None  # the SmartRunError class that ended the run (replay raises the same)
    server_exit: int | None = None  # the exit status of a supervised vllm serve

    def summary(self) -> dict[str, Any]:
        """The fields that are set, as `--json` answers print the outcome."""
        return self.model_dump(exclude_none=True)


class SessionRecord(RecordModel):
    """Everything one `model run` saw, asked, decided and what happened. See docs/session-record.md.

    Each stage's result is stored as the stage's own model, so a record loads back with pydantic alone;
    records of older schemas are brought up to this one by `migrate` before validation.
    """

    schema_version: int = SCHEMA_VERSION
    tool_version: str
    started_at: str
    finished_at: str | None = None
    command_line: list[str] = Field(default_factory=list)
    request: RunRequest | None = None  # redacted; the replay input (None only in a hand-made record)
    llm: LLMInfo = Field(default_factory=LLMInfo)
    vllm: VllmRecord = Field(default_factory=VllmRecord)
    hardware: HardwareSnapshot | None = None  # as detected (before --gpus / CUDA_VISIBLE_DEVICES)
    model: ModelFacts | None = None
    bounds_file: BoundsFileRecord | None = None
    bounds: Bounds | None = None  # the effective bounds, with the sources of every limit
    baseline: Plan | None = None
    baseline_estimate: MemoryEstimate | None = None
    cache: CacheRecord = Field(default_factory=CacheRecord)
    llm_exchanges: list[LLMExchangeRecord] = Field(default_factory=list)
    advice: list[AdviceRecord] = Field(default_factory=list)
    launch_attempts: list[LaunchAttemptRecord] = Field(default_factory=list)
    final_plan: Plan | None = None
    final_argv: list[str] | None = None
    estimate: MemoryEstimate | None = None
    tuning: TuningReport | None = None  # the tune stage's report when --tune ran
    calibration: CalibrationRecord = Field(default_factory=CalibrationRecord)
    outcome: Outcome = Field(default_factory=Outcome)
    warnings: list[str] = Field(default_factory=list)
    decisions: list[Decision] = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _older_schemas(cls, data: Any) -> Any:
        return migrate(data) if isinstance(data, dict) else data


# ---------------------------------------------------------------------------- older schemas


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A schema-1 record's JSON in schema 2's shape (other versions are returned as they are).

    Schema 1 kept `bounds` as `Bounds.to_json()` (per knob: limits and sources, no knob name, no goal),
    each launch attempt's argv, env, outcome, log excerpt and duration twice (beside the attempt and in
    it) and each advisor call's last proposal and rejections twice (beside its `detail` and in it).
    Everything else already had the shape of the stage models. A part that cannot be converted is left
    as it is, so validation names it.
    """
    if data.get("schema_version") != 1:
        return data
    data = {**data, "schema_version": SCHEMA_VERSION}
    bounds, request = data.get("bounds"), data.get("request")
    if isinstance(bounds, dict):
        goal = request.get("goal", "stable") if isinstance(request, dict) else "stable"
        with contextlib.suppress(ValidationError, TypeError):
            data["bounds"] = Bounds.from_json(bounds, goal).model_dump(mode="json")
    if not data.get("request"):  # schema 1 defaulted the request to {}
        data.pop("request", None)
    if isinstance(data.get("cache"), dict) and data["cache"].get("key") == {}:
        data["cache"] = {**data["cache"], "key": None}
    attempts = data.get("launch_attempts")
    if isinstance(attempts, list):
        data["launch_attempts"] = [_attempt_v2(a) if isinstance(a, dict) else a for a in attempts]
    advice = data.get("advice")
    if isinstance(advice, list):
        data["advice"] = [_advice_v2(a) if isinstance(a, dict) else a for a in advice]
    return data


def _advice_v2(old: dict[str, Any]) -> dict[str, Any]:
    """One schema-1 advisor call: its `detail` (each reply's fate, the cost) becomes the record's own fields;
    the last proposal and all rejections, which schema 1 also kept beside it, are read from the steps."""
    new = {k: v for k, v in old.items() if k not in ("proposal", "rejections", "detail")}
    detail: dict[str, Any] = old["detail"] if isinstance(old.get("detail"), dict) else {}
    steps = detail.get("exchanges")
    if steps is None and (old.get("proposal") is not None or old.get("rejections")):  # no detail: one step
        steps = [{"proposal": old.get("proposal"), "rejections": old.get("rejections") or []}]
    new["steps"] = steps or []
    new.update({k: detail[k] for k in ("kept_baseline", "latency_s", "tokens", "budget_s", "spent_s") if k in detail})
    return new


def _attempt_v2(old: dict[str, Any]) -> dict[str, Any]:
    """One schema-1 launch attempt: the recorded argv, env, excerpt and duration go into the attempt (they
    are what the record showed and replay served); an attempt recorded empty is rebuilt from them."""
    attempt = dict(old.get("attempt") or {})
    moved = {"argv": "argv", "env": "env_changes", "log_excerpt": "log_excerpt", "duration_s": "duration_s"}
    for was, now in moved.items():
        if old.get(was) is not None:
            attempt[now] = old[was]
    if "outcome" not in attempt:  # schema 1's own `outcome` is the failure class, or "ready"
        outcome = str(old.get("outcome") or "")
        attempt["outcome"] = outcome if outcome in ("ready", "interrupted") else "failed"
        if attempt["outcome"] == "failed":
            attempt["failure_class"] = outcome or None
    attempt.setdefault("number", old.get("number", 0))
    return {"number": old.get("number"), "phase": old.get("phase", "launch"), "healthy": old.get("healthy", False),
            "attempt": attempt}


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
    if version not in (1, SCHEMA_VERSION):  # schema 1 is migrated by SessionRecord's validator
        raise InputError(f"{path}: schema_version {version!r} is not supported (this smartrun reads 1 and "
                         f"{SCHEMA_VERSION})")
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
    return not isinstance(record, str) and record.request is not None and record.request.dry_run


# ---------------------------------------------------------------------------- replay comparison


def _first_difference(old: Any, new: Any, where: str = "") -> tuple[str, Any, Any]:
    """The path of the first differing part of two JSON values (keys sorted), and the two parts there: a
    one-line message shows what differs, not the start of two long values cut at the same place."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if key not in old or key not in new or old[key] != new[key]:
                if key in old and key in new:
                    return _first_difference(old[key], new[key], f"{where}.{key}" if where else str(key))
                return where, old, new
    if isinstance(old, list) and isinstance(new, list):
        n = next((n for n, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        if len(old) == len(new):
            return _first_difference(old[n], new[n], f"{where}[{n}]")
        return f"{where}[{n}:]", old[n:], new[n:]  # the common start left out
    return where, old, new


def first_divergence(recorded: list[Decision], replayed: list[Decision]) -> str | None:
    """The first decision that differs (step, value or provenance), as one line; None when all match."""
    for i, (old, new) in enumerate(zip(recorded, replayed, strict=False)):
        if old.step != new.step:
            error = f" ({new.value.get('message')})" if new.step == "error" and isinstance(new.value, dict) else ""
            return f"decision {i + 1}: recorded step {old.step!r}, replay reached {new.step!r}{error}"
        if to_jsonable(old.value) != to_jsonable(new.value):
            where, was, now = _first_difference(to_jsonable(old.value), to_jsonable(new.value))
            named = f"{where} = " if where else ""
            return f"decision {i + 1} ({old.step}): recorded {named}{short(was)}, replay decided {short(now)}"
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
