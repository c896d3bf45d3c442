"""How long replaying the fixture sessions takes (no GPU, no LLM, no vLLM): in-process and as a cold CLI run.

For each record in fixtures/sessions/: decisions, LLM exchanges, launch attempts, the median in-process
`pipeline.replay` time, and the median wall time of a fresh `localaistack session replay FILE` process.

    .venv/bin/python benchmarks/session_replay.py [--runs 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SESSIONS = sorted((REPO / "fixtures" / "sessions").glob("*.json"))


def _median_s(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    from smartrun import pipeline
    from smartrun.session import load_record

    pipeline.replay(load_record(SESSIONS[0]))  # warm the imports so the first row is not the import time
    print(f"{'session':<28} {'outcome':<9} {'decisions':>9} {'llm':>4} {'starts':>6} {'replay ms':>10} "
          f"{'CLI s':>7}  (median of {args.runs})")
    for path in SESSIONS:
        record = load_record(path)
        in_process = _median_s(lambda record=record: pipeline.replay(record), args.runs)
        cli = _median_s(lambda path=path: subprocess.run(
            [sys.executable, "-m", "smartrun", "session", "replay", str(path)], check=True,
            capture_output=True), args.runs)
        print(f"{path.stem:<28} {record.outcome.status or '?':<9} {len(record.decisions):>9} "
              f"{len(record.llm_exchanges):>4} {len(record.launch_attempts):>6} {in_process * 1000:>10.1f} "
              f"{cli:>7.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
