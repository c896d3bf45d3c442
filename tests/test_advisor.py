"""The advisor end to end: the real openai client over HTTP to a scripted server on 127.0.0.1.

Every case ends in an accepted in-bounds plan, a fallback to the baseline with its reason, or AdvisorError.
"""

from __future__ import annotations

import json
import threading

import pytest
from fakes.advisor_inputs import FAKE_KEY, baseline, bounds, check_for, context, reply, transport
from fakes.llm_server import FakeLLM

from smartrun.advisor import Advice, LLMUnavailable, advise, debug_line, explain_lines
from smartrun.clock import FakeClock
from smartrun.errors import AdvisorError, EstimateError

GOOD = reply([{"knob": "max_num_seqs", "value": 16, "reason": "throughput goal, memory allows"},
              {"knob": "gpu_memory_utilization", "value": 0.9, "reason": "a little more KV cache"}])


def run(steps, *, strict=False, llm_options=None, **transport_settings) -> tuple[Advice, FakeLLM]:
    """Advice from a scripted server; both run on one FakeClock (`llm.clock`): delays, trickles, budgets and
    backoff are exact and take no real time."""
    clock = FakeClock()
    with FakeLLM(steps, clock=clock, **(llm_options or {})) as llm:
        ctx = context()
        advice = advise(ctx, transport(llm.base_url, clock, **transport_settings),
                        check_for(ctx.bounds, ctx.baseline), strict=strict)
    return advice, llm


def assert_in_bounds(advice: Advice) -> None:
    b = bounds()
    for name, value in advice.plan.params.items():
        assert b.knobs[name].contains(value), (name, value)
    assert set(advice.plan.params) == set(baseline().params)


def assert_fallback(advice: Advice, *words: str) -> None:
    assert advice.plan == baseline()
    assert advice.fallback_reason
    for word in words:
        assert word in advice.fallback_reason, advice.fallback_reason


def test_good_reply_becomes_an_llm_plan_with_provenance():
    advice, llm = run([{"content": GOOD, "usage": {"prompt_tokens": 812, "completion_tokens": 96}}])
    assert advice.plan.source == "llm"
    assert advice.plan.params["max_num_seqs"] == 16
    assert advice.plan.params["gpu_memory_utilization"] == 0.9
    assert "throughput goal" in advice.plan.provenance["max_num_seqs"]
    assert advice.fallback_reason is None
    assert advice.tokens == (812, 96)
    assert len(llm.chat_requests) == 1
    assert llm.chat_requests[0]["body"]["response_format"]["type"] == "json_schema"
    assert_in_bounds(advice)
    assert debug_line(advice).startswith('source=llm reason="suits the goal" latency=')
    assert debug_line(advice).endswith("tokens=812/96")


@pytest.mark.parametrize("wrap", [
    "```json\n{}\n```",
    "Sure! Here is my proposal:\n```\n{}\n```\nLet me know if you need more.",
    "Given the H100 I suggest {} because memory is plentiful.",
])
def test_json_inside_fences_or_prose_is_found(wrap):
    advice, _ = run([{"content": wrap.replace("{}", GOOD)}])
    assert advice.plan.source == "llm"
    assert advice.plan.params["max_num_seqs"] == 16


def test_out_of_range_values_are_rejected_three_times_then_the_baseline_is_used():
    bad = reply([{"knob": "max_model_len", "value": 131072, "reason": "more context"}])
    advice, llm = run([{"content": bad, "times": 3}])
    assert_fallback(advice, "3 replies", "max_model_len=131072")
    assert len(llm.chat_requests) == 3  # first try + max_repairs=2
    assert all(e.rejections and not e.accepted for e in advice.exchanges)
    assert debug_line(advice).startswith("source=static")


