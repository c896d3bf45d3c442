"""Stage 5, advise: an LLM proposes knob changes inside the hard bounds; the validator is the only gate.

Any OpenAI-compatible endpoint will do (OpenAI, DeepSeek, a local vLLM, Ollama, llama.cpp). The reply is
data: knobs the LLM may not change are dropped and reported, the rest goes through `check` (a closure over
validate.check), rejected proposals are sent back for repair at most `max_repairs` times, and after that
the baseline is used (or AdvisorError under --smart-run-strict). Nothing in a reply is ever executed.
API keys live only in LLMSettings.api_key (SecretStr) and the client; never in prompts, errors or records.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StrictBool,
    ValidationError,
    create_model,
    field_validator,
)

from smartrun.contracts import Bounds, Change, KnobBound, Plan, Proposal, Rejection, Verdict
from smartrun.deadline import within
from smartrun.errors import AdvisorError, InputError, SmartRunError
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.knobs import CATALOGUE
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "sk-no-key-needed"  # what a key-less local server gets: the client insists on some key
MAX_REPLY_CHARS = 200_000  # a longer reply is refused unparsed
LOG_EXCERPT_CHARS = 1_000  # the tail of vLLM's log the recover prompt quotes
DEFAULT_BUDGET_S = 60.0  # --llm-timeout: seconds for one whole decision (every request, retry and repair)
CONNECT_TIMEOUT_S = 10.0  # a connect that takes longer is retried (inside the budget): nothing was sent
REASON_CHARS = 32  # the longest reason of one change the schema allows (a few words: each costs tokens)
SUMMARY_CHARS = 80  # the longest reason of the whole reply
FLOAT_STEP = 0.01  # fractions are offered on this grid (an enum every server enforces, unlike a float's min/max)
AdviceKind = Literal["propose", "recover"]


# ---------------------------------------------------------------------------- errors


class LLMUnavailable(AdvisorError):
    """The endpoint gave no usable completion (after retries, or a refusal that retrying cannot fix)."""


class ReplyParseError(AdvisorError):
    """The reply holds no JSON object of the expected shape (empty, truncated, prose only)."""


# ---------------------------------------------------------------------------- settings


class LLMSettings(Frozen):
    """Where the advisor's LLM lives. `model=""` means: ask the server (/models) and take its first model."""

    base_url: str
    model: str = ""
    api_key: SecretStr | None = None  # None = key-less server (a dummy key is sent)
    timeout_s: float = Field(default=DEFAULT_BUDGET_S, gt=0)  # the whole budget of one decision (--llm-timeout)
    max_attempts: int = Field(default=4, ge=1)  # HTTP tries per exchange, inside the budget
    origin: dict[str, str] = Field(default_factory=dict)  # field -> "cli" | "env:NAME" | "file:PATH"


def default_config_path() -> Path:
    from platformdirs import user_config_dir

    return Path(user_config_dir("localaistack")) / "config.toml"


def _read_llm_table(path: Path) -> dict[str, Any]:
    """The [llm] table of the user config file; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    from smartrun import fileio

    try:
        data = tomllib.loads(fileio.read_text(path, 1 << 20))  # regular file, size-capped: no FIFO hang
    except InputError as err:
        raise InputError(f"cannot read LLM settings: {err.message}") from None
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as err:
        raise InputError(f"{path}: cannot read LLM settings: {err}") from None
    table = data.get("llm", {})
    if not isinstance(table, dict):
        raise InputError(f"{path}: [llm] must be a table")
    unknown = sorted(set(table) - {"base_url", "model", "api_key", "timeout"})
    if unknown:
        raise InputError(f"{path}: [llm] has unknown keys {unknown} (known: base_url, model, api_key, timeout)")
    for key in ("base_url", "model", "api_key"):
        if key in table and not isinstance(table[key], str):
            raise InputError(f"{path}: [llm] {key} must be a string")  # the value may be a key: not shown
    return table


def _first(*candidates: tuple[Any, str]) -> tuple[Any, str | None]:
    """The first (value, origin) whose value is set."""
    for value, origin in candidates:
        if value not in (None, ""):
            return value, origin
    return None, None


def _timeout(value: Any, origin: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise InputError(f"LLM timeout from {origin} must be a positive number of seconds, got {value!r}")
    return seconds


def _base_url(value: Any, origin: str) -> str:
    """An http(s) URL, or InputError now: a typo is bad input, not an endpoint to retry for seconds."""
    from urllib.parse import urlsplit

    text = str(value).strip().rstrip("/")
    try:
        parts = urlsplit(text)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:
        ok = False
    if not ok:
        raise InputError(f"LLM base URL from {origin} must be an http(s) URL like http://host:port/v1, "
                         f"got {shown_url(text)!r}")
    return text


def resolve_settings(
    cli_base_url: str | None = None,
    cli_model: str | None = None,
    cli_timeout: float | None = None,
    env: Mapping[str, str] = os.environ,
    config_path: str | Path | None = None,
) -> LLMSettings | None:
    """CLI > environment > [llm] in the user config file, field by field. None when no LLM is configured."""
    path = Path(config_path) if config_path is not None else default_config_path()
    table = _read_llm_table(path)
    file_origin = f"file:{path}"
    base_url, base_origin = _first(
        (cli_base_url, "cli"),
        (env.get("SMARTRUN_LLM_BASE_URL"), "env:SMARTRUN_LLM_BASE_URL"),
        (env.get("OPENAI_BASE_URL"), "env:OPENAI_BASE_URL"),
        (table.get("base_url"), file_origin),
    )
    model, model_origin = _first(
        (cli_model, "cli"), (env.get("SMARTRUN_LLM_MODEL"), "env:SMARTRUN_LLM_MODEL"), (table.get("model"), file_origin)
    )
    if base_url is None and model is None:
        return None
    if base_url is None:
        base_url, base_origin = DEFAULT_OPENAI_BASE_URL, "default"
    key, key_origin = _first(
        (env.get("SMARTRUN_LLM_API_KEY"), "env:SMARTRUN_LLM_API_KEY"),
        (env.get("OPENAI_API_KEY"), "env:OPENAI_API_KEY"),
        (table.get("api_key"), file_origin),
    )
    timeout, timeout_origin = _first(
        (cli_timeout, "cli"), (env.get("SMARTRUN_LLM_TIMEOUT"), "env:SMARTRUN_LLM_TIMEOUT"),
        (table.get("timeout"), file_origin),
    )
    origin = {"base_url": base_origin, "model": model_origin, "api_key": key_origin, "timeout_s": timeout_origin}
    fields: dict[str, Any] = {"base_url": _base_url(base_url, str(base_origin)), "model": str(model or "")}
    if key is not None:
        fields["api_key"] = SecretStr(str(key))
    if timeout is not None:
        fields["timeout_s"] = _timeout(timeout, str(timeout_origin))
    return LLMSettings(**fields, origin={k: v for k, v in origin.items() if v})


# ---------------------------------------------------------------------------- transport


class LLMReply(Frozen):
    """One completion as received. `structured`: the JSON-schema response_format was in force.

    `latency_s` is the request that answered; `elapsed_s` the whole call (failed tries and backoff included),
    which is what the decision's budget is charged (recorded, so replay charges the same).
    """

    content: str
    latency_s: float
    elapsed_s: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    structured: bool = False
    finish_reason: str | None = None
    max_tokens: int | None = None  # what the request allowed
    server_timings: dict[str, float] | None = None  # llama.cpp's own split: prompt_ms, predicted_ms, ...


class Transport(Protocol):
    """Sends chat messages, returns the reply within `budget_s`; raises LLMUnavailable once retrying is
    pointless, the tries are spent or the budget is gone. `max_tokens` goes on every request."""

    def complete(self, messages: list[dict], schema: dict, *, max_tokens: int | None = None,
                 budget_s: float | None = None) -> LLMReply: ...


class _Transient(Exception):
    """A failure worth retrying (connection, 408/409/429/5xx), with the server's Retry-After."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class _OutOfTime(Exception):
    """The budget ran out before or while a request was in flight: it is not resent (it would time out again)."""


