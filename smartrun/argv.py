"""The one argv tokenizer: `vllm serve` arguments read the way vLLM's own parser reads them.

Every place that looks into an argv (pins, passthrough, adaptation to the installed vLLM, the
endpoint and API key for readiness and the probe, redaction) calls `tokenize`; nothing else scans
argv, so they cannot disagree about a spelling.

Spellings understood (vLLM's FlexibleArgumentParser on top of argparse):
- `--x v`, `--x=v`; `_` and `-` interchangeable in a long flag's name (`--api_key=K` is `--api-key`);
- several values (`--api-key K1 K2`: nargs "+"), an optional value (`--hf-token [V]`: nargs "?");
- negative booleans: the catalogue's (`--disable-prefix-caching`) and argparse's `--no-x` for every
  boolean knob `--x`;
- short flags with an attached value (`-O3`, `-O=3`, `-O 3`), aliases (`-tp 2`, `-tp=2`);
- nested JSON dot-keys (`-cc.cudagraph_mode=NONE`, `--compilation-config.mode 3`);
- negative numbers are values (`--max-model-len -1`), as in argparse; `--` ends the flags.

How many values a flag takes comes from the knob catalogue (knobs.CATALOGUE) first, then from the
`arity` mapping the caller passes (the installed vLLM's `serve --help`, see launch.VllmInfo.arity),
else it is guessed: one value when the next item does not look like a flag.

API:
- `tokenize(argv, arity=None) -> list[Token]`: every item of argv belongs to exactly one token, in
  order; `Token.raw` is the items it spans (`start:end`), so `rebuild(tokens) == list(argv)`.
- `Token`: `flag` (normalised: `--api-key`, `-O`; None for a positional or `--`), `written` (as
  typed, before `=`), `knob` (catalogue entry or None), `values`, `inline` (`--x=v` / `-O3`),
  `negative` (a boolean's negative flag), `dotted` (the dot-key of `-cc.x=y`), `secret`.
- `last(tokens, knob_name)`: the token vLLM would use (the last one wins); `values_of(argv, name)`.
- `has(tokens, knob_name)`, `with_defaults(argv, {knob: value})`: add a flag only when not given.
- `normalize(flag)`: the canonical spelling of a flag name.
- `refuse_unknown(argv, known, own, arity, where)`: InputError (exit 2) for a flag the vLLM that will run
  does not accept, naming the nearest flag (vLLM's, smartrun's own, LocalAIStack's aliases).
- `parse_user_args(argv) -> UserArgs`: the user's vLLM flags as typed pins (known knobs) and passthrough.
Redaction built on these lives in smartrun.secrets.
"""

from __future__ import annotations

import argparse
import difflib
import re
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from smartrun.errors import InputError
from smartrun.frozen import Frozen
from smartrun.knobs import CATALOGUE, LOCALAISTACK_ALIASES, LOCALAISTACK_HINTS, Knob, parse_value

Arity = Literal["0", "1", "?", "+"]
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")  # argparse's own test: such items are values
# Flags outside the catalogue whose values are hidden anyway (a newer vLLM's --hf-token-like flags).
_SECRET_NAME = re.compile(r"(?:^|-)(?:api-key|token|secret|password|passwd)$")


@dataclass(frozen=True)
class Token:
    """One flag with its values, or one positional item, as vLLM would read it."""

    start: int
    end: int
    raw: tuple[str, ...]
    flag: str | None = None
    written: str | None = None
    values: tuple[str, ...] = ()
    inline: bool = False
    knob: Knob | None = None
    negative: bool = False
    dotted: str | None = None

    @property
    def secret(self) -> bool:
        """Its values are secrets: a catalogue knob marked secret, or an unknown flag named like one."""
        if self.flag is None:
            return False
        if self.knob is not None:
            return self.knob.secret
        return bool(_SECRET_NAME.search(self.flag.lstrip("-")))


def _index() -> dict[str, tuple[Knob, bool]]:
    """Every catalogue spelling -> (knob, value for booleans); argparse's `--no-x` for each boolean `--x`."""
    index: dict[str, tuple[Knob, bool]] = {}
    for knob in CATALOGUE.values():
        for flag in (knob.flag, *knob.aliases):
            index[flag] = (knob, True)
            if knob.type == "bool" and flag.startswith("--"):
                index.setdefault("--no-" + flag[2:], (knob, False))
        for flag in knob.negative_flags:
            index[flag] = (knob, False)
    return index


FLAGS = _index()


def catalogue_arity(knob: Knob) -> Arity:
    if knob.type == "bool":
        return "0"
    return {"+": "+", "?": "?"}.get(knob.nargs, "1")  # type: ignore[return-value]


def normalize(name: str) -> str:
    """`--api_key` -> `--api-key` (only the name before a dot-key: `--x_y.a_b` -> `--x-y.a_b`)."""
    if name.startswith("--") and len(name) > 2:
        head, dot, tail = name[2:].partition(".")
        return "--" + head.replace("_", "-") + dot + tail
    return name


