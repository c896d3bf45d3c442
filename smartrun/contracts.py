"""The contracts between stages: what bound, advise, validate, launch and record pass each other.

A Plan is a full set of knob values (by catalogue name, e.g. "max_model_len") that has passed
the validator or was built inside the bounds by the rules; every value carries its provenance.
A Proposal is unvalidated; only validate.check turns it into a Plan (a Verdict). Bounds are the
effective limits of one run, each KnobBound with the sources of its limits.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import Field, field_serializer

from smartrun.frozen import Frozen
from smartrun.knobs import CATALOGUE, REDACTED

Goal = Literal["stable", "latency", "throughput", "long-context"]
GOALS: tuple[str, ...] = get_args(Goal)

PlanSource = Literal["static", "llm", "cache", "replay", "recovery", "tune"]


class Plan(Frozen):
    """Knob values to launch with. `provenance[knob]` says which rule/pin/bound/LLM reason set it."""

    params: dict[str, Any]
    source: PlanSource = "static"
    provenance: dict[str, str] = Field(default_factory=dict)
    reason: str | None = None

    def with_changes(self, changes: dict[str, Any], source: PlanSource, why: dict[str, str]) -> Plan:
        """A new plan with some knobs changed; provenance of the changed knobs is replaced by `why`."""
        params = {**self.params, **changes}
        provenance = {**self.provenance, **{k: why.get(k, source) for k in changes}}
        return Plan(params=params, source=source, provenance=provenance, reason=self.reason)


class Change(Frozen):
    """One proposed knob change, as anyone (LLM, cache, replay, recovery ladder) proposes it."""

    knob: str
    value: Any
    reason: str = ""


class Proposal(Frozen):
    """Proposed changes on top of a base plan. Unvalidated: only validate.check turns it into a Plan."""

    changes: tuple[Change, ...] = ()
    reason: str = ""
    source: PlanSource = "llm"


class Rejection(Frozen):
    """Why one proposed change was refused: the knob, the value, the bound it broke and where that came from."""

    knob: str
    value: Any
    bound: str  # e.g. "0.85 <= x <= 0.93", "one of ['bfloat16', 'float16']", "pinned to 8192"
    source: str  # e.g. "pin", "bounds:smartrun.toml:7", "hardware", "catalogue"
    reason: str  # one readable line


def gpus_used(params: dict[str, Any]) -> int:
    """GPUs a plan occupies: tensor x pipeline parallel per replica, times the data-parallel replicas."""
    return (int(params.get("tensor_parallel_size") or 1) * int(params.get("pipeline_parallel_size") or 1)
            * int(params.get("data_parallel_size") or 1))


class KnobBound(Frozen):
    """The effective bound of one knob: a range (min/max) or a set (choices). A pin is min == max or one choice."""

    knob: str
    min: float | int | None = None
    max: float | int | None = None
    choices: tuple[Any, ...] | None = None
    pinned: bool = False
    llm_may_change: bool = True  # False for pins and user-only knobs
    sources: tuple[str, ...] = ()  # "vllm", "hardware", "model", "estimate", "bounds:<file>:<line>", "pin", "goal"
    notes: tuple[str, ...] = ()  # why each limit exists, one line each
    # Added by the bounds helper: how far the recovery ladder (Proposal.source == "recovery") may go
    # beyond the normal bound, e.g. gpu_memory_utilization down to the OOM floor 0.82, or float32.
    recovery_min: float | int | None = None
    recovery_choices: tuple[Any, ...] = ()
    recovery_source: str | None = None

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)

    def contains_for_recovery(self, value: Any) -> bool:
        """Inside the bound, or inside the extra room the bounds file grants the recovery ladder."""
        if self.contains(value) or value in self.recovery_choices:
            return True
        if self.choices is not None or self.recovery_min is None:
            return False
        return self.recovery_min <= value and (self.max is None or value <= self.max)

    def _secret(self) -> bool:
        return self.knob in CATALOGUE and CATALOGUE[self.knob].secret

    @field_serializer("choices")
    def _dump_choices(self, choices: tuple[Any, ...] | None) -> tuple[Any, ...] | None:
        """A secret knob's pinned value never leaves in a dump (the session record stores these bounds)."""
        return (REDACTED,) if choices is not None and self._secret() else choices

    def describe(self) -> str:
        """The bound in words: "0.85 <= x <= 0.93", "one of ['bfloat16', 'float16']", "pinned to 8192"."""
        if self._secret():
            return "pinned (secret)" if self.pinned else "secret"
        if self.pinned:
            value = self.choices[0] if self.choices else self.min
            return f"pinned to {value}"
        if self.choices is not None:
            return f"one of {list(self.choices)}"
        lo = "" if self.min is None else f"{self.min} <= "
        hi = "" if self.max is None else f" <= {self.max}"
        return f"{lo}x{hi}" if lo or hi else "any value"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self._secret():
            out["choices"] = [REDACTED]
        elif self.choices is not None:
            out["choices"] = list(self.choices)
        else:
            out["min"], out["max"] = self.min, self.max
        if self.pinned:
            out["pinned"] = True
        if not self.llm_may_change:
            out["llm_may_change"] = False
        if self.recovery_min is not None:
            out["recovery_min"] = self.recovery_min
        if self.recovery_choices:
            out["recovery_choices"] = list(self.recovery_choices)
        out["sources"] = list(self.sources)
        return out


class Bounds(Frozen):
    """The effective bounds of every knob for one run, and the goal they were made for."""

    knobs: dict[str, KnobBound]
    goal: Goal = "stable"
    warnings: tuple[str, ...] = ()
    gpu_count: int | None = None  # usable GPUs: tensor_parallel_size * pipeline_parallel_size may not exceed it
    bounds_file: str | None = None  # where the file limits came from ("builtin" for the shipped default)

    def to_json(self) -> dict[str, Any]:
        """{knob: {"min","max"} | {"choices"}, plus "pinned" when pinned and "sources"}."""
        return {name: bound.to_json() for name, bound in self.knobs.items()}

    @classmethod
    def from_json(cls, data: dict[str, Any], goal: str = "stable") -> Bounds:
        """Bounds back from `to_json()`: every knob's limits and sources (the goal is not in it: pass it).

        The model's own JSON (`model_dump_json`) keeps everything, notes and warnings too; this reads the
        shorter form, which schema-1 session records and `--json` outputs hold.
        """
        knobs = {name: {"knob": name, **bound} for name, bound in data.items()}
        return cls.model_validate({"knobs": knobs, "goal": goal})


class Verdict(Frozen):
    """What validate.check concluded: the accepted plan, or why each refused change was refused."""

    plan: Plan | None  # None when anything was rejected
    rejections: tuple[Rejection, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.plan is not None


class LaunchEvent(Frozen):
    """One line of launch progress, typed so that no one parses it back from its wording.

    `warning` goes on record, `command` is the line to rerun a healthy start by hand, `progress` the rest.
    `str()` is the line as shown on a terminal.
    """

    kind: Literal["progress", "warning", "command"] = "progress"
    text: str

    def __str__(self) -> str:
        prefix = {"warning": "warning: ", "command": "to rerun by hand: "}.get(self.kind, "")
        return prefix + self.text
