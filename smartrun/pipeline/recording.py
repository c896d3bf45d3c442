"""Wrappers that put every LLM exchange and launch attempt on record as the run makes them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from smartrun import advisor
from smartrun.contracts import Plan
from smartrun.pipeline.context import Recorder
from smartrun.secrets import redact_argv, redact_env, redact_text, redact_tree
from smartrun.session import (
    LaunchAttemptRecord,
    LLMExchangeRecord,
    to_jsonable,
)


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
        entry = LLMExchangeRecord.model_validate({
            "kind": self.kind, "messages": to_jsonable(list(messages)),
            "schema": to_jsonable(schema) if schema is not None else None, "max_tokens": options.get("max_tokens")})
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
        entry.reply = reply
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
            entry.error = {"type": "smartrun.advisor.ReplyRejected", "message": advisor.rejection_text(exchange)}

    def _note_model(self) -> None:
        """The model name into the record once the transport knows it (discovered from /models)."""
        name = getattr(self.inner, "model_name", None)
        llm = self.recorder.record.llm
        if isinstance(name, str) and name and not llm.model:
            llm.model, llm.model_origin = name, "discovered from the server's /models"

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
        outcome = attempt_outcome(attempt)
        recorded = attempt.model_copy(update={  # the argv and env really used, redacted; the log's last lines
            "argv": tuple(redact_argv(argv)), "env_changes": redact_env(dict(env or {})),
            "log_excerpt": tuple(redact_text(str(x), self.recorder.secrets) for x in attempt.log_excerpt)[-40:],
            "duration_s": _recorded_latency_attr(attempt, "duration_s", self.monotonic() - started)})
        entry = LaunchAttemptRecord(number=number, phase=self.phase, healthy=server is not None, attempt=recorded)
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


def attempt_outcome(attempt: Any) -> str:
    """"ready", "interrupted", or the failure class vllm_log gave a failed start (e.g. "oom_cuda_graph")."""
    return str(getattr(attempt, "failure_class", None) or getattr(attempt, "outcome", None) or "unknown")