def _retry_after(response: Any) -> float | None:
    """Seconds from a numeric Retry-After header (an HTTP date is ignored: backoff applies)."""
    value = getattr(response, "headers", {}).get("retry-after") if response is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


_STATUS_WORDS = {
    401: "LLM endpoint refused the API key (401)",
    403: "LLM endpoint denied access (403)",
    404: "LLM endpoint has no such model or no chat completions at this URL (404)",
}


class OpenAITransport:
    """The official openai client with its own retries off; tenacity retries transient failures.

    One `complete` call keeps to its budget (by default the whole --llm-timeout) in wall-clock time:
    connect, first byte, a trickled body, failed tries and backoff all count. A request still unanswered
    when the budget runs out is abandoned and not resent: resending it unchanged would only time out again.
    Transient failures (connection refused, 429, 5xx) are retried with jittered exponential backoff while
    tries and time are left. JSON-schema structured output is tried first; a server that refuses it (400
    naming response_format) or ignores it (a non-JSON reply) gets plain text from then on.
    """

    def __init__(self, settings: LLMSettings, *, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.settings = settings
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._sleep = sleep
        self._client: Any = None
        self._model = settings.model
        self.structured = True  # turned off for good on the first sign the server lacks it
        self.greedy = True  # temperature 0: the same facts get the same advice; off if the server refuses it

    @property
    def budget_s(self) -> float:
        """Seconds for one whole decision: --llm-timeout."""
        return self.settings.timeout_s

    @property
    def model_name(self) -> str:
        """The model asked for: configured, or discovered from /models on the first request."""
        return self._model

    def _key(self) -> str:
        return self.settings.api_key.get_secret_value() if self.settings.api_key else NO_KEY

    def _scrub(self, text: str) -> str:
        """Error text with the API key masked: some servers echo the key they refused."""
        key = self.settings.api_key.get_secret_value() if self.settings.api_key else ""
        text = " ".join(str(text).split())[:300]
        return text.replace(key, "***") if key else text

    def client(self) -> Any:
        if self._client is None:
            import openai  # lazy: keeps `localaistack` start-up fast

            self._client = openai.OpenAI(base_url=self.settings.base_url, api_key=self._key(),
                                         timeout=self.settings.timeout_s, max_retries=0)
        return self._client

    def _drop_client(self) -> None:
        """After an abandoned request: shut its sockets down, so the server sees the client go and stops
        generating (llama.cpp frees its slot for the next decision) and the waiting thread wakes up; then
        close the client. Best effort: it reaches into httpx's pool, and any failure leaves the socket to
        its own timeout."""
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(Exception):
            pool = client._client._transport._pool  # openai -> httpx.Client -> HTTPTransport -> httpcore pool
            for connection in list(pool.connections):
                sock = connection._connection._network_stream._sock
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):  # closing under a request in flight: nothing more to do
            client.close()

    def complete(self, messages: list[dict], schema: dict, *, max_tokens: int | None = None,
                 budget_s: float | None = None) -> LLMReply:
        from tenacity import RetryError, Retrying, retry_if_exception_type, stop_after_attempt, stop_any

        budget = self.settings.timeout_s if budget_s is None else budget_s
        self.client()  # built before the clock starts: loading TLS certificates is not the server's time
        started = time.monotonic()
        deadline = started + budget

        def out_of_time(state: Any) -> bool:  # no time for the wait plus a request worth making
            return deadline - time.monotonic() - (getattr(state, "upcoming_sleep", 0.0) or 0.0) < min(1.0, budget / 10)

        retrying = Retrying(
            stop=stop_any(stop_after_attempt(self.settings.max_attempts), out_of_time),  # type: ignore[arg-type]  # any callable of the retry state stops
            wait=self._wait(deadline),
            retry=retry_if_exception_type(_Transient),
            sleep=self._sleep,
        )
        try:
            reply = retrying(self._attempt, messages, schema, max_tokens, deadline)
        except RetryError as err:
            last = err.last_attempt.exception()
            tries = err.last_attempt.attempt_number
            raise _spent(LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} failed {tries} time(s); last error: {last}"
            ), started) from None
        except _OutOfTime:
            raise _spent(LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} timed out: no complete reply within the "
                f"{budget:g}s left of the --llm-timeout budget; not resent"
            ), started) from None
        except LLMUnavailable as err:
            raise _spent(err, started) from None
        return reply.model_copy(update={"elapsed_s": round(time.monotonic() - started, 3)})

    def _wait(self, deadline: float) -> Callable[[Any], float]:
        """Backoff with jitter, or the server's Retry-After when longer; never above backoff_max_s."""
        from tenacity import wait_random_exponential

        backoff = wait_random_exponential(multiplier=self.backoff_s, max=self.backoff_max_s)

        def wait(state: Any) -> float:
            asked = getattr(state.outcome.exception(), "retry_after_s", None) or 0.0
            return max(0.0, min(max(backoff(state), asked), self.backoff_max_s, deadline - time.monotonic()))

        return wait

    def _attempt(self, messages: list[dict], schema: dict, max_tokens: int | None, deadline: float) -> LLMReply:
        """One request (plus a plain-text re-send when the server refuses response_format)."""
        if not self._model:
            try:
                self._model = self._call(deadline, lambda t: self._discover_model(t))
            except LLMUnavailable as err:
                raise LLMUnavailable(f"no --llm-model given and the server did not list one: {err.message}") from None
        for _ in range(3):  # at most one step down for each option a server may refuse
            try:
                return self._call(deadline, lambda t: self._create(messages, schema if self.structured else None,
                                                                   max_tokens, t))
            except _Unstructured:
                self.structured = False
            except _NoTemperature:
                self.greedy = False
        return self._call(deadline, lambda t: self._create(messages, None, max_tokens, t))

    def _discover_model(self, timeout: Any) -> str:
        models = self.client().models.list(timeout=timeout)
        ids = [m.id for m in getattr(models, "data", None) or [] if getattr(m, "id", None)]
        if not ids:
            raise LLMUnavailable(f"LLM endpoint {shown_url(self.settings.base_url)} lists no models")
        return ids[0]

    def _create(self, messages: list[dict], schema: dict | None, max_tokens: int | None, timeout: Any) -> LLMReply:
        kwargs: dict[str, Any] = {}
        if schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "smartrun_proposal", "schema": schema, "strict": False},
            }
        if max_tokens is not None:
            kwargs["max_tokens"] = max_tokens
        if self.greedy:
            kwargs["temperature"] = 0
        sent = time.monotonic()
        completion = self.client().chat.completions.create(model=self._model, messages=messages, timeout=timeout,
                                                           **kwargs)  # inside _call's wall-clock deadline
        latency = time.monotonic() - sent
        choices = getattr(completion, "choices", None)
        if isinstance(completion, str) or not choices:
            shown = completion[:60] if isinstance(completion, str) else "no choices"
            raise LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} did not send a chat completion ({shown!r})"
            )
        content = choices[0].message.content or ""
        structured = schema is not None
        if structured and content.strip() and not _is_json(content) and choices[0].finish_reason != "length":
            self.structured = False  # it ignored response_format: plain text from now on
            structured = False
        usage = getattr(completion, "usage", None)
        return LLMReply(
            content=content[:MAX_REPLY_CHARS + 1],
            latency_s=round(latency, 3),
            prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
            completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
            model=getattr(completion, "model", None) or self._model,
            structured=structured,
            finish_reason=choices[0].finish_reason,
            max_tokens=max_tokens,
            server_timings=_timings(completion),
        )

    def _call(self, deadline: float, request: Callable[[Any], Any]) -> Any:
        """One request inside the deadline, mapping openai's exceptions onto retry / give up / plain text."""
        import httpx
        import openai

        left = deadline - time.monotonic()
        if left <= 0:
            raise _OutOfTime()
        # the socket's own limits sit just past the deadline: the wall clock (deadline.within) enforces it, so
        # a slow first byte or a body trickled a byte at a time ends there too
        timeout = httpx.Timeout(left + 1.0, connect=min(left, CONNECT_TIMEOUT_S))
        try:
            return within(left, lambda: request(timeout), on_abandon=self._drop_client)
        except TimeoutError:
            raise _OutOfTime() from None
        except openai.APIConnectionError as err:  # includes APITimeoutError: a connect that took too long
            what = "timed out connecting" if isinstance(err, openai.APITimeoutError) else "connection failed"
            raise _Transient(f"{what} ({shown_url(self.settings.base_url)})") from None
        except openai.APIStatusError as err:
            status = err.status_code
            message = self._scrub(getattr(err, "message", "") or str(err))
            if status in (408, 409, 429) or status >= 500:
                raise _Transient(f"HTTP {status}: {message}", _retry_after(err.response)) from None
            if status in (400, 422) and re.search(r"response_format|json_schema|structured", message, re.I):
                raise _Unstructured() from None
            if status in (400, 422) and self.greedy and re.search(r"temperature", message, re.I):
                raise _NoTemperature() from None
            if status in _STATUS_WORDS:
                raise LLMUnavailable(_STATUS_WORDS[status]) from None
            raise LLMUnavailable(f"LLM endpoint answered HTTP {status}: {message}") from None
        except openai.OpenAIError as err:
            raise LLMUnavailable(f"LLM client error: {self._scrub(str(err))}") from None
        except (ValueError, RecursionError) as err:  # a truncated or hostile JSON body: a bad reply, fall back
            raise LLMUnavailable(f"LLM endpoint sent a body that is not JSON ({self._scrub(str(err))[:80]})") from None


