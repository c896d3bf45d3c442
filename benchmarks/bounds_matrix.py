"""The rule engine over every fixture machine x model for one goal: what the baseline is, or why nothing fits,
and how long effective_bounds + baseline take (real estimator).

    .venv/bin/python benchmarks/bounds_matrix.py [--goal stable|latency|throughput|long-context]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from smartrun import hardware, model, rules, sizing
from smartrun.contracts import GOALS
from smartrun.errors import InfeasibleError

FIX = Path(__file__).resolve().parent.parent / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--goal", choices=GOALS, default="stable")
    goal = parser.parse_args().goal
    machines = {p.stem: hardware.load_snapshot(p) for p in sorted((FIX / "hardware").glob("*.json"))}
    models = {p.name: model.inspect(str(p)) for p in sorted((FIX / "models").iterdir()) if (p / "config.json").exists()}
    times, ok, infeasible = [], 0, 0
    print(f"goal {goal}: tp / max_model_len / util / seqs / dtype of the baseline, or what does not fit")
    print(f"{'machine':<26} {'model':<32} plan")
    for machine, hw in machines.items():
        for name, facts in models.items():
            start = time.perf_counter()
            try:
                bounds = rules.effective_bounds(facts, hw, None, {}, goal)
                plan, est = sizing.baseline(bounds, facts, hw, goal)
                p = plan.params
                cell = (f"tp {p['tensor_parallel_size']} / {p['max_model_len']} / {p['gpu_memory_utilization']} / "
                        f"{p['max_num_seqs']} / {p['dtype']}  (KV {est.kv_cache_gib:.1f} GiB)")
                ok += 1
            except InfeasibleError as err:
                cell = "INFEASIBLE: " + err.message[:110]
                infeasible += 1
            times.append((time.perf_counter() - start) * 1000)
            print(f"{machine:<26} {name:<32} {cell}")
    times.sort()
    print(f"\n{ok} baselines, {infeasible} infeasible; effective_bounds+baseline per pair: median "
          f"{statistics.median(times):.1f} ms, p95 {times[int(len(times) * 0.95)]:.1f} ms, max {times[-1]:.1f} ms")


if __name__ == "__main__":
    main()
