"""Stage 5, advise: an LLM proposes knob changes inside the hard bounds; the validator is the only gate.

Any OpenAI-compatible endpoint will do (OpenAI, DeepSeek, a local vLLM, Ollama, llama.cpp). The reply is
data: knobs the LLM may not change are dropped and reported, the rest goes through `check` (a closure over
validate.check), rejected proposals are sent back for repair at most `max_repairs` times, and after that
the baseline is used (or AdvisorError under --smart-run-strict). Nothing in a reply is ever executed.
API keys live only in LLMSettings.api_key (SecretStr) and the client; never in prompts, errors or records.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from smartrun.deadline import within
from smartrun.errors import AdvisorError, InputError, SmartRunError
from smartrun.hardware import HardwareSnapshot
from smartrun.knobs import CATALOGUE
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.plan import Change, Frozen, Plan, Proposal, Rejection
from smartrun.rules import Bounds, KnobBound
from smartrun.validate import Verdict

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
NO_KEY = "sk-no-key-needed"  # what a key-less local server gets: the client insists on some key
MAX_REPLY_CHARS = 200_000  # a longer reply is refused unparsed
LOG_EXCERPT_CHARS = 4_000
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
    timeout_s: float = Field(default=60.0, gt=0)
    max_attempts: int = Field(default=4, ge=1)
    max_total_s: float = Field(default=120.0, gt=0)
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
    """One completion as received. `structured`: the JSON-schema response_format was in force."""

    content: str
    latency_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    structured: bool = False
    finish_reason: str | None = None


class Transport(Protocol):
    """Sends chat messages, returns the reply; raises LLMUnavailable once retrying is pointless or spent."""

    def complete(self, messages: list[dict], schema: dict) -> LLMReply: ...


class _Transient(Exception):
    """A failure worth retrying (connection, timeout, 408/409/429/5xx), with the server's Retry-After."""

    def __init__(self, message: str, retry_after_s: float | None = None):
        super().__init__(message)
        self.retry_after_s = retry_after_s


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

    Retries use exponential backoff with jitter, bounded by `max_attempts` and `max_total_s`.
    JSON-schema structured output is tried first; a server that refuses it (400 naming response_format)
    or ignores it (a non-JSON reply) gets plain text from then on, for the rest of the session.
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

    def complete(self, messages: list[dict], schema: dict) -> LLMReply:
        from tenacity import (
            RetryError,
            Retrying,
            retry_if_exception_type,
            stop_after_attempt,
            wait_random_exponential,
        )

        try:
            from tenacity import stop_before_delay as stop_by_time  # counts the coming wait (tenacity>=8.3)
        except ImportError:  # pragma: no cover
            from tenacity import stop_after_delay as stop_by_time

        started = time.monotonic()
        retrying = Retrying(
            stop=stop_after_attempt(self.settings.max_attempts) | stop_by_time(self.settings.max_total_s),
            wait=self._wait(wait_random_exponential(multiplier=self.backoff_s, max=self.backoff_max_s)),
            retry=retry_if_exception_type(_Transient),
            sleep=self._sleep,
        )
        try:
            return retrying(self._attempt, messages, schema, started)
        except RetryError as err:
            last = err.last_attempt.exception()
            tries = err.last_attempt.attempt_number
            raise LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} failed {tries} time(s) in "
                f"{time.monotonic() - started:.1f}s; last error: {last}"
            ) from None

    def _wait(self, backoff: Callable[[Any], float]) -> Callable[[Any], float]:
        """Backoff with jitter, or the server's Retry-After when longer; never above backoff_max_s."""

        def wait(state: Any) -> float:
            asked = getattr(state.outcome.exception(), "retry_after_s", None) or 0.0
            return min(max(backoff(state), asked), self.backoff_max_s)

        return wait

    def _attempt(self, messages: list[dict], schema: dict, started: float) -> LLMReply:
        """One request (plus a plain-text re-send when the server refuses response_format)."""
        remaining = self.settings.max_total_s - (time.monotonic() - started)
        timeout = max(0.1, min(self.settings.timeout_s, remaining))
        if not self._model:
            try:
                self._model = self._call(lambda: self._discover_model(timeout))
            except LLMUnavailable as err:
                raise LLMUnavailable(f"no --llm-model given and the server did not list one: {err.message}") from None
        if self.structured:
            try:
                return self._call(lambda: self._create(messages, schema, timeout))
            except _Unstructured:
                self.structured = False
        return self._call(lambda: self._create(messages, None, timeout))

    def _discover_model(self, timeout: float) -> str:
        try:
            models = within(timeout + 0.5, lambda: self.client().models.list(timeout=timeout))
        except TimeoutError:
            raise _Transient(f"timed out ({shown_url(self.settings.base_url)}/models)") from None
        ids = [m.id for m in getattr(models, "data", None) or [] if getattr(m, "id", None)]
        if not ids:
            raise LLMUnavailable(f"LLM endpoint {shown_url(self.settings.base_url)} lists no models")
        return ids[0]

    def _create(self, messages: list[dict], schema: dict | None, timeout: float) -> LLMReply:
        kwargs: dict[str, Any] = {}
        if schema is not None:
            kwargs["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "smartrun_proposal", "schema": schema, "strict": False},
            }
        sent = time.monotonic()
        try:  # the whole exchange within `timeout` of wall clock: a reply trickled byte by byte is cut off
            completion = within(timeout + 0.5, lambda: self.client().chat.completions.create(
                model=self._model, messages=messages, timeout=timeout, **kwargs))
        except TimeoutError:
            raise _Transient(f"timed out ({shown_url(self.settings.base_url)}: no complete reply within "
                             f"{timeout:g} s)") from None
        latency = time.monotonic() - sent
        choices = getattr(completion, "choices", None)
        if isinstance(completion, str) or not choices:
            shown = completion[:60] if isinstance(completion, str) else "no choices"
            raise LLMUnavailable(
                f"LLM endpoint {shown_url(self.settings.base_url)} did not send a chat completion ({shown!r})"
            )
        content = choices[0].message.content or ""
        structured = schema is not None
        if structured and content.strip() and not _is_json(content):
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
        )

    def _call(self, request: Callable[[], Any]) -> Any:
        """Run one request, mapping openai's exceptions onto retry / give up / fall back to plain text."""
        import openai

        try:
            return request()
        except openai.APIConnectionError as err:  # includes APITimeoutError
            what = "timed out" if isinstance(err, openai.APITimeoutError) else "connection failed"
            raise _Transient(f"{what} ({shown_url(self.settings.base_url)})") from None
        except openai.APIStatusError as err:
            status = err.status_code
            message = self._scrub(getattr(err, "message", "") or str(err))
            if status in (408, 409, 429) or status >= 500:
                raise _Transient(f"HTTP {status}: {message}", _retry_after(err.response)) from None
            if status in (400, 422) and re.search(r"response_format|json_schema|structured", message, re.I):
                raise _Unstructured() from None
            if status in _STATUS_WORDS:
                raise LLMUnavailable(_STATUS_WORDS[status]) from None
            raise LLMUnavailable(f"LLM endpoint answered HTTP {status}: {message}") from None
        except openai.OpenAIError as err:
            raise LLMUnavailable(f"LLM client error: {self._scrub(str(err))}") from None
        except (ValueError, RecursionError) as err:  # a truncated or hostile JSON body: a bad reply, fall back
            raise LLMUnavailable(f"LLM endpoint sent a body that is not JSON ({self._scrub(str(err))[:80]})") from None


