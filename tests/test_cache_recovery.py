"""A plan the recovery ladder reached is reused next time (first try), not refused by the normal bounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fakes import free_port

REPO = Path(__file__).resolve().parent.parent
MODEL = str(REPO / "fixtures/models/llama-3.1-8b-instruct")
H100 = str(REPO / "fixtures/hardware/1x-h100-80gb.json")
STANDIN = str(REPO / "tests/fakes/fake_vllm.py")


def _smart_run(tmp_path: Path) -> subprocess.CompletedProcess:
    # graphs need 10 GiB: the 0.88 baseline OOMs while capturing them and recovery lowers utilization to the
    # OOM floor's room; the stand-in then dies 2 s after ready (long enough for the readiness poll on a loaded machine) so the supervised run ends (exit 4)
    scenario = {"graph_actual_gib": 10, "faults": {"die_after_ready_s": 2.0}}
    env = {**os.environ, "FAKE_VLLM_SCENARIO": json.dumps(scenario)}
    args = [sys.executable, "-m", "smartrun", "model", "run", MODEL, "--smart-run", "--hardware", H100,
            "--vllm-bin", STANDIN, "--port", str(free_port()), "--startup-timeout", "30"]
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)


def test_recovered_plan_is_reused_from_the_cache_on_the_first_try(tmp_path):
    first = _smart_run(tmp_path)
    assert "attempt 2/3" in first.stdout and "gpu_memory_utilization 0.88 -> 0.84" in first.stdout, first.stdout
    second = _smart_run(tmp_path)
    assert "  plan         source=cache" in second.stdout, second.stdout + second.stderr
    assert "rejected by today's bounds" not in second.stdout + second.stderr
    assert "attempt 1/3" in second.stdout and "attempt 2/3" not in second.stdout
    assert "--gpu-memory-utilization 0.84" in second.stdout and "is ready at" in second.stdout
