"""The OpenAI-compatible transport: one request at a time inside the decision's budget, retried when safe."""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Callable
from typing import Any, Protocol

from smartrun.advisor.settings import (
    CONNECT_TIMEOUT_S,
    MAX_REPLY_CHARS,
    NO_KEY,
    LLMSettings,
    LLMUnavailable,
    shown_url,
)
from smartrun.clock import SYSTEM, Clock
from smartrun.deadline import within
from smartrun.frozen import Frozen


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
    The budget, the backoff waits and the latencies are read from `clock`.
    """

    def __init__(self, settings: LLMSettings, *, backoff_s: float = 0.5, backoff_max_s: float = 8.0,
                 clock: Clock = SYSTEM):
        self.settings = settings
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
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
        clock = self.clock
        started = clock.monotonic()
        deadline = started + budget

        def out_of_time(state: Any) -> bool:  # no time for the wait plus a request worth making
            return deadline - clock.monotonic() - (getattr(state, "upcoming_sleep", 0.0) or 0.0) < min(1.0, budget / 10)

        retrying = Retrying(
            stop=stop_any(stop_after_attempt(self.settings.max_attempts), out_of_time),  # type: ignore[arg-type]  # any callable of the retry state stops
            wait=self._wait(deadline),
            retry=retry_if_exception_type(_Transient),
            sleep=clock.sleep,
        )
        try:
            reply = retrying(self._attempt, messages, schema, max_tokens, deadline)
        except RetryError as err:
            last = err.last_attempt.exception()
            tries = err.last_attempt.attempt_number
            raise _spent(LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} failed {tries} time(s); last error: {last}"
            ), clock, started) from None
        except _OutOfTime:
            raise _spent(LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} timed out: no complete reply before the "
                "--llm-timeout budget ran out; not resent"  # what was left is the exchange's latency, not text
            ), clock, started, budget) from None
        except LLMUnavailable as err:
            raise _spent(err, clock, started) from None
        return reply.model_copy(update={"elapsed_s": round(clock.monotonic() - started, 3)})

    def _wait(self, deadline: float) -> Callable[[Any], float]:
        """Backoff with jitter, or the server's Retry-After when longer; never above backoff_max_s."""
        from tenacity import wait_random_exponential

        backoff = wait_random_exponential(multiplier=self.backoff_s, max=self.backoff_max_s)

        def wait(state: Any) -> float:
            asked = getattr(state.outcome.exception(), "retry_after_s", None) or 0.0
            return max(0.0, min(max(backoff(state), asked), self.backoff_max_s, deadline - self.clock.monotonic()))

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
        sent = self.clock.monotonic()
        completion = self.client().chat.completions.create(model=self._model, messages=messages, timeout=timeout,
                                                           **kwargs)  # inside _call's wall-clock deadline
        latency = self.clock.monotonic() - sent
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

        left = deadline - self.clock.monotonic()
        if left <= 0:
            raise _OutOfTime()
        # the socket's own limits sit just past the deadline: the clock (deadline.within) enforces it, so a slow
        # first byte or a body trickled a byte at a time ends there too; they are real time, so the clock sets them
        # (a test's FakeClock decides alone, whatever the machine's load)
        limit = self.clock.io_limit
        timeout = httpx.Timeout(limit(left) + 1.0, connect=limit(min(left, CONNECT_TIMEOUT_S)))
        try:
            return within(left, lambda: request(timeout), on_abandon=self._drop_client, clock=self.clock)
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


def _spent(err: LLMUnavailable, clock: Clock, started: float, budget: float | None = None) -> LLMUnavailable:
    """The error with the seconds the failed call took, which the decision's budget is charged (a call that ran
    out of time is charged what was left of the budget, not the moments it took to notice)."""
    elapsed = clock.monotonic() - started
    err.elapsed_s = round(elapsed if budget is None else min(elapsed, budget), 3)  # type: ignore[attr-defined]
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


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True
