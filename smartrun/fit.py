"""Whether a plan fits: the estimator asked about a plan on the GPUs `gpus.select_gpus` gives it.

The bounds (rules), the baseline (sizing), the no-fit suggestions, the cluster rules and the validator's
fit check all ask here, so they ask the same question of the same estimator, and a shortfall reads the
same wherever it is met.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from smartrun import memory
from smartrun.contracts import Bounds, KnobBound, gpus_used
from smartrun.errors import EstimateError
from smartrun.gpus import describe_gpus, select_gpus
from smartrun.hardware import GpuInfo, HardwareSnapshot
from smartrun.memory import (
    EngineFlags,
    GpuSpec,
    MemoryEstimate,
    plan_safe_fits,
    plan_safe_kv_tokens,
    plan_safe_max_model_len,
)
from smartrun.model import ModelFacts
from smartrun.policy import GoalPolicy, Policy

EstimateFn = Callable[[ModelFacts, Sequence[GpuSpec], EngineFlags, "str | None"], MemoryEstimate]


def default_estimate() -> EstimateFn:
    """The uncalibrated estimator (smartrun.memory.estimate), looked up when called."""
    return memory.estimate


def gpu_specs(gpus: Sequence[GpuInfo]) -> list[GpuSpec]:
    return [GpuSpec.from_gpu(g) for g in gpus]


def flags_from_params(params: dict[str, Any]) -> EngineFlags:
    """The estimator's view of a plan's knob values (None and unknown-to-the-estimator knobs dropped)."""
    fields = EngineFlags.model_fields
    return EngineFlags(**{k: v for k, v in params.items() if k in fields and v is not None})


def estimate_plan(flags: EngineFlags, facts: ModelFacts, hw: HardwareSnapshot, vllm_version: str | None,
                  estimate_fn: EstimateFn) -> MemoryEstimate:
    """The estimate of `flags` on the GPUs select_gpus picks for them (for the cluster rules)."""
    gpus = select_gpus(hw, flags.tensor_parallel_size * flags.pipeline_parallel_size)
    return estimate_fn(facts, gpu_specs(gpus), flags, vllm_version)


def shortfall(facts: ModelFacts, gpus: Sequence[GpuInfo], flags: EngineFlags, est: MemoryEstimate) -> str:
    """What does not fit and by how much, in one line."""
    where = f"at tp {flags.tensor_parallel_size}"
    if est.weights_gib > est.requested_gib:
        return (f"{facts.name} needs {est.weights_gib:.1f} GiB of weights per GPU {where}; "
                f"{describe_gpus(gpus)} offers {est.requested_gib:.1f} GiB at utilization "
                f"{flags.gpu_memory_utilization}")
    if est.fits:  # fits at the point estimate, not at the low end of its band
        return (f"{facts.name} on {describe_gpus(gpus)} {where}: max_model_len {est.max_model_len} needs more KV "
                f"cache than the low end of the estimate holds ({plan_safe_max_model_len(est)} tokens for one "
                f"request; {est.margin_gib:.2f} GiB kept back for the estimate's uncertainty)")
    return f"{facts.name} does not fit on {describe_gpus(gpus)} {where}, utilization " \
           f"{flags.gpu_memory_utilization}: {est.reason or 'no KV cache left'}"


def fit_check(facts: ModelFacts, hardware: HardwareSnapshot, vllm_version: str | None = None, *,
              estimate_fn: EstimateFn | None = None) -> Callable[[dict[str, Any]], str | None]:
    """For the validator: why a full params dict will not start (None when the estimator says it fits)."""
    estimate_fn = estimate_fn or default_estimate()

    def check(params: dict[str, Any]) -> str | None:
        flags = flags_from_params(params)
        count = flags.tensor_parallel_size * flags.pipeline_parallel_size
        if gpus_used(params) > len(hardware.gpus):
            return f"tp x pp x dp = {gpus_used(params)} GPUs; the machine has {len(hardware.gpus)}"
        gpus = select_gpus(hardware, count)
        try:
            est = estimate_fn(facts, gpu_specs(gpus), flags, vllm_version)
        except EstimateError as err:
            return err.message
        return None if est.fits else shortfall(facts, gpus, flags, est)

    return check


class PlanFit:
    """What the baseline's sizing steps and the no-fit suggestions ask the estimator, with their inputs
    (bounds, goal policy) and a cache of its answers."""

    def __init__(self, bounds: Bounds, facts: ModelFacts, hw: HardwareSnapshot, goal: str,
                 vllm_version: str | None, estimate_fn: EstimateFn, policy: Policy):
        self.bounds, self.facts, self.hw, self.goal = bounds, facts, hw, goal
        self.version, self.estimate_fn, self.policy = vllm_version, estimate_fn, policy
        self.gp: GoalPolicy = policy.goal(goal)
        self._cache: dict[tuple, MemoryEstimate | None] = {}

    # The estimate is read at the low end of its band (memory.plan_safe_*): a plan never counts on cache that
    # may not be there. Only when nothing fits there does sizing.baseline retry at the point estimate (point=True).
    point = False

    def fits(self, est: MemoryEstimate) -> bool:
        return est.fits if self.point else plan_safe_fits(est)

    def largest(self, est: MemoryEstimate) -> int:
        return est.largest_max_model_len if self.point else plan_safe_max_model_len(est)

    def kv_tokens(self, est: MemoryEstimate) -> int:
        return est.kv_cache_tokens if self.point else plan_safe_kv_tokens(est)

    def concurrency(self, est: MemoryEstimate) -> float:
        """Full-length requests the cache holds at once (at the low end of the band unless point)."""
        if not est.kv_cache_tokens:
            return 0.0
        return est.max_concurrency * self.kv_tokens(est) / est.kv_cache_tokens

    def bound(self, name: str) -> KnobBound | None:
        return self.bounds.knobs.get(name)

    def pinned(self, name: str) -> bool:
        bound = self.bound(name)
        return bound is not None and bound.pinned

    def estimate(self, params: dict[str, Any]) -> MemoryEstimate | None:
        """The estimate of a replica of this plan on the GPUs it would get (None when it cannot be budgeted)."""
        flags = flags_from_params(params)
        key = tuple(sorted(flags.model_dump().items()))
        if key not in self._cache:
            count = flags.tensor_parallel_size * flags.pipeline_parallel_size
            if count > len(self.hw.gpus):
                self._cache[key] = None
            else:
                try:
                    est = self.estimate_fn(self.facts, gpu_specs(select_gpus(self.hw, count)), flags, self.version)
                except EstimateError:
                    est = None
                self._cache[key] = est
        return self._cache[key]

    def limits(self) -> tuple[int, int]:
        """(preferred floor, native) context inside the bounds."""
        bound = self.bound("max_model_len")
        native = self.facts.derived_max_model_len
        if bound is not None and bound.max is not None:
            native = min(native, int(bound.max))
        floor = min(native, self.policy.sizing.context_floor)
        if bound is not None and bound.min is not None:
            floor = max(floor, int(bound.min))
        return floor, native

    def context_seqs(self, params: dict[str, Any]) -> int:
        """The batch the context is sized with: the goal's full-length requests (or the pin); the batch is sized after."""
        if self.pinned("max_num_seqs"):
            return int(params["max_num_seqs"])
        return self.gp.full_length_requests
