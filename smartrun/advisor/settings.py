"""The advisor's settings (endpoint, model, key, budget) from flags, environment and config; its errors."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from platformdirs import user_config_dir
from pydantic import (
    Field,
    SecretStr,
)

from smartrun import fileio
from smartrun.errors import AdvisorError, InputError
from smartrun.frozen import Frozen

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

PROMPTS_DIR = Path(__file__).resolve().parent.parent / "prompts"
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




class LLMUnavailable(AdvisorError):
    """The endpoint gave no usable completion (after retries, or a refusal that retrying cannot fix)."""

    __module__ = "smartrun.advisor"  # the name session records give it (pipeline.replay rebuilds it by name)


class ReplyParseError(AdvisorError):
    """The reply holds no JSON object of the expected shape (empty, truncated, prose only)."""

    __module__ = "smartrun.advisor"  # the name session records give it




class LLMSettings(Frozen):
    """Where the advisor's LLM lives. `model=""` means: ask the server (/models) and take its first model."""

    base_url: str
    model: str = ""
    api_key: SecretStr | None = None  # None = key-less server (a dummy key is sent)
    timeout_s: float = Field(default=DEFAULT_BUDGET_S, gt=0)  # the whole budget of one decision (--llm-timeout)
    max_attempts: int = Field(default=4, ge=1)  # HTTP tries per exchange, inside the budget
    origin: dict[str, str] = Field(default_factory=dict)  # field -> "cli" | "env:NAME" | "file:PATH"


def default_config_path() -> Path:
    return Path(user_config_dir("localaistack")) / "config.toml"


def _read_llm_table(path: Path) -> dict[str, Any]:
    """The [llm] table of the user config file; {} when the file does not exist."""
    if not path.is_file():
        return {}

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


def shown_url(url: str) -> str:
    """The URL without user:password@, for messages and records."""
    return re.sub(r"//[^/@]*@", "//", url)