class _Unstructured(Exception):
    """The server refused the JSON-schema response_format."""


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


class _ReplyChange(BaseModel):
    model_config = ConfigDict(extra="ignore")
    knob: str
    value: Any
    reason: str = ""


class _Reply(BaseModel):
    model_config = ConfigDict(extra="ignore")
    changes: list[_ReplyChange] = []
    reason: str = ""


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


def parse_reply(text: str) -> Proposal:
    """The LLM's reply as a Proposal (unvalidated). ReplyParseError says in one line what is wrong."""
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
        reply = _Reply.model_validate(chosen)
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


class Advice(Frozen):
    """The advisor's outcome: the plan to use and the full story of how it was reached."""

    plan: Plan
    exchanges: tuple[LLMExchange, ...] = ()
    fallback_reason: str | None = None
    latency_s: float = 0.0
    tokens: tuple[int, int] = (0, 0)  # prompt, completion


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
    env.filters["compact"] = lambda value: json.dumps(value, separators=(",", ":"))
    return env


def render(template: str, **data: Any) -> str:
    return _templates().get_template(template).render(**data)


def _bound_rows(context: AdviceContext) -> list[dict[str, Any]]:
    rows = []
    for name, bound in sorted(context.bounds.knobs.items()):
        knob = CATALOGUE.get(name)
        rows.append({
            "knob": name,
            "flag": knob.flag if knob else "",
            "baseline": _show(context.baseline.params.get(name)),
            "allowed": _allowed(bound),
            "open": _off_limits(name, context.bounds) is None,
            "pinned": bound.pinned,
            "sources": ", ".join(bound.sources) or "-",
            "notes": list(bound.notes),
        })
    return rows


def _hardware_data(hw: HardwareSnapshot) -> dict[str, Any]:
    return {
        "gpus": [{"index": g.index, "name": g.name, "memory_total_mib": g.memory_total_mib,
                  "memory_free_mib": g.memory_free_mib, "compute_capability": g.compute_capability}
                 for g in hw.gpus],
        "nvlink_pairs": [list(p) for p in hw.nvlink_pairs],
        "cpu_count": hw.cpu_count,
        "ram_mib": hw.ram_mib,
        "cuda_driver_version": hw.cuda_driver_version,
    }