def _spent(err: LLMUnavailable, started: float) -> LLMUnavailable:
    """The error with the seconds the failed call took, which the decision's budget is charged."""
    err.elapsed_s = round(time.monotonic() - started, 3)  # type: ignore[attr-defined]
    return err


def _timings(completion: Any) -> dict[str, float] | None:
    """The server's own timing split when it sends one (llama.cpp: prompt and generation time, tokens)."""
    extra = getattr(completion, "model_extra", None) or {}
    timings = extra.get("timings") if isinstance(extra, dict) else None
    if not isinstance(timings, dict):
        return None
    keep = ("prompt_n", "prompt_ms", "predicted_n", "predicted_ms")
    found = {k: float(timings[k]) for k in keep if isinstance(timings.get(k), int | float)}
    return found or None


class _Unstructured(Exception):
    """The server refused the JSON-schema response_format."""


class _NoTemperature(Exception):
    """The server refused temperature 0 (some reasoning models accept only their default)."""


def shown_url(url: str) -> str:
    """The URL without user:password@, for messages and records."""
    return re.sub(r"//[^/@]*@", "//", url)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


# ---------------------------------------------------------------------------- reply parsing


class ReplyChange(BaseModel):
    """One change as an LLM writes it; the per-knob entries `reply_model` derives narrow all three fields."""

    model_config = ConfigDict(extra="ignore")
    knob: str
    value: Any
    reason: str = ""

    @field_validator("reason", mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:  # a rambling reason is cut, not a reason to refuse the change
        return value[: 3 * REASON_CHARS] if isinstance(value, str) else value


class Reply(BaseModel):
    """The reply's shape. `reply_model` derives the schema the LLM gets and the first parser from it."""

    model_config = ConfigDict(extra="ignore")
    changes: list[ReplyChange]  # required: an object without it is not an answer (e.g. one cut-off change)
    reason: str = ""

    @field_validator("reason", mode="before")
    @classmethod
    def _short(cls, value: Any) -> Any:
        return value[: 3 * SUMMARY_CHARS] if isinstance(value, str) else value


class _StrictChange(ReplyChange):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})


