"""The pipeline in-process: records, replay (clean and diverging), saved parameters, LLM fallback.

Real parts throughout: fixture model dirs and snapshots, the built-in bounds, the scripted
OpenAI-compatible server on a free port through the real openai client.
"""

from __future__ import annotations

import json

import pytest
from conftest import FIXTURES
from fakes import free_port
from fakes.llm_server import FakeLLM

from smartrun import hardware, pipeline
from smartrun.clock import FakeClock
from smartrun.errors import AdvisorError, ReplayDivergence
from smartrun.plan_cache import CacheEntry, SavedParams
from smartrun.session import load_record

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
FAKE_KEY = "sk-smartrunPIPE-5e1d7c3b9a"


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _request(**kw) -> pipeline.RunRequest:
    base = {"model": MODEL, "hardware_path": H100, "dry_run": True, "smart_run": True, "vllm_version": "0.33.0"}
    return pipeline.RunRequest(**{**base, **kw})


def _sources(request, base_url=None, key=FAKE_KEY):
    env = {"SMARTRUN_LLM_API_KEY": key} if base_url else {}
    if base_url:
        request = request.model_copy(update={"llm_base_url": base_url, "llm_model": "fake-model",
                                             "llm_timeout": 5.0})
    return request, pipeline.live_sources(request, env=env, config_path="/nonexistent/config.toml")


def _reply(changes, reason="fits the goal") -> dict:
    return {"content": json.dumps({"changes": changes, "reason": reason})}


def _run(tmp_path, name, request, sources):
    out = tmp_path / f"{name}.json"
    result = pipeline.run(request, sources, session_out=out)
    return result, load_record(out)


def test_llm_proposal_recorded_and_replayed_clean(tmp_path):
    step = _reply([{"knob": "max_num_seqs", "value": 6, "reason": "a few more parallel requests"}])
    with FakeLLM([step]) as llm:
        request, sources = _sources(_request(), llm.base_url)
        result, record = _run(tmp_path, "llm", request, sources)
    assert result.plan.source == "llm" and result.plan.params["max_num_seqs"] == 6
    assert len(record.llm_exchanges) == 1 and record.llm_exchanges[0].reply.content
    assert record.llm_exchanges[0].tokens and record.llm_exchanges[0].latency_s is not None
    assert FAKE_KEY not in json.dumps(record.model_dump(mode="json"))
    out = pipeline.replay(record)
    assert out.divergence is None and out.replayed.final_plan == record.final_plan


def test_edited_reply_makes_replay_diverge(tmp_path):
    step = _reply([{"knob": "max_num_seqs", "value": 6, "reason": "more"}])
    with FakeLLM([step]) as llm:
        request, sources = _sources(_request(), llm.base_url)
        _result, record = _run(tmp_path, "edit", request, sources)
    exchange = record.llm_exchanges[0]
    assert exchange.reply is not None
    content = json.loads(exchange.reply.content)
    content["changes"][0]["value"] = 5
    exchange.reply = exchange.reply.model_copy(update={"content": json.dumps(content)})
    with pytest.raises(ReplayDivergence) as err:
        pipeline.replay(record)
    assert err.value.exit_code == 5 and "advice" in err.value.message


def test_unreachable_llm_falls_back_to_static_and_replays(tmp_path):
    request, sources = _sources(_request(llm_timeout=1.0), "http://127.0.0.1:9/v1")
    sources.transport.backoff_s = 0.01  # keep the bounded retries quick
    result, record = _run(tmp_path, "down", request, sources)
    assert result.plan.source == "static"
    assert record.advice[0].fallback and record.llm_exchanges and record.llm_exchanges[0].error
    pipeline.replay(record)


def test_strict_mode_failure_is_recorded_and_replays(tmp_path):
    bad = {"content": "I think you should raise the memory a lot."}
    with FakeLLM([bad, bad, bad]) as llm:
        request, sources = _sources(_request(strict=True), llm.base_url)
        out = tmp_path / "strict.json"
        with pytest.raises(AdvisorError):
            pipeline.run(request, sources, session_out=out)
    record = load_record(out)
    assert record.outcome.status == "error" and record.outcome.exit_code == 3
    assert record.decisions[-1].step == "error"
    pipeline.replay(record)


