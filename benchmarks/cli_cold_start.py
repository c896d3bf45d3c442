"""Cold wall time of `localaistack model run ... --dry-run` with no LLM (issue 4 target: < 0.5 s median).

Each run is a fresh Python process, as a user would start it. Also times `--help` and, for
context, a bare `python -c pass`, so the table shows what the tool itself adds.

    python benchmarks/cli_cold_start.py [--runs 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "fixtures/models/qwen2.5-7b-instruct"
HARDWARE = REPO / "fixtures/hardware/1x-h100-80gb.json"

CASES = {
    "python -c pass (floor)": [sys.executable, "-c", "pass"],
    "localaistack --help": [sys.executable, "-m", "smartrun", "--help"],
    "model run --dry-run (no LLM)": [
        sys.executable, "-m", "smartrun", "model", "run", str(MODEL),
        "--smart-run", "--dry-run", "--hardware", str(HARDWARE),
    ],
    "model run --dry-run + vLLM flags (checked)": [  # the unknown-flag check against the shipped 0.33 list
        sys.executable, "-m", "smartrun", "model", "run", str(MODEL),
        "--smart-run", "--dry-run", "--hardware", str(HARDWARE), "--vllm-max-model-len", "8192",
        "--max-num-seqs", "8", "--seed", "1", "--enable-lora",
    ],
    "import openai (what laziness avoids)": [sys.executable, "-c", "import openai"],
}


def time_once(argv: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, env=env, cwd=REPO)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.decode()[-400:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "SMARTRUN_HOME": home, "PYTHONDONTWRITEBYTECODE": "0"}
        for key in ("SMARTRUN_LLM_BASE_URL", "OPENAI_BASE_URL", "SMARTRUN_LLM_MODEL"):
            env.pop(key, None)
        print(f"{'command':40} {'median s':>9} {'min s':>7} {'max s':>7}  (n={args.runs})")
        for name, argv in CASES.items():
            time_once(argv, env)  # warm the file cache and .pyc files: "cold" means a new process
            times = [time_once(argv, env) for _ in range(args.runs)]
            print(f"{name:40} {statistics.median(times):9.3f} {min(times):7.3f} {max(times):7.3f}")
    print("target: model run --dry-run median < 0.500 s")


if __name__ == "__main__":
    main()
