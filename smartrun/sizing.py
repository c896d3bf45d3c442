"""Stage 4b, size: the baseline Plan sized from the estimate, for every goal.

Where the guide's templates were written for small cards, the plan here asks the estimator what the
machine holds and follows the goal's preferences (smartrun/data/policy.toml), always inside the
effective bounds (rules.effective_bounds) and never past a pin:

- GPUs (`place_gpus`): the smallest tensor-parallel size that holds the model, spare GPUs as
  data-parallel replicas (throughput, stable), or the largest TP the heads allow (latency), or the
  TP that holds the native context (long-context). GPUs left idle are said so in the provenance.
- context (`size_context`): the native context when the cache holds `full_length_requests` of it at
  once, else the longest that does (at least the preferred minimum while a couple fit); long-context
  takes the longest that fits one request.
- concurrency (`size_concurrency`): max_num_seqs from the KV tokens at typical request lengths,
  capped at vLLM's own per-GPU default; max_num_batched_tokens at vLLM's default, never below it.
- utilization: vLLM's default 0.92 inside the bounds (free memory, the built-in band).
Then the estimator checks the whole plan; on a miss the batch, then the context shrink, then TP grows.
When nothing fits, smartrun.no_fit lists what would, each checked by the estimator.
"""

from __future__ import annotations

from typing import Any

from smartrun.contracts import Bounds, KnobBound, Plan
from smartrun.errors import InfeasibleError
from smartrun.fit import EstimateFn, PlanFit, default_estimate, flags_from_params, shortfall
from smartrun.gpus import all_linked, choose_dtype, select_gpus
from smartrun.hardware import HardwareSnapshot
from smartrun.knobs import CATALOGUE
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts
from smartrun.no_fit import no_fit_suggestions
from smartrun.policy import Policy
from smartrun.policy import load as load_policy


def _round_context(c: PlanFit, tokens: int) -> int:
    """A fitted context rounded down to the policy's step, or to whole 16-token blocks when that would cost much."""
    step = c.policy.sizing.context_step
    return _round_down(tokens, step) if tokens >= 8 * step else _round_down(tokens, 16)


def _pinned_value(bound: KnobBound | None) -> Any:
    assert bound is not None  # only asked of a pinned knob, which has a bound
    return bound.choices[0] if bound.choices else bound.min


def _round_down(value: int, step: int) -> int:
    return value // step * step if value >= step else value


def _nearest(bound: KnobBound | None, value: Any) -> Any:
    """The in-bound value nearest to `value` (ties go to the smaller, safer one)."""
    if bound is None or bound.contains(value):
        return value
    if bound.choices is not None:
        numeric = [c for c in bound.choices if isinstance(c, (int, float)) and not isinstance(c, bool)]
        if numeric and isinstance(value, (int, float)):
            return min(numeric, key=lambda c: (abs(c - value), c))
        return bound.choices[0]
    if bound.min is not None and value < bound.min:
        return bound.min
    return bound.max


def _place(bounds: Bounds, name: str, value: Any, why: str, params: dict, prov: dict) -> None:
    bound = bounds.knobs.get(name)
    if bound is not None and bound.pinned:
        params[name] = bound.choices[0] if bound.choices else bound.min
        prov[name] = "pin"
        return
    placed = _nearest(bound, value)
    params[name] = placed
    prov[name] = why if placed == value or bound is None else (
        f"{why}; {value} moved to {placed} to lie inside {bound.describe()} ({', '.join(bound.sources)})")


def _catalogue_order(name: str) -> int:
    return list(CATALOGUE).index(name) if name in CATALOGUE else len(CATALOGUE)


def _custom_all_reduce(bounds: Bounds, hw: HardwareSnapshot, params: dict, prov: dict) -> None:
    bound = bounds.knobs.get("disable_custom_all_reduce")
    if bound is not None and bound.pinned:
        return
    tp = params["tensor_parallel_size"]
    gpus = select_gpus(hw, tp * params["pipeline_parallel_size"])
    groups = [gpus[i:i + tp] for i in range(0, len(gpus), tp)]  # all-reduce runs inside each stage's TP group
    if tp > 1 and not all(all_linked(hw, g) for g in groups) and (bound is None or bound.contains(True)):
        params["disable_custom_all_reduce"] = True
        prov["disable_custom_all_reduce"] = f"hardware: no NVLink between GPUs {', '.join(str(g.index) for g in gpus)}"


