"""A short, bounded load probe against any OpenAI-compatible /v1/completions endpoint.

Closed loop: `concurrency` clients send requests back to back until the duration or the request
budget runs out, then the requests in flight finish (each bounded by its own timeout), so a probe
always stops by itself. Streaming is used to time the first token; a server that refuses the stream
or vLLM's extras (ignore_eos, stream_options) is retried once in a plainer form for the rest of the run.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from pydantic import Field, ValidationError

from smartrun import fileio
from smartrun.clock import SYSTEM, Clock
from smartrun.errors import InputError, SmartRunError
from smartrun.frozen import Frozen


class ProbeError(SmartRunError):
    """The endpoint could not be probed at all (unreachable, no model listed)."""


class ProbeSettings(Frozen):
    """What load to offer: a closed loop of `concurrency` clients, bounded in time and requests."""

    # Upper limits keep a probe bounded in time and memory (every in-flight prompt is held as text).
    concurrency: int = Field(16, ge=1, le=4096)
    duration_s: float = Field(10.0, gt=0, le=3600, allow_inf_nan=False)
    prompt_tokens: int = Field(256, ge=1, le=131072)
    output_tokens: int = Field(128, ge=1, le=131072)
    max_requests: int = Field(1000, ge=1, le=1_000_000)
    request_timeout_s: float = Field(60.0, gt=0, le=3600, allow_inf_nan=False)
    model: str | None = None


class ProbeOption(NamedTuple):
    """One probe setting as a command-line option: the ProbeSettings field it sets and how it is typed."""

    field: str
    flag: str
    type: Callable[[str], Any]
    metavar: str
    help: str  # "{default}" is the setting's default

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")


# Declared once: `localaistack probe` takes these as they are, `model run --tune` as --probe-* (tune.options),
# and a bad value is reported under the flag the user typed (make_settings).
PROBE_OPTIONS: tuple[ProbeOption, ...] = (
    ProbeOption("concurrency", "--concurrency", int, "N", "clients sending at once (default {default})"),
    ProbeOption("duration_s", "--duration", float, "S", "seconds to keep sending (default {default:g})"),
    ProbeOption("prompt_tokens", "--prompt-tokens", int, "N", "prompt length in tokens (default {default})"),
    ProbeOption("output_tokens", "--output-tokens", int, "N", "tokens to generate per request (default {default})"),
    ProbeOption("max_requests", "--max-requests", int, "N", "stop after this many requests (default {default})"),
    ProbeOption("request_timeout_s", "--request-timeout", float, "S", "seconds per request (default {default:g})"),
)
SETTING_FLAGS = {option.field: option.flag for option in PROBE_OPTIONS}


def make_settings(**values: Any) -> ProbeSettings:
    """ProbeSettings from user input; a bad value raises InputError naming its flag (None = default)."""
    given = {k: v for k, v in values.items() if v is not None}
    try:
        return ProbeSettings(**given)
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "?"
        flag = SETTING_FLAGS.get(field, field)
        raise InputError(f"{flag} {given.get(field)!r}: {first['msg'].lower()}") from None


class ProbeProgress(Frozen):
    """A live snapshot while the probe runs (for one updating progress line)."""

    elapsed_s: float
    done: int
    errors: int
    in_flight: int
    output_tokens: int

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def line(self) -> str:
        return (f"probe {self.elapsed_s:5.1f}s  done {self.done}  errors {self.errors}  "
                f"in flight {self.in_flight}  {self.tokens_per_s:,.0f} tok/s")


class ProbeResult(Frozen):
    """What one probe measured. Times in milliseconds; TTFT is None when nothing streamed."""

    url: str
    model: str
    settings: ProbeSettings
    requests: int  # sent (ok + errors)
    ok: int
    errors: int
    error_kinds: dict[str, int] = Field(default_factory=dict)
    output_tokens: int
    elapsed_s: float
    tokens_per_s: float
    requests_per_s: float
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    streamed: bool = True
    stopped_by: Literal["duration", "max_requests"] = "duration"
    # Per-request samples in completion order (ms), for checks and plots; left out of records and --json.
    latencies_ms: tuple[float, ...] = Field(default=(), exclude=True, repr=False)
    ttfts_ms: tuple[float, ...] = Field(default=(), exclude=True, repr=False)

    def summary(self) -> str:
        fmt = lambda v: "-" if v is None else f"{v:,.0f}"  # noqa: E731
        return (f"{self.tokens_per_s:,.1f} tok/s  {self.requests_per_s:,.2f} req/s  "
                f"TTFT p50/p95 {fmt(self.ttft_p50_ms)}/{fmt(self.ttft_p95_ms)} ms  "
                f"latency p50/p95 {fmt(self.latency_p50_ms)}/{fmt(self.latency_p95_ms)} ms  "
                f"ok {self.ok}  errors {self.errors}")


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def api_root(url: str) -> str:
    """'http://h:8000', 'http://h:8000/', 'http://h:8000/v1' -> 'http://h:8000'."""
    import httpx

    try:
        parsed = httpx.URL(url.strip())
    except Exception:  # httpx raises several types for junk
        parsed = None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.host:
        raise InputError(f"probe URL {url!r}: expected http(s)://HOST[:PORT][/v1]")
    root = str(parsed.copy_with(query=None, fragment=None)).rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


def prompt_text(tokens: int, index: int) -> str:
    """About `tokens` tokens of text; the leading index keeps prefix caching from flattering the run."""
    return f"{index} " + " ".join(["hello"] * max(0, tokens - 1))


MAX_MODELS_BYTES = 4 * 1024 * 1024  # a model list larger than this is not a server's honest answer


async def first_model(client: Any, root: str, timeout_s: float = 60.0) -> str:
    """The first model id /v1/models lists (what vLLM serves); the whole exchange within `timeout_s` of wall
    clock (a server that trickles its answer a byte at a time defeats per-read timeouts), the body capped."""
    import asyncio

    import httpx

    async def fetch() -> tuple[int, bytes]:
        async with client.stream("GET", f"{root}/v1/models", timeout=timeout_s) as reply:
            body = bytearray()
            async for chunk in reply.aiter_bytes():
                body += chunk
                if len(body) > MAX_MODELS_BYTES:
                    raise ValueError(f"answer larger than {MAX_MODELS_BYTES // (1024 * 1024)} MiB")
            return reply.status_code, bytes(body)

    try:
        status, body = await asyncio.wait_for(fetch(), timeout_s)
    except asyncio.TimeoutError:
        raise ProbeError(f"{root}/v1/models: no complete answer within {timeout_s:g} s; pass --model") from None
    except httpx.HTTPError as err:
        detail = f"{type(err).__name__}: {err}" if str(err) else f"{type(err).__name__}; not an HTTP server?"
        raise ProbeError(f"{root}: cannot reach the server ({detail})") from None
    except ValueError as err:
        raise ProbeError(f"{root}/v1/models: {err}; pass --model") from None
    try:
        if status != 200:
            raise ValueError(f"HTTP {status}")
        models = _object(fileio.loads_json(body)).get("data") or []
        return str(_object(_list(models)[0])["id"])
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError, UnicodeDecodeError) as err:
        name = "nested too deeply" if isinstance(err, RecursionError) else f"{type(err).__name__}: {err}"
        raise ProbeError(f"{root}/v1/models: no model listed ({name}); pass --model") from None


class _Run:
    """Mutable state shared by the probe's workers (only inside run_probe_async)."""

    # Request shapes, from richest to plainest; a 400/422 moves every worker to the next one.
    VARIANTS = (
        {"stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True},
        {"stream": True},
        {"stream": False},
    )

    def __init__(self, settings: ProbeSettings, clock: Clock = SYSTEM):
        self.settings = settings
        self.clock = clock
        self.variant = 0
        self.issued = 0
        self.ok = 0
        self.errors: Counter[str] = Counter()
        self.in_flight = 0
        self.output_tokens = 0
        self.latencies: list[float] = []
        self.ttfts: list[float] = []
        self.streamed_any = False
        self.stopped_by: Literal["duration", "max_requests"] = "duration"


def _text_of(choice: Any) -> str:
    choice = _object(choice)
    return str(choice.get("text") or _object(choice.get("delta") or {}).get("content") or "")


def _object(value: Any) -> dict[str, Any]:
    """A JSON object from the server, or TypeError (counted as a bad reply)."""
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _list(value: Any) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise TypeError(f"expected a JSON list, got {type(value).__name__}")
    return value


def _token_count(usage_tokens: Any, chunk_tokens: int, max_tokens: int | None = None) -> int:
    """The server's completion_tokens when it is a sane count, else the text chunks seen.

    A count far above the max_tokens asked for (10**12 from a broken or lying server) is a bad reply: one such
    answer would otherwise dominate the tokens/s the tuner compares. vLLM never exceeds max_tokens; the slack
    (2x + 16) leaves room for servers that count special tokens."""
    if usage_tokens is None:
        return chunk_tokens
    if isinstance(usage_tokens, bool) or not isinstance(usage_tokens, int) or usage_tokens < 0:
        raise TypeError(f"usage.completion_tokens {usage_tokens!r} is not a count")
    if max_tokens is not None and usage_tokens > 2 * max_tokens + 16:
        raise ValueError(f"usage.completion_tokens {usage_tokens} is far more than the {max_tokens} asked for")
    return usage_tokens


MAX_REPLY_BYTES = 16 * 1024 * 1024  # one completion's answer (or one event line) larger than this is a bad reply


async def _capped_body(reply: Any, limit: int = MAX_REPLY_BYTES) -> bytes:
    body = bytearray()
    async for chunk in reply.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ValueError(f"answer larger than {limit} bytes")
    return bytes(body)


async def _capped_lines(reply: Any, limit: int = MAX_REPLY_BYTES) -> Any:
    """The answer's lines as text, none longer than `limit` bytes (a server never sending a newline cannot
    fill memory)."""
    pending = bytearray()
    async for chunk in reply.aiter_bytes():
        pending += chunk
        while (cut := pending.find(b"\n")) >= 0:
            yield pending[:cut].decode("utf-8", "replace").rstrip("\r")
            del pending[:cut + 1]
        if len(pending) > limit:
            raise ValueError(f"an event line longer than {limit} bytes")
    if pending:
        yield pending.decode("utf-8", "replace").rstrip("\r")


async def _one_request(client: Any, url: str, model: str, run: _Run, index: int) -> None:
    """Send one completion; record latency, TTFT and tokens, or the error kind."""
    import httpx

    s, clock = run.settings, run.clock
    while True:
        variant = run.variant
        body = {"model": model, "prompt": prompt_text(s.prompt_tokens, index), "max_tokens": s.output_tokens,
                "temperature": 0.0, **_Run.VARIANTS[variant]}
        start = clock.monotonic()
        ttft = None
        chunk_tokens = 0
        usage_tokens = None
        try:
            async with client.stream("POST", url, json=body, timeout=clock.io_limit(s.request_timeout_s)) as reply:
                if reply.status_code in (400, 422) and variant + 1 < len(_Run.VARIANTS):
                    await reply.aread()
                    run.variant = max(run.variant, variant + 1)
                    continue  # retry this request in the plainer form
                if reply.status_code != 200:
                    await reply.aread()
                    run.errors[f"HTTP {reply.status_code}"] += 1
                    return
                if "text/event-stream" in reply.headers.get("content-type", ""):
                    async for line in _capped_lines(reply):
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        event = _object(json.loads(data))
                        if event.get("usage"):
                            usage_tokens = _object(event["usage"]).get("completion_tokens")
                        for choice in _list(event.get("choices")):
                            if _text_of(choice):
                                chunk_tokens += 1
                                if ttft is None:
                                    ttft = clock.monotonic() - start
                    run.streamed_any = True
                else:
                    payload = _object(json.loads(await _capped_body(reply)))
                    usage_tokens = _object(payload.get("usage") or {}).get("completion_tokens")
                    chunk_tokens = 1 if any(_text_of(c) for c in _list(payload.get("choices"))) else 0
                tokens = _token_count(usage_tokens, chunk_tokens, s.output_tokens)
        except httpx.TimeoutException:
            run.errors["timeout"] += 1
            return
        except httpx.HTTPError as err:
            run.errors[type(err).__name__] += 1
            return
        except (ValueError, TypeError, AttributeError, RecursionError):  # not JSON, or not shaped like a completion
            run.errors["bad reply"] += 1
            return
        latency = clock.monotonic() - start
        if latency > s.request_timeout_s:  # answered, but after its timeout by the clock: a timeout all the same
            run.errors["timeout"] += 1
            return
        run.ok += 1
        run.output_tokens += tokens
        run.latencies.append(latency * 1000.0)
        if ttft is not None:
            run.ttfts.append(ttft * 1000.0)
        return


async def _worker(client: Any, url: str, model: str, run: _Run, started: float) -> None:
    import asyncio

    s = run.settings
    while True:
        if run.clock.monotonic() - started >= s.duration_s:
            return
        if run.issued >= s.max_requests:
            run.stopped_by = "max_requests"
            return
        index = run.issued
        run.issued += 1
        run.in_flight += 1
        try:  # the whole request within its timeout of wall clock, even when the server trickles
            await asyncio.wait_for(_one_request(client, url, model, run, index), run.clock.io_limit(s.request_timeout_s))
        except asyncio.TimeoutError:
            run.errors["timeout"] += 1
        finally:
            run.in_flight -= 1


async def run_probe_async(
    base_url: str,
    settings: ProbeSettings,
    on_progress: Callable[[ProbeProgress], None] | None = None,
    progress_every_s: float = 0.25,
    api_key: str | None = None,
    clock: Clock = SYSTEM,
) -> ProbeResult:
    """Probe `base_url` (server root or .../v1) with `settings`; returns when every worker has stopped.

    `api_key` (a server started with --api-key) is sent as a bearer token and kept out of the result.
    The duration, latencies and each request's timeout are read from `clock`; the asyncio timeouts on the
    same figures are the real-time backstop (`clock.io_limit`: on a test's FakeClock only its time decides).
    """
    import asyncio  # lazy: the CLI starts faster without it

    import httpx

    root = api_root(base_url)
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(limits=limits, timeout=clock.io_limit(settings.request_timeout_s), trust_env=False,
                                 headers=headers) as client:
        model = settings.model or await first_model(client, root, clock.io_limit(settings.request_timeout_s))
        run = _Run(settings, clock)
        started = clock.monotonic()

        def progress() -> ProbeProgress:
            return ProbeProgress(elapsed_s=clock.monotonic() - started, done=run.ok, errors=sum(run.errors.values()),
                                 in_flight=run.in_flight, output_tokens=run.output_tokens)

        workers = [asyncio.create_task(_worker(client, f"{root}/v1/completions", model, run, started))
                   for _ in range(settings.concurrency)]
        hard_stop = clock.io_limit(settings.duration_s + settings.request_timeout_s) + 5.0

        async def watch() -> None:
            while not all(w.done() for w in workers):
                await asyncio.wait(workers, timeout=progress_every_s)
                if on_progress:
                    on_progress(progress())

        try:
            await asyncio.wait_for(watch(), hard_stop)
        except asyncio.TimeoutError:  # a request timeout that did not fire; never hang
            run.errors["probe deadline"] += run.in_flight
        finally:  # also on Ctrl+C: stop every worker before the client closes under it (no stray tracebacks)
            for worker in workers:
                worker.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        elapsed = clock.monotonic() - started
    if on_progress:
        on_progress(progress())
    errors = sum(run.errors.values())
    return ProbeResult(
        url=root, model=model, settings=settings, requests=run.ok + errors, ok=run.ok, errors=errors,
        error_kinds=dict(run.errors), output_tokens=run.output_tokens, elapsed_s=elapsed,
        tokens_per_s=run.output_tokens / elapsed if elapsed > 0 else 0.0,
        requests_per_s=run.ok / elapsed if elapsed > 0 else 0.0,
        ttft_p50_ms=percentile(run.ttfts, 50), ttft_p95_ms=percentile(run.ttfts, 95),
        latency_p50_ms=percentile(run.latencies, 50), latency_p95_ms=percentile(run.latencies, 95),
        streamed=run.streamed_any, stopped_by=run.stopped_by,
        latencies_ms=tuple(run.latencies), ttfts_ms=tuple(run.ttfts),
    )


def run_probe(
    base_url: str, settings: ProbeSettings, on_progress: Callable[[ProbeProgress], None] | None = None,
    api_key: str | None = None, clock: Clock = SYSTEM,
) -> ProbeResult:
    """Blocking form of run_probe_async for the CLI and the tuner."""
    import asyncio

    return asyncio.run(run_probe_async(base_url, settings, on_progress, api_key=api_key, clock=clock))


class ProgressLine:
    """A progress callback that rewrites one status line on a terminal and stays quiet in a pipe."""

    def __init__(self, stream: Any = None):
        self.out = stream or sys.stderr
        self.interactive = bool(getattr(self.out, "isatty", lambda: False)())
        self.shown = False

    def __call__(self, progress: ProbeProgress) -> None:
        if self.interactive:
            self.out.write("\r\033[K" + progress.line())
            self.out.flush()
            self.shown = True

    def finish(self) -> None:
        """End the status line so the next output starts on a fresh one."""
        if self.shown:
            self.out.write("\n")
            self.out.flush()
            self.shown = False