class _StrictReply(Reply):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})


def _value_type(knob: KnobSpec) -> Any:
    """The pydantic type of one knob's value: strict (no "16" for 16), ranged or enumerated by its bound."""
    _, kind, low, high, choices = knob
    if choices is not None:
        return Literal[choices]
    limits: dict[str, Any] = {k: v for k, v in (("ge", low), ("le", high)) if v is not None}
    if kind == "int":
        int_limits: dict[str, Any] = {k: int(v) for k, v in limits.items()}
        return Annotated[int, Field(strict=True, **int_limits)]
    if kind == "float":
        grid = _float_grid(low, high)
        extra: dict[str, Any] = {"json_schema_extra": {"enum": grid}} if grid else {}
        return Annotated[float, Field(strict=True, **limits, **extra)]
    if kind == "bool":
        return StrictBool
    return Annotated[str, Field(strict=True, max_length=200)]


def _float_grid(low: Any, high: Any) -> list[float] | None:
    """Every FLOAT_STEP from low to high (both included) when that is a short list, else None. Grammar-based
    servers (llama.cpp) ignore a number's minimum/maximum but enforce an enum, so a fraction such as
    gpu_memory_utilization stays inside its bound even from a small model."""
    if low is None or high is None or high < low or (high - low) / FLOAT_STEP > 50:
        return None
    steps = round((high - low) / FLOAT_STEP)
    grid = sorted({round(low + i * FLOAT_STEP, 4) for i in range(steps + 1)} | {float(low), float(high)})
    return [v for v in grid if low <= v <= high]


KnobSpec = tuple[str, str, Any, Any, Any]  # name, catalogue type, min, max, choices (a hashable cache key)


def _knob_specs(bounds: Bounds, knobs: list[str] | None = None) -> tuple[KnobSpec, ...]:
    specs = []
    for name in open_knobs(bounds) if knobs is None else knobs:
        bound, knob = bounds.knobs[name], CATALOGUE.get(name)
        kind = knob.type if knob is not None else "str"
        choices = tuple(bound.choices) if bound.choices is not None else None
        if choices is None and kind == "choice" and knob is not None and knob.choices:
            choices = tuple(knob.choices)
        specs.append((name, kind, bound.min, bound.max, choices))
    return tuple(specs)


@lru_cache(maxsize=64)
def _derived(specs: tuple[KnobSpec, ...]) -> type[Reply]:
    entries = [create_model(f"Change_{spec[0]}", __base__=_StrictChange,
                            knob=(Literal[spec[0]], ...),  # type: ignore[arg-type]  # a Literal made at run time
                            value=(_value_type(spec), ...),
                            reason=(Annotated[str, Field(max_length=REASON_CHARS)], ...))
               for spec in specs]
    item: Any = Union[tuple(entries)] if len(entries) > 1 else (entries[0] if entries else ReplyChange)  # noqa: UP007
    return create_model("SmartrunReply", __base__=_StrictReply,
                        changes=(Annotated[list[item], Field(max_length=len(entries))], ...),
                        reason=(Annotated[str, Field(max_length=SUMMARY_CHARS)], ...))


def reply_model(bounds: Bounds, knobs: list[str] | None = None) -> type[Reply]:
    """The reply model for these bounds, instructor's way: one entry type per knob the LLM may change (`knobs`,
    default every open knob), its value typed and ranged (enum/min/max) by the effective bound, at most as
    many changes as knobs, reasons of bounded length. Its JSON schema goes to the server; the same model
    parses the reply."""
    return _derived(_knob_specs(bounds, knobs))


def _inline(schema: Any, defs: dict[str, Any] | None = None) -> Any:
    """The schema with $refs replaced by their definitions and titles dropped: every server reads it, and
    it costs fewer tokens."""
    if defs is None and isinstance(schema, dict):
        defs = schema.get("$defs", {})
    if isinstance(schema, dict):
        if "$ref" in schema:
            return _inline((defs or {})[schema["$ref"].rsplit("/", 1)[-1]], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k not in ("$defs", "title")}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def reply_schema(bounds: Bounds, knobs: list[str] | None = None) -> dict[str, Any]:
    """The JSON schema of a reply, derived from `reply_model(bounds, knobs)`."""
    return _inline(reply_model(bounds, knobs).model_json_schema())


def reply_max_tokens(bounds: Bounds, knobs: list[str] | None = None) -> int:
    """max_tokens for a reply: the longest JSON the schema allows at 2 characters a token (JSON punctuation,
    digits and snake_case names tokenise densely), plus the whitespace a server lets a model put between the
    parts (SmolLM2 pretty-prints: about 16 tokens a change, 24 allowed). A reply that fits the schema and is
    laid out like that is not cut off; one padded with more whitespace is, and is repaired."""
    items = [len(json.dumps({"knob": spec[0], "value": _longest_value(spec), "reason": "x" * REASON_CHARS}))
             for spec in _knob_specs(bounds, knobs)]
    envelope = len(json.dumps({"changes": [], "reason": "x" * SUMMARY_CHARS}))
    return math.ceil(envelope / 2) + 24 + sum(math.ceil(n / 2) + 24 for n in items) + 16


def _longest_value(spec: KnobSpec) -> Any:
    _, kind, low, high, choices = spec
    if choices is not None:
        return max(choices, key=lambda c: len(json.dumps(c)))
    if kind in ("int", "float"):
        return max((v for v in (low, high, 0.123456789) if v is not None), key=lambda v: len(json.dumps(v)))
    return True if kind == "bool" else "x" * 40


