"""The advisor on real stage outputs: a fixture machine and model, the real bounds, baseline and validator.

The LLM's first reply is partly out of bounds and partly off limits; the repair is accepted.
"""

from __future__ import annotations

import json

import pytest
from fakes.advisor_inputs import FAKE_KEY, reply, transport
from fakes.llm_server import FakeLLM
from pydantic import ValidationError

from smartrun import hardware, model, rules, sizing, validate
from smartrun.advisor import (
    MAX_OFFERED,
    AdviceContext,
    advise,
    explain_lines,
    initial_messages,
    offered_knobs,
    open_knobs,
    prompt_tokens,
    reply_max_tokens,
    reply_model,
    reply_schema,
)
from smartrun.fit import fit_check


def real_context(fixtures_dir) -> AdviceContext:
    hw = hardware.load_snapshot(fixtures_dir / "hardware" / "1x-h100-80gb.json")
    facts = model.inspect(str(fixtures_dir / "models" / "qwen2.5-7b-instruct"))
    bounds = rules.effective_bounds(facts, hw, None, {"max_model_len": 8192}, goal="throughput")
    base, estimate = sizing.baseline(bounds, facts, hw, "throughput")
    return AdviceContext(hardware=hw, model=facts, bounds=bounds, baseline=base, estimate=estimate,
                         goal="throughput")


def test_partly_rejected_proposal_is_repaired_on_real_bounds(fixtures_dir):
    ctx = real_context(fixtures_dir)
    fit = fit_check(ctx.model, ctx.hardware)
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


def test_real_prompt_is_compact_and_lists_every_open_knob_with_its_range(fixtures_dir):
    ctx = real_context(fixtures_dir)
    system, user = (m["content"] for m in initial_messages(ctx, "propose"))
    facts = json.loads(user.split("```json\n")[1].split("\n```")[0])
    offered = offered_knobs(ctx, "propose")  # the goal's most important open knobs, in the guide's order
    assert list(facts["open"]) == offered == ["max_num_seqs", "gpu_memory_utilization", "max_num_batched_tokens",
                                              "kv_cache_dtype"][:MAX_OFFERED]
    for name in set(open_knobs(ctx.bounds)) - set(offered):  # the rest keep their value, shown as fixed
        assert facts["fixed"].get(name) == ctx.baseline.params.get(name)
    for name, row in facts["open"].items():
        bound = ctx.bounds.knobs[name]
        assert row["now"] == ctx.baseline.params.get(name)
        assert row.get("one_of") == (list(bound.choices) if bound.choices is not None else None)
        assert (row.get("min"), row.get("max")) == ((bound.min, bound.max) if bound.choices is None else (None, None))
    assert facts["fixed"]["max_model_len"] == 8192  # the pin: a value, not a range the LLM may use
    assert "max_model_len" not in facts["open"]
    assert facts["estimate"]["kv_cache_tokens"] == ctx.estimate.kv_cache_tokens
    assert prompt_tokens([{"content": system}, {"content": user}]) < 1000  # well under 1,500


def test_a_recovery_offers_the_knobs_its_failure_calls_for(fixtures_dir):
    ctx = real_context(fixtures_dir)
    graphs = ctx.model_copy(update={"failure": {"class": "oom_cuda_graph", "evidence": "CUDA out of memory"}})
    assert offered_knobs(graphs, "recover")[:2] == ["enforce_eager", "optimization_level"]
    kv = ctx.model_copy(update={"failure": {"class": "kv_cache_too_small"}})
    assert "max_model_len" not in offered_knobs(kv, "recover")  # pinned in this context: never offered
    assert offered_knobs(kv, "recover")[0] == "gpu_memory_utilization"


def test_reply_schema_is_derived_from_the_open_bounds(fixtures_dir):
    ctx = real_context(fixtures_dir)
    schema = reply_schema(ctx.bounds)
    changes = schema["properties"]["changes"]
    entries = {e["properties"]["knob"]["const"]: e for e in changes["items"]["anyOf"]}
    assert set(entries) == set(open_knobs(ctx.bounds))
    assert changes["maxItems"] == len(entries)
    seqs = entries["max_num_seqs"]["properties"]
    bound = ctx.bounds.knobs["max_num_seqs"]
    limits = {k: v for k, v in (("minimum", bound.min), ("maximum", bound.max)) if v is not None}
    assert seqs["value"] == {"type": "integer", **limits}
    assert entries["dtype"]["properties"]["value"]["enum"] == list(ctx.bounds.knobs["dtype"].choices)
    assert entries["gpu_memory_utilization"]["properties"]["value"]["type"] == "number"
    assert all(e["properties"]["reason"]["maxLength"] <= 100 for e in entries.values())
    assert schema["properties"]["reason"]["maxLength"] <= 200
    assert "$ref" not in json.dumps(schema) and "title" not in json.dumps(schema)
    # the same model parses: a value in range is taken as typed, one out of range reaches the validator
    model = reply_model(ctx.bounds)
    ok = model.model_validate({"changes": [{"knob": "max_num_seqs", "value": 12, "reason": "r"}], "reason": "x"})
    assert ok.changes[0].value == 12
    with pytest.raises(ValidationError):
        model.model_validate({"changes": [{"knob": "max_num_seqs", "value": "12", "reason": "r"}], "reason": "x"})
    assert 200 < reply_max_tokens(ctx.bounds) < 1000
