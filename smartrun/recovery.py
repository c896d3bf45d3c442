"""The guide's recovery ladders as rules: a classified failure -> the next proposal inside the bounds, or Stop.

Ladders (the tuning guide's order for out-of-memory and too-long contexts, refined by what vLLM's own messages
say):
- OOM (profiling or unknown phase): lower max_model_len, then gpu_memory_utilization, then max_num_seqs.
- OOM after the KV cache is allocated (CUDA-graph capture, sampler warm-up): the memory outside the
  utilization share ran out, and a shorter context does not give any of it back, so the ladder starts
  at gpu_memory_utilization (then max_num_seqs; the sampler message names max_num_seqs first).
- OOM while loading weights / no memory for cache blocks: more tensor parallelism if the bounds allow;
  for cache blocks then a higher utilization, eager mode (no CUDA-graph reservation), fewer batched tokens.
- KV cache too small: vLLM's estimated maximum length when inside the bounds; raising utilization when
  max_model_len is pinned.
- Free memory at start too low: utilization just below free/total.
- CUDA graph / compile errors: eager mode, else a lower optimization level.
- NCCL / custom all-reduce errors: disable custom all-reduce.
- Port in use, model not found, bad arguments, ...: Stop with what to do.
A pinned knob is never changed; when only relaxing a pin would help, the Stop says which pin and to what.
Each proposal is a candidate only: launch passes it through the validator before using it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from smartrun.contracts import Bounds, Change, KnobBound, Plan, Proposal
from smartrun.frozen import Frozen
from smartrun.knobs import CATALOGUE
from smartrun.vllm_log import Failure

OOM_UTIL_FLOOR = 0.82  # guide 3.2: "if OOM is frequent, go down to 0.82 ~ 0.86"
UTIL_STEP = 0.04
DEFAULT_UTIL = CATALOGUE["gpu_memory_utilization"].default  # vLLM's, when the plan does not set it
MIN_MAX_MODEL_LEN = 256


class Stop(Frozen):
    """No tuning inside the bounds can fix this failure: why, and what the user can do."""

    reason: str
    hint: str = ""
    pin: str | None = None  # the pinned knob that blocks the only fix, if any

    def message(self) -> str:
        return f"{self.reason}; {self.hint}" if self.hint else self.reason


def _flag(knob: str) -> str:
    """The flag as the user would type it, from the one catalogue."""
    return CATALOGUE[knob].flag if knob in CATALOGUE else "--" + knob.replace("_", "-")


class _Ladder:
    """Helpers over one (plan, bounds, tried) triple: what a knob may become, and whether it was tried."""

    def __init__(self, plan: Plan, bounds: Bounds, attempts: Sequence[Any]):
        self.plan, self.bounds = plan, bounds
        self.tried = [dict(getattr(a, "params", {}) or {}) for a in attempts] + [dict(plan.params)]
        self.blocked_pin: tuple[str, Any] | None = None

    def bound(self, knob: str) -> KnobBound | None:
        return self.bounds.knobs.get(knob)

    def pinned(self, knob: str) -> bool:
        b = self.bound(knob)
        return bool(b and b.pinned)

    def allows(self, knob: str, value: Any) -> bool:
        if self.pinned(knob):
            return False
        b = self.bound(knob)
        return b is None or b.contains_for_recovery(value)

    def current(self, knob: str, default: Any = None) -> Any:
        value = self.plan.params.get(knob)
        return default if value is None else value

    def proposal(self, knob: str, value: Any, rung: str) -> Proposal | None:
        """A one-change proposal, or None when the bounds forbid it or the same params already failed."""
        if not self.allows(knob, value) or self.plan.params.get(knob) == value:
            return None
        params = {**self.plan.params, knob: value}
        if params in self.tried:
            return None
        reason = f"recovery ladder: {rung}: {_flag(knob)} {self.current(knob)} -> {value}"
        return Proposal(changes=(Change(knob=knob, value=value, reason=reason),), reason=reason, source="recovery")


def _lower_max_model_len(lad: _Ladder, failure: Failure, rung: str) -> Proposal | None:
    cur = lad.current("max_model_len") or failure.details.get("max_model_len")
    if cur is None:
        return None
    b = lad.bound("max_model_len")
    floor = int(b.min) if b and b.min is not None else MIN_MAX_MODEL_LEN
    est = failure.estimated_max_model_len
    if lad.pinned("max_model_len"):
        return None
    if est is not None and floor <= est < cur:
        return lad.proposal("max_model_len", int(est), f"{rung} (vLLM estimates at most {est})")
    target = max(floor, int(cur) // 2)
    return lad.proposal("max_model_len", target, f"{rung} (halved toward the bound's minimum {floor})") if target < cur else None


def _lower_util(lad: _Ladder, rung: str) -> Proposal | None:
    """One step (0.04) down, never below the recovery floor the bounds grant (else their min, else 0.82)."""
    cur = float(lad.current("gpu_memory_utilization", DEFAULT_UTIL))
    b = lad.bound("gpu_memory_utilization")
    if b is not None and b.recovery_min is not None:
        floor = float(b.recovery_min)
    elif b is not None and b.min is not None:
        floor = float(b.min)
    else:
        floor = OOM_UTIL_FLOOR
    target = round(max(floor, cur - UTIL_STEP), 2)
    return lad.proposal("gpu_memory_utilization", target, rung) if target < cur else None


def _raise_util(lad: _Ladder, rung: str) -> Proposal | None:
    cur = float(lad.current("gpu_memory_utilization", DEFAULT_UTIL))
    b = lad.bound("gpu_memory_utilization")
    if not b or b.max is None:
        return None
    target = round(float(b.max), 2)
    return lad.proposal("gpu_memory_utilization", target, rung) if target > cur else None


def _halve(lad: _Ladder, knob: str, rung: str, default: int | None) -> Proposal | None:
    cur = lad.current(knob, default)
    if cur is None:
        return None
    b = lad.bound(knob)
    floor = int(b.min) if b and b.min is not None else 1
    target = max(floor, int(cur) // 2)
    return lad.proposal(knob, target, rung) if target < int(cur) else None


def _more_tp(lad: _Ladder, rung: str) -> Proposal | None:
    cur = int(lad.current("tensor_parallel_size", 1))
    b = lad.bound("tensor_parallel_size")
    if b is None:
        return None
    options = sorted(v for v in (b.choices or ()) if isinstance(v, int) and v > cur)
    if not options and b.max is not None:
        options = [v for v in (2, 4, 8, 16) if cur < v <= b.max]
    pp = int(lad.current("pipeline_parallel_size", 1))
    dp = int(lad.current("data_parallel_size", 1))
    gpus = lad.bounds.gpu_count
    for value in options:
        if (p := lad.proposal("tensor_parallel_size", value, rung)) is None:
            continue
        if gpus and value * pp * dp > gpus:  # fewer, larger replicas on the same GPUs
            fewer = max(1, gpus // (value * pp))
            if lad.pinned("data_parallel_size") or fewer * value * pp > gpus:
                continue
            why = f"recovery ladder: {rung}: {_flag('data_parallel_size')} {dp} -> {fewer} to free the GPUs"
            p = Proposal(changes=(*p.changes, Change(knob="data_parallel_size", value=fewer, reason=why)),
                         reason=p.reason, source="recovery")
        return p
    return None


def _set(lad: _Ladder, knob: str, value: Any, rung: str) -> Proposal | None:
    return lad.proposal(knob, value, rung)


def candidates(failure: Failure, plan: Plan, bounds: Bounds, attempts: Sequence[Any] = ()) -> tuple[list[Proposal], Stop]:
    """Every rung that applies, in ladder order, and the Stop to report when none of them is accepted."""
    lad = _Ladder(plan, bounds, attempts)
    k = failure.klass
    rungs: list[Proposal | None] = []
    stop = Stop(reason=f"{k}: no recovery step left inside the bounds", hint=f"vLLM said: {failure.evidence}")
    if k in ("oom_profiling", "oom_cuda_graph", "oom_sampler"):
        after_kv = k != "oom_profiling"
        if k == "oom_sampler":
            rungs += [_halve(lad, "max_num_seqs", "OOM in sampler warm-up, rung 1: lower max_num_seqs", 256),
                      _lower_util(lad, "OOM in sampler warm-up, rung 2: lower gpu_memory_utilization")]
        elif after_kv:
            rungs += [_lower_util(lad, "OOM after KV allocation, rung 1: lower gpu_memory_utilization"),
                      _halve(lad, "max_num_seqs", "OOM after KV allocation, rung 2: lower max_num_seqs", 256),
                      _set(lad, "enforce_eager", True, "OOM while capturing CUDA graphs, rung 3: eager mode")]
        else:
            rungs += [_lower_max_model_len(lad, failure, "OOM rung 1: lower max_model_len"),
                      _lower_util(lad, "OOM rung 2: lower gpu_memory_utilization"),
                      _halve(lad, "max_num_seqs", "OOM rung 3: lower max_num_seqs", 256)]
        stop = Stop(reason=f"CUDA out of memory ({k}) and every OOM rung is at its bound",
                    hint="allow a lower --gpu-memory-utilization / --max-num-seqs / --max-model-len, "
                         "or use more GPUs or a quantized model")
    elif k == "kv_cache_too_small":
        est = failure.estimated_max_model_len
        cur = lad.current("max_model_len") or failure.details.get("max_model_len")
        if lad.pinned("max_model_len"):
            rungs.append(_raise_util(lad, "KV cache too small for pinned max_model_len: raise gpu_memory_utilization"))
            at_most = f"vLLM estimates at most {est}" if est else "vLLM reports the KV cache is too small"
            stop = Stop(reason=f"pinned --max-model-len {cur} does not fit: {at_most}",
                        hint=f"unpin it or set it to <= {est}" if est else "unpin it or allow more GPU memory",
                        pin="max_model_len")
        else:
            rungs += [_lower_max_model_len(lad, failure, "KV cache too small: use vLLM's estimated maximum length"),
                      _raise_util(lad, "KV cache too small: raise gpu_memory_utilization")]
            b = lad.bound("max_model_len")
            if est is not None and b is not None and b.min is not None and est < b.min:
                stop = Stop(reason=f"KV cache too small: vLLM estimates at most {est} tokens, below the bound's "
                                   f"minimum max_model_len {b.min} ({', '.join(b.sources)})",
                            hint=f"lower that minimum to <= {est}, or allow more memory or GPUs")
    elif k in ("no_kv_cache_memory", "oom_loading"):
        rungs.append(_more_tp(lad, f"{k}: weights do not leave room; use more tensor parallelism"))
        if k == "no_kv_cache_memory":
            rungs += [_raise_util(lad, "no memory for cache blocks: raise gpu_memory_utilization"),
                      _set(lad, "enforce_eager", True, "no memory for cache blocks: eager mode drops the CUDA-graph reserve"),
                      _halve(lad, "max_num_batched_tokens", "no memory for cache blocks: fewer batched tokens (activation)", None)]
        stop = Stop(reason=f"{k}: the weights do not fit in the GPU memory the bounds allow",
                    hint="use more GPUs (--tensor-parallel-size), a quantized model, or allow a higher "
                         "--gpu-memory-utilization")
    elif k == "insufficient_free_memory":
        free, total = failure.details.get("free_gib"), failure.details.get("total_gib")
        if free and total:
            target = int((free / total - 0.01) * 100) / 100
            rungs.append(lad.proposal("gpu_memory_utilization", target,
                                      f"free memory at start {free}/{total} GiB: utilization below free/total")
                         if target > 0 else None)
            stop = Stop(reason=f"only {free} of {total} GiB is free on the GPU (other processes hold memory)",
                        hint=f"free that memory, or allow --gpu-memory-utilization <= {target}",
                        pin="gpu_memory_utilization" if lad.pinned("gpu_memory_utilization") else None)
    elif k == "compile_error":
        rungs += [_set(lad, "enforce_eager", True, "CUDA graph / compile error: eager mode"),
                  _set(lad, "optimization_level", 0, "CUDA graph / compile error: optimization level 0")]
        stop = Stop(reason="CUDA graph / torch.compile error and neither --enforce-eager nor -O0 is allowed",
                    hint="allow --enforce-eager or a lower --optimization-level")
    elif k == "nccl_error":
        rungs.append(_set(lad, "disable_custom_all_reduce", True, "NCCL / custom all-reduce error: disable custom all-reduce"))
        stop = Stop(reason="NCCL error even with custom all-reduce disabled",
                    hint="check the GPUs' interconnect (NCCL_DEBUG=INFO), or try NCCL_P2P_DISABLE=1 or tp=1")
    elif k == "dtype_unsupported":
        rungs += [_set(lad, "dtype", "float16", "bf16 unsupported on this GPU: use float16 as vLLM advises"),
                  _set(lad, "dtype", "float32", "bf16 unsupported on this GPU: float32 as the last resort")]
        stop = Stop(reason="bfloat16 is not supported on this GPU", hint="allow --dtype float16")
    elif k == "max_model_len_too_large":
        est = failure.estimated_max_model_len
        rungs.append(lad.proposal("max_model_len", est, "max_model_len above the model's derived limit") if est else None)
        stop = Stop(reason=f"--max-model-len is above the model's limit ({est})",
                    hint=f"set it to <= {est}", pin="max_model_len" if lad.pinned("max_model_len") else None)
    else:
        stop = _not_tunable(failure)
    return [p for p in rungs if p is not None], stop


_ADVICE = {
    "port_in_use": "the port is already in use: pick another --port or stop the process that holds it",
    "model_not_found": "vLLM cannot find the model: check the path or the Hugging Face repo id (and access token)",
    "bad_argument": "vLLM rejected an argument: check the flags for this vLLM version (`vllm serve --help`)",
    "tp_not_divisible": "--tensor-parallel-size must divide the model's attention heads",
    "not_enough_gpus": "more GPUs were asked for than this machine has: lower --tensor-parallel-size / --pipeline-parallel-size",
    "ray_not_running": "vLLM found no Ray cluster: start it (`ray start --head` on the head, `ray start --address` "
                       "on each node) and pass --ray-address HEAD:PORT",
    "ray_placement_group_timeout": "Ray could not place tp x pp GPU workers: a node is missing or its GPUs are "
                                   "busy; check `ray status` (every node started with --num-gpus)",
    "ray_node_died": "a Ray node died or the head has no GPU for vLLM: check `ray status` and the node's raylet "
                     "log; restart the node with `ray start --address`",
    "startup_timeout": "vLLM did not become ready in time: raise --startup-timeout (big models load slowly)",
    "died_after_ready": "vLLM died after it was ready: see the log excerpt",
}


def _not_tunable(failure: Failure) -> Stop:
    hint = _ADVICE.get(failure.klass, "see the log excerpt")
    return Stop(reason=f"{failure.klass} is not recoverable by tuning: {failure.evidence}", hint=hint)


def next_step(failure: Failure, plan: Plan, bounds: Bounds, attempts: Sequence[Any] = ()) -> Proposal | Stop:
    """The first ladder rung that applies and stays inside the bounds, else Stop with what to do."""
    proposals, stop = candidates(failure, plan, bounds, attempts)
    return proposals[0] if proposals else stop