_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)```", re.S)


_THINK = re.compile(r"<think>.*?(</think>|$)", re.S | re.I)


def _json_objects(text: str) -> list[tuple[int, Any]]:
    """(position, value) of every JSON value in the text: the whole text, fenced blocks, objects in prose."""
    found: list[tuple[int, Any]] = []
    candidates = [(0, text), *((m.start(), m.group(1)) for m in _FENCE.finditer(text))]
    for position, candidate in candidates:
        try:
            found.append((position, json.loads(candidate)))
        except (ValueError, RecursionError):  # RecursionError: a hostile reply nested thousands deep
            continue
    decoder = json.JSONDecoder()
    for match in _OBJECT_START.finditer(text):
        try:
            value, _ = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        found.append((match.start(), value))
    return found


# only a "{" that can open an object: decoding from every "{" of "{{{{..." was quadratic
_OBJECT_START = re.compile(r"\{(?=\s*[\"}])")


def parse_reply(text: str, model: type[Reply] = Reply) -> Proposal:
    """The LLM's reply as a Proposal (unvalidated). ReplyParseError says in one line what is wrong.

    The JSON is read with `model` (the schema's own model). A reply that breaks the schema (a server that
    does not enforce it, a knob that is not open, a value out of range) is read with the base `Reply`
    instead, so that screening and the validator can say which change broke which bound.
    """
    if not text or not text.strip():
        raise ReplyParseError("LLM reply is empty")
    if len(text) > MAX_REPLY_CHARS:
        raise ReplyParseError(f"LLM reply is too long ({len(text)} characters)")
    objects = [(pos, o) for pos, o in _json_objects(_THINK.sub("", text)) if isinstance(o, dict)]
    if not objects:
        shown = " ".join(text.split())[:60]
        hint = "truncated JSON" if "{" in text else "no JSON object"
        raise ReplyParseError(f"LLM reply holds no complete JSON object ({hint}): {shown!r}")
    shaped = [(pos, o) for pos, o in objects if "changes" in o]
    chosen = max(shaped, key=lambda item: item[0])[1] if shaped else objects[0][1]  # the final answer
    try:
        reply: Reply = model.model_validate(chosen)
    except ValidationError:
        try:
            reply = Reply.model_validate(chosen)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise ReplyParseError(f"LLM reply JSON has the wrong shape at {where}: {first['msg']}") from None
    changes = tuple(Change(knob=c.knob, value=c.value, reason=c.reason) for c in reply.changes)
    return Proposal(changes=changes, reason=reply.reason, source="llm")


# ---------------------------------------------------------------------------- screening


@lru_cache(maxsize=1)
def _flag_names() -> dict[str, str]:
    """vLLM flag spellings and aliases -> catalogue name (`--max-model-len`, `-tp`)."""
    names: dict[str, str] = {}
    for knob in CATALOGUE.values():
        for spelling in (knob.flag, *knob.aliases):
            names[spelling] = knob.name
    return names


def knob_name(raw: str) -> str:
    """The catalogue name an LLM meant: accepts `max_model_len`, `--max-model-len`, `-tp`."""
    raw = str(raw).strip()
    if raw in _flag_names():
        return _flag_names()[raw]
    return raw.lstrip("-").replace("-", "_").lower()


def _off_limits(name: str, bounds: Bounds) -> str | None:
    """Why the LLM may not set this knob, or None when it may."""
    knob = CATALOGUE.get(name)
    if knob is not None and knob.security:
        return "security setting: only the user sets it"
    if knob is not None and not knob.llm_may_change:
        return "user-only knob"
    bound = bounds.knobs.get(name)
    if bound is None:
        return "unknown knob" if knob is None else "not among the tunable knobs"
    if bound.pinned:
        return f"pinned by the user to {_show(bound.choices[0] if bound.choices else bound.min)}"
    if not bound.llm_may_change:
        return f"not open to the LLM ({', '.join(bound.sources) or 'bounds'})"
    if _single_value(bound):
        return f"fixed by {', '.join(bound.sources) or 'the bounds'} ({_allowed(bound)})"
    return None


def _single_value(bound: KnobBound) -> bool:
    if bound.choices is not None:
        return len(bound.choices) == 1
    return bound.min is not None and bound.min == bound.max


def screen(proposal: Proposal, bounds: Bounds) -> tuple[Proposal, tuple[str, ...]]:
    """Keep the changes the LLM may make; the rest is returned as readable `ignored` lines."""
    kept: dict[str, Change] = {}
    ignored: list[str] = []
    for change in proposal.changes:
        name = knob_name(change.knob)
        why = _off_limits(name, bounds)
        if why:
            ignored.append(f"{change.knob}={_show(change.value)}: {why}")
            continue
        if name in kept:
            ignored.append(f"{change.knob}={_show(kept[name].value)}: superseded by a later change")
        kept[name] = Change(knob=name, value=change.value, reason=change.reason)
    return Proposal(changes=tuple(kept.values()), reason=proposal.reason, source="llm"), tuple(ignored)


def _show(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)[:80]


def _allowed(bound: KnobBound) -> str:
    if bound.choices is not None:
        return "one of " + ", ".join(_show(c) for c in bound.choices)
    low = "" if bound.min is None else f"{bound.min} <= "
    high = "" if bound.max is None else f" <= {bound.max}"
    return f"{low}x{high}" if (low or high) else "any"


# ---------------------------------------------------------------------------- context, prompts


class AdviceContext(Frozen):
    """Everything the LLM is told. Built by the pipeline; the advisor never reads files itself."""

    hardware: HardwareSnapshot
    model: ModelFacts
    bounds: Bounds
    baseline: Plan
    estimate: MemoryEstimate | None = None
    goal: str = "stable"
    attempts: tuple[dict, ...] = ()  # earlier launches: params, failure class, short log excerpt
    failure: dict | None = None  # recover only: class, evidence, vLLM's estimated max len, log excerpt


class LLMExchange(Frozen):
    """One round trip, as recorded: what was sent, what came back, and what became of it."""

    kind: AdviceKind
    messages: tuple[dict, ...]
    reply: LLMReply | None = None
    error: str | None = None
    proposal: Proposal | None = None
    ignored: tuple[str, ...] = ()
    rejections: tuple[Rejection, ...] = ()
    accepted: bool = False
    kept_baseline: bool = False  # the LLM answered with no change: the baseline stands, with its reason
    max_tokens: int | None = None  # what the request allowed (sized to the reply schema)
    prompt_tokens_est: int = 0  # the prompt's size in tokens, estimated before sending


class Advice(Frozen):
    """The advisor's outcome: the plan to use and the full story of how it was reached."""

    plan: Plan
    exchanges: tuple[LLMExchange, ...] = ()
    fallback_reason: str | None = None
    latency_s: float = 0.0
    tokens: tuple[int, int] = (0, 0)  # prompt, completion
    kept_baseline: bool = False  # the LLM's accepted answer changed nothing: plan is the baseline, with its reason
    budget_s: float | None = None  # --llm-timeout: the whole decision's budget
    spent_s: float = 0.0  # what the exchanges took of it


def _json_block(value: Any) -> str:
    """Indented JSON with backticks escaped, so file text cannot close the prompt's code fence."""
    return json.dumps(value, indent=2, ensure_ascii=False, default=str).replace("`", "\\u0060")


@lru_cache(maxsize=1)
def _templates() -> Any:
    import jinja2

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(PROMPTS_DIR)),
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["json"] = _json_block
    env.filters["show"] = _show
    env.filters["compact"] = lambda value: json.dumps(value, separators=(",", ":"), ensure_ascii=False,
                                                      default=str).replace("`", "\\u0060")
    return env


