"""The tuner's data (settings, rounds, report, state) and how a round is judged (SLO, health, gain)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from pydantic import Field

from smartrun.contracts import Bounds, Plan, Proposal
from smartrun.frozen import Frozen
from smartrun.policy import load as load_policy
from smartrun.probe import ProbeResult, ProbeSettings

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
