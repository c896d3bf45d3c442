"""The tuner against the stand-in's hidden perf model: its pick next to the exhaustive best and the guide's templates.

For each profile of tests/fakes/perf_model.py, the real smartrun.tune loop (rules ladder, real validator)
runs in-process on the perf model (restart = does this config start, probe = its steady-state numbers),
starting from the guide's stable template. Printed side by side: the tuner's result, the best in-bounds
configuration found by trying every one, and the guide's fixed templates (stable 4 seqs / 0.88, throughput
8 seqs / 0.90 / tp 2 where the GPUs allow). Numbers are the model's real-time units (tok/s, ms).

    .venv/bin/python benchmarks/tuner.py [--rounds 4 5] [--concurrency 64] [--slo-s 25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "fakes"))

import perf_model as pm  # noqa: E402

from smartrun import validate  # noqa: E402
from smartrun.contracts import (  # noqa: E402
    Bounds,
    KnobBound,
    Plan,
)
from smartrun.probe import ProbeSettings  # noqa: E402
from smartrun.tune import TuneSettings, run_tuning  # noqa: E402

SEQS = (1, 64)
UTIL = (0.85, 0.93)  # the guide's usual range


def bounds_for(prof: pm.Profile) -> Bounds:
    src = ("bounds:benchmark",)
    return Bounds(knobs={
        "max_num_seqs": KnobBound(knob="max_num_seqs", min=SEQS[0], max=SEQS[1], sources=src),
        "tensor_parallel_size": KnobBound(knob="tensor_parallel_size", min=1, max=prof.gpus, sources=("hardware",)),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=UTIL[0], max=UTIL[1], sources=src),
    }, goal="throughput", gpu_count=prof.gpus)


def space_for(prof: pm.Profile) -> dict[str, tuple]:
    utils = tuple(round(UTIL[0] + 0.01 * i, 2) for i in range(round((UTIL[1] - UTIL[0]) / 0.01) + 1))
    tps = tuple(t for t in (1, 2, 4, 8) if t <= prof.gpus)
    return {"max_num_seqs": tuple(range(SEQS[0], SEQS[1] + 1)), "tensor_parallel_size": tps,
            "gpu_memory_utilization": utils}


def templates(prof: pm.Profile) -> dict[str, dict]:
    return {
        "guide stable": {"max_num_seqs": 4, "tensor_parallel_size": 1, "gpu_memory_utilization": 0.88},
        "guide throughput": {"max_num_seqs": 8, "tensor_parallel_size": min(2, prof.gpus),
                             "gpu_memory_utilization": 0.90},
    }


def tune(prof: pm.Profile, rounds: int, workload: tuple[int, int, int], slo: float | None):
    sim = pm.Simulation(prof, *workload)
    start = templates(prof)["guide stable"]
    ok, server = sim.start(start)
    assert ok, server
    bounds = bounds_for(prof)
    probe = ProbeSettings(prompt_tokens=workload[0], output_tokens=workload[1], concurrency=workload[2])
    settings = TuneSettings(rounds=rounds, slo_p95_ms=slo, probe=probe)
    outcome = run_tuning(Plan(params=start), bounds, server, sim.restart, settings,
                         check=lambda proposal, base: validate.check(bounds, base, proposal),
                         probe=sim.probe, say=lambda line: None)
    return outcome.report, sim


def cell(params: dict, e: pm.Expected) -> str:
    conf = f"seqs {params['max_num_seqs']:>2} tp {params['tensor_parallel_size']} util {params['gpu_memory_utilization']:.2f}"
    if not e.starts:
        return f"{conf}  does not start"
    return f"{conf}  {e.tokens_per_s:7.1f} tok/s  p95 {e.p95_ms / 1000:5.2f} s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    ap.add_argument("--rounds", type=int, nargs="+", default=[4, 5], help="tuning rounds to compare (default 4 5)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--slo-s", type=float, default=25.0, help="second table: SLO on p95 latency, seconds")
    args = ap.parse_args()
    workload = (args.prompt_tokens, args.output_tokens, args.concurrency)
    print(f"workload: {args.concurrency} clients, prompt {args.prompt_tokens} / output {args.output_tokens} tokens; "
          f"bounds: max_num_seqs {SEQS[0]}..{SEQS[1]}, util {UTIL[0]}..{UTIL[1]}, tp 1..GPUs; "
          "tuner: rules ladder from the guide's stable template")
    last_report = None
    for title, slo in (("no SLO", None), (f"SLO p95 <= {args.slo_s:g} s", args.slo_s * 1000)):
        print(f"\n== {title}")
        header = f"{'profile':<14} {'configuration':<17} {'params and model numbers':<60} {'of best':>7}"
        print(header)
        print("-" * len(header))
        for name, prof in pm.PROFILES.items():
            space = space_for(prof)
            best, best_e = pm.exhaustive_best(space, prof, *workload, slo_p95_ms=slo)
            rows = []
            for rounds in args.rounds:
                report, sim = tune(prof, rounds, workload, slo)
                chosen = {k: report.chosen.params[k] for k in space}
                note = f"  [{len(report.rounds) - 1} rounds, {sim.restarts - 1} restarts, {sim.failed_starts} failed]"
                rows.append((f"tuner, {rounds} rounds", chosen, sim.expected(chosen), note))
                last_report = report if slo is None else last_report
            rows.append(("exhaustive best", best, best_e, f"  [{len(pm.grid(space, prof))} configs]"))
            for tname, params in templates(prof).items():
                rows.append((tname, params, pm.expected(params, prof, *workload), ""))
            for i, (what, params, e, note) in enumerate(rows):
                if not e.starts:
                    share = "-"
                elif slo is not None and e.p95_ms > slo:
                    share = "SLO x"
                else:
                    share = f"{e.tokens_per_s / best_e.tokens_per_s:.0%}"
                print(f"{name if i == 0 else '':<14} {what:<17} {cell(params, e):<60} {share:>7}{note}")
            print()
    if last_report is not None:
        print(f"rounds of the last tuner run without SLO ({list(pm.PROFILES)[-1]}, {args.rounds[-1]} rounds):")
        print(last_report.table())


if __name__ == "__main__":
    main()
