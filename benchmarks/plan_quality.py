"""Plan quality: smartrun's plan vs plain `vllm serve MODEL` vs the exhaustive best, per fixture model x machine x goal.

For every fixture model (fixtures/models) on every hardware snapshot (fixtures/hardware) and every goal:
- plan: rules.effective_bounds + sizing.baseline with the built-in bounds (what `model run --smart-run` plans).
- vllm: plain `vllm serve MODEL` with vLLM 0.33's defaults (native context, util 0.92, the per-GPU batch
  defaults, one GPU).
- best: the exhaustive best over tp x dp x max_num_seqs x utilization at the plan's own context.
- any: whether any configuration starts (tp x context down to 256 tokens x utilization, fewest sequences).
Whether a configuration starts is the estimator's point estimate (memory.estimate: it matches real vLLM
startups closely); how fast it serves is the project's throughput model (tests/fakes/perf_model.py with data
parallelism), with KV capacity from the estimator and the decode step from the weights each GPU streams per
token over its memory bandwidth (smartrun/data/gpus.json). The workload is closed-loop: WORKLOAD below.

Printed: one row per case (start, tokens/s ratio to plain vLLM and to the best, context offered), then the
issue 13 done-when checks with their medians. With --tune N, the real tuning loop (smartrun.tune.run_tuning,
rules ladder, real validator with the estimator's fit check) climbs N rounds from each --goal throughput plan
on the same model (restart = does the estimator say it starts, probe = the throughput model), and its result
is printed against the starting plan, plain vLLM and the exhaustive best.

    .venv/bin/python benchmarks/plan_quality.py [--goals stable throughput] [--models ...] [--machines ...]
                                                [--clients N] [--tune ROUNDS]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from functools import cache
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "fakes"))

import perf_model as pm  # noqa: E402

from smartrun import hardware, memory, model, rules, sizing  # noqa: E402
from smartrun.contracts import GOALS  # noqa: E402
from smartrun.errors import SmartRunError  # noqa: E402
from smartrun.fit import fit_check, flags_from_params  # noqa: E402
from smartrun.gpus import select_gpus, tp_divides  # noqa: E402

FIX = REPO / "fixtures"
VERSION = "0.33.0"
# prompt tokens, output tokens, closed-loop clients: the policy's typical 2048-token request, and as many
# clients as vLLM's own max_num_seqs on an 80 GB card (the load its defaults are built for)
WORKLOAD = (1536, 512, 1024)
SEQS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
UTILS = (0.85, 0.87, 0.89, 0.91, 0.92, 0.93)
CONTEXTS = (None, 131072, 65536, 32768, 16384, 8192, 4096, 2048, 1024, 512, 256)


class Case:
    """One model on one machine: the estimator and the throughput model for any configuration."""

    def __init__(self, facts: model.ModelFacts, hw: hardware.HardwareSnapshot):
        self.facts, self.hw = facts, hw
        self.n = len(hw.gpus)
        self.tps = [t for t in range(1, self.n + 1) if tp_divides(facts, t)]
        self._est: dict[tuple, memory.MemoryEstimate | None] = {}

    def estimate(self, params: dict[str, Any]) -> memory.MemoryEstimate | None:
        flags = flags_from_params(params)
        key = tuple(sorted(flags.model_dump().items()))
        if key not in self._est:
            count = flags.tensor_parallel_size * flags.pipeline_parallel_size
            try:
                gpus = [memory.GpuSpec.from_gpu(g) for g in select_gpus(self.hw, count)]
                self._est[key] = memory.estimate(self.facts, gpus, flags, VERSION)
            except SmartRunError:
                self._est[key] = None
        return self._est[key]

    def starts(self, params: dict[str, Any]) -> bool:
        if pm_gpus(params) > self.n:
            return False
        est = self.estimate(params)
        return est is not None and est.fits

    def profile(self, tp: int) -> pm.Profile:
        """The throughput model's profile for this model on these GPUs (decode step from bandwidth)."""
        est = self.estimate({"tensor_parallel_size": tp, "max_model_len": 256, "max_num_seqs": 1})
        weights_gib = est.weights_gib * tp if est is not None else 1e9
        bw = _bandwidth(self.hw.gpus[0].name)
        step_ms = max(1.0, weights_gib * (1 << 30) / (bw * 1e9) * 1000.0)
        linked = self.n == 1 or all(self.hw.nvlinked(a.index, b.index) for a in self.hw.gpus for b in self.hw.gpus
                                    if a.index < b.index)
        return pm.Profile(name="fixture", gpus=self.n, gpu_gib=0.0, weights_gib=0.0, act_gib=0.0, act_per_seq_gib=0.0,
                          kv_mib_per_token=0.0, reserve_gib=0.0, graph_per_seq_gib=0.0, step_ms=step_ms,
                          batch_k=64.0, tp_exp=0.85, tp_comm_ms=0.5 if linked else 3.0,
                          prefill_ms_per_ktok=step_ms * 4, spread0=0.05, spread_per_seq=0.002,
                          preempt_spread=0.4)

    def tokens_per_s(self, params: dict[str, Any]) -> float:
        """Closed-loop tokens/s of a configuration that starts (0 when it does not)."""
        if not self.starts(params):
            return 0.0
        est = self.estimate(params)
        tp = int(params.get("tensor_parallel_size") or 1)
        seqs = est.max_num_seqs  # the effective batch (vLLM's default when unset)
        run = {**params, "max_num_seqs": seqs}
        prompt, output, clients = WORKLOAD
        per_request = prompt + output
        if est.max_model_len < per_request:  # requests longer than the context are cut to it
            prompt, output = max(1, est.max_model_len - output // 4), output // 4
        return pm.expected(run, self.profile(tp), prompt, output, clients,
                           kv_capacity_tokens=est.kv_cache_tokens).tokens_per_s

    def best(self, context: int | None) -> tuple[dict[str, Any] | None, float]:
        """The exhaustive best over tp x dp x seqs x util at this context."""
        top: tuple[dict[str, Any] | None, float] = (None, 0.0)
        for tp in self.tps:
            for dp in range(1, self.n // tp + 1):
                for util in UTILS:
                    for seqs in SEQS:
                        params = {"tensor_parallel_size": tp, "data_parallel_size": dp, "gpu_memory_utilization": util,
                                  "max_num_seqs": seqs, "max_model_len": context}
                        if not self.starts(params):
                            break  # more sequences only need more memory
                        speed = self.tokens_per_s(params)
                        if speed > top[1]:
                            top = (params, speed)
        return top

    def any_starts(self) -> bool:
        for tp in self.tps:
            for util in (0.93, 0.95):
                for ctx in CONTEXTS:
                    if ctx is not None and ctx > self.facts.derived_max_model_len:
                        continue
                    if self.starts({"tensor_parallel_size": tp, "gpu_memory_utilization": util, "max_model_len": ctx,
                                    "max_num_seqs": 1}):
                        return True
        return False


def pm_gpus(params: dict[str, Any]) -> int:
    return (int(params.get("tensor_parallel_size") or 1) * int(params.get("pipeline_parallel_size") or 1)
            * int(params.get("data_parallel_size") or 1))


@cache
def _bandwidth(name: str) -> float:
    try:
        row = memory.match_gpu(name)
    except SmartRunError:
        return 1000.0
    return float(row.get("memory_bandwidth_gb_s") or 1000.0)


def run_case(case: Case, goal: str) -> dict[str, Any]:
    """One row: the plan, plain vLLM and the exhaustive best (tokens/s, context)."""
    row: dict[str, Any] = {"goal": goal}
    vllm = {}
    row["vllm_starts"] = case.starts(vllm)
    row["vllm_tps"] = case.tokens_per_s(vllm)
    vest = case.estimate(vllm)
    row["vllm_ctx"] = vest.max_model_len if row["vllm_starts"] and vest is not None else 0
    row["any_starts"] = case.any_starts()
    try:
        b = rules.effective_bounds(case.facts, case.hw, None, {}, goal, VERSION)
        plan, _ = sizing.baseline(b, case.facts, case.hw, goal, VERSION)
        params = dict(plan.params)
    except SmartRunError as err:
        row.update(plan_starts=False, plan_tps=0.0, plan_ctx=0, best_tps=0.0, plan="-", why=err.message[:60])
        return row
    row["plan_starts"] = case.starts(params)
    row["plan_tps"] = case.tokens_per_s(params)
    row["plan_ctx"] = params.get("max_model_len") or 0
    row["plan"] = (f"tp{params.get('tensor_parallel_size', 1)} dp{params.get('data_parallel_size', 1)} "
                   f"seqs{params.get('max_num_seqs')} u{params.get('gpu_memory_utilization')}")
    _, row["best_tps"] = case.best(params.get("max_model_len"))
    return row


class _Server:
    def __init__(self, params: dict[str, Any]):
        self.params, self.base_url = dict(params), "sim://"

    def stop(self) -> None:
        pass


def tune_case(case: Case, rounds: int) -> dict[str, Any] | None:
    """The tuning loop from the --goal throughput plan: (start, tuned, vllm, best) tokens/s and the steps taken."""
    from smartrun import validate
    from smartrun.contracts import Plan
    from smartrun.probe import ProbeResult, ProbeSettings
    from smartrun.tune import TuneSettings, run_tuning

    try:
        bounds = rules.effective_bounds(case.facts, case.hw, None, {}, "throughput", VERSION)
        plan, _ = sizing.baseline(bounds, case.facts, case.hw, "throughput", VERSION)
    except SmartRunError:
        return None
    prompt, output, clients = WORKLOAD
    settings = ProbeSettings(concurrency=clients, prompt_tokens=prompt, output_tokens=output, duration_s=10.0)

    def restart(next_plan: Plan) -> tuple[bool, Any]:
        return (True, _Server(next_plan.params)) if case.starts(next_plan.params) else (False, "does not start")

    def probe(server: _Server) -> ProbeResult:
        tps = case.tokens_per_s(server.params)
        n = max(1, round(tps * 10.0 / output))
        return ProbeResult(url="sim://", model="sim", settings=settings, requests=n, ok=n, errors=0,
                           output_tokens=n * output, elapsed_s=10.0, tokens_per_s=tps, requests_per_s=n / 10.0,
                           latency_p50_ms=1.0, latency_p95_ms=1.0, streamed=False)

    fit = fit_check(case.facts, case.hw, VERSION)
    outcome = run_tuning(plan, bounds, _Server(plan.params), restart, TuneSettings(rounds=rounds),
                         check=lambda proposal, base: validate.check(bounds, base, proposal, fit_check=fit),
                         probe=probe, say=lambda line: None)
    report = outcome.report
    steps = [r.step for r in report.rounds[1:] if r.step]
    return {"start": report.baseline_tokens_per_s or 0.0, "tuned": report.chosen_tokens_per_s or 0.0,
            "vllm": case.tokens_per_s({}), "best": case.best(plan.params.get("max_model_len"))[1],
            "steps": steps, "chosen": report.chosen.params}


def tune_table(machines: list[str], models: list[str], rounds: int) -> None:
    print(f"\n--tune {rounds}: the tuning loop from the --goal throughput plan")
    head = f"{'machine':<24} {'model':<30} {'tuned/start':>11} {'tuned/vllm':>10} {'tuned/best':>10}  steps"
    print(head)
    print("-" * len(head))
    gains, vs_vllm, vs_best = [], [], []
    for machine in machines:
        hw = hardware.load_snapshot(FIX / "hardware" / f"{machine}.json")
        for name in models:
            got = tune_case(Case(model.inspect(str(FIX / "models" / name)), hw), rounds)
            if got is None or not got["start"]:
                continue
            gains.append(got["tuned"] / got["start"])
            if got["vllm"]:
                vs_vllm.append(got["tuned"] / got["vllm"])
            if got["best"]:
                vs_best.append(got["tuned"] / got["best"])
            to_vllm = f"{got['tuned'] / got['vllm']:.2f}x" if got["vllm"] else "-"
            to_best = f"{got['tuned'] / got['best']:.0%}" if got["best"] else "-"
            print(f"{machine:<24} {name:<30} {got['tuned'] / got['start']:>10.2f}x {to_vllm:>10} {to_best:>10}  "
                  f"{', '.join(got['steps']) or '-'}")
    if gains:
        print(f"tuned vs its starting plan: median {statistics.median(gains):.2f}x, min {min(gains):.2f}x; vs plain vLLM "
              f"median {statistics.median(vs_vllm):.2f}x; vs the exhaustive best median {statistics.median(vs_best):.0%},"
              f" min {min(vs_best):.0%} ({len(gains)} cases)")


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def main() -> None:
    global WORKLOAD
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--goals", nargs="+", default=list(GOALS))
    ap.add_argument("--models", nargs="+", default=None)
    ap.add_argument("--machines", nargs="+", default=None)
    ap.add_argument("--clients", type=int, default=WORKLOAD[2], help=f"closed-loop clients (default {WORKLOAD[2]})")
    ap.add_argument("--tune", type=int, default=0, metavar="ROUNDS", help="also run the tuning loop (see above)")
    args = ap.parse_args()
    WORKLOAD = (WORKLOAD[0], WORKLOAD[1], args.clients)
    machines = args.machines or sorted(p.stem for p in (FIX / "hardware").glob("*.json"))
    models = args.models or sorted(p.name for p in (FIX / "models").iterdir() if (p / "config.json").is_file())
    print(f"workload: {WORKLOAD[2]} closed-loop clients, {WORKLOAD[0]} prompt + {WORKLOAD[1]} output tokens; "
          f"vLLM {VERSION}; tokens/s from tests/fakes/perf_model.py, starts from the estimator")
    head = (f"{'machine':<24} {'model':<30} {'goal':<12} {'any':>3} {'vllm':>4} {'plan':>4} "
            f"{'plan/vllm':>9} {'plan/best':>9} {'ctx plan':>9} {'ctx vllm':>9}  plan")
    print(head)
    print("-" * len(head))
    rows = []
    for machine in machines:
        hw = hardware.load_snapshot(FIX / "hardware" / f"{machine}.json")
        for name in models:
            case = Case(model.inspect(str(FIX / "models" / name)), hw)
            for goal in args.goals:
                row = run_case(case, goal) | {"machine": machine, "model": name}
                rows.append(row)
                vs_vllm = _ratio(row["plan_tps"], row["vllm_tps"])
                vs_best = _ratio(row["plan_tps"], row["best_tps"])
                print(f"{machine:<24} {name:<30} {goal:<12} {'yes' if row['any_starts'] else 'no':>3} "
                      f"{'yes' if row['vllm_starts'] else 'no':>4} {'yes' if row['plan_starts'] else 'no':>4} "
                      f"{(f'{vs_vllm:.2f}x' if vs_vllm else '-'):>9} {(f'{vs_best:.0%}' if vs_best else '-'):>9} "
                      f"{row['plan_ctx']:>9} {row['vllm_ctx']:>9}  {row.get('plan') or row.get('why')}")
    summary(rows)
    if args.tune:
        tune_table(machines, models, args.tune)


def summary(rows: list[dict[str, Any]]) -> None:
    """The done-when checks of issue 13, with medians."""
    print()
    default = [r for r in rows if r["goal"] == "stable"]
    startable = [r for r in default if r["any_starts"]]
    started = [r for r in startable if r["plan_starts"]]
    print(f"default goal starts where any configuration starts: {len(started)}/{len(startable)}"
          f"  (plain vLLM: {sum(r['vllm_starts'] for r in startable)}/{len(startable)})")
    both = [r for r in default if r["vllm_starts"]]
    ratios = [r["plan_tps"] / r["vllm_tps"] for r in both if r["vllm_tps"] > 0]
    if ratios:
        low = min(ratios)
        print(f"default goal throughput vs plain vLLM where vLLM starts: median {statistics.median(ratios):.2f}x, "
              f"min {low:.2f}x over {len(ratios)} cases  (targets: median >= 1.0x, min >= 0.9x)")
    short = [r for r in both if r["plan_ctx"] < min(r["vllm_ctx"], 32768)]
    print(f"default goal context >= min(vLLM's context, 32768) where vLLM starts: {len(both) - len(short)}/{len(both)}"
          + (f"  short: {', '.join(r['machine'] + '/' + r['model'] for r in short)}" if short else ""))
    thr = [r for r in rows if r["goal"] == "throughput" and r["plan_starts"] and r["best_tps"] > 0]
    shares = [r["plan_tps"] / r["best_tps"] for r in thr]
    if shares:
        print(f"throughput goal vs the exhaustive best at its own context: median {statistics.median(shares):.0%}, "
              f"min {min(shares):.0%} over {len(shares)} cases  (targets: median >= 90%, min >= 75%)")
    for goal in ("latency", "long-context"):
        sel = [r for r in rows if r["goal"] == goal and r["plan_starts"] and r["vllm_tps"] > 0]
        if sel:
            print(f"{goal} goal: throughput vs plain vLLM median {statistics.median(r['plan_tps'] / r['vllm_tps'] for r in sel):.2f}x; "
                  f"context median {statistics.median(r['plan_ctx'] for r in sel):.0f} vs vLLM's "
                  f"{statistics.median(r['vllm_ctx'] for r in sel):.0f}")


if __name__ == "__main__":
    main()