def test_cache_hit_miss_refresh_and_corrupt(tmp_path):
    request, sources = _sources(_request())
    first, record = _run(tmp_path, "miss", request, sources)
    assert record.cache.looked_up and not record.cache.hit and first.plan.source == "static"
    key = first.cache_key
    saved = {**first.plan.params, "max_num_seqs": 3}
    SavedParams().store(CacheEntry(key=key, params=saved, saved_at="2026-01-01T00:00:00Z"))

    hit, record = _run(tmp_path, "hit", request, pipeline.live_sources(request, env={}))
    assert hit.plan.source == "cache" and hit.plan.params["max_num_seqs"] == 3 and record.cache.hit
    pipeline.replay(record)

    refresh = request.model_copy(update={"refresh": True})
    fresh, record = _run(tmp_path, "refresh", refresh, pipeline.live_sources(refresh, env={}))
    assert fresh.plan.source == "static" and not record.cache.looked_up

    out_of_bounds = {**first.plan.params, "gpu_memory_utilization": 0.99}
    SavedParams().store(CacheEntry(key=key, params=out_of_bounds, saved_at="2026-01-01T00:00:00Z"))
    stale, record = _run(tmp_path, "stale", request, pipeline.live_sources(request, env={}))
    assert stale.plan.source == "static" and record.cache.hit and "no longer inside" in record.cache.note
    assert any("gpu_memory_utilization" in w for w in record.warnings)

    path = SavedParams()._path(key)
    path.write_text("{broken")
    broken, record = _run(tmp_path, "corrupt", request, pipeline.live_sources(request, env={}))
    assert broken.plan.source == "static" and not record.cache.hit
    assert any("corrupt smart-run cache entry" in w for w in record.warnings)


def test_replay_of_a_record_with_other_hardware_diverges(tmp_path):
    request, sources = _sources(_request())
    _result, record = _run(tmp_path, "hw", request, sources)
    record.hardware = hardware.load_snapshot(str(FIXTURES / "hardware" / "1x-a100-40gb.json"))
    with pytest.raises(ReplayDivergence) as err:
        pipeline.replay(record)
    assert "decision 1 (hardware)" in err.value.message


def test_bounds_file_is_replayed_from_its_recorded_text(tmp_path):
    bounds = tmp_path / "smartrun.toml"
    bounds.write_text((FIXTURES / "bounds" / "example-serving.toml").read_text())
    request, sources = _sources(_request(bounds_path=str(bounds), smart_run=False))
    _result, record = _run(tmp_path, "bounds", request, sources)
    assert any(f"bounds:{bounds}:" in s for b in record.bounds.knobs.values() for s in b.sources)
    bounds.unlink()  # replay needs only the record
    pipeline.replay(record)
    record.bounds_file.text = record.bounds_file.text.replace("version = 1", "version = 1\n", 1)
    with pytest.raises(ReplayDivergence) as err:  # a line moved: provenance differs
        pipeline.replay(record)
    assert "bounds" in err.value.message or "baseline" in err.value.message


def test_smartrun_toml_is_found_upward_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "smartrun.toml").write_text((FIXTURES / "bounds" / "example-serving.toml").read_text())
    deeper = tmp_path / "a" / "b"
    deeper.mkdir(parents=True)
    monkeypatch.chdir(deeper)
    request, sources = _sources(_request(smart_run=False))
    _result, record = _run(tmp_path, "found", request, sources)
    assert record.bounds_file.path == str(tmp_path / "smartrun.toml") and not record.bounds_file.builtin


def test_served_api_key_never_reaches_the_llm_or_the_record(tmp_path):
    served_key = "sk-servedKEY-4d2c9b7e1f00"
    step = _reply([{"knob": "max_num_seqs", "value": 5, "reason": "ok"}])
    with FakeLLM([step]) as llm:
        request, sources = _sources(_request(user_args=("--api-key", served_key)), llm.base_url)
        result, record = _run(tmp_path, "served-key", request, sources)
        sent = json.dumps(llm.requests)
    assert served_key not in sent and FAKE_KEY not in sent.replace(f"Bearer {FAKE_KEY}", "")
    assert served_key not in (tmp_path / "served-key.json").read_text()
    assert result.plan.params["api_key"] == (served_key,)  # still served: the user asked for it
    pipeline.replay(record)


def test_llm_record_keeps_model_finish_tokens_latency_and_why_each_reply_was_rejected(tmp_path):
    cut = {"content": '{"changes": [{"knob": "max_num_seqs", "val', "finish_reason": "length",
           "usage": {"prompt_tokens": 700, "completion_tokens": 300}}
    bad = _reply([{"knob": "gpu_memory_utilization", "value": 0.99, "reason": "all of it"}])
    good = _reply([{"knob": "max_num_seqs", "value": 6, "reason": "a few more"}])
    with FakeLLM([cut, bad, good], model="local-model") as llm:
        request = _request(llm_base_url=llm.base_url, llm_timeout=5.0)  # no --llm-model: asked from /models
        sources = pipeline.live_sources(request, env={}, config_path="/nonexistent/config.toml")
        result, record = _run(tmp_path, "story", request, sources)
    assert result.plan.source == "llm" and result.plan.params["max_num_seqs"] == 6
    assert record.llm.model == "local-model" and "discovered" in (record.llm.model_origin or "")
    first, second, third = record.llm_exchanges
    assert all(isinstance(e.max_tokens, int) and e.max_tokens > 0 for e in record.llm_exchanges)
    assert first.reply.finish_reason == "length" and first.tokens == {"prompt_tokens": 700,
                                                                         "completion_tokens": 300}
    assert first.error["type"] == "smartrun.advisor.ReplyRejected" and "cut off" in first.error["message"]
    assert second.error and "gpu_memory_utilization=0.99" in second.error["message"] and second.accepted is False
    assert third.error is None and third.accepted is True and third.latency_s is not None
    out = pipeline.replay(record)  # a judged reply replays as a reply, not as a transport error
    assert out.divergence is None and out.replayed.final_plan == record.final_plan
    summary = result.json_summary()["llm"][0]
    assert [e["finish_reason"] for e in summary["exchanges"]] == ["length", "stop", "stop"]