def _model_data(m: ModelFacts) -> dict[str, Any]:
    keep = ("name", "architecture", "model_type", "num_hidden_layers", "hidden_size", "num_attention_heads",
            "num_kv_heads", "head_dim", "vocab_size", "derived_max_model_len", "sliding_window", "torch_dtype",
            "is_multimodal")
    data: dict[str, Any] = {k: getattr(m, k) for k in keep}
    if m.weight_bytes:
        data["weights_gib"] = round(m.weight_bytes / 2**30, 2)
    for part in ("moe", "mla", "quantization"):
        value = getattr(m, part)
        if value is not None:
            data[part] = value.model_dump(exclude={"raw"})
    return data


def _estimate_data(e: MemoryEstimate | None) -> dict[str, Any] | None:
    return None if e is None else e.model_dump()


def _excerpt(text: Any) -> str:
    text = str(text or "")
    return text[-LOG_EXCERPT_CHARS:].replace("```", "'''")


def prompt_data(context: AdviceContext) -> dict[str, Any]:
    """The values the templates render; nothing else reaches the prompt."""
    failure = dict(context.failure) if context.failure else None
    log_excerpt = _excerpt(failure.pop("log_excerpt", "")) if failure else ""
    return {
        "goal": context.goal,
        "vllm_version": context.estimate.vllm_version if context.estimate else None,
        "hardware": _hardware_data(context.hardware),
        "model": _model_data(context.model),
        "estimate": _estimate_data(context.estimate),
        "bounds": _bound_rows(context),
        "bound_warnings": list(context.bounds.warnings),
        "baseline": context.baseline.params,
        "attempts": [dict(a) for a in context.attempts],
        "failure": failure,
        "log_excerpt": log_excerpt,
        "schema": reply_schema(context.bounds),
    }


def open_knobs(bounds: Bounds) -> list[str]:
    return sorted(name for name in bounds.knobs if _off_limits(name, bounds) is None)


def reply_schema(bounds: Bounds) -> dict[str, Any]:
    """The JSON schema of a reply; knob names limited to the knobs the LLM may change."""
    knob: dict[str, Any] = {"type": "string"}
    if open_knobs(bounds):
        knob["enum"] = open_knobs(bounds)
    return {
        "type": "object",
        "properties": {
            "changes": {"type": "array", "items": {
                "type": "object",
                "properties": {"knob": knob, "value": {"type": ["integer", "number", "boolean", "string"]},
                               "reason": {"type": "string"}},
                "required": ["knob", "value", "reason"],
                "additionalProperties": False,
            }},
            "reason": {"type": "string"},
        },
        "required": ["changes", "reason"],
        "additionalProperties": False,
    }


def initial_messages(context: AdviceContext, kind: AdviceKind) -> list[dict[str, str]]:
    data = prompt_data(context)
    return [
        {"role": "system", "content": render(f"{kind}_system.md.j2", **data)},
        {"role": "user", "content": render(f"{kind}_user.md.j2", **data)},
    ]


def _repair_message(exchange: LLMExchange) -> dict[str, str]:
    rejections = [r.model_dump() for r in exchange.rejections]
    content = render("repair_user.md.j2", error=exchange.error, rejections=rejections,
                     ignored=list(exchange.ignored))
    return {"role": "user", "content": content}


# ---------------------------------------------------------------------------- the loop


def _one_exchange(kind: AdviceKind, messages: list[dict], transport: Transport, bounds: Bounds,
                  check: Callable[[Proposal], Verdict]) -> tuple[LLMExchange, Plan | None]:
    """Ask once, screen the reply, run what is left through `check`."""
    sent = tuple(dict(m) for m in messages)
    reply = transport.complete(messages, reply_schema(bounds))
    try:
        if reply.finish_reason == "length" and not _is_json(reply.content.strip()):
            raise ReplyParseError("LLM reply was cut off (finish_reason=length)")
        proposal = parse_reply(reply.content)
    except ReplyParseError as err:
        return LLMExchange(kind=kind, messages=sent, reply=reply, error=err.message), None
    usable, ignored = screen(proposal, bounds)
    if not usable.changes and proposal.changes:
        error = "nothing in the reply may be changed by the LLM"
        return LLMExchange(kind=kind, messages=sent, reply=reply, error=error, proposal=usable,
                           ignored=ignored), None
    try:
        verdict = check(usable)
    except SmartRunError as err:  # e.g. the estimator cannot budget the proposed combination
        error = f"proposal could not be checked: {err.message}"
        return LLMExchange(kind=kind, messages=sent, reply=reply, error=error, proposal=usable,
                           ignored=ignored), None
    exchange = LLMExchange(kind=kind, messages=sent, reply=reply, proposal=usable, ignored=ignored,
                           rejections=verdict.rejections, accepted=verdict.accepted)
    if not verdict.accepted or verdict.plan is None:
        return exchange, None
    reason = usable.reason or "LLM proposal"
    return exchange, verdict.plan.model_copy(update={"source": "llm", "reason": reason})


