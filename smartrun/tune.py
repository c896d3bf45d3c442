"""Stable first, then faster: measure the healthy server, step inside the bounds, keep what helps.

A round is: propose one step (the LLM with the measurements and the history, or the guide's throughput
ladder when no LLM is set) -> the validator -> restart the server with it -> probe. The best
configuration that meets the SLO (p95 latency) is kept; a failed restart falls back to the best known
configuration so the user is never left without a server. The report (a frozen TuningReport) goes to
the session record and, for the chosen plan, to the saved-parameters cache.

The loop knows nothing about how servers start: the pipeline hands it `restart(plan) -> (ok, server)`,
a `check(proposal, base) -> Verdict` (validate.check over the bounds) and, optionally, a probe function;
the benchmark drives the same loop with the stand-in's perf model in-process.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from pydantic import Field

from smartrun.contracts import Bounds, Change, KnobBound, LaunchEvent, Plan, Proposal
from smartrun.errors import LaunchError, SmartRunError
from smartrun.frozen import Frozen
from smartrun.policy import load as load_policy
from smartrun.probe import ProbeResult, ProbeSettings, make_settings

# The guide's throughput ladder (section 4.3) and its steps, from the policy (smartrun/data/policy.toml):
# rungs in order; the smallest step worth trying between a good value and a failed one; one utilization
# step; and the knee: doubling max_num_seqs that gains less than KNEE_GAIN is past it (KV cache or compute
# saturated), so the next rung goes first and max_num_seqs comes back with rounds to spare.
_TUNE = load_policy().tune
LADDER: tuple[str, ...] = _TUNE.ladder
RESOLUTION: dict[str, float] = dict(_TUNE.resolution)
UTIL_STEP = _TUNE.util_step
KNEE_GAIN = _TUNE.knee_gain
PLACEMENT = ("data_parallel_size", "tensor_parallel_size")  # rungs that move GPUs between replicas and TP
MAX_ERROR_RATE = 0.01  # a round with more failed requests than this is not a candidate

RoundSource = Literal["baseline", "rules", "llm", "defaults"]


class TuneSettings(Frozen):
    """How to tune: rounds, the SLO, when a step counts as a gain, and the load each probe offers."""

    rounds: int = Field(4, ge=1, le=50)
    slo_p95_ms: float | None = Field(None, gt=0, allow_inf_nan=False)
    min_gain: float = Field(0.03, ge=0, le=1)  # a fraction: 1 = a step must double tokens/s
    probe: ProbeSettings = ProbeSettings(concurrency=32, duration_s=15.0, max_requests=5000)
    vs_defaults: bool = False  # also measure plain `vllm serve` with only the user's flags, as the yardstick


class TuneRound(Frozen):
    """One configuration tried: what changed from the plan it was derived from, what it measured, the verdict."""

    index: int  # 0 = the configuration the server came up with
    source: RoundSource
    params: dict[str, Any]
    changes: dict[str, Any] = Field(default_factory=dict)  # knob -> new value
    previous: dict[str, Any] = Field(default_factory=dict)  # knob -> value before the change
    step: str = ""  # ladder rung, e.g. "max_num_seqs:up", "gpu_memory_utilization:between"
    reason: str = ""
    started: bool = True
    failure: str | None = None  # rejected by the validator / did not start / unhealthy probe
    result: ProbeResult | None = None
    meets_slo: bool = False
    gain: float | None = None  # relative to the best round before it (tokens/s, or p95 while no round meets the SLO)
    tokens_gain: float | None = None  # tokens/s relative to the best round before it, for the table
    kept: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        return self.result.tokens_per_s if self.result else None

    @property
    def p95_ms(self) -> float | None:
        return self.result.latency_p95_ms if self.result else None


class TuningReport(Frozen):
    """All rounds, the chosen configuration and why tuning stopped; recorded in the session."""

    rounds: tuple[TuneRound, ...]
    chosen: Plan
    chosen_round: int
    slo_p95_ms: float | None = None
    slo_met: bool = True
    stopped_because: str
    fell_back: bool = False  # the server was restarted on the chosen plan at the end
    settings: TuneSettings
    llm_exchanges: tuple[dict[str, Any], ...] = ()  # tune prompts and replies, when an LLM proposed the steps
    defaults: TuneRound | None = None  # --tune-vs-defaults: plain `vllm serve` with only the user's flags

    @property
    def baseline_tokens_per_s(self) -> float | None:
        return self.rounds[0].tokens_per_s if self.rounds else None

    @property
    def chosen_tokens_per_s(self) -> float | None:
        return self.rounds[self.chosen_round].tokens_per_s

    def table(self) -> str:
        """The rounds as a plain-text table, then the chosen configuration."""
        rows = [("round", "change", "tok/s", "p95 ms", "errors", "result")]
        for r in self.rounds:
            change = "baseline" if r.index == 0 else ", ".join(
                f"{short(k)} {_fmt(r.previous.get(k))}->{_fmt(v)}" for k, v in r.changes.items()) or "(none)"
            tok = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.1f}"
            p95 = "-" if r.p95_ms is None else f"{r.p95_ms:,.0f}"
            errors = "-" if r.result is None else str(r.result.errors)
            rows.append((str(r.index), change, tok, p95, errors, round_outcome(r, self.slo_p95_ms)))
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows]
        base, best = self.baseline_tokens_per_s, self.chosen_tokens_per_s
        uplift = f", {best / base - 1:+.0%} over the baseline" if base and best else ""
        chosen = " ".join(f"{short(k)}={_fmt(self.chosen.params.get(k))}" for k in LADDER if k in self.chosen.params)
        lines.append(f"chosen: round {self.chosen_round} ({chosen}){uplift}; stopped: {self.stopped_because}")
        if self.defaults is not None:
            d = self.defaults
            if d.tokens_per_s and best:
                lines.append(f"plain vLLM defaults (your flags only): {d.tokens_per_s:,.1f} tok/s; the chosen "
                             f"configuration is {best / d.tokens_per_s:.2f}x that, the starting plan "
                             f"{(base or 0.0) / d.tokens_per_s:.2f}x")
            else:
                lines.append(f"plain vLLM defaults (your flags only): {d.failure or 'not measured'}")
        if not self.slo_met:
            lines.append(f"warning: no configuration met the SLO p95 <= {self.slo_p95_ms:g} ms; kept the lowest p95")
        return "\n".join(lines)


class TuneState(Frozen):
    """What a proposer sees: the bounds, the plans, every round so far and the settings."""

    bounds: Bounds
    baseline: Plan
    best: Plan  # the plan of the best round (the baseline until something beats it)
    best_round: int
    rounds: tuple[TuneRound, ...]
    settings: TuneSettings


class TuningOutcome(NamedTuple):
    report: TuningReport
    server: Any  # the running server, on report.chosen


Proposer = Callable[[TuneState], "Proposal | None"]
Restart = Callable[[Plan], "tuple[bool, Any]"]
Check = Callable[[Proposal, Plan], Any]  # (proposal, base) -> validate.Verdict, as the pipeline's closure
ProbeFn = Callable[[Any], ProbeResult]


SHORT = {"max_num_seqs": "seqs", "tensor_parallel_size": "tp", "gpu_memory_utilization": "util",
         "data_parallel_size": "dp"}


def short(knob: str) -> str:
    return SHORT.get(knob, knob)


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def round_outcome(r: TuneRound, slo: float | None) -> str:
    """The last column of the table: kept / not kept and why."""
    if r.failure:
        return r.failure if len(r.failure) <= 60 else r.failure[:57] + "..."
    gain = "" if r.tokens_gain is None or r.index == 0 else f" ({r.tokens_gain:+.1%} tok/s)"
    slo_note = "" if slo is None or r.meets_slo else f", p95 over SLO {slo:g} ms"
    return ("kept" if r.kept else "not kept") + gain + slo_note


# ---------------------------------------------------------------------------- scoring


def meets_slo(result: ProbeResult, slo_p95_ms: float | None) -> bool:
    if slo_p95_ms is None:
        return True
    return result.latency_p95_ms is not None and result.latency_p95_ms <= slo_p95_ms


def healthy(result: ProbeResult) -> str | None:
    """Why a probe does not count (nothing served, too many errors), or None."""
    if result.ok == 0:
        return f"probe failed: no request succeeded ({', '.join(result.error_kinds) or 'no requests'})"
    if result.errors > MAX_ERROR_RATE * result.requests:
        return f"probe failed: {result.errors}/{result.requests} requests failed"
    return None


def improvement(new: TuneRound, old: TuneRound) -> float:
    """How much better `new` is than `old`: tokens/s when both meet the SLO, p95 while neither does."""
    assert new.result is not None and old.result is not None
    if new.meets_slo and old.meets_slo:
        return new.result.tokens_per_s / max(old.result.tokens_per_s, 1e-9) - 1.0
    if new.meets_slo != old.meets_slo:
        return 1.0 if new.meets_slo else -1.0
    return (old.result.latency_p95_ms or 0.0) / max(new.result.latency_p95_ms or 1e-9, 1e-9) - 1.0


# ---------------------------------------------------------------------------- the rules (guide 4.3)


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


# ---------------------------------------------------------------------------- the loop


def run_tuning(
    plan: Plan,
    bounds: Bounds,
    server: Any,
    restart: Restart,
    settings: TuneSettings | None = None,
    *,
    check: Check | None = None,
    probe: ProbeFn | None = None,
    propose: Proposer | None = None,
    say: Callable[[str], None] = print,
) -> TuningOutcome:
    """Tune a healthy `server` running `plan`; returns the report and the server left running (on the best plan).

    `restart(plan)` must stop the running server and start one on `plan`, returning (True, server) when it is
    healthy or (False, why) when it is not. Raises LaunchError only if even the best known plan cannot restart.
    """
    settings = settings or TuneSettings()
    live = {"server": server}

    def tracked(next_plan: Plan) -> tuple[bool, Any]:
        ok, got = restart(next_plan)
        live["server"] = got if ok else None
        return ok, got

    try:
        return _tuning_loop(plan, bounds, server, tracked, settings, check or _default_check(bounds),
                            _guarded(probe or _default_probe(settings)), propose or rules_step, say)
    except KeyboardInterrupt:  # Ctrl+C while tuning: stop the server we started, leave no orphan
        running = live["server"]
        if running is not None and hasattr(running, "stop"):
            running.stop()
        raise


def _tuning_loop(plan: Plan, bounds: Bounds, server: Any, restart: Restart, settings: TuneSettings, check: Check,
                 probe: Callable[[Any], ProbeResult | str], propose: Proposer,
                 say: Callable[[str], None]) -> TuningOutcome:
    say(f"tune: probing the running server ({_load_line(settings.probe)})")
    first = _measured(TuneRound(index=0, source="baseline", params=dict(plan.params), reason="launched plan"),
                      probe(server), settings)
    first = first.model_copy(update={"kept": first.failure is None})
    rounds = [first]
    say(f"tune: round 0 baseline: {_result_line(first)}")
    best_i, best_plan, running_plan = 0, plan, plan
    defaults = None
    if settings.vs_defaults and first.result is not None:
        defaults, server, running_plan = _measure_defaults(plan, bounds, restart, probe, settings, say)
    stopped = f"{settings.rounds} round(s) done"
    if first.result is None:
        stopped = "the running server could not be measured"
    for index in range(1, settings.rounds + 1 if first.result is not None else 1):
        state = TuneState(bounds=bounds, baseline=plan, best=best_plan, best_round=best_i,
                          rounds=tuple(rounds), settings=settings)
        proposal = propose(state)
        if proposal is None or not proposal.changes:
            stopped = "no step left that could gain" if index > 1 else "no step to try inside the bounds"
            break
        source: RoundSource = "llm" if proposal.source == "llm" else "rules"
        changes = {c.knob: c.value for c in proposal.changes}
        attempt = TuneRound(index=index, source=source, params={**best_plan.params, **changes}, changes=changes,
                            previous={k: best_plan.params.get(k) for k in changes}, step=proposal.reason,
                            reason="; ".join(c.reason for c in proposal.changes if c.reason) or proposal.reason)
        verdict = check(proposal, best_plan)
        if not verdict.accepted:
            why = "; ".join(r.reason for r in verdict.rejections) or "rejected"
            rounds.append(attempt.model_copy(update={"started": False, "failure": f"rejected: {why}"}))
            say(f"tune: round {index}: {_changes_line(attempt)} rejected by the validator: {why}")
            continue
        candidate: Plan = verdict.plan
        attempt = attempt.model_copy(update={"params": dict(candidate.params)})
        say(f"tune: round {index}: restarting with {_changes_line(attempt)}")
        ok, started = restart(candidate)
        running_plan = candidate
        if not ok:
            why = _failure_text(started)
            rounds.append(attempt.model_copy(update={"started": False, "failure": f"did not start: {why}"}))
            say(f"tune: round {index}: did not start ({why}); back to the best known configuration")
            server = _restart_best(restart, best_plan, say)
            running_plan = best_plan
            continue
        server = started
        measured = _measured(attempt, probe(server), settings)
        gain = improvement(measured, rounds[best_i]) if measured.failure is None else None
        kept = gain is not None and gain > 0
        tokens_gain = None if gain is None else (
            measured.tokens_per_s / max(rounds[best_i].tokens_per_s or 0.0, 1e-9) - 1.0)  # type: ignore[operator]
        measured = measured.model_copy(update={"gain": gain, "kept": kept, "tokens_gain": tokens_gain})
        rounds.append(measured)
        say(f"tune: round {index}: {_result_line(measured)} -> {round_outcome(measured, settings.slo_p95_ms)}")
        if kept:
            best_i, best_plan = index, candidate
    fell_back = False
    if running_plan.params != best_plan.params:
        say(f"tune: restarting on the best configuration (round {best_i})")
        server = _restart_best(restart, best_plan, say)
        fell_back = True
    chosen = best_plan if best_i == 0 else best_plan.model_copy(update={"source": "tune"})
    report = TuningReport(rounds=tuple(rounds), chosen=chosen, chosen_round=best_i,
                          slo_p95_ms=settings.slo_p95_ms,
                          slo_met=settings.slo_p95_ms is None or rounds[best_i].meets_slo,
                          stopped_because=stopped, fell_back=fell_back, settings=settings, defaults=defaults)
    for line in report.table().splitlines():
        say(f"tune: {line}")
    return TuningOutcome(report=report, server=server)


def _measure_defaults(plan: Plan, bounds: Bounds, restart: Restart, probe: Callable[[Any], ProbeResult | str],
                      settings: TuneSettings, say: Callable[[str], None]) -> tuple[TuneRound, Any, Plan]:
    """The yardstick: plain `vllm serve` with only the flags the user typed (their pins) and vLLM's defaults
    for the rest, measured with the same probe; then back on the plan. Never a candidate for the choice."""
    mine = {k: v for k, v in plan.params.items() if (b := bounds.knobs.get(k)) is not None and b.pinned}
    yardstick = TuneRound(index=0, source="defaults", params=mine, reason="plain vllm serve with your flags only")
    say("tune: measuring plain vLLM defaults (your flags only) as the yardstick")
    ok, started = restart(Plan(params=mine, source=plan.source, reason="plain vLLM defaults"))
    if ok:
        yardstick = _measured(yardstick, probe(started), settings)
        say(f"tune: plain vLLM defaults: {_result_line(yardstick)}")
    else:
        why = _failure_text(started)
        yardstick = yardstick.model_copy(update={"started": False, "failure": f"did not start: {why}"})
        say(f"tune: plain vLLM defaults did not start ({why})")
    return yardstick, _restart_best(restart, plan, say), plan


def _measured(r: TuneRound, result: ProbeResult | str, settings: TuneSettings) -> TuneRound:
    if isinstance(result, str):
        return r.model_copy(update={"failure": result})
    return r.model_copy(update={"result": result, "failure": healthy(result),
                                "meets_slo": meets_slo(result, settings.slo_p95_ms)})


def _guarded(probe: ProbeFn) -> Callable[[Any], ProbeResult | str]:
    """The probe, with a probe that cannot run at all (no model listed, server gone) turned into a reason."""

    def run(server: Any) -> ProbeResult | str:
        try:
            return probe(server)
        except SmartRunError as err:
            return f"probe failed: {err.message}"

    return run


def _restart_best(restart: Restart, best: Plan, say: Callable[[str], None], tries: int = 2) -> Any:
    """Bring the best known configuration back; never leave the user without a server."""
    why = "not tried"
    for _ in range(tries):
        ok, server = restart(best)
        if ok:
            return server
        why = _failure_text(server)
        say(f"tune: restarting the best configuration failed ({why}); trying again")
    raise LaunchError(f"tuning: the best known configuration did not restart after {tries} tries ({why})")


def _failure_text(value: Any) -> str:
    if value is None:
        return "no server"
    if isinstance(value, str):
        return value
    if isinstance(value, SmartRunError):
        return value.message
    for attr in ("failure", "failure_class", "summary", "evidence"):
        got = getattr(value, attr, None)
        if got:
            return str(getattr(got, "klass", got))
    return type(value).__name__


def _load_line(s: ProbeSettings) -> str:
    return (f"concurrency {s.concurrency}, prompt {s.prompt_tokens} / output {s.output_tokens} tokens, "
            f"up to {s.duration_s:g}s or {s.max_requests} requests")


def _result_line(r: TuneRound) -> str:
    if r.result is None:
        return r.failure or "no result"
    return r.result.summary() + (f" [{r.failure}]" if r.failure else "")


def _changes_line(r: TuneRound) -> str:
    return ", ".join(f"{k} {_fmt(r.previous.get(k))} -> {_fmt(v)}" for k, v in r.changes.items())


def _default_check(bounds: Bounds) -> Check:
    from smartrun import validate

    return lambda proposal, base: validate.check(bounds, base, proposal)


def _default_probe(settings: TuneSettings, api_key: str | None = None) -> ProbeFn:
    from smartrun import probe as probe_mod

    def run(server: Any) -> ProbeResult:
        line = probe_mod.ProgressLine()
        try:
            return probe_mod.run_probe(server.base_url, settings.probe, on_progress=line, api_key=api_key)
        finally:
            line.finish()

    return run


# ---------------------------------------------------------------------------- the LLM's step


def llm_proposer(transport: Any, *, goal: str = "throughput", facts: dict[str, Any] | None = None,
                 fallback: Proposer = rules_step, patience: int = 2,
                 on_exchange: Callable[[dict[str, Any]], None] | None = None) -> Proposer:
    """A proposer that asks the LLM (advisor Transport + parse_reply) for the next step.

    The LLM sees the bounds, the best plan, every round's measurements and the SLO. It ends tuning with an
    empty change list; the loop also ends after `patience` rounds in a row that gained under min_gain.
    When the LLM fails or proposes only knobs it may not touch, the rules take that round (said so).
    """
    from smartrun import advisor

    def propose(state: TuneState) -> Proposal | None:
        recent = [r for r in state.rounds[1:]][-patience:]
        if len(recent) == patience and all((r.gain or 0.0) < state.settings.min_gain for r in recent):
            return None
        messages = tune_messages(state, goal=goal, facts=facts or {})
        exchange: dict[str, Any] = {"kind": "tune", "round": len(state.rounds), "messages": messages}
        try:
            reply = transport.complete(messages, advisor.reply_schema(state.bounds),
                                       max_tokens=advisor.reply_max_tokens(state.bounds))
            exchange["reply"] = reply.content
            proposal, ignored = advisor.screen(advisor.parse_reply(reply.content, advisor.reply_model(state.bounds)),
                                               state.bounds)
            exchange["ignored"] = list(ignored)
        except SmartRunError as err:
            exchange["error"] = err.message
            proposal = None
        if on_exchange:
            on_exchange(exchange)
        if proposal is None or (not proposal.changes and exchange.get("ignored")):
            step = fallback(state)
            if step is None:
                return None
            why = exchange.get("error") or "only off-limits knobs proposed"
            return step.model_copy(update={"reason": f"{step.reason} (LLM: {why})"})
        if not proposal.changes:
            return None  # the LLM says tuning is done
        return proposal.model_copy(update={"source": "llm"})

    return propose


def tune_messages(state: TuneState, *, goal: str, facts: dict[str, Any]) -> list[dict[str, str]]:
    """The tune prompt pair rendered with the bounds, the best plan and the measured rounds."""
    from smartrun import advisor

    rounds = [{
        "round": r.index, "source": r.source, "changes": r.changes, "params": {k: r.params.get(k) for k in LADDER},
        "tokens_per_s": _round(r.tokens_per_s), "p95_ms": _round(r.p95_ms),
        "ttft_p95_ms": _round(r.result.ttft_p95_ms) if r.result else None,
        "errors": r.result.errors if r.result else None, "failure": r.failure, "kept": r.kept,
    } for r in state.rounds]
    bounds = {name: b.to_json() for name, b in state.bounds.knobs.items() if name in advisor.open_knobs(state.bounds)}
    best = {k: v for k, v in state.best.params.items() if not _secret(k)}  # no API key in a prompt
    data = {
        "goal": goal, "bounds": bounds, "best": best, "best_round": state.best_round,
        "rounds": rounds, "slo_p95_ms": state.settings.slo_p95_ms, "min_gain": state.settings.min_gain,
        "rounds_left": state.settings.rounds - (len(state.rounds) - 1), "load": state.settings.probe.model_dump(),
        "facts": facts, "gpu_count": state.bounds.gpu_count, "schema": advisor.reply_schema(state.bounds),
    }
    return [
        {"role": "system", "content": advisor.render("tune_system.md.j2", **data)},
        {"role": "user", "content": advisor.render("tune_user.md.j2", **data)},
    ]


def _secret(knob: str) -> bool:
    from smartrun.knobs import CATALOGUE

    entry = CATALOGUE.get(knob)
    return entry is not None and entry.security


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


# ---------------------------------------------------------------------------- CLI and pipeline glue


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The --tune options for `model run`; skips any flag the parser already has (e.g. --tune)."""
    have = set(parser._option_string_actions)  # argparse keeps no public list
    d = TuneSettings()

    def add(flag: str, **kw: Any) -> None:
        if flag not in have:
            parser.add_argument(flag, **kw)

    add("--tune", action="store_true", help="after a healthy start, tune throughput inside the bounds")
    add("--tune-rounds", type=int, default=None, metavar="N", help=f"tuning rounds after the baseline (default {d.rounds})")
    add("--tune-min-gain", type=float, default=None, metavar="FRACTION",
        help=f"a step that gains less than this ends its rung (default {d.min_gain:g})")
    add("--slo-p95-ms", type=float, default=None, metavar="MS", help="keep only configurations with p95 latency <= MS")
    add("--probe-concurrency", type=int, default=None, metavar="N",
        help=f"clients sending at once while probing (default {d.probe.concurrency})")
    add("--probe-duration", type=float, default=None, metavar="S", help=f"seconds per probe (default {d.probe.duration_s:g})")
    add("--probe-prompt-tokens", type=int, default=None, metavar="N",
        help=f"prompt tokens per request (default {d.probe.prompt_tokens})")
    add("--probe-output-tokens", type=int, default=None, metavar="N",
        help=f"output tokens per request (default {d.probe.output_tokens})")
    add("--probe-max-requests", type=int, default=None, metavar="N",
        help=f"requests per probe at most (default {d.probe.max_requests})")
    add("--tune-vs-defaults", action="store_true", default=None,
        help="also measure plain vllm serve with only your flags (one more restart), as the yardstick")