def test_an_empty_llm_proposal_is_shown_as_kept_baseline(tmp_path):
    with FakeLLM([_reply([], "the baseline suits a stable goal")]) as llm:
        request, sources = _sources(_request(strict=True), llm.base_url)
        result, record = _run(tmp_path, "kept", request, sources)
    assert result.plan.source == "static" and result.plan.params == result.baseline.params
    assert result.plan.reason == "the LLM kept the baseline: the baseline suits a stable goal"
    assert record.advice[0].accepted and not record.advice[0].fallback
    assert record.advice[0].reason == result.plan.reason
    assert not any("LLM advice not used" in w for w in record.warnings)
    pipeline.replay(record)


def test_strict_llm_failure_under_json_is_one_object_naming_the_error_exit_and_record(tmp_path, capsys):
    from smartrun.cli import main

    prose = {"content": "Raise the memory utilization a lot.", "times": 3}
    out = tmp_path / "strict.json"
    with FakeLLM([prose]) as llm:
        code = main(["model", "run", MODEL, "--hardware", H100, "--vllm-version", "0.33.0", "--smart-run",
                     "--smart-run-strict", "--dry-run", "--json", "--llm-base-url", llm.base_url,
                     "--llm-model", "fake-model", "--llm-timeout", "10", "--session-out", str(out)])
    captured = capsys.readouterr()
    assert code == 3
    answer = json.loads(captured.out)  # stdout is exactly one JSON object
    assert answer["exit"] == 3 and answer["error"].startswith("--smart-run-strict: LLM advice not used after 3")
    assert answer["session_record"] == str(out)
    record = load_record(out)
    assert record.outcome.exit_code == 3
    assert [e.error["type"] for e in record.llm_exchanges] == ["smartrun.advisor.ReplyRejected"] * 3
    assert all(e.max_tokens for e in record.llm_exchanges)
    assert f"session record: {out}" in captured.err.splitlines()


def test_a_record_holds_no_timing_in_its_decisions_fast_or_slow(tmp_path):
    """The same answers, quick or slow (by the clock), decide the same: the durations sit in typed fields
    (exchange latency, advice budget) that replay does not compare, never in decision or warning text."""
    bad = _reply([{"knob": "gpu_memory_utilization", "value": 0.99, "reason": "all of it"}])
    good = _reply([{"knob": "max_num_seqs", "value": 6, "reason": "a few more"}])
    port = free_port()  # one URL for every run: it is in the decisions

    def record_with(delays: tuple[float, float]):
        clock = FakeClock()
        steps = [{**bad, "delay_s": delays[0]}, {**good, "delay_s": delays[1]}]
        with FakeLLM(steps, clock=clock, port=port) as llm:
            request = _request(llm_base_url=llm.base_url, llm_model="fake-model", llm_timeout=10.0)
            sources = pipeline.live_sources(request, env={}, config_path="/nonexistent/config.toml", clock=clock)
            _, record = _run(tmp_path, f"took-{delays[0]}-{delays[1]}", request, sources)
        return record

    fast, slow = record_with((0.5, 1.0)), record_with((2.0, 4.0))
    timed_out_early, timed_out_late = record_with((1.0, 30.0)), record_with((7.0, 30.0))  # 9 s or 3 s were left
    assert fast.final_plan.source == slow.final_plan.source == "llm"
    assert timed_out_early.final_plan.source == "static"
    for one, other in ((fast, slow), (timed_out_early, timed_out_late)):
        assert [e.latency_s for e in one.llm_exchanges] != [e.latency_s for e in other.llm_exchanges]
        assert one.decisions == other.decisions and one.warnings == other.warnings
        assert one.advice[0].reason == other.advice[0].reason and one.advice[0].fallback == other.advice[0].fallback
        pipeline.replay(one)
    assert (fast.advice[0].spent_s, slow.advice[0].spent_s) == (1.5, 6.0)
    assert "not resent" in timed_out_early.advice[0].fallback
    assert timed_out_early.advice[0].spent_s == timed_out_late.advice[0].spent_s == 10.0
    assert slow.started_at == fast.started_at == "2026-01-01T00:00:00.000Z"  # wall time from the clock too
