"""The one secrets layer: which values are secret, and hiding them in argv, text and JSON trees.

- One marker, `REDACTED` (declared with the knob catalogue, which marks the secret knobs).
- Secret values come from argv through the one tokenizer (smartrun.argv): every value of a flag
  whose catalogue knob is `secret` (`--api-key K1 K2`, `--api_key=K`, `--hf-token V`), and of an
  unknown flag named like a credential; plus credential-like environment variables.
- `redact_argv` hides them structurally (the flag stays, its values become REDACTED); `redact_text`
  hides known values and anything shaped like a key (Authorization headers, bearer tokens, `sk-...`,
  `hf_...`, `user:password@` in URLs); `redact_tree` does it in every string of a JSON-like value.
- Every pattern runs in linear time on any input (no pattern can rescan a run of characters from
  each of its positions), and `cap_line` shortens a line before any pattern sees it, so a hostile
  multi-megabyte log line cannot freeze the process.
Apply `redact_text` to every line before it is printed, kept in a record, or sent to an LLM.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from smartrun.argv import tokenize
from smartrun.knobs import REDACTED

MAX_LINE = 16384  # characters of one log line kept; the rest is cut (and counted) before any regex
_SHORT = 4  # secrets shorter than this are hidden only where they stand alone (never inside a word)
_MAX_DEPTH = 200

_PATTERNS = (  # the part in group "keep" stays, the rest of the match is redacted
    re.compile(r"(?i)(?P<keep>authorization[\"']?\s*[:=]\s*[\"']?)(bearer\s+)?[^\s\"',]+"),
    re.compile(r"(?i)(?P<keep>\bbearer\s+)[A-Za-z0-9._~+/=-]{8,}"),
    re.compile(r"(?P<keep>)\bsk-[A-Za-z0-9_-]{8,}"),
    re.compile(r"(?P<keep>)\bhf_[A-Za-z0-9]{8,}"),
    # user:password@ in URLs; the scheme starts where a scheme character does not precede it, so a long
    # run of letters is scanned once, not once per position (which would be quadratic)
    re.compile(r"(?P<keep>(?<![A-Za-z0-9+.-])[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@:]+:[^/\s@]+(?=@)"),
)
_SECRET_ENV = re.compile(r"(?i)^[A-Z0-9_]*(API_KEY|TOKEN|SECRET|PASSWORD)[A-Z0-9_]*$")
_ALWAYS_SECRET_ENV = ("VLLM_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # vLLM / HF read these


def cap_line(line: str, limit: int = MAX_LINE) -> str:
    """The line cut to `limit` characters, saying how much was cut."""
    if len(line) <= limit:
        return line
    return f"{line[:limit]} ... [{len(line) - limit} characters cut]"


def secret_values(argv: Iterable[str] = (), env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Every value of a secret flag in argv (all spellings, all values) and of credential-like env vars."""
    found: list[str] = []
    for token in tokenize(list(argv)):
        if token.secret:
            found += [v for v in token.values if v]
    for key, value in (env or {}).items():
        if not value:
            continue
        if key in _ALWAYS_SECRET_ENV or (_SECRET_ENV.match(key) and len(value) >= 8):  # "1", "true" are flags
            found.append(value)
    seen: dict[str, None] = {}
    for value in found:
        if value != REDACTED:
            seen.setdefault(value, None)
    return tuple(seen)


def launch_env_secrets(env: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """Secrets of the environment a child process gets (ours plus its changes)."""
    return secret_values((), {**os.environ, **(env or {})})


def redact_argv(argv: Iterable[str], secrets: Sequence[str] = ()) -> list[str]:
    """argv with every value of a secret flag replaced by REDACTED (the flag stays), and key-like text hidden."""
    out: list[str] = []
    for token in tokenize([str(a) for a in argv]):
        if not token.secret:
            out += [redact_text(item, secrets) for item in token.raw]
        elif token.inline:
            out.append(f"{token.written}={REDACTED}")
        else:
            out += [token.raw[0], *(REDACTED for _ in token.values)]
    return out


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """Known secret values (longest first) and anything that looks like a key or an Authorization header hidden."""
    if not text:
        return text
    for secret in sorted({s for s in secrets if s and s != REDACTED}, key=len, reverse=True):
        if len(secret) >= _SHORT:
            text = text.replace(secret, REDACTED)
        elif secret in text:
            text = re.sub(rf"(?<![\w.-]){re.escape(secret)}(?![\w.-])", REDACTED, text)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group("keep") + REDACTED, text)
    return text


def redact_env(env: Mapping[str, str], secrets: Sequence[str] = ()) -> dict[str, str]:
    """Environment changes with credential-like variables hidden."""
    return {k: (REDACTED if (_SECRET_ENV.match(k) or k in _ALWAYS_SECRET_ENV) else redact_text(str(v), secrets))
            for k, v in env.items()}


def redact_tree(value: Any, secrets: Sequence[str] = (), _depth: int = 0) -> Any:
    """Redact inside every string of a JSON-like value (structure and keys kept, so the JSON stays valid)."""
    if isinstance(value, str):
        return redact_text(value, secrets)
    if _depth > _MAX_DEPTH:
        return REDACTED  # nothing we write nests this deep; never recurse without end on crafted input
    if isinstance(value, dict):
        return {k: redact_tree(v, secrets, _depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v, secrets, _depth + 1) for v in value]
    return value


def redact_line(line: str, secrets: Sequence[str] = ()) -> str:
    """One line for output: capped first, then redacted."""
    return redact_text(cap_line(line), secrets)
