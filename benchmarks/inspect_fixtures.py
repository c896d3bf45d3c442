"""Inspect every fixture model: time per inspect, weight GiB from headers/index, and vLLM's own figure.

    .venv/bin/python benchmarks/inspect_fixtures.py

"vLLM GiB" is `Model loading took X GiB` from fixtures/reference/vllm_startup_logs.jsonl for the same
HF repo (TP 1, no quantization flag); vLLM's figure includes small buffers the checkpoint does not hold.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from pathlib import Path

from smartrun.memory import evidence
from smartrun.model import inspect

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "fixtures" / "models"
GIB = 1024**3


def vllm_weights_gib() -> dict[str, float]:
    """Median `Model loading took` per repo id, over single-GPU, unquantized, bf16/default runs."""
    seen: dict[str, list[float]] = {}
    for run in evidence.load_cases():
        if run.weights_gib is None or run.quantization or run.tensor_parallel_size not in (1, None):
            continue
        if run.dtype not in (None, "torch.bfloat16"):
            continue
        seen.setdefault(run.model, []).append(run.weights_gib)
    return {model: statistics.median(values) for model, values in seen.items()}


def main() -> None:
    spec = importlib.util.spec_from_file_location("make_fixtures", MODELS / "make_fixtures.py")
    make_fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_fixtures)
    repo_of = {d: row[0] for d, row in make_fixtures.FIXTURES.items()}  # fixture dir -> HF repo id
    vllm = vllm_weights_gib()
    print(f"{'fixture':32} {'source':20} {'inspect ms':>10} {'weights GiB':>11} {'vLLM GiB':>9} {'diff':>6}  max len")
    for d in sorted(repo_of):
        times = []
        for _ in range(5):
            start = time.perf_counter()
            facts = inspect(str(MODELS / d))
            times.append((time.perf_counter() - start) * 1000)
        gib = facts.weight_bytes / GIB
        ref = vllm.get(repo_of[d])
        ref_s = f"{ref:9.2f}" if ref is not None else f"{'-':>9}"
        diff = f"{ref - gib:+6.2f}" if ref is not None else f"{'':>6}"
        print(f"{d:32} {facts.weight_bytes_source:20} {statistics.median(times):10.1f} {gib:11.2f} {ref_s} {diff}"
              f"  {facts.derived_max_model_len}")


if __name__ == "__main__":
    main()
