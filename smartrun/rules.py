"""Stage 4, bound: effective hard bounds (each limit with its sources) and a safe baseline plan.

effective bounds = vLLM's domain ∩ bounds file (global, per-model, per-GPU, goal preset)
                   ∩ hardware ∩ model ∩ estimate ∩ user pins.
A pin outside another source's bound is a PinConflictError naming both (unless force); an empty
intersection is an InfeasibleError naming the sources that clash. The baseline starts from the
guide's template for the goal, moves each value to the nearest in-bound value (rule-making, with
provenance saying so) and is fitted with the estimator so that it starts.
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

    def describe(self) -> str:
        """The bound in words: "0.85 <= x <= 0.93", "one of ['bfloat16', 'float16']", "pinned to 8192"."""
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
        if self.choices is not None:
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
    knobs: dict[str, KnobBound]
    goal: str = "stable"
    warnings: tuple[str, ...] = ()
    gpu_count: int | None = None  # usable GPUs: tensor_parallel_size * pipeline_parallel_size may not exceed it
    bounds_file: str | None = None  # where the file limits came from ("builtin" for the shipped default)

    def to_json(self) -> dict[str, Any]:
        """{knob: {"min","max"} | {"choices"}, plus "pinned" when pinned and "sources"}."""
        return {name: bound.to_json() for name, bound in self.knobs.items()}
