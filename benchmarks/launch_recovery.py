"""Launch + recovery against the `vllm` stand-in: one row per failure scenario, and one full transcript.

Each scenario hides a memory budget or a fault from the tuner; the row shows the attempts the recovery
loop needed, the failure classes it saw, what it changed, and the wall time (stand-in delays ~0.1 s).

    .venv/bin/python benchmarks/launch_recovery.py                # the table
    .venv/bin/python benchmarks/launch_recovery.py --transcript   # plus the terminal output of one recovered launch
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from fakes import install_vllm_shim  # noqa: E402

from smartrun import launch, validate  # noqa: E402
from smartrun.contracts import (  # noqa: E402
    Bounds,
    KnobBound,
    Plan,
)
from smartrun.errors import LaunchError  # noqa: E402

BASE = {"max_model_len": 8192, "gpu_memory_utilization": 0.9, "max_num_seqs": 64}
SCENARIOS = [
    # name, hidden scenario, plan changes, pins
    ("healthy", {}, {}, {}),
    ("OOM capturing graphs", {"graph_actual_gib": 10.0}, {"gpu_memory_utilization": 0.92}, {}),
    ("KV too small (131072)", {"kv_bytes_per_token": 1 << 20, "derived_max_model_len": 131072},
     {"max_model_len": 131072}, {}),
    ("CUDA graph error", {"faults": {"cudagraph_error": True}}, {}, {}),
    ("NCCL error at tp=2", {"gpus": 2, "faults": {"nccl_error": True}}, {"tensor_parallel_size": 2}, {}),
    ("free memory low (70 GiB)", {"free_gib": 70.0}, {}, {}),
    ("no room for KV at tp=1", {"gpus": 2, "weights_gib": 70.0}, {}, {}),
    ("pinned max_model_len", {"kv_bytes_per_token": 1 << 20, "derived_max_model_len": 131072},
     {"max_model_len": 131072}, {"max_model_len": 131072, "gpu_memory_utilization": 0.9}),
    ("OOM beyond the floor", {"graph_actual_gib": 20.0}, {"gpu_memory_utilization": 0.95}, {}),
    ("never ready (timeout 1 s)", {"faults": {"never_ready": True}}, {}, {}),
]


def bounds(pins: dict) -> Bounds:
    knobs = {
        "max_model_len": KnobBound(knob="max_model_len", min=4096, max=131072),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.95, recovery_min=0.82),
        "max_num_seqs": KnobBound(knob="max_num_seqs", min=8, max=256),
        "tensor_parallel_size": KnobBound(knob="tensor_parallel_size", choices=(1, 2)),
        "enforce_eager": KnobBound(knob="enforce_eager", choices=(False, True)),
        "disable_custom_all_reduce": KnobBound(knob="disable_custom_all_reduce", choices=(False, True)),
    }
    for knob, value in pins.items():
        knobs[knob] = KnobBound(knob=knob, min=value, max=value, pinned=True, llm_may_change=False, sources=("pin",))
    return Bounds(knobs=knobs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_one(shim: Path, info: launch.VllmInfo, hidden: dict, changes: dict, pins: dict, printer, events) -> dict:
    os.environ["FAKE_VLLM_SCENARIO"] = json.dumps({"delays": {"import_s": 0.0, "load_s": 0.1}, **hidden})
    port = free_port()
    plan = Plan(params={**BASE, **changes, "port": port})
    b = bounds(pins)
    timeout = 1.0 if hidden.get("faults", {}).get("never_ready") else 30.0
    launcher = launch.ProcessLauncher(str(shim), info=info, printer=printer, progress=lambda t: events(f"[{t}]"),
                                      poll_interval=0.05, startup_timeout=timeout)
    started = time.monotonic()
    try:
        report = launch.run_with_recovery(plan, b, launcher, check=lambda p: validate.check(b, plan, p),
                                          on_event=lambda e: events(str(e)), model_path="/models/demo-8b")
        report.server.stop()
        attempts, final, outcome = report.attempts, report.plan, "ready"
    except LaunchError as err:
        attempts, final, outcome = err.report.attempts, err.report.plan, "gave up"
    diff = [f"{k}={v}" for k, v in final.params.items() if plan.params.get(k) != v]
    return {"attempts": len(attempts), "classes": " > ".join(a.failure_class or "ready" for a in attempts),
            "changed": ", ".join(diff) or "-", "outcome": outcome, "s": time.monotonic() - started}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transcript", action="store_true", help="print the full output of the OOM scenario")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shim = install_vllm_shim(Path(tmp) / "bin")
        info = launch.find_vllm(str(shim), cache_dir=Path(tmp) / "cache")
        rows = []
        for name, hidden, changes, pins in SCENARIOS:
            rows.append((name, run_one(shim, info, hidden, changes, pins, lambda _line: None, lambda _e: None)))
        header = f"{'scenario':<27} {'tries':>5}  {'outcome':<8} {'wall s':>6}  {'failure classes':<44} changed"
        print(header)
        print("-" * len(header))
        for name, r in rows:
            print(f"{name:<27} {r['attempts']:>5}  {r['outcome']:<8} {r['s']:>6.2f}  {r['classes']:<44} {r['changed']}")
        if args.transcript:
            print("\n--- transcript: OOM while capturing CUDA graphs, recovered ---")
            name, hidden, changes, pins = SCENARIOS[1]
            run_one(shim, info, hidden, changes, pins, print, print)
    return 0


if __name__ == "__main__":
    sys.exit(main())
