"""The guide's throughput ladder: the next in-bound step for each knob, from the rounds so far."""

from __future__ import annotations

from typing import Any

from smartrun.contracts import Bounds, Change, KnobBound, Proposal
from smartrun.tune.report import (
    KNEE_GAIN,
    LADDER,
    PLACEMENT,
    RESOLUTION,
    SHORT,
    UTIL_STEP,
    TuneRound,
    TuneState,
    _fmt,
)


def _open(bound: KnobBound | None) -> bool:
    return bound is not None and not bound.pinned and bound.llm_may_change


def _tp_values(bound: KnobBound, gpu_count: int | None) -> list[int]:
    if bound.choices is not None:
        values = [int(v) for v in bound.choices]
    else:
        lo, hi = int(bound.min or 1), int(bound.max or gpu_count or 1)
        values = [v for v in (1, 2, 4, 8, 16) if lo <= v <= hi]
    return sorted(v for v in values if gpu_count is None or v <= gpu_count)


def _up(knob: str, value: Any, bound: KnobBound, bounds: Bounds) -> Any:
    """One rung up the ladder for `knob` from `value`, inside the bound; None at the top."""
    nxt: float | None
    if knob == "data_parallel_size":
        nxt = int(value) * 2
    elif knob == "max_num_seqs":
        top = bound.max if bound.max is not None else 1024
        nxt = min(int(value) * 2, int(top))
    elif knob == "tensor_parallel_size":
        nxt = next((v for v in _tp_values(bound, bounds.gpu_count) if v > int(value)), None)
    else:
        top = float(bound.max) if bound.max is not None else 0.95
        nxt = round(min(float(value) + UTIL_STEP, top), 2)
    if nxt is None or nxt <= value or not bound.contains(nxt):
        return None
    return nxt


def _between(knob: str, good: Any, bad: Any) -> Any:
    """The midpoint between a good value and a failed one, when a step that small is still worth a round."""
    res = RESOLUTION.get(knob)
    if res is None or abs(bad - good) <= res * 1.5:
        return None
    if knob == "max_num_seqs":
        return (int(good) + int(bad)) // 2
    return round((good + bad) / 2 / res) * res


def rules_step(state: TuneState) -> Proposal | None:
    """The guide's throughput ladder: raise max_num_seqs while it pays, then tp (several GPUs), then util.

    A rung stays open while its last step gained at least `min_gain`; after a step that failed (did not start,
    broke the SLO, errors) the rung bisects between the best value and the lowest failed one, never past it. Once doubling max_num_seqs gains under KNEE_GAIN the
    batch is saturated: a larger tp goes first (it also adds KV memory, so a tp gain reopens max_num_seqs),
    and when the last doubling gained under 3 x min_gain, a util nudge goes first too.
    """
    candidates = {knob: c for knob in LADDER if (c := _candidate(knob, state)) is not None}
    seqs = candidates.get("max_num_seqs")
    seqs_gain = None if seqs is None or seqs[2] is None else (seqs[2].gain or 0.0)
    order: list[str] = []
    if seqs is not None and seqs[1].endswith(":up") and (seqs_gain is None or seqs_gain >= KNEE_GAIN):
        order.append("max_num_seqs")
    order += [k for k in LADDER if k in PLACEMENT]
    if seqs_gain is not None and seqs_gain >= 3 * state.settings.min_gain:
        order.append("max_num_seqs")
    order += [k for k in LADDER if k not in PLACEMENT and k != "max_num_seqs"] + ["max_num_seqs"]
    for knob in order:
        if knob in candidates:
            value, step, last = candidates[knob]
            extra = _placement_changes(knob, value, state) if knob in PLACEMENT else {}
            if extra is None:
                continue
            return _ladder_proposal(knob, value, step, last, extra)
    return None