def settings_from_args(args: argparse.Namespace) -> TuneSettings:
    """TuneSettings from the parsed --tune options; a bad value is an InputError naming its flag."""
    from pydantic import ValidationError

    from smartrun.errors import InputError

    d = TuneSettings()
    g = lambda name: getattr(args, name, None)  # noqa: E731

    def pick(name: str, default: Any) -> Any:
        return default if g(name) is None else g(name)

    probe = make_settings(
        flag_prefix="--probe-",
        concurrency=pick("probe_concurrency", d.probe.concurrency),
        duration_s=pick("probe_duration", d.probe.duration_s),
        prompt_tokens=pick("probe_prompt_tokens", d.probe.prompt_tokens),
        output_tokens=pick("probe_output_tokens", d.probe.output_tokens),
        max_requests=pick("probe_max_requests", d.probe.max_requests),
    )
    flags = {"rounds": "--tune-rounds", "slo_p95_ms": "--slo-p95-ms", "min_gain": "--tune-min-gain"}
    values = {"rounds": g("tune_rounds"), "slo_p95_ms": g("slo_p95_ms"), "min_gain": g("tune_min_gain"),
              "vs_defaults": g("tune_vs_defaults")}
    try:
        return TuneSettings(probe=probe, **{k: v for k, v in values.items() if v is not None})
    except ValidationError as err:
        field = str(err.errors()[0]["loc"][0])
        raise InputError(f"{flags.get(field, field)} {values.get(field)!r}: {err.errors()[0]['msg'].lower()}") from None