# --- GPUs ----------------------------------------------------------------------------------------


def _tp_choices(c: PlanFit, pp: int) -> list[int]:
    bound = c.bound("tensor_parallel_size")
    choices = sorted(bound.choices or [1]) if bound is not None else [1]
    return [t for t in choices if t * pp <= len(c.hw.gpus)]


def _holds(c: PlanFit, params: dict[str, Any], tp: int, context: int) -> MemoryEstimate | None:
    """The estimate at this tp when one request of `context` tokens fits, else None."""
    est = c.estimate({**params, "tensor_parallel_size": tp, "max_model_len": context, "max_num_seqs": 1})
    return est if est is not None and c.fits(est) else None


def place_gpus(c: PlanFit, params: dict[str, Any], prov: dict[str, str], floor: int, native: int) -> None:
    """tensor_parallel_size and data_parallel_size from the goal's parallelism; says which GPUs stay idle."""
    pp = int(params.get("pipeline_parallel_size") or 1)
    n = len(c.hw.gpus)
    tps = _tp_choices(c, pp)
    if not tps:
        raise InfeasibleError(f"pipeline_parallel_size {pp} needs more GPUs than the {n} the machine has")
    style = c.gp.parallelism
    if c.pinned("tensor_parallel_size"):
        tp = _pinned_value(c.bound("tensor_parallel_size"))
        why = "pin"
    else:
        fitting = [t for t in tps if _holds(c, params, t, min(floor, native)) is not None]
        if not fitting:
            tp, why = tps[0], "estimate: no tensor parallel size holds the model (see below)"
        elif style == "tensor":
            tp = fitting[-1]
            why = f"policy:{c.goal}: the largest tensor parallel size the heads and GPUs allow ({tp}) for latency"
        elif style == "context":
            holding = [t for t in fitting if _holds(c, params, t, native) is not None]
            tp = holding[0] if holding else max(fitting, key=lambda t: (_largest(c, params, t), -t))
            why = (f"estimate: the smallest tensor parallel size that holds the native context {native} is {tp}"
                   if holding else f"estimate: tensor parallel size {tp} holds the longest context")
        else:
            tp = fitting[0]
            why = ("estimate: one GPU holds the model" if tp == 1 else
                   f"estimate: the smallest tensor parallel size that holds the model is {tp}")
            tp, why = _replica_batch_rule(c, params, fitting, tp, why, floor, native)
            wanted = min(native, c.policy.sizing.context_preferred_min)
            if c.gp.context_before_replicas and not _offers(c, params, tp, wanted):
                better = [t for t in fitting if _offers(c, params, t, wanted)]
                if better:
                    tp = better[0]
                    why = (f"policy:{c.goal}: tensor parallel size {tp} offers {wanted} tokens of context to "
                           f"{c.gp.full_length_requests} requests at once; {fitting[0]} GPU(s) per replica would not")
    params["tensor_parallel_size"], prov["tensor_parallel_size"] = tp, why
    _place_replicas(c, params, prov, tp * pp)


def _replica_batch(c: PlanFit, params: dict[str, Any], tp: int, context: int) -> int:
    """Typical requests one replica's cache holds at once (point estimate, smallest batch)."""
    est = c.estimate({**params, "tensor_parallel_size": tp, "max_model_len": context, "max_num_seqs": 1})
    if est is None or not c.fits(est):
        return 0
    return est.kv_cache_tokens // min(c.policy.sizing.typical_request_tokens, context)