def looks_like_flag(item: str) -> bool:
    """argparse's view: starts with `-`, is not `-` alone, not a negative number, has no space."""
    return item.startswith("-") and item != "-" and not _NEGATIVE_NUMBER.match(item) and " " not in item


ArityLookup = Mapping[str, str] | Callable[[str], str | None] | None


def _lookup(arity: ArityLookup, flag: str) -> str | None:
    if arity is None:
        return None
    if callable(arity):
        return arity(flag)
    return arity.get(flag)


def tokenize(argv: Sequence[str], arity: ArityLookup = None) -> list[Token]:
    """argv -> tokens covering every item in order (see the module docstring)."""
    items = [str(a) for a in argv]
    tokens: list[Token] = []
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--":  # everything after is positional
            tokens.append(Token(start=i, end=i + 1, raw=(item,)))
            tokens += [Token(start=j, end=j + 1, raw=(items[j],), values=(items[j],)) for j in range(i + 1, len(items))]
            break
        if not looks_like_flag(item):
            tokens.append(Token(start=i, end=i + 1, raw=(item,), values=(item,)))
            i += 1
            continue
        token = _flag_token(items, i, arity)
        tokens.append(token)
        i = token.end
    return tokens


def _flag_token(items: list[str], i: int, arity: ArityLookup) -> Token:
    item = items[i]
    written, eq, inline_value = item.partition("=")
    name = normalize(written)
    dotted = None
    knob, positive = FLAGS.get(name, (None, True))
    kind: str | None = catalogue_arity(knob) if knob is not None else _lookup(arity, name)
    if knob is None and kind is None and "." in name.lstrip("-"):  # -cc.mode=3: a JSON dot-key, one value
        lead = len(name) - len(name.lstrip("-"))
        base, _, dotted = name[lead:].partition(".")
        name, kind = name[:lead] + base, "1"
        knob = None
    elif knob is None and kind is None and not item.startswith("--") and not eq and len(item) > 2:
        short = item[:2]  # -O3: a one-letter flag with its value attached
        short_knob = FLAGS.get(short, (None, True))[0]
        short_kind = catalogue_arity(short_knob) if short_knob is not None else _lookup(arity, short)
        if short_kind not in (None, "0"):
            return Token(start=i, end=i + 1, raw=(item,), flag=short, written=short, values=(item[2:],),
                         inline=True, knob=short_knob)
    if kind is None:
        kind = "?"  # unknown: one value when the next item is not a flag
    common: dict[str, Any] = {"flag": name, "written": written, "knob": knob,
                              "negative": knob is not None and knob.type == "bool" and not positive,
                              "dotted": dotted}
    if eq:
        return Token(start=i, end=i + 1, raw=(item,), values=(inline_value,), inline=True, **common)
    end = i + 1
    if kind in ("1", "?"):
        if end < len(items) and not looks_like_flag(items[end]) and items[end] != "--":
            end += 1
    elif kind == "+":
        while end < len(items) and not looks_like_flag(items[end]) and items[end] != "--":
            end += 1
    return Token(start=i, end=end, raw=tuple(items[i:end]), values=tuple(items[i + 1:end]), **common)


def rebuild(tokens: Iterable[Token]) -> list[str]:
    """The argv the tokens came from (or a filtered/edited list of them)."""
    return [item for token in tokens for item in token.raw]


def last(tokens: Sequence[Token], knob_name: str) -> Token | None:
    """The token vLLM would use for this knob: argparse keeps the last one."""
    for token in reversed(tokens):
        if token.knob is not None and token.knob.name == knob_name:
            return token
    return None


def has(tokens: Sequence[Token], knob_name: str) -> bool:
    return last(tokens, knob_name) is not None


def values_of(argv: Sequence[str], knob_name: str, arity: ArityLookup = None) -> tuple[str, ...]:
    """The values vLLM would take for this knob (its last occurrence), () when absent."""
    token = last(tokenize(argv, arity), knob_name)
    return token.values if token is not None else ()


def with_defaults(argv: Sequence[str], defaults: Mapping[str, Any]) -> list[str]:
    """argv plus `--flag value` for each knob in `defaults` that argv does not set (in any spelling)."""
    tokens = tokenize(argv)
    out = list(argv)
    for name, value in defaults.items():
        if value is not None and not has(tokens, name):
            out += [CATALOGUE[name].flag, str(value)]
    return out