def make_restart(launcher: Any, bounds: Bounds, server: Any, *, model_path: str,
                 passthrough: tuple[str, ...] = (), on_event: Callable[[LaunchEvent], None] | None = None) -> Restart:
    """restart(plan) over launch.run_with_recovery with one attempt: stops the running server, starts `plan`.

    One attempt, no recovery ladder: a configuration that does not start is the tuner's answer, not a
    problem to repair (the tuner falls back to its best known plan instead).
    """
    from smartrun import launch

    current = {"server": server}

    def restart(plan: Plan) -> tuple[bool, Any]:
        running = current["server"]
        if running is not None:
            running.stop()
            current["server"] = None
        try:
            report = launch.run_with_recovery(plan, bounds, launcher, check=lambda proposal: None, max_attempts=1,
                                              on_event=on_event or (lambda line: None), model_path=model_path,
                                              passthrough=passthrough)
        except SmartRunError as err:
            attempts = getattr(getattr(err, "report", None), "attempts", ()) or ()
            last = attempts[-1] if attempts else None
            if last is not None and getattr(last, "failure_class", None):
                return False, f"{last.failure_class}: {(last.evidence or '')[:120]}"
            return False, err.message
        current["server"] = report.server
        return True, report.server

    return restart


def _plan_api_key(plan: Plan) -> str | None:
    """A pinned --api-key travels in the plan (catalogue knob api_key, a tuple of keys)."""
    key = plan.params.get("api_key")
    if isinstance(key, (list, tuple)):
        key = key[0] if key else None
    return str(key) if key else None