def render(template: str, **data: Any) -> str:
    return _templates().get_template(template).render(**data)


def _open_rows(context: AdviceContext, offered: list[str]) -> dict[str, dict[str, Any]]:
    """The knobs the LLM may change: value now, range or choices, where the limits come from."""
    rows: dict[str, dict[str, Any]] = {}
    for name in offered:
        bound = context.bounds.knobs[name]
        row: dict[str, Any] = {"now": context.baseline.params.get(name)}
        if bound.choices is not None:
            row["one_of"] = list(bound.choices)
        else:
            row.update({k: v for k, v in (("min", bound.min), ("max", bound.max)) if v is not None})
        rows[name] = row
    return rows


def _fixed_values(context: AdviceContext, offered: list[str]) -> dict[str, Any]:
    """Knobs the LLM may not change now, with the value they keep (None = vLLM's default: left out)."""
    shut = sorted(set(context.bounds.knobs) - set(offered))
    return {name: context.baseline.params[name] for name in shut if context.baseline.params.get(name) is not None}


def _hardware_data(hw: HardwareSnapshot) -> dict[str, Any]:
    """GPUs grouped by kind: one line of numbers however many GPUs there are."""
    groups: dict[tuple, dict[str, Any]] = {}
    for g in hw.gpus:
        key = (g.name, g.memory_total_mib, g.compute_capability)
        entry = groups.setdefault(key, {"count": 0, "name": g.name, "memory_gib": round(g.memory_total_mib / 1024, 1),
                                        "free_gib": round(g.memory_free_mib / 1024, 1),
                                        "compute_capability": g.compute_capability})
        entry["count"] += 1
        entry["free_gib"] = min(entry["free_gib"], round(g.memory_free_mib / 1024, 1))
    data: dict[str, Any] = {"gpus": list(groups.values())}
    if hw.nvlink_pairs:
        data["nvlink_pairs"] = len(hw.nvlink_pairs)
    return data


def _model_data(m: ModelFacts) -> dict[str, Any]:
    keep = ("name", "architecture", "num_attention_heads", "num_kv_heads", "derived_max_model_len", "sliding_window",
            "torch_dtype", "is_multimodal")
    data: dict[str, Any] = {k: getattr(m, k) for k in keep if getattr(m, k) not in (None, False)}
    if m.weight_bytes:
        data["weights_gib"] = round(m.weight_bytes / 2**30, 2)
    if m.moe is not None:
        data["moe"] = {"experts": m.moe.num_experts, "per_token": m.moe.experts_per_token}
    if m.mla is not None:
        data["mla"] = True
    if m.quantization is not None:
        data["quantization"] = {k: v for k, v in (("method", m.quantization.method),
                                                  ("weight_bits", m.quantization.weight_bits)) if v is not None}
    return data


def _estimate_data(e: MemoryEstimate | None) -> dict[str, Any] | None:
    """The baseline's budget per GPU in GiB (tokens engine-wide): what decides whether a change fits."""
    if e is None:
        return None
    keep = ("total_gib", "weights_gib", "kv_cache_gib", "kv_cache_tokens", "max_concurrency", "largest_max_model_len",
            "fits", "reason")
    return {k: getattr(e, k) for k in keep if getattr(e, k) is not None}


def _excerpt(text: Any) -> str:
    """The log's tail (lines given as a list are joined), fences defused so it stays inside its block."""
    if isinstance(text, list | tuple):
        text = "\n".join(map(str, text))
    text = str(text or "")
    return text[-LOG_EXCERPT_CHARS:].replace("```", "'''")


def prompt_data(context: AdviceContext, offered: list[str] | None = None) -> dict[str, Any]:
    """The values the templates render; nothing else reaches the prompt. `facts` is one compact JSON block."""
    failure = dict(context.failure) if context.failure else None
    log_excerpt = _excerpt(failure.pop("log_excerpt", "")) if failure else ""
    facts: dict[str, Any] = {"goal": context.goal}
    if context.estimate is not None:
        facts["vllm"] = context.estimate.vllm_version
    facts.update(_hardware_data(context.hardware))
    facts["model"] = _model_data(context.model)
    if context.estimate is not None:
        facts["estimate"] = _estimate_data(context.estimate)
    offered = offered_knobs(context, "recover" if context.failure else "propose") if offered is None else offered
    facts["open"] = _open_rows(context, offered)
    facts["fixed"] = _fixed_values(context, offered)
    if context.bounds.warnings:
        facts["warnings"] = [" ".join(str(w).split())[:160] for w in context.bounds.warnings]
    if context.attempts:
        facts["attempts"] = [dict(a) for a in context.attempts]
    return {"goal": context.goal, "facts": facts, "failure": failure, "log_excerpt": log_excerpt,
            "open": list(facts["open"])}


def open_knobs(bounds: Bounds) -> list[str]:
    return sorted(name for name in bounds.knobs if _off_limits(name, bounds) is None)


MAX_OFFERED = 3  # knobs one decision offers the LLM: a short schema keeps a small model's reply short
# The guide's order of moves, per goal (propose) and per failure (recover); open knobs not named come after,
# in the guide's general order.
_GUIDE_ORDER = ("max_model_len", "gpu_memory_utilization", "tensor_parallel_size", "max_num_seqs", "dtype",
                "enforce_eager", "optimization_level", "disable_custom_all_reduce", "max_num_batched_tokens",
                "kv_cache_dtype", "enable_prefix_caching", "enable_chunked_prefill", "pipeline_parallel_size")
_GOAL_ORDER = {
    "stable": ("max_model_len", "gpu_memory_utilization", "max_num_seqs", "tensor_parallel_size"),
    "latency": ("max_num_seqs", "max_model_len", "gpu_memory_utilization", "tensor_parallel_size"),
    "throughput": ("max_num_seqs", "gpu_memory_utilization", "max_num_batched_tokens", "tensor_parallel_size",
                   "kv_cache_dtype"),
    "long-context": ("max_model_len", "gpu_memory_utilization", "kv_cache_dtype", "max_num_seqs"),
}
_FAILURE_ORDER = {
    "oom_cuda_graph": ("enforce_eager", "optimization_level", "gpu_memory_utilization"),
    "compile_error": ("enforce_eager", "optimization_level"),
    "nccl_error": ("disable_custom_all_reduce", "tensor_parallel_size"),
    "tp_not_divisible": ("tensor_parallel_size",),
    "not_enough_gpus": ("tensor_parallel_size", "pipeline_parallel_size"),
    "dtype_unsupported": ("dtype",),
    "oom_sampler": ("max_num_seqs", "gpu_memory_utilization"),
    "oom_profiling": ("max_num_batched_tokens", "max_num_seqs", "gpu_memory_utilization"),
}
_RECOVER_ORDER = ("max_model_len", "gpu_memory_utilization", "max_num_seqs", "enforce_eager")


