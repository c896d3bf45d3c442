"""The advisor on real stage outputs: a fixture machine and model, the real bounds, baseline and validator.

The LLM's first reply is partly out of bounds and partly off limits; the repair is accepted.
"""

from __future__ import annotations

from fakes.advisor_inputs import FAKE_KEY, reply, transport
from fakes.llm_server import FakeLLM

from smartrun import hardware, model, rules, validate
from smartrun.advisor import AdviceContext, advise, explain_lines, initial_messages


def real_context(fixtures_dir) -> AdviceContext:
    hw = hardware.load_snapshot(fixtures_dir / "hardware" / "1x-h100-80gb.json")
    facts = model.inspect(str(fixtures_dir / "models" / "qwen2.5-7b-instruct"))
    bounds = rules.effective_bounds(facts, hw, None, {"max_model_len": 8192}, goal="throughput")
    base, estimate = rules.baseline(bounds, facts, hw, "throughput")
    return AdviceContext(hardware=hw, model=facts, bounds=bounds, baseline=base, estimate=estimate,
                         goal="throughput")


def test_partly_rejected_proposal_is_repaired_on_real_bounds(fixtures_dir):
    ctx = real_context(fixtures_dir)
    fit = rules.fit_check(ctx.model, ctx.hardware)
    first = reply([
        {"knob": "max_num_seqs", "value": 64, "reason": "many users"},
        {"knob": "gpu_memory_utilization", "value": 0.97, "reason": "more KV cache"},
        {"knob": "max_model_len", "value": 16384, "reason": "longer prompts"},
        {"knob": "trust_remote_code", "value": True, "reason": "just in case"},
    ], "throughput first")
    second = reply([{"knob": "max_num_seqs", "value": 64, "reason": "many users"},
                    {"knob": "gpu_memory_utilization", "value": 0.9, "reason": "inside the built-in band"}],
                   "throughput first, inside the bounds")
    with FakeLLM([{"content": first}, {"content": second}]) as llm:
        advice = advise(ctx, transport(llm.base_url),
                        lambda p: validate.check(ctx.bounds, ctx.baseline, p, fit_check=fit))
    assert advice.plan.source == "llm"
    assert advice.plan.params["max_num_seqs"] == 64
    assert advice.plan.params["gpu_memory_utilization"] == 0.9
    assert advice.plan.params["max_model_len"] == 8192  # the pin held
    assert "trust_remote_code" not in advice.plan.params
    for name, value in advice.plan.params.items():
        bound = ctx.bounds.knobs.get(name)
        assert bound is None or bound.contains(value) or value is None, (name, value)
    rejected = [r.knob for r in advice.exchanges[0].rejections]
    assert rejected == ["gpu_memory_utilization"]  # the built-in band binds the LLM (only a typed pin passes it)
    assert len(advice.exchanges[0].ignored) == 2
    lines = explain_lines(advice)
    assert lines[0].startswith("LLM propose #1: not accepted")
    assert lines[-1].startswith('source=llm reason="throughput first, inside the bounds"')
    repair = llm.chat_requests[1]["body"]["messages"][-1]["content"]
    assert "gpu_memory_utilization = 0.97" in repair and "0.85 <= x <= 0.93" in repair
    assert FAKE_KEY not in advice.model_dump_json()


def test_real_prompt_lists_every_bound_with_its_source(fixtures_dir):
    ctx = real_context(fixtures_dir)
    _, user = (m["content"] for m in initial_messages(ctx, "propose"))
    for name, bound in ctx.bounds.knobs.items():
        assert f"| {name} | " in user
        for source in bound.sources:
            assert source in user
    assert "| max_model_len | --max-model-len | 8192 | 8192 <= x <= 8192 | no, pinned | pin |" in user
    assert "| pipeline_parallel_size |" in user and "no |" in user
    assert f'"kv_cache_tokens": {ctx.estimate.kv_cache_tokens}' in user
