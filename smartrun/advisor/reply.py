"""The reply's schema, derived per offered knob from pydantic models, and the parser that reads it."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    create_model,
    field_validator,
)

from smartrun.advisor.prompts import open_knobs
from smartrun.advisor.settings import (
    FLOAT_STEP,
    MAX_REPLY_CHARS,
    REASON_CHARS,
    SUMMARY_CHARS,
    ReplyParseError,
)
from smartrun.contracts import Bounds, Change, Proposal
from smartrun.knobs import CATALOGUE


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


# only a "{" that can open an object: decoding from every "{" of "{{{{..." would be quadratic
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
