"""Hand-built stage inputs for the advisor tests (bounds, baseline, hardware, model, estimate, check)."""

from __future__ import annotations

import json
from typing import Any

from smartrun.advisor import AdviceContext, LLMSettings, OpenAITransport
from smartrun.clock import FakeClock
from smartrun.contracts import Bounds, KnobBound, Plan, Proposal, Rejection, Verdict
from smartrun.hardware import GpuInfo, HardwareSnapshot
from smartrun.memory import MemoryEstimate
from smartrun.model import ModelFacts

FAKE_KEY = "sk-test-DISTINCTIVE-7f3a9c"  # must never show up in a prompt, error or record


def bounds() -> Bounds:
    return Bounds(goal="throughput", knobs={
        "max_model_len": KnobBound(knob="max_model_len", min=1024, max=32768,
                                   sources=("model", "bounds:smartrun.toml:3"),
                                   notes=("the model's derived context is 32768",)),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.93,
                                            sources=("bounds:smartrun.toml:4",)),
        "max_num_seqs": KnobBound(knob="max_num_seqs", min=1, max=64, sources=("hardware",)),
        "tensor_parallel_size": KnobBound(knob="tensor_parallel_size", min=1, max=1, pinned=True,
                                          llm_may_change=False, sources=("pin",)),
        "dtype": KnobBound(knob="dtype", choices=("bfloat16", "float16"), sources=("hardware",)),
    })


def baseline() -> Plan:
    params = {"max_model_len": 4096, "gpu_memory_utilization": 0.88, "max_num_seqs": 4,
              "tensor_parallel_size": 1, "dtype": "bfloat16"}
    return Plan(params=params, source="static", provenance={k: "rule: guide template" for k in params})


def hardware() -> HardwareSnapshot:
    gpu = GpuInfo(index=0, uuid="GPU-0", name="NVIDIA H100 80GB HBM3", memory_total_mib=81559,
                  memory_free_mib=81000, memory_used_mib=559, compute_capability="9.0")
    return HardwareSnapshot(source="test", cpu_count=16, ram_mib=131072, gpus=(gpu,))


def model(name: str = "Qwen/Qwen2.5-7B-Instruct") -> ModelFacts:
    return ModelFacts(name=name, architecture="Qwen2ForCausalLM", model_type="qwen2", num_hidden_layers=28,
                      hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_kv_heads=4,
                      head_dim=128, vocab_size=152064, max_position_embeddings=32768,
                      derived_max_model_len=32768, weight_bytes=15_231_233_024)


def estimate() -> MemoryEstimate:
    return MemoryEstimate(
        vllm_version="0.33.0", profile="0.33", total_gib=79.19, requested_gib=69.69, free_gib=78.6,
        weights_gib=14.19, activation_gib=1.43, non_torch_gib=0.62, cudagraph_gib=0.51, kv_cache_gib=52.94,
        kv_cache_tokens=991_344, kv_bytes_per_token=57344, block_size=16, num_gpu_blocks=61_959,
        max_model_len=4096, max_num_seqs=4, max_num_batched_tokens=8192, max_concurrency=242.03, fits=True,
        largest_max_model_len=32768,
    )


def context(**overrides: Any) -> AdviceContext:
    fields: dict[str, Any] = {"hardware": hardware(), "model": model(), "bounds": bounds(),
                              "baseline": baseline(), "estimate": estimate(), "goal": "throughput"}
    fields.update(overrides)
    return AdviceContext(**fields)


def _stand_in_check(b: Bounds, base: Plan, proposal: Proposal) -> Verdict:
    """A minimal validator for when smartrun.validate.check is not there: types, bounds, no clamping."""
    rejections = []
    for change in proposal.changes:
        bound = b.knobs.get(change.knob)
        numeric = isinstance(change.value, int | float) and not isinstance(change.value, bool)
        ok = bound is not None and not bound.pinned and (
            (bound.choices is not None and change.value in bound.choices)
            or (bound.choices is None and numeric and bound.contains(change.value)))
        if not ok:
            rejections.append(Rejection(knob=change.knob, value=change.value, bound=f"{bound}", source="test",
                                        reason=f"{change.knob}={change.value!r} is outside the bound"))
    if rejections:
        return Verdict(plan=None, rejections=tuple(rejections))
    changes = {c.knob: c.value for c in proposal.changes}
    return Verdict(plan=base.with_changes(changes, "llm", {c.knob: f"llm: {c.reason}" for c in proposal.changes}))


def check_for(b: Bounds, base: Plan):
    """The pipeline's closure: the real validate.check once it exists, else the stand-in."""
    from smartrun import validate

    real = getattr(validate, "check", None)
    if real is None:
        return lambda proposal: _stand_in_check(b, base, proposal)
    return lambda proposal: real(b, base, proposal)


def transport(base_url: str, clock: Any = None, **settings: Any) -> OpenAITransport:
    """A transport timed by `clock` (a fresh FakeClock unless given: its backoff waits take no real time and
    are listed in `clock.slept`; hand the same clock to FakeLLM to delay replies on it)."""
    fields = {"base_url": base_url, "model": "fake-model", "api_key": FAKE_KEY, "timeout_s": 5.0,
              "max_attempts": 3, **settings}
    return OpenAITransport(LLMSettings(**fields), backoff_s=0.01, backoff_max_s=0.02,
                           clock=clock if clock is not None else FakeClock())


def reply(changes: list[dict[str, Any]], reason: str = "suits the goal") -> str:
    return json.dumps({"changes": changes, "reason": reason})