def offered_knobs(context: AdviceContext, kind: AdviceKind) -> list[str]:
    """The open knobs this decision offers the LLM, most important first (the guide's order for the goal, or
    for the failure when recovering), at most MAX_OFFERED: the others keep their value (shown as fixed)."""
    if kind == "recover":
        klass = str((context.failure or {}).get("class", ""))
        first = (*_FAILURE_ORDER.get(klass, ()), *_RECOVER_ORDER)
    else:
        first = _GOAL_ORDER.get(context.goal, _GOAL_ORDER["stable"])
    ranked = [*first, *_GUIDE_ORDER, *open_knobs(context.bounds)]
    chosen: list[str] = []
    for name in ranked:
        if name not in chosen and _off_limits(name, context.bounds) is None and name in context.bounds.knobs:
            chosen.append(name)
    return chosen[:MAX_OFFERED]


def initial_messages(context: AdviceContext, kind: AdviceKind) -> list[dict[str, str]]:
    data = prompt_data(context, offered_knobs(context, kind))
    return [
        {"role": "system", "content": render(f"{kind}_system.md.j2", **data)},
        {"role": "user", "content": render(f"{kind}_user.md.j2", **data)},
    ]


CHARS_PER_TOKEN = 2.8  # these prompts on SmolLM2's tokenizer (benchmarks/advisor_bench.py); GPT-class ones use fewer


def prompt_tokens(messages: list[dict] | tuple[dict, ...]) -> int:
    """About how many tokens the messages take (a few per message for the chat template): the size shown
    by --explain before the server counts it."""
    return sum(math.ceil(len(str(m.get("content") or "")) / CHARS_PER_TOKEN) + 4 for m in messages)


def _repair_turn(exchange: LLMExchange, offered: list[str]) -> list[dict[str, str]]:
    """The failed answer (as parsed, or a short head of an unusable one: a cut-off reply is not pasted back
    whole) and what was wrong with it. Only the last answer is carried, so repairs do not grow the prompt."""
    cut_off = exchange.reply is not None and exchange.reply.finish_reason == "length"
    if exchange.proposal is not None:
        said = json.dumps({"changes": [c.model_dump() for c in exchange.proposal.changes],
                           "reason": exchange.proposal.reason}, ensure_ascii=False, default=str)
    else:
        head = " ".join((exchange.reply.content if exchange.reply else "").split())[:120]
        said = f"{head} ... [{'cut off' if cut_off else 'not usable'}]"
    rejections = [r.model_dump() for r in exchange.rejections]
    content = render("repair_user.md.j2", error=exchange.error, rejections=rejections, cut_off=cut_off,
                     ignored=list(exchange.ignored), open=offered)
    return [{"role": "assistant", "content": said}, {"role": "user", "content": content}]


class _Budget:
    """The whole --llm-timeout of one decision, charged with what each call took (as the transport reported
    it, so a replay charges the recorded times and decides the same)."""

    def __init__(self, total_s: float):
        self.total_s = float(total_s)
        self.spent_s = 0.0

    def charge(self, reply: LLMReply | None) -> None:
        if reply is not None:
            self.spent_s += reply.elapsed_s or reply.latency_s

    def left(self) -> float:
        return max(0.0, self.total_s - self.spent_s)


# ---------------------------------------------------------------------------- the loop


def _one_exchange(kind: AdviceKind, messages: list[dict], transport: Transport, context: AdviceContext,
                  check: Callable[[Proposal], Verdict], budget: _Budget) -> tuple[LLMExchange, Plan | None]:
    """Ask once (schema and max_tokens from the reply model), screen the reply, run the rest through `check`."""
    bounds, offered = context.bounds, offered_knobs(context, kind)
    max_tokens = reply_max_tokens(bounds, offered)
    sent = tuple(dict(m) for m in messages)
    asked = {"kind": kind, "messages": sent, "max_tokens": max_tokens, "prompt_tokens_est": prompt_tokens(sent)}
    reply = transport.complete(messages, reply_schema(bounds, offered), max_tokens=max_tokens, budget_s=budget.left())
    budget.charge(reply)
    try:
        if reply.finish_reason == "length" and not _is_json(reply.content.strip()):
            raise ReplyParseError(f"LLM reply was cut off at max_tokens={max_tokens} (finish_reason=length)")
        proposal = parse_reply(reply.content, reply_model(bounds, offered))
    except ReplyParseError as err:
        return LLMExchange(**asked, reply=reply, error=err.message), None
    usable, ignored = screen(proposal, bounds)
    if not proposal.changes:
        return LLMExchange(**asked, reply=reply, proposal=usable, accepted=True, kept_baseline=True), None
    if not usable.changes:
        error = "nothing in the reply may be changed by the LLM"
        return LLMExchange(**asked, reply=reply, error=error, proposal=usable, ignored=ignored), None
    try:
        verdict = check(usable)
    except SmartRunError as err:  # e.g. the estimator cannot budget the proposed combination
        error = f"proposal could not be checked: {err.message}"
        return LLMExchange(**asked, reply=reply, error=error, proposal=usable, ignored=ignored), None
    same = verdict.plan is not None and verdict.plan.params == context.baseline.params
    exchange = LLMExchange(**asked, reply=reply, proposal=usable, ignored=ignored, rejections=verdict.rejections,
                           accepted=verdict.accepted, kept_baseline=same)
    if not verdict.accepted or verdict.plan is None or same:
        return exchange, None
    reason = usable.reason or "LLM proposal"
    return exchange, verdict.plan.model_copy(update={"source": "llm", "reason": reason})


def rejection_text(exchange: LLMExchange) -> str:
    """Why the advisor did not use an exchange's reply, in one line (for repairs, records, fallbacks)."""
    if exchange.error:
        return exchange.error
    broken = "; ".join(f"{r.knob}={_show(r.value)} outside {r.bound} ({r.source})" for r in exchange.rejections)
    return f"rejected by the bounds: {broken}"


def _totals(exchanges: list[LLMExchange]) -> tuple[float, tuple[int, int]]:
    replies = [e.reply for e in exchanges if e.reply is not None]
    latency = round(sum(r.latency_s for r in replies), 3)
    return latency, (sum(r.prompt_tokens for r in replies), sum(r.completion_tokens for r in replies))