def _placement_changes(knob: str, value: int, state: TuneState) -> dict[str, Any] | None:
    """The other placement knob, so that tp x pp x dp still fits the GPUs: more TP takes replicas away
    (n // (tp x pp) of them), more replicas take TP away (the next smaller TP the bounds allow); None when
    no such layout exists."""
    best, gpus = state.best.params, state.bounds.gpu_count
    tp, dp = int(best.get("tensor_parallel_size") or 1), int(best.get("data_parallel_size") or 1)
    pp = int(best.get("pipeline_parallel_size") or 1)
    if gpus is None:
        return {}
    if knob == "tensor_parallel_size":
        if value * pp * dp <= gpus:
            return {}
        fewer = gpus // (value * pp)
        dp_bound = state.bounds.knobs.get("data_parallel_size")
        if fewer < 1 or (dp_bound is not None and (not _open(dp_bound) or not dp_bound.contains(fewer))):
            return None
        return {"data_parallel_size": fewer}
    if tp * pp * value <= gpus:
        return {}
    tp_bound = state.bounds.knobs.get("tensor_parallel_size")
    if tp_bound is None or not _open(tp_bound):
        return None
    smaller = [t for t in _tp_values(tp_bound, gpus) if t < tp and t * pp * value <= gpus]
    return {"tensor_parallel_size": max(smaller)} if smaller else None


def _candidate(knob: str, state: TuneState) -> tuple[Any, str, TuneRound | None] | None:
    """(value, step, the rung's last round) for the next try on `knob`'s rung, or None when it is closed."""
    bound = state.bounds.knobs.get(knob)
    best = state.best.params
    if knob == "data_parallel_size" and knob not in best and bound is not None:
        best = {**best, knob: 1}  # a plan without replicas runs one
    if bound is None or not _open(bound) or knob not in best:
        return None
    last = _last_round_of(knob, state.rounds)
    ceiling = _lowest_failed_above(knob, state)
    if last is None or (last.kept and (last.gain or 0.0) >= state.settings.min_gain):
        value, step = _up(knob, best[knob], bound, state.bounds), f"{knob}:up"
        if value is not None and ceiling is not None and value >= ceiling:  # never step past a known failure
            value, step = _between(knob, best[knob], ceiling), f"{knob}:between"
    elif last.failure or (last.result is not None and not last.meets_slo and not last.kept):
        target = ceiling if ceiling is not None else last.params[knob]
        value, step = _between(knob, best[knob], target), f"{knob}:between"
    else:
        return None  # the rung's last step was measured and did not gain enough
    tried = {_key(r.params) for r in state.rounds}
    if value is None or value == best[knob] or _key({**best, knob: value}) in tried:
        return None
    return value, step, last


def _ladder_proposal(knob: str, value: Any, step: str, last: TuneRound | None,
                     extra: dict[str, Any] | None = None) -> Proposal:
    why = {
        "max_num_seqs": "throughput ladder: more sequences per batch",
        "data_parallel_size": "throughput ladder: more replicas serving side by side",
        "tensor_parallel_size": "throughput ladder: spread the model over more GPUs",
        "gpu_memory_utilization": "throughput ladder: more KV cache, below the OOM edge",
    }[knob]
    if step.endswith(":between") and last is not None:
        why += f" (halfway to the failed {_fmt(last.params.get(knob))})"
    changes = [Change(knob=knob, value=value, reason=why)]
    changes += [Change(knob=k, value=v, reason=f"{why}: {SHORT.get(k, k)} {v} so the GPUs hold the new layout")
                for k, v in (extra or {}).items()]
    return Proposal(changes=tuple(changes), reason=step, source="tune")


def _lowest_failed_above(knob: str, state: TuneState) -> Any:
    """The smallest value of `knob` above the best one that failed (did not start, broke the SLO, errors)
    with the other ladder knobs as in the best plan; None when there is none."""
    one = {"data_parallel_size": 1}  # a plan without replicas runs one
    best = {**one, **state.best.params}
    if knob not in best:
        return None
    same = [k for k in LADDER if k != knob]
    failed = [p[knob] for p in ({**one, **r.params} for r in state.rounds if r.failure is not None
                                or (r.result is not None and not r.meets_slo))
              if knob in p and p[knob] > best[knob] and all(p.get(k) == best.get(k) for k in same)]
    return min(failed) if failed else None


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in params.items()))


def _last_round_of(knob: str, rounds: tuple[TuneRound, ...]) -> TuneRound | None:
    """The latest round that stepped `knob`, unless a later tp gain reopened max_num_seqs."""
    for r in reversed(rounds):
        if knob == "max_num_seqs" and "tensor_parallel_size" in r.changes and r.kept:
            return None  # more GPUs hold more sequences: start the rung again
        if knob in r.changes:
            return r
    return None
