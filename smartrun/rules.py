"""Stage 4, bound: effective hard bounds (each limit with its sources) and a safe baseline plan.

CONTRACT. TODO(helper-bounds): effective_bounds(), baseline().
"""

from __future__ import annotations

from typing import Any

from smartrun.plan import Frozen

GOALS = ("stable", "latency", "throughput", "long-context")


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

    def contains(self, value: Any) -> bool:
        if self.choices is not None:
            return value in self.choices
        if self.min is not None and value < self.min:
            return False
        return not (self.max is not None and value > self.max)


class Bounds(Frozen):
    knobs: dict[str, KnobBound]
    goal: str = "stable"
    warnings: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """{knob: {"min","max"} | {"choices"}, plus "pinned" when pinned and "sources"}."""
        raise NotImplementedError