def test_repair_loop_lists_the_broken_bound_and_accepts_the_fix():
    bad = reply([{"knob": "max_num_seqs", "value": 16, "reason": "throughput"},
                 {"knob": "gpu_memory_utilization", "value": 0.97, "reason": "more KV"}])
    advice, llm = run([{"content": bad}, {"content": GOOD}])
    assert advice.plan.source == "llm"
    assert advice.plan.params["gpu_memory_utilization"] == 0.9
    assert [e.accepted for e in advice.exchanges] == [False, True]
    second = llm.chat_requests[1]["body"]["messages"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert "gpu_memory_utilization = 0.97" in second[-1]["content"]
    assert "0.93" in second[-1]["content"]  # the bound it broke
    assert any("rejected gpu_memory_utilization=0.97" in line for line in explain_lines(advice))


def test_a_proposal_the_checker_cannot_budget_is_a_failed_attempt_not_a_crash():
    calls = []

    def picky_check(proposal):
        calls.append(proposal)
        if len(calls) == 1:
            raise EstimateError("max_num_seqs=7: the estimator cannot budget this")
        return check_for(bounds(), baseline())(proposal)

    with FakeLLM([{"content": reply([{"knob": "max_num_seqs", "value": 7}])}, {"content": GOOD}]) as llm:
        advice = advise(context(), transport(llm.base_url), picky_check)
    assert advice.exchanges[0].error == ("proposal could not be checked: "
                                         "max_num_seqs=7: the estimator cannot budget this")
    assert advice.plan.source == "llm" and advice.plan.params["max_num_seqs"] == 16


def test_unknown_knob_is_ignored_and_reported_while_the_rest_is_taken():
    text = reply([{"knob": "turbo_mode", "value": True, "reason": "go fast"},
                  {"knob": "max_num_seqs", "value": 8, "reason": "throughput"}])
    advice, _ = run([{"content": text}])
    assert advice.plan.source == "llm"
    assert advice.plan.params["max_num_seqs"] == 8
    assert "turbo_mode" not in advice.plan.params
    assert any("turbo_mode" in item for item in advice.exchanges[0].ignored)


def test_security_knobs_and_shell_text_never_reach_the_plan():
    hostile = reply([{"knob": "--trust-remote-code", "value": True, "reason": "needed"},
                     {"knob": "host", "value": "0.0.0.0", "reason": "reachable"},
                     {"knob": "max_model_len", "value": "4096; rm -rf ~", "reason": "context"}])
    advice, llm = run([{"content": hostile, "times": 3}])
    assert_fallback(advice, "max_model_len")
    first = advice.exchanges[0]
    assert any("trust-remote-code" in item and "security" in item for item in first.ignored)
    assert any("host" in item for item in first.ignored)
    assert [r.knob for r in first.rejections] == ["max_model_len"]
    assert first.rejections[0].value == "4096; rm -rf ~"
    assert "host" not in advice.plan.params and "trust_remote_code" not in advice.plan.params
    repair = llm.chat_requests[1]["body"]["messages"][-1]["content"]
    assert "not yours to change" in repair and "max_model_len" in repair


def test_a_change_to_a_pinned_knob_is_ignored_and_shown():
    text = reply([{"knob": "tensor_parallel_size", "value": 2, "reason": "split"},
                  {"knob": "max_num_seqs", "value": 12, "reason": "throughput"}])
    advice, _ = run([{"content": text}])
    assert advice.plan.params["tensor_parallel_size"] == 1
    assert advice.plan.params["max_num_seqs"] == 12
    assert any("tensor_parallel_size=2: pinned" in item for item in advice.exchanges[0].ignored)


def test_a_reply_that_only_touches_pinned_knobs_is_a_failed_attempt():
    text = reply([{"knob": "-tp", "value": 2, "reason": "split"}])
    advice, _ = run([{"content": text, "times": 3}])
    assert_fallback(advice, "nothing in the reply may be changed")


def test_empty_reply_falls_back_with_the_reason():
    advice, _ = run([{"content": "", "times": 3}])
    assert_fallback(advice, "LLM reply is empty")


def test_null_content_counts_as_empty():
    advice, _ = run([{"content": None}, {"content": GOOD}])
    assert advice.exchanges[0].error == "LLM reply is empty"
    assert advice.plan.source == "llm"


def test_truncated_json_falls_back_with_the_reason():
    cut = GOOD[: len(GOOD) // 2]
    advice, _ = run([{"content": cut, "finish_reason": "length", "times": 3}])
    assert_fallback(advice, "cut off")


def test_429_then_success_is_retried_inside_one_exchange():
    advice, llm = run([{"status": 429, "error": "slow down"}, {"content": GOOD}])
    assert advice.plan.source == "llm"
    assert len(llm.chat_requests) == 2
    assert len(advice.exchanges) == 1


def test_retry_after_is_honoured_up_to_the_backoff_cap():
    with FakeLLM([{"status": 429, "headers": {"Retry-After": "0.4"}},
                  {"status": 503, "headers": {"Retry-After": "3600"}}, {"content": GOOD}]) as llm:
        tr = transport(llm.base_url)
        tr.backoff_max_s = 1.0
        reply = tr.complete([{"role": "user", "content": "hi"}], {})
    assert reply.content == GOOD
    assert tr.clock.slept == [0.4, 1.0]  # the waits, on the transport's clock
    assert reply.elapsed_s == 1.4  # and what the decision's budget is charged for them


def test_500_until_give_up_is_bounded_and_falls_back():
    advice, llm = run([{"status": 500, "times": 10}], max_attempts=3)
    assert_fallback(advice, "LLM not used: ", "failed 3 time(s)", "HTTP 500")
    assert len(llm.chat_requests) == 3
    assert advice.exchanges[0].reply is None


def test_total_time_bound_stops_retries_before_the_attempt_count():
    # every wait is 0.125 s (Retry-After = the cap); a try is only made while the wait leaves 0.1 s (a tenth of
    # the 1 s budget) for it: tries at 0, 0.125, ..., 0.875 s, then 1.0 - 0.875 - 0.125 < 0.1 stops
    with FakeLLM([{"status": 503, "headers": {"Retry-After": "0.125"}, "times": 50}]) as llm:
        tr = transport(llm.base_url, max_attempts=50, timeout_s=1.0)
        tr.backoff_s = tr.backoff_max_s = 0.125
        with pytest.raises(LLMUnavailable, match=r"failed 8 time\(s\); last error: HTTP 503") as err:
            tr.complete([{"role": "user", "content": "hi"}], {})
    assert len(llm.chat_requests) == 8 and tr.clock.slept == [0.125] * 7
    assert err.value.elapsed_s == 0.875


def test_reply_slower_than_the_timeout_falls_back():
    advice, llm = run([{"content": GOOD, "delay_s": 5}], timeout_s=0.3, max_attempts=3)
    assert_fallback(advice, "timed out", "no complete reply before the --llm-timeout budget ran out; not resent")
    assert len(llm.chat_requests) == 1 and advice.spent_s == 0.3


def test_reply_just_inside_the_timeout_is_used():
    advice, _ = run([{"content": GOOD, "delay_s": 4.9}], timeout_s=5.0)
    assert advice.plan.source == "llm" and advice.spent_s == 4.9


def test_non_json_content_type_is_not_a_completion():
    advice, _ = run([{"body": "<html><body>Bad gateway</body></html>", "content_type": "text/html"}])
    assert_fallback(advice, "did not send a chat completion")


def test_refused_key_is_reported_plainly_not_retried_and_not_echoed():
    echo = f"Incorrect API key provided: {FAKE_KEY}"
    advice, llm = run([{"status": 401, "error": echo, "times": 5}])
    assert_fallback(advice, "refused the API key (401)")
    assert len(llm.chat_requests) == 1
    assert FAKE_KEY not in advice.model_dump_json()


def test_other_client_errors_show_the_server_message_without_the_key():
    advice, llm = run([{"status": 400, "error": f"bad request for key {FAKE_KEY}"}])
    assert_fallback(advice, "HTTP 400", "***")
    assert FAKE_KEY not in advice.fallback_reason
    assert len(llm.chat_requests) == 1


def test_strict_mode_raises_exit_code_3():
    with pytest.raises(AdvisorError) as caught:
        run([{"content": "I cannot help with that.", "times": 3}], strict=True)
    assert caught.value.exit_code == 3
    assert "--smart-run-strict" in caught.value.message
    assert "\n" not in caught.value.message


def test_strict_mode_raises_on_transport_failure_too():
    with pytest.raises(AdvisorError, match="failed 2 time"):
        run([{"status": 502, "times": 5}], strict=True, max_attempts=2)


def test_server_without_json_schema_gets_plain_text_for_the_rest_of_the_session():
    bad = reply([{"knob": "max_num_seqs", "value": 1000, "reason": "max"}])
    advice, llm = run([{"content": bad}, {"content": GOOD}], llm_options={"structured": False})
    assert advice.plan.source == "llm"
    formats = ["response_format" in r["body"] for r in llm.chat_requests]
    assert formats == [True, False, False]  # refused once, then never sent again
    assert [e.reply.structured for e in advice.exchanges] == [False, False]


def test_server_ignoring_json_schema_is_remembered_as_plain_text():
    prose = "Sure. " + GOOD
    with FakeLLM([{"content": prose}, {"content": GOOD}]) as llm:
        tr = transport(llm.base_url)
        first = tr.complete([{"role": "user", "content": "a"}], {"type": "object"})
        tr.complete([{"role": "user", "content": "b"}], {"type": "object"})
    assert first.structured is False
    assert ["response_format" in r["body"] for r in llm.chat_requests] == [True, False]


def test_model_is_discovered_from_the_server_when_not_configured():
    with FakeLLM([{"content": GOOD}], model="local-qwen") as llm:
        ctx = context()
        advice = advise(ctx, transport(llm.base_url, model="", api_key=None), check_for(ctx.bounds, ctx.baseline))
    assert advice.plan.source == "llm"
    assert llm.chat_requests[0]["body"]["model"] == "local-qwen"
    assert llm.chat_requests[0]["headers"]["authorization"] == "Bearer sk-no-key-needed"


def test_the_key_is_sent_as_a_header_but_never_in_prompts_or_records():
    advice, llm = run([{"content": reply([{"knob": "max_num_seqs", "value": 99}])}, {"content": GOOD}])
    assert llm.chat_requests[0]["headers"]["authorization"] == f"Bearer {FAKE_KEY}"
    bodies = json.dumps([r["body"] for r in llm.requests])
    assert FAKE_KEY not in bodies
    assert FAKE_KEY not in advice.model_dump_json()
    assert "max_model_len" in bodies and "gpu_memory_utilization" in bodies


def test_recover_prompt_carries_the_failure_and_the_log_excerpt():
    failure = {"class": "kv_cache_too_small", "evidence": "estimated maximum model length is 6144",
               "estimated_max_model_len": 6144,
               "log_excerpt": "ValueError: To serve at least one request with the models's max seq len (8192)"}
    fix = reply([{"knob": "max_model_len", "value": 6144, "reason": "vLLM says 6144 fits"}], "fit the KV cache")
    with FakeLLM([{"content": fix}]) as llm:
        ctx = context(failure=failure, attempts=({"params": {"max_model_len": 8192}, "failure": "kv_cache_too_small"},))
        advice = advise(ctx, transport(llm.base_url), check_for(ctx.bounds, ctx.baseline), kind="recover")
    assert advice.plan.params["max_model_len"] == 6144
    assert advice.exchanges[0].kind == "recover"
    system, user = (m["content"] for m in llm.chat_requests[0]["body"]["messages"])
    assert "the last start of `vllm serve` failed" in system
    assert "kv_cache_too_small" in user and "max seq len (8192)" in user and "6144" in user


def test_no_model_configured_and_none_listed_is_said_plainly():
    with FakeLLM([{"content": GOOD}], model="") as llm:
        ctx = context()
        advice = advise(ctx, transport(llm.base_url, model=""), check_for(ctx.bounds, ctx.baseline))
    assert_fallback(advice, "no --llm-model given and the server did not list one")
    assert llm.chat_requests == []


def test_nothing_listening_is_retried_then_falls_back():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = context()
    advice = advise(ctx, transport(f"http://user:secret@127.0.0.1:{port}/v1", max_attempts=2),
                    check_for(ctx.bounds, ctx.baseline))
    assert_fallback(advice, "failed 2 time(s)", "connection failed")
    assert "secret" not in advice.fallback_reason


# ---------------------------------------------------------------- issue 15: bounded replies, one budget


def test_every_request_carries_max_tokens_and_the_derived_schema():
    bad = reply([{"knob": "gpu_memory_utilization", "value": 0.99, "reason": "more KV"}])
    advice, llm = run([{"content": bad}, {"content": GOOD}])
    assert advice.plan.source == "llm"
    for request in llm.chat_requests:
        body = request["body"]
        assert isinstance(body["max_tokens"], int) and 50 < body["max_tokens"] < 1000
        assert body["temperature"] == 0  # the same facts get the same advice
        changes = body["response_format"]["json_schema"]["schema"]["properties"]["changes"]
        assert changes["maxItems"] == len(changes["items"]["anyOf"]) <= 3
    assert [e.max_tokens for e in advice.exchanges] == [r["body"]["max_tokens"] for r in llm.chat_requests]


def test_an_empty_proposal_keeps_the_baseline_and_says_so():
    advice, _ = run([{"content": reply([], "the baseline already suits the goal")}], strict=True)
    assert advice.kept_baseline and advice.fallback_reason is None
    assert advice.plan.params == baseline().params and advice.plan.source == "static"
    assert advice.plan.reason == "the LLM kept the baseline: the baseline already suits the goal"
    assert debug_line(advice).startswith('source=static reason="the LLM kept the baseline: the baseline already')
    assert explain_lines(advice)[0].startswith("LLM propose #1: the LLM kept the baseline: the baseline already")


def test_a_proposal_that_repeats_the_baseline_also_keeps_it():
    same = reply([{"knob": "max_num_seqs", "value": 4, "reason": "already right"}], "no change needed")
    advice, _ = run([{"content": same}])
    assert advice.kept_baseline and advice.plan.reason == "the LLM kept the baseline: no change needed"


def test_llm_timeout_is_the_whole_decision_budget_and_a_timed_out_request_is_not_resent():
    bad = reply([{"knob": "max_model_len", "value": 131072, "reason": "more context"}])
    advice, llm = run([{"content": bad, "delay_s": 4}, {"content": GOOD, "delay_s": 30}],
                      timeout_s=10, max_attempts=4)
    assert len(llm.chat_requests) == 2  # the timed-out repair was not sent again
    assert_fallback(advice, "timed out", "before the --llm-timeout budget ran out; not resent")
    # the repair got (and was charged) the 6 s the first answer left of the 10 s budget, not a fresh 10 s
    assert advice.spent_s == 10 and advice.budget_s == 10
    assert [e.reply.elapsed_s if e.reply else None for e in advice.exchanges] == [4, None]


def test_no_repair_is_sent_once_the_budget_is_spent():
    bad = reply([{"knob": "max_model_len", "value": 131072, "reason": "more context"}])
    advice, llm = run([{"content": bad, "delay_s": 10}, {"content": GOOD}], timeout_s=10)
    assert len(llm.chat_requests) == 1
    assert_fallback(advice, "after 1 reply", "the --llm-timeout budget of 10s is spent")


def test_a_reply_on_time_by_the_clock_is_used_however_long_it_takes_in_real_time():
    # a loaded machine: the reply is on the dot of the 0.3 s budget by the clock but takes 1.6 s of real time,
    # past the socket's old real-time limit (budget + 1 s); only the clock may decide, so it is used, once
    bad = reply([{"knob": "max_model_len", "value": 131072, "reason": "more context"}])
    advice, llm = run([{"content": bad, "delay_s": 0.3, "real_s": 1.6}, {"content": GOOD}], timeout_s=0.3)
    assert len(llm.chat_requests) == 1
    assert_fallback(advice, "after 1 reply", "the --llm-timeout budget of 0.3s is spent")
    assert advice.spent_s == 0.3 and advice.exchanges[0].reply.latency_s == 0.3


def test_a_trickled_reply_is_abandoned_at_the_deadline():
    import time

    def deadline_threads() -> list[threading.Thread]:
        return [t for t in threading.enumerate() if t.name == "smartrun-deadline"]

    # a byte every 0.2 s by the clock: a per-read socket timeout never fires, only the whole-call deadline does
    clock = FakeClock()
    with FakeLLM([{"content": GOOD, "trickle_s": 0.2, "times": 3}], clock=clock) as llm:
        ctx = context()
        advice = advise(ctx, transport(llm.base_url, clock, timeout_s=1.0), check_for(ctx.bounds, ctx.baseline))
        assert_fallback(advice, "timed out", "before the --llm-timeout budget ran out")
        assert len(llm.chat_requests) == 1 and advice.spent_s == 1.0
        # the abandoned request's socket was shut down: its thread ends now, while the server (still open, 20 ms
        # of real time a byte) would otherwise go on sending for seconds
        gone_by = time.monotonic() + 5
        while deadline_threads() and time.monotonic() < gone_by:
            time.sleep(0.01)
        assert not deadline_threads()


def test_a_cut_off_reply_is_not_pasted_back_whole():
    long_cut = '{"changes": [{"knob": "max_num_seqs", "value": 16, "reason": "' + "very long " * 60
    advice, llm = run([{"content": long_cut, "finish_reason": "length"}, {"content": GOOD}])
    assert advice.plan.source == "llm"
    assert "cut off at max_tokens=" in advice.exchanges[0].error
    repair = llm.chat_requests[1]["body"]["messages"]
    assert [m["role"] for m in repair] == ["system", "user", "assistant", "user"]
    assert len(repair[2]["content"]) < 200 and repair[2]["content"].endswith("[cut off]")
    assert "shorter" in repair[3]["content"]


def test_repairs_do_not_grow_the_prompt():
    bad = reply([{"knob": "max_num_seqs", "value": 1000, "reason": "max"}])
    _, llm = run([{"content": bad, "times": 3}])
    sizes = [len(json.dumps(r["body"]["messages"])) for r in llm.chat_requests]
    assert len(sizes) == 3 and sizes[1] == sizes[2]  # only the last answer and its problems are carried


def test_a_server_refusing_temperature_zero_gets_its_default():
    with FakeLLM([{"status": 400, "error": "Unsupported value: 'temperature' does not support 0"},
                  {"content": GOOD}]) as llm:
        ctx = context()
        advice = advise(ctx, transport(llm.base_url), check_for(ctx.bounds, ctx.baseline))
    assert advice.plan.source == "llm"
    assert ["temperature" in r["body"] for r in llm.chat_requests] == [True, False]
