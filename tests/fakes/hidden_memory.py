"""A machine whose vLLM holds non-KV memory the estimator cannot know: the stand-in, set up for calibration.

The stand-in's visible terms (weights, activation, non-torch, CUDA-graph estimate) are what the estimator
says for one model on one GPU; on top of them the machine holds `hidden_non_kv_gib` that no log line
names, so only the KV cache shows it. `launch` runs the real pipeline (live sources: the calibration
data under $SMARTRUN_HOME, `vllm serve` as a real stand-in process) and stops the server once ready.
Shared by tests/test_calibration.py and benchmarks/calibration.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fakes import FAKE_VLLM, free_port

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "fixtures" / "models" / "llama-3.1-8b-instruct"
L4 = REPO / "fixtures" / "hardware" / "1x-l4.json"
VERSION = "0.33.0"  # what the stand-in prints


def scenario(hidden_gib: float, model: Path = MODEL, hardware: Path = L4) -> dict[str, Any]:
    """The stand-in's budget: the estimator's terms for this model and GPU, plus the hidden memory."""
    from smartrun import hardware as hw_mod
    from smartrun import memory
    from smartrun import model as model_mod

    facts = model_mod.inspect(str(model))
    snapshot = hw_mod.load_snapshot(str(hardware))
    gpu = memory.GpuSpec.from_gpu(snapshot.gpus[0])
    est = memory.estimate(facts, [gpu], memory.EngineFlags(max_num_seqs=8, max_model_len=4096), VERSION)
    return {
        "gpu_total_gib": gpu.cuda_total_bytes / memory.GIB, "gpus": len(snapshot.gpus), "gpu_name": gpu.name,
        "cc": gpu.compute_capability, "weights_gib": est.weights_gib, "kv_bytes_per_token": est.kv_bytes_per_token,
        "activation_gib_per_1k_tokens": est.activation_gib / (est.max_num_batched_tokens / 1000),
        "non_torch_gib": est.non_torch_gib, "graph_gib": est.cudagraph_gib,
        "derived_max_model_len": facts.derived_max_model_len, "num_heads": facts.num_attention_heads,
        "hidden_non_kv_gib": hidden_gib, "delays": {"import_s": 0.0, "load_s": 0.02, "profile_s": 0.0,
                                                    "capture_s": 0.0},
    }


def launch(hidden_gib: float, args: tuple[str, ...] = (), goal: str = "stable", session: Path | None = None,
           model: Path = MODEL, hardware: Path = L4) -> Any:
    """One `model run` on this machine (the stand-in plays its vLLM); the pipeline's RunResult, server stopped."""
    from smartrun import pipeline

    os.environ["FAKE_VLLM_SCENARIO"] = json.dumps(scenario(hidden_gib, model, hardware))
    request = pipeline.RunRequest(model=str(model), user_args=tuple(args), goal=goal, hardware_path=str(hardware),
                                  vllm_bin=str(FAKE_VLLM), port=free_port(), startup_timeout=60)
    sources = pipeline.live_sources(request)
    sources.supervise = False  # stop the server once it is ready
    return pipeline.run(request, sources, session_out=session, write=session is not None)


def snapshot(hardware: Path = L4) -> Any:
    from smartrun import hardware as hw_mod

    return hw_mod.load_snapshot(str(hardware))


def measured_tokens(result: Any) -> int | None:
    """The KV tokens the stand-in printed on the healthy start."""
    for entry in reversed(result.record.launch_attempts):
        if entry.healthy:
            return entry.attempt.facts.kv_cache_tokens if entry.attempt.facts else None
    return None


def estimate(args: dict[str, Any], calibration: Any = None, model: Path = MODEL, hardware: Path = L4) -> Any:
    """The estimator for a configuration on this machine, with or without a correction."""
    from smartrun import hardware as hw_mod
    from smartrun import memory
    from smartrun import model as model_mod

    facts = model_mod.inspect(str(model))
    snapshot = hw_mod.load_snapshot(str(hardware))
    return memory.estimate(facts, snapshot, memory.EngineFlags(**args), VERSION, calibration=calibration)