def _replica_batch_rule(c: PlanFit, params: dict[str, Any], fitting: list[int], tp: int, why: str, floor: int,
                        native: int) -> tuple[int, str]:
    """Larger replicas before more of them while a replica's cache holds fewer than the policy's batch."""
    need = c.gp.replica_min_batch
    context = min(floor, native)
    have = _replica_batch(c, params, tp, context)
    if not need or have >= need:
        return tp, why
    pp = int(params.get("pipeline_parallel_size") or 1)
    batches = {t: _replica_batch(c, params, t, context) for t in fitting if t >= tp}
    for bigger, got in batches.items():
        if bigger > tp and got >= need:
            return bigger, (f"policy:{c.goal}: a replica of {bigger} GPUs holds {got} typical requests at once; "
                            f"{tp} GPU(s) would hold {have} (a replica should hold {need}): larger replicas first")
    # no replica reaches the batch: the layout whose replicas hold the most requests together
    best = max(batches, key=lambda t: (len(c.hw.gpus) // (t * pp) * batches[t], -t))
    if best != tp:
        return best, (f"policy:{c.goal}: no replica holds {need} typical requests; {best} GPUs per replica hold the "
                      f"most together ({len(c.hw.gpus) // (best * pp)} x {batches[best]})")
    return tp, why


def _offers(c: PlanFit, params: dict[str, Any], tp: int, context: int) -> bool:
    """Whether a replica at this tp holds the goal's full-length requests of `context` tokens at once."""
    est = c.estimate({**params, "tensor_parallel_size": tp, "max_model_len": context,
                      "max_num_seqs": c.context_seqs(params)})
    return est is not None and c.fits(est) and c.concurrency(est) >= c.gp.full_length_requests


def _largest(c: PlanFit, params: dict[str, Any], tp: int) -> int:
    est = c.estimate({**params, "tensor_parallel_size": tp, "max_model_len": None,
                      "max_num_seqs": c.context_seqs(params)})
    return c.largest(est) if est is not None else 0


def _place_replicas(c: PlanFit, params: dict[str, Any], prov: dict[str, str], per_replica: int) -> None:
    """data_parallel_size: every spare GPU runs a replica (unless pinned or bounded); idle GPUs are named."""
    n = len(c.hw.gpus)
    bound = c.bound("data_parallel_size")
    if bound is not None and bound.pinned:
        dp, why = _pinned_value(bound), "pin"
    else:
        want = max(1, n // per_replica)
        dp = _nearest(bound, want) if bound is not None else want
        while dp > 1 and dp * per_replica > n:
            dp -= 1
        why = (f"placement: {dp} replicas of {per_replica} GPU(s) each serve requests side by side"
               if dp > 1 else f"placement: one replica on {per_replica} GPU(s)")
        if dp != want and bound is not None:
            why += f" ({want} would fit the GPUs; {bound.describe()} from {', '.join(bound.sources)})"
    idle = n - dp * per_replica
    if idle > 0:
        used = {g.index for g in select_gpus(c.hw, min(n, dp * per_replica))}
        names = ", ".join(str(g.index) for g in c.hw.gpus if g.index not in used)
        why += f"; GPU(s) {names} idle: {_idle_reason(c, params, per_replica, idle)}"
    if dp > 1 or (bound is not None and bound.pinned) or idle > 0:
        params["data_parallel_size"], prov["data_parallel_size"] = dp, why


def _idle_reason(c: PlanFit, params: dict[str, Any], per_replica: int, idle: int) -> str:
    tp = params["tensor_parallel_size"]
    tp_bound = c.bound("tensor_parallel_size")
    bigger = [t for t in (tp_bound.choices or ()) if t > tp] if tp_bound is not None else []
    if not bigger:
        return (f"a replica needs {per_replica} GPU(s) and no larger tensor parallel size divides the model's "
                f"{c.facts.num_attention_heads} attention heads")
    return f"{idle} GPU(s) are fewer than one more replica of {per_replica}"


# --- context -------------------------------------------------------------------------------------


def _concurrency(c: PlanFit, params: dict[str, Any], context: int) -> float:
    est = c.estimate({**params, "max_model_len": context, "max_num_seqs": c.context_seqs(params)})
    return c.concurrency(est) if est is not None and c.fits(est) else 0.0


def _longest_holding(c: PlanFit, params: dict[str, Any], requests: int, lo: int, hi: int) -> int:
    """The longest context in [lo, hi] (rounded to the policy's step) whose cache holds `requests` of it; 0 if none."""
    step = c.policy.sizing.context_step
    if _concurrency(c, params, hi) >= requests:
        return hi
    lo_r = max(step, _round_down(lo, step))
    if _concurrency(c, params, lo_r) < requests:
        return 0
    a, b = lo_r // step, hi // step  # a holds, b*step does not (or is hi)
    while b - a > 1:
        mid = (a + b) // 2
        if _concurrency(c, params, mid * step) >= requests:
            a = mid
        else:
            b = mid
    return a * step


def size_context(c: PlanFit, params: dict[str, Any], prov: dict[str, str], floor: int, native: int) -> None:
    """max_model_len from the cache: native when it holds the goal's full-length requests, else the longest that does."""
    if c.pinned("max_model_len"):
        return
    sz, requests = c.policy.sizing, c.gp.full_length_requests
    goal = f"policy:{c.goal}"
    if c.gp.context == "max":
        est = c.estimate({**params, "max_model_len": None, "max_num_seqs": c.context_seqs(params)})
        largest = min(native, c.largest(est) if est is not None else 0)
        ctx = native if largest >= native else _round_context(c, largest)
        why = (f"{goal}: the model's native context {native}" if ctx == native else
               f"estimate: the longest context one request fits is {largest}; {ctx} (native {native})")
    elif _concurrency(c, params, native) >= requests:
        ctx = native
        why = (f"{goal}: the model's native context {native}; the cache holds "
               f"{_concurrency(c, params, native):.1f} full-length requests (wanted {requests})")
    else:
        ctx = _longest_holding(c, params, requests, floor, native)
        preferred = min(native, sz.context_preferred_min)
        model_native = c.facts.derived_max_model_len
        if (c.gp.prefer_min_context and ctx < preferred
                and _concurrency(c, params, preferred) >= sz.min_full_length_requests):
            ctx = preferred
            why = (f"{goal}: {ctx} tokens (at least min(native, {sz.context_preferred_min}) while the cache holds "
                   f"{sz.min_full_length_requests} full-length request; the model's native {model_native} holds "
                   f"fewer than {requests})")
        elif ctx:
            traded = " (trades context for concurrency)" if c.goal in ("throughput", "latency") else ""
            why = (f"estimate: the longest context whose cache holds {requests} full-length requests is {ctx} "
                   f"(native {model_native}){traded}")
        else:
            est = c.estimate({**params, "max_model_len": None, "max_num_seqs": c.context_seqs(params)})
            largest = c.largest(est) if est is not None else 0
            ctx = min(native, _round_context(c, largest))
            why = f"estimate: only {largest} tokens of context fit one request; {ctx}"
            if 0 < ctx < floor:
                why += f", below the preferred floor {floor}"
    if ctx < sz.context_min:
        return  # nothing useful fits; the fitting loop reports it
    _place(c.bounds, "max_model_len", ctx, why, params, prov)


# --- concurrency ---------------------------------------------------------------------------------


def size_concurrency(c: PlanFit, params: dict[str, Any], prov: dict[str, str]) -> None:
    """max_num_seqs from the KV tokens at typical request lengths, capped at vLLM's default; mnbt at vLLM's.

    The cache is counted at vLLM's default batch first (its sampler buffers are the largest), then again at
    the batch that gives, which frees memory for a little more cache. The batch is a ceiling vLLM fills as
    blocks allow (a smaller cache queues or preempts, it does not fail to start), so it is sized at the point
    estimate; everything a start depends on (fit, context) is sized at the plan-safe low end.
    """
    sz = c.policy.sizing
    est = c.estimate({**params, "max_num_seqs": None, "max_num_batched_tokens": None})
    if est is None:
        return
    vllm_seqs, vllm_mnbt = est.max_num_seqs, est.max_num_batched_tokens
    typical = min(sz.typical_request_tokens, params["max_model_len"])
    if not c.pinned("max_num_seqs"):
        if not c.fits(est):  # vLLM's default batch leaves too little: count the cache at the smallest batch instead
            est = c.estimate({**params, "max_num_seqs": 1, "max_num_batched_tokens": None})
            if est is None or not c.fits(est):
                return
        kv = est.kv_cache_tokens
        seqs = min(vllm_seqs, max(1, kv // typical))
        again = c.estimate({**params, "max_num_seqs": seqs, "max_num_batched_tokens": None})
        if again is not None and c.fits(again) and again.kv_cache_tokens > kv:
            kv = again.kv_cache_tokens
            seqs = min(vllm_seqs, max(1, kv // typical))
        why = (f"estimate: the cache holds {kv} tokens, {kv // typical} requests of {typical} tokens; "
               f"vLLM's default here is {vllm_seqs}")
        if c.gp.max_num_seqs is not None and c.gp.max_num_seqs < seqs:
            seqs = c.gp.max_num_seqs
            why += f"; policy:{c.goal} keeps batches at {seqs} or fewer"
        if seqs >= 8 * sz.seqs_step:
            seqs = _round_down(seqs, sz.seqs_step)
        _place(c.bounds, "max_num_seqs", seqs, why, params, prov)
    if not c.pinned("max_num_batched_tokens"):
        seqs = int(params["max_num_seqs"])
        at_seqs = c.estimate({**params, "max_num_batched_tokens": None})  # vLLM's default at this batch
        vllm_mnbt = at_seqs.max_num_batched_tokens if at_seqs is not None else vllm_mnbt
        mnbt = max(vllm_mnbt, seqs)
        why = (f"vLLM's default for this GPU and batch ({vllm_mnbt})"
               + (f", raised to max_num_seqs {seqs}" if mnbt > vllm_mnbt else ""))
        _place(c.bounds, "max_num_batched_tokens", mnbt, why, params, prov)


# --- the plan ------------------------------------------------------------------------------------


def _start(c: PlanFit) -> tuple[dict[str, Any], dict[str, str]]:
    """Template knobs, dtype, utilization and every pin, before sizing."""
    params: dict[str, Any] = {}
    prov: dict[str, str] = {}
    for name, value in c.gp.template.items():
        _place(c.bounds, name, value, f"policy:{c.goal} template", params, prov)
    dtype_bound = c.bound("dtype")
    dtype, why = choose_dtype(dtype_bound.choices if dtype_bound else None, c.facts, c.hw.gpus)
    _place(c.bounds, "dtype", dtype, why, params, prov)
    util = c.policy.sizing.utilization
    _place(c.bounds, "gpu_memory_utilization", util, f"policy: vLLM's default {util}", params, prov)
    for name, bound in c.bounds.knobs.items():  # every pin (user-only knobs too) goes into the plan
        if bound.pinned:
            params[name], prov[name] = _pinned_value(bound), "pin"
    return params, prov


def baseline(bounds: Bounds, facts: ModelFacts, hardware: HardwareSnapshot, goal: str | None = None,
             vllm_version: str | None = None, *, estimate_fn: EstimateFn | None = None,
             policy: Policy | None = None) -> tuple[Plan, MemoryEstimate]:
    """The goal's plan (default: the bounds' goal) sized from the estimate inside the bounds (see the module
    docstring); InfeasibleError when nothing fits."""
    c = PlanFit(bounds, facts, hardware, goal or bounds.goal, vllm_version, estimate_fn or default_estimate(),
                policy or load_policy())
    params, prov = _start(c)
    floor, native = c.limits()
    if "max_model_len" not in params:
        params["max_model_len"] = min(floor, native)
        bound = c.bound("max_model_len")
        prov["max_model_len"] = (
            f"policy: the preferred floor {floor}" if floor < native or bound is None else
            f"estimate: {native}, the longest context the bounds allow ({', '.join(bound.sources)})")
    failures: list[str] = []
    util_bound = c.bound("gpu_memory_utilization")
    utils = [params["gpu_memory_utilization"]]
    if util_bound is not None and not util_bound.pinned and util_bound.max is not None and util_bound.max > utils[0]:
        utils.append(util_bound.max)  # guide 4.2: context first, then memory
    # the plan-safe low end of the estimate first (at vLLM's utilization, then the band's top); its point value
    # only when nothing fits there
    for point, util in [(False, u) for u in utils] + [(True, u) for u in utils]:
        c.point = point
        start, start_prov = {**params, "gpu_memory_utilization": util}, dict(prov)
        if util != params["gpu_memory_utilization"]:
            start_prov["gpu_memory_utilization"] = (f"estimate: raised to the band's top {util} so the plan fits "
                                                    f"({', '.join(util_bound.sources if util_bound else ())})")
        found = _sized_at(c, start, start_prov, floor, native, failures)
        if found is not None:
            plan, est = found
            if point:
                why = ("fits only at the estimate's point value, not at the low end of its band: vLLM may refuse "
                       "the first start, and recovery then steps down")
                plan = plan.model_copy(update={"reason": f"{plan.reason}; {why}"})
            return plan, est
    params.setdefault("tensor_parallel_size", 1)
    raise InfeasibleError(failures[0] + no_fit_suggestions(c, params))


def _sized_at(c: PlanFit, params: dict[str, Any], prov: dict[str, str], floor: int, native: int,
              failures: list[str]) -> tuple[Plan, MemoryEstimate] | None:
    """GPUs, context and batch at the smallest TP that fits, else at each larger one; None when none fits."""
    place_gpus(c, params, prov, floor, native)
    tps = [params["tensor_parallel_size"]]
    if not c.pinned("tensor_parallel_size"):
        tps += [t for t in _tp_choices(c, int(params.get("pipeline_parallel_size") or 1)) if t > tps[0]]
    for tp in tps:
        trial, trial_prov = dict(params), dict(prov)
        if tp != params["tensor_parallel_size"]:
            trial["tensor_parallel_size"] = tp
            trial_prov["tensor_parallel_size"] = f"estimate: tensor parallel size {tp} is the smallest that fits"
            trial.pop("data_parallel_size", None)
            trial_prov.pop("data_parallel_size", None)
            _place_replicas(c, trial, trial_prov, tp * int(trial.get("pipeline_parallel_size") or 1))
        size_context(c, trial, trial_prov, floor, native)
        size_concurrency(c, trial, trial_prov)
        trial, trial_prov = _starved_utilization(c, trial, trial_prov, floor, native)
        _custom_all_reduce(c.bounds, c.hw, trial, trial_prov)
        est, why_not = _fit(c, trial, trial_prov)
        if est is not None:
            ordered = {name: trial[name] for name in sorted(trial, key=_catalogue_order)}
            reason = f"goal {c.goal}: sized from the estimate ({c.gp.description})"
            return Plan(params=ordered, source="static", provenance=trial_prov, reason=reason), est
        failures.append(why_not)
    return None


def _starved_utilization(c: PlanFit, params: dict[str, Any], prov: dict[str, str], floor: int, native: int,
                         ) -> tuple[dict[str, Any], dict[str, str]]:
    """When a replica's cache holds fewer typical requests than the goal's batch, the band's top utilization
    (guide 4.3: memory is the last rung) if the plan still fits there; else the plan as it is."""
    need, bound = c.gp.replica_min_batch, c.bound("gpu_memory_utilization")
    util, seqs = params.get("gpu_memory_utilization"), params.get("max_num_seqs")
    if (not c.gp.starved_utilization or not need or seqs is None or seqs >= need or bound is None or bound.pinned or bound.max is None
            or util is None or bound.max <= util):
        return params, prov
    raised, raised_prov = {**params, "gpu_memory_utilization": bound.max}, dict(prov)
    raised_prov["gpu_memory_utilization"] = (f"estimate: the band's top {bound.max} ({', '.join(bound.sources)}): at "
                                             f"{util} a replica's cache holds only {seqs} typical requests")
    size_context(c, raised, raised_prov, floor, native)
    size_concurrency(c, raised, raised_prov)
    est = c.estimate(raised)
    if est is not None and c.fits(est) and int(raised.get("max_num_seqs") or 0) > int(seqs):
        return raised, raised_prov
    return params, prov


def _fit(c: PlanFit, params: dict[str, Any], prov: dict[str, str]) -> tuple[MemoryEstimate | None, str]:
    """The plan as sized, else with a smaller batch, else with a shorter context; mutates params on success."""
    est = c.estimate(params)
    if est is not None and c.fits(est):
        return est, ""
    if not c.pinned("max_num_seqs") and params.get("max_num_seqs"):
        seqs = int(params["max_num_seqs"])
        while seqs > 1:
            seqs //= 2
            trial = {**params, "max_num_seqs": seqs}
            bound = c.bound("max_num_seqs")
            if bound is not None and not bound.contains(seqs):
                break
            e = c.estimate(trial)
            if e is not None and c.fits(e):
                params.update(trial)
                prov["max_num_seqs"] = f"estimate: lowered to {seqs} so the activations fit ({prov['max_num_seqs']})"
                return e, ""
    bound = c.bound("max_model_len")
    if not c.pinned("max_model_len") and est is not None and c.largest(est) > 0:
        fitted = min(int(params["max_model_len"]), c.largest(est))
        fitted = _round_context(c, fitted)
        if fitted >= c.policy.sizing.context_min and (bound is None or bound.contains(fitted)):
            trial = {**params, "max_model_len": fitted}
            e = c.estimate(trial)
            if e is not None and c.fits(e):
                params.update(trial)
                prov["max_model_len"] = f"estimate: the longest context that fits is {c.largest(e)}; {fitted}"
                return e, ""
    gpus = select_gpus(c.hw, min(len(c.hw.gpus), params["tensor_parallel_size"]
                                 * int(params.get("pipeline_parallel_size") or 1)))
    if est is None:
        return None, f"{c.facts.name} cannot be budgeted at tp {params['tensor_parallel_size']}"
    return None, shortfall(c.facts, gpus, flags_from_params(params), est)