def refuse_unknown(argv: Sequence[str], known: Collection[str], own: Collection[str] = (),
                   arity: ArityLookup = None, where: str = "vLLM") -> None:
    """InputError for the flags in argv that neither vLLM (`known`: the flags of the vLLM that will run) nor
    the catalogue knows, each with the nearest real flag - vLLM would refuse to start on them, and a dry run
    would print a command that cannot run. A stray positional (a second MODEL, a value after a boolean) too.

    `own` are smartrun's own options of the command (`--llm-model`): a typo of one lands here as well.
    """
    problems = []
    for token in tokenize(argv, arity):
        if token.flag is None:
            if token.raw != ("--",):
                problems.append(f"unexpected argument {token.raw[0]!r} (MODEL is given already; flags start "
                                "with --)")
            continue
        if token.knob is not None or token.flag in known:
            continue
        problems.append(f"{token.written}: not a flag of {where}" + _did_you_mean(token.flag, known, own))
    if problems:
        unknown = any(": not a flag" in p for p in problems)
        hint = " (to hand a flag to vllm unchecked, put it after `--`)" if unknown else ""
        raise InputError("; ".join(problems) + hint)


def _did_you_mean(flag: str, known: Collection[str], own: Collection[str]) -> str:
    """`; did you mean --max-num-seqs?` for the nearest flag, or how to list them when nothing is near."""
    if flag in LOCALAISTACK_HINTS:
        return f"; LocalAIStack's {flag} is not a vLLM flag: did you mean {LOCALAISTACK_HINTS[flag]}?"
    if flag.startswith("--vllm-") and "--" + flag[len("--vllm-"):] in known:  # LocalAIStack-style, not an alias
        aliases = ", ".join(sorted(LOCALAISTACK_ALIASES))
        return f"; did you mean {'--' + flag[len('--vllm-'):]}? (the --vllm-* flags read are {aliases})"
    spellings = {*known, *own, *(f for k in CATALOGUE.values() for f in (k.flag, *k.aliases))}
    by_name = {f.lstrip("-"): f for f in sorted(spellings, reverse=True)}  # compare names, not the dashes
    near = difflib.get_close_matches(flag.lstrip("-"), list(by_name), n=1, cutoff=0.7)
    return f"; did you mean {by_name[near[0]]}?" if near else "; no flag is close (`vllm serve --help=all` lists them)"


def positive_seconds(text: str) -> float:
    """An argparse type for timeouts: a positive, finite number of seconds (checked before any work starts)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a positive, finite number of seconds")
    return value


class UserArgs(Frozen):
    """What the user typed after MODEL: pins (known knobs, typed values) and passthrough (everything else, in order)."""

    pins: dict[str, Any] = {}
    passthrough: tuple[str, ...] = ()
    pin_flags: dict[str, str] = {}  # knob -> the text the user typed ("--max-model-len 32k"), for messages


def parse_user_args(argv: list[str]) -> UserArgs:
    """vLLM flags in vLLM's own syntax (`--max-model-len 8192`, `--gpu-memory-utilization=0.9`, `--enforce-eager`).

    Read by the one tokenizer. Known knobs become typed pins (the last occurrence
    wins, as in vLLM); everything else goes to passthrough with its values, in order, as typed. A bad
    value of a known flag is an InputError naming it.
    """
    pins: dict[str, Any] = {}
    typed: dict[str, str] = {}
    passthrough: list[str] = []
    for token in tokenize(argv):
        k = token.knob
        if k is None:
            passthrough += token.raw
            continue
        name = token.flag or k.flag
        if k.type == "bool":
            positive = not token.negative
            if token.values:
                cobra = token.written in LOCALAISTACK_ALIASES and token.values[0].lower() in ("true", "false")
                if not cobra:  # LocalAIStack's own parser takes --vllm-trust-remote-code=false; vLLM's none
                    raise InputError(f"{name} takes no value (got {token.raw[0]!r})")
                positive = positive == (token.values[0].lower() == "true")
            pins[k.name], typed[k.name] = positive, name
            continue
        if not token.values:
            if k.nargs == "?":
                pins[k.name], typed[k.name] = True, name
                continue
            raise InputError(f"{name} needs a value")
        if k.nargs == "+":
            values = tuple(parse_value(k, v, name) for v in token.values)
            pins[k.name], typed[k.name] = values, f"{name} {' '.join(token.values)}"
            continue
        value = parse_value(k, token.values[0], name)
        if k.nargs == "append":
            value = (*pins.get(k.name, ()), value)
        pins[k.name], typed[k.name] = value, f"{name} {token.values[0]}"
    return UserArgs(pins=pins, passthrough=tuple(passthrough), pin_flags=typed)


def serve_args(user_args: Sequence[str], extra_args: Sequence[str] = (), *, host: str | None = None,
               port: int | None = None) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(pins, passthrough) for `vllm serve`: the user's known flags as pins; passthrough is --host/--port,
    then the user's unknown flags, then everything after `--`.

    --host/--port are user only: added unless given (pinned, or typed in any spelling). The caller's
    default host is 127.0.0.1 (the guide's templates), not vLLM's all interfaces.
    """
    user = parse_user_args(list(user_args))
    given = (*user.passthrough, *extra_args)
    defaults = {name: value for name, value in (("host", host), ("port", port)) if name not in user.pins}
    return user.pins, (*with_defaults(given, defaults)[len(given):], *given)