def api_key_of(argv: tuple[str, ...] | list[str]) -> str | None:
    """The first key of vLLM's --api-key (any spelling, several keys) the probe must send, or None."""
    from smartrun.argv import values_of

    keys = values_of(argv, "api_key")
    return keys[0] if keys else None


def launch_inputs(request: Any, facts: Any) -> tuple[str, tuple[str, ...]]:
    """(model path, passthrough args) as the pipeline builds them, for a hook call that did not pass them."""
    from smartrun.pipeline import launch_passthrough

    _, passthrough = launch_passthrough(request)
    return str(getattr(facts, "path", None) or getattr(request, "model", "")), passthrough


def tune_after_launch(*, request: Any, plan: Plan, bounds: Bounds, server: Any, restart: Restart | None = None,
                      launcher: Any = None, check: Check | None = None, settings: TuneSettings | None = None,
                      transport: Any = None, facts: Any = None, on_event: Callable[[str, str], None] | None = None,
                      probe: ProbeFn | None = None, model_path: str | None = None,
                      passthrough: tuple[str, ...] | None = None, **_: Any) -> TuningOutcome | dict[str, Any]:
    """The pipeline's --tune hook: tune the healthy `server`, return the outcome (report + running server).

    Needs `restart` (or a `launcher` to build one with make_restart, with the pipeline's `model_path` and
    `passthrough`; without them they are rebuilt from the request the way the pipeline builds them);
    settings come from `settings`, else from `request.tune_options` (TuneSettings fields), else the defaults.
    """
    emit = on_event or (lambda kind, text: print(text))
    if restart is None and launcher is None:
        emit("warning", "--tune: no way to restart the server was handed to the tuner; skipped")
        return {"skipped": "no restart callable"}
    if settings is None:
        options = getattr(request, "tune_options", None) or {}
        settings = TuneSettings(**options) if options else TuneSettings()
    if getattr(request, "goal", None) == "latency" and settings.slo_p95_ms is None:
        emit("warning", "--tune raises tokens/s; with --goal latency set --slo-p95-ms to cap the p95 latency")
    derived_path, derived_passthrough = launch_inputs(request, facts)
    passthrough = derived_passthrough if passthrough is None else tuple(passthrough)
    if restart is None:
        restart = make_restart(launcher, bounds, server, model_path=model_path or derived_path,
                               passthrough=passthrough, on_event=lambda line: emit("launch", str(line)))
    probe = probe or _default_probe(settings, api_key=_plan_api_key(plan) or api_key_of(passthrough))
    propose: Proposer | None = None
    exchanges: list[dict[str, Any]] = []
    if transport is not None and getattr(request, "smart_run", False):
        model = {"name": getattr(facts, "name", None), "architecture": getattr(facts, "architecture", None)}
        propose = llm_proposer(transport, goal=getattr(request, "goal", "throughput"), facts=model,
                               on_exchange=exchanges.append)
    outcome = run_tuning(plan, bounds, server, restart, settings, check=check, probe=probe, propose=propose,
                         say=lambda line: emit("tune", line))
    if exchanges:
        report = outcome.report.model_copy(update={"llm_exchanges": tuple(exchanges)})
        outcome = TuningOutcome(report=report, server=outcome.server)
    return outcome