def _failure_summary(exchange: LLMExchange) -> str:
    if exchange.error:
        return exchange.error
    broken = "; ".join(f"{r.knob}={_show(r.value)} outside {r.bound} ({r.source})" for r in exchange.rejections)
    return f"rejected by the bounds: {broken}"


def _totals(exchanges: list[LLMExchange]) -> tuple[float, tuple[int, int]]:
    replies = [e.reply for e in exchanges if e.reply is not None]
    latency = round(sum(r.latency_s for r in replies), 3)
    return latency, (sum(r.prompt_tokens for r in replies), sum(r.completion_tokens for r in replies))


def static_advice(baseline: Plan, reason: str) -> Advice:
    """The baseline, with the reason the LLM was not used (no LLM configured, cache hit elsewhere...)."""
    return Advice(plan=baseline, fallback_reason=reason)


def advise(
    context: AdviceContext,
    transport: Transport,
    check: Callable[[Proposal], Verdict],
    *,
    kind: AdviceKind = "propose",
    strict: bool = False,
    max_repairs: int = 2,
) -> Advice:
    """Ask the LLM for changes to `context.baseline`; repair rejected proposals; else fall back or raise.

    `check` is the only gate (the pipeline passes a closure over validate.check with the bounds and the
    base plan); under `strict`, anything short of an accepted proposal raises AdvisorError (exit code 3).
    """
    messages: list[dict] = initial_messages(context, kind)
    exchanges: list[LLMExchange] = []
    failure = "no attempt made"
    for _ in range(1 + max(0, max_repairs)):
        try:
            exchange, plan = _one_exchange(kind, messages, transport, context.bounds, check)
        except AdvisorError as err:  # transport gave up: retrying the conversation will not help
            exchanges.append(LLMExchange(kind=kind, messages=tuple(dict(m) for m in messages), error=err.message))
            failure = err.message
            break
        exchanges.append(exchange)
        latency, tokens = _totals(exchanges)
        if plan is not None:
            return Advice(plan=plan, exchanges=tuple(exchanges), latency_s=latency, tokens=tokens)
        failure = _failure_summary(exchange)
        messages = [*messages, {"role": "assistant", "content": exchange.reply.content if exchange.reply else ""},
                    _repair_message(exchange)]
    latency, tokens = _totals(exchanges)
    asked = sum(1 for e in exchanges if e.reply is not None)
    if exchanges and exchanges[-1].reply is None:  # the transport gave up
        reason = f"LLM not used: {failure}"
    else:
        reason = f"LLM advice not used after {asked} repl{'y' if asked == 1 else 'ies'}: {failure}"
    if strict:
        raise AdvisorError(f"--smart-run-strict: {reason}")
    return Advice(plan=context.baseline, exchanges=tuple(exchanges), fallback_reason=reason,
                  latency_s=latency, tokens=tokens)


# ---------------------------------------------------------------------------- reporting


def debug_line(advice: Advice) -> str:
    """`source=llm reason="..." latency=1.23s tokens=812/96` for --smart-run-debug."""
    reason = advice.fallback_reason if advice.plan.source != "llm" else advice.plan.reason
    reason = " ".join(str(reason or "-").split())[:240]
    prompt, completion = advice.tokens
    return (f"source={advice.plan.source} reason={json.dumps(reason, ensure_ascii=False)} "
            f"latency={advice.latency_s:.2f}s tokens={prompt}/{completion}")


def explain_lines(advice: Advice) -> list[str]:
    """One line per exchange and per ignored/rejected change, for --explain."""
    lines: list[str] = []
    for number, ex in enumerate(advice.exchanges, 1):
        taken = ", ".join(f"{c.knob}={_show(c.value)}" for c in ex.proposal.changes) if ex.proposal else ""
        status = "accepted" if ex.accepted else "not accepted"
        lines.append(f"LLM {ex.kind} #{number}: {status}" + (f" [{taken}]" if taken else "")
                     + (f": {ex.error}" if ex.error else ""))
        lines.extend(f"  ignored {item}" for item in ex.ignored)
        lines.extend(f"  rejected {r.knob}={_show(r.value)}: {r.reason}"
                     + ("" if r.bound in r.reason else f" (allowed {r.bound}; {r.source})") for r in ex.rejections)
    lines.append(debug_line(advice))
    return lines
