"""End to end: `localaistack model run --smart-run` as a real process, with the vllm stand-in and the
scripted LLM server; an OOM is recovered through the LLM's recover prompt; Ctrl+C stops everything;
the session it wrote replays clean and names the recovery.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, REPO
from fakes import free_port
from fakes.llm_server import FakeLLM

from smartrun.cli import main
from smartrun.plan_cache import SavedParams
from smartrun.session import load_record

FAKE_VLLM = REPO / "tests" / "fakes" / "fake_vllm.py"
MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
FAKE_KEY = "sk-smartrunE2E-93b1c0ffee42"
SERVED_KEY = "served-key-77a1e5d3c2b9"  # vllm --api-key: served, never stored


def _reply(changes, reason) -> dict:
    return {"content": json.dumps({"changes": changes, "reason": reason})}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is dead for our purposes
        return stat.read().split()[2] != "Z"


@pytest.mark.realtime  # the smoke test: CLI, fake vLLM and scripted LLM, real clock
def test_smart_run_recovers_oom_with_llm_and_replays(tmp_path, monkeypatch):
    record_file = tmp_path / "starts.jsonl"
    session = tmp_path / "session.json"
    scenario = {"weights_gib": 14.2, "graph_actual_gib": 11.0, "worker": True, "record": str(record_file)}
    steps = [
        _reply([{"knob": "max_num_seqs", "value": 6, "reason": "a few more parallel chats"}], "stable, a bit wider"),
        _reply([{"knob": "gpu_memory_utilization", "value": 0.85, "reason": "leave room for graph capture"}],
               "the OOM hit while capturing CUDA graphs"),
    ]
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SMARTRUN_", "OPENAI_"))},
           "SMARTRUN_HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "SMARTRUN_LLM_API_KEY": FAKE_KEY, "FAKE_VLLM_SCENARIO": json.dumps(scenario), "PYTHONUNBUFFERED": "1"}
    with FakeLLM(steps) as llm:
        argv = [sys.executable, "-m", "smartrun", "model", "run", MODEL, "--smart-run", "--hardware", H100,
                "--vllm-bin", str(FAKE_VLLM), "--port", str(free_port()), "--startup-timeout", "60",
                "--llm-base-url", llm.base_url, "--llm-model", "fake-model", "--session-out", str(session),
                "--api-key", SERVED_KEY]
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True,  # a backgrounded CI job may start us ignoring SIGINT: Ctrl+C as a user has it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines = []
        deadline = time.monotonic() + 90
        try:
            for line in proc.stdout:
                lines.append(line)
                if "final command:" in line or time.monotonic() > deadline:
                    break
            assert any("final command:" in ln for ln in lines), "".join(lines[-30:])
            proc.send_signal(signal.SIGINT)  # Ctrl+C
            rest, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert len(llm.chat_requests) == 2
        assert SERVED_KEY not in json.dumps(llm.requests)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output[-2000:]
    assert "attempt 1 failed: oom" in output and "gpu_memory_utilization 0.92 -> 0.85" in output

    starts = [json.loads(x) for x in record_file.read_text().splitlines()]
    assert len(starts) == 2
    for start in starts:  # no orphans: every stand-in and its worker are gone
        assert not _alive(start["pid"]) and not _alive(start["worker_pid"])

    text = session.read_text()
    assert FAKE_KEY not in text and SERVED_KEY not in text
    record = load_record(session)
    assert record.outcome.status == "interrupted"
    assert [a.healthy for a in record.launch_attempts] == [False, True]
    assert record.launch_attempts[0].outcome.startswith("oom")
    assert [a.kind for a in record.advice] == ["propose", "recover"]
    assert record.final_plan.params["gpu_memory_utilization"] == 0.85
    assert record.final_plan.params["max_num_seqs"] == 6
    # the LLM's own reason, marked once (it read "llm: llm: ..." when launch re-validated the recover plan)
    assert record.final_plan.provenance["gpu_memory_utilization"] == "llm: leave room for graph capture"
    assert record.cache.stored

    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    assert main(["session", "replay", str(session)]) == 0
    saved = SavedParams().entries()
    assert len(saved) == 1 and saved[0][1].params["gpu_memory_utilization"] == 0.85
    assert SERVED_KEY not in saved[0][0].read_text() and "api_key" not in saved[0][1].params


def test_replay_json_reports_the_match(capsys):
    path = FIXTURES / "sessions" / "kv-too-small-recovered.json"
    assert main(["session", "replay", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["match"] is True and data["decisions"] == len(load_record(path).decisions)


def test_launch_that_never_fits_exits_4_and_its_record_replays(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps({"weights_gib": 90.0}))  # more than the card holds
    session = tmp_path / "fail.json"
    code = main(["model", "run", MODEL, "--hardware", H100, "--vllm-bin", str(FAKE_VLLM), "--port", str(free_port()),
                 "--max-attempts", "2", "--startup-timeout", "60", "--session-out", str(session)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 4 and err[-1].startswith("localaistack: vllm serve did not become healthy after")
    record = load_record(session)
    assert record.outcome.status == "error" and record.outcome.exit_code == 4
    assert record.launch_attempts and not any(a.healthy for a in record.launch_attempts)
    assert record.launch_attempts[0].outcome == "oom_loading"
    assert record.decisions[-2].step == "final" and record.decisions[-1].step == "error"
    assert main(["session", "replay", str(session)]) == 0


def test_tune_hook_after_a_healthy_start_is_recorded_and_replays(tmp_path, monkeypatch):
    from smartrun import pipeline
    from smartrun.cli import build_parser
    from smartrun.cli.run_cmd import request_from_args

    monkeypatch.setenv("SMARTRUN_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FAKE_VLLM_PERF", "kv_bound,time_scale=0.002")
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", "{}")
    rtx4090 = str(FIXTURES / "hardware" / "1x-rtx4090.json")  # the kv_bound profile's 24 GiB card
    argv = ["model", "run", MODEL, "--hardware", rtx4090, "--vllm-bin", str(FAKE_VLLM), "--port", str(free_port()),
            "--smart-run", "--tune", "--tune-rounds", "1", "--probe-duration", "0.5", "--probe-concurrency", "2"]
    args, extra = build_parser().parse_known_args(argv)
    args.extra = extra
    request = request_from_args(args)
    sources = pipeline.live_sources(request, env={}, config_path=str(tmp_path / "none.toml"))
    sources.supervise = False  # stop the tuned server instead of waiting on it
    session = tmp_path / "tuned.json"
    result = pipeline.run(request, sources, session_out=session)
    record = load_record(session)
    assert record.tuning and record.tuning.rounds and record.decisions[-2].step == "tune"
    assert record.launch_attempts[0].phase == "launch"
    assert {a.phase for a in record.launch_attempts[1:]} <= {"tune"} and len(record.launch_attempts) >= 2
    assert result.plan.params == record.tuning.chosen.params == record.final_plan.params
    assert SavedParams().entries()[0][1].params == result.plan.params
    assert pipeline.replay(record).replayed.final_plan == record.final_plan