def _judged(transport: Transport, exchange: LLMExchange) -> None:
    """Tell a recording transport what became of its last reply (why it was not used), for the record."""
    note = getattr(transport, "judged", None)
    if callable(note):
        note(exchange)


def static_advice(baseline: Plan, reason: str) -> Advice:
    """The baseline, with the reason the LLM was not used (no LLM configured, cache hit elsewhere...)."""
    return Advice(plan=baseline, fallback_reason=reason)


def kept_reason(reason: str) -> str:
    """How a plan the LLM left as it was is explained: "the LLM kept the baseline: <its reason>"."""
    reason = " ".join(str(reason or "").split())
    return "the LLM kept the baseline" + (f": {reason}" if reason else "")


def advise(
    context: AdviceContext,
    transport: Transport,
    check: Callable[[Proposal], Verdict],
    *,
    kind: AdviceKind = "propose",
    strict: bool = False,
    max_repairs: int = 2,
    budget_s: float | None = None,
) -> Advice:
    """Ask the LLM for changes to `context.baseline`; repair rejected proposals; else fall back or raise.

    `check` is the only gate (the pipeline passes a closure over validate.check with the bounds and the
    base plan); under `strict`, anything short of an answer the validator accepts (an empty one keeps the
    baseline) raises AdvisorError (exit code 3). The whole decision keeps to `budget_s` (default: the
    transport's --llm-timeout): every request, retry and repair comes out of it, and a repair is only sent
    while some of it is left.
    """
    budget = _Budget(budget_s if budget_s is not None else getattr(transport, "budget_s", DEFAULT_BUDGET_S))
    first: list[dict] = initial_messages(context, kind)
    messages = first
    exchanges: list[LLMExchange] = []
    failure = "no attempt made"
    for attempt in range(1 + max(0, max_repairs)):
        if attempt and budget.left() <= 0:
            failure += f"; the --llm-timeout budget of {budget.total_s:g}s is spent"
            break
        try:
            exchange, plan = _one_exchange(kind, messages, transport, context, check, budget)
        except AdvisorError as err:  # transport gave up: retrying the conversation will not help
            budget.spent_s += float(getattr(err, "elapsed_s", 0.0) or 0.0)  # shown; nothing is decided on it
            sent = tuple(dict(m) for m in messages)
            exchange = LLMExchange(kind=kind, messages=sent, error=err.message, prompt_tokens_est=prompt_tokens(sent),
                                   max_tokens=reply_max_tokens(context.bounds, offered_knobs(context, kind)))
            exchanges.append(exchange)
            _judged(transport, exchange)
            failure = err.message
            break
        exchanges.append(exchange)
        _judged(transport, exchange)
        latency, tokens = _totals(exchanges)
        done = {"exchanges": tuple(exchanges), "latency_s": latency, "tokens": tokens, "budget_s": budget.total_s,
                "spent_s": round(budget.spent_s, 3)}
        if exchange.kept_baseline:
            why = kept_reason(exchange.proposal.reason if exchange.proposal else "")
            return Advice(plan=context.baseline.model_copy(update={"reason": why}), kept_baseline=True, **done)
        if plan is not None:
            return Advice(plan=plan, **done)
        failure = rejection_text(exchange)
        messages = [*first, *_repair_turn(exchange, offered_knobs(context, kind))]
    latency, tokens = _totals(exchanges)
    asked = sum(1 for e in exchanges if e.reply is not None)
    if exchanges and exchanges[-1].reply is None:  # the transport gave up
        reason = f"LLM not used: {failure}"
    else:
        reason = f"LLM advice not used after {asked} repl{'y' if asked == 1 else 'ies'}: {failure}"
    if strict:
        raise AdvisorError(f"--smart-run-strict: {reason}")
    return Advice(plan=context.baseline, exchanges=tuple(exchanges), fallback_reason=reason,
                  latency_s=latency, tokens=tokens, budget_s=budget.total_s, spent_s=round(budget.spent_s, 3))


# ---------------------------------------------------------------------------- reporting


def debug_line(advice: Advice) -> str:
    """`source=llm reason="..." latency=1.23s tokens=812/96` for --smart-run-debug."""
    reason = advice.fallback_reason if advice.plan.source != "llm" and not advice.kept_baseline else advice.plan.reason
    reason = " ".join(str(reason or "-").split())[:240]
    prompt, completion = advice.tokens
    return (f"source={advice.plan.source} reason={json.dumps(reason, ensure_ascii=False)} "
            f"latency={advice.latency_s:.2f}s tokens={prompt}/{completion}")


def exchange_line(number: int, ex: LLMExchange) -> str:
    """One exchange for --explain: outcome, prompt size (estimated, and as the server counted it), the reply's
    cap, length and finish reason, and its latency."""
    taken = ", ".join(f"{c.knob}={_show(c.value)}" for c in ex.proposal.changes) if ex.proposal else ""
    if ex.kept_baseline:
        status = kept_reason(ex.proposal.reason if ex.proposal else "")
    else:
        status = "accepted" if ex.accepted else "not accepted"
    size = f"prompt ~{ex.prompt_tokens_est} tokens"
    if ex.reply is not None:
        r = ex.reply
        size += (f" ({r.prompt_tokens} counted by the server), max_tokens {ex.max_tokens}, reply "
                 f"{r.completion_tokens} tokens, finish {r.finish_reason}, {r.latency_s:.2f}s")
    else:
        size += f", max_tokens {ex.max_tokens}, no reply"
    return (f"LLM {ex.kind} #{number}: {status}" + (f" [{taken}]" if taken and not ex.kept_baseline else "")
            + (f": {ex.error}" if ex.error else "") + f" ({size})")


def explain_lines(advice: Advice) -> list[str]:
    """One line per exchange and per ignored/rejected change, for --explain."""
    lines: list[str] = []
    for number, ex in enumerate(advice.exchanges, 1):
        lines.append(exchange_line(number, ex))
        lines.extend(f"  ignored {item}" for item in ex.ignored)
        lines.extend(f"  rejected {r.knob}={_show(r.value)}: {r.reason}"
                     + ("" if r.bound in r.reason else f" (allowed {r.bound}; {r.source})") for r in ex.rejections)
    if advice.budget_s:
        lines.append(f"LLM time: {advice.spent_s:.2f}s of the {advice.budget_s:g}s --llm-timeout budget, "
                     f"{len(advice.exchanges)} round trip(s)")
    lines.append(debug_line(advice))
    return lines
