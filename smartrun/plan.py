"""The currency between bound, advise, validate, launch and record: plans, proposals, rejections.

A Plan is a full set of knob values (by catalogue name, e.g. "max_model_len") that has passed
the validator or was built inside the bounds by the rules. Every value carries its provenance.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

PlanSource = Literal["static", "llm", "cache", "replay", "recovery", "tune"]


class Frozen(BaseModel):
    """Base for data passed between stages: immutable, no unknown fields."""

    model_config = ConfigDict(frozen=True, extra="forbid")


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
