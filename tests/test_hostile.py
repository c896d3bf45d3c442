"""Hostile input, end to end: each break an adversarial pass found has a regression test here.

Secrets in every spelling vLLM accepts (never printed, kept or sent to the LLM; readiness still finds the
key), a vLLM stand-in printing a giant log line, and (further below) hangs, crafted files and records.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from conftest import FIXTURES, REPO
from fakes import install_vllm_shim, process_gone
from fakes.llm_server import FakeLLM

from smartrun import launch, validate
from smartrun.cli import main
from smartrun.plan import Plan
from smartrun.rules import Bounds, KnobBound

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
FAKE_VLLM = REPO / "tests" / "fakes" / "fake_vllm.py"
K1, K2 = "served-key-one-7c1e2a90", "served-key-two-4d8b3f61"
HF = "hftoken-value-55e0c1b2a3"
QUICK = {"import_s": 0.0, "load_s": 0.02, "profile_s": 0.0, "capture_s": 0.0}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bounds() -> Bounds:
    return Bounds(knobs={
        "max_model_len": KnobBound(knob="max_model_len", min=4096, max=131072),
        "gpu_memory_utilization": KnobBound(knob="gpu_memory_utilization", min=0.85, max=0.95, recovery_min=0.82),
        "max_num_seqs": KnobBound(knob="max_num_seqs", min=8, max=256),
        "enforce_eager": KnobBound(knob="enforce_eager", choices=(False, True)),
    })


class Launch:
    """run_with_recovery against the stand-in, keeping every line it printed and every event."""

    def __init__(self, tmp_path, monkeypatch):
        self.shim = install_vllm_shim(tmp_path / "bin")
        self.port = _free_port()
        self.record = tmp_path / "starts.jsonl"
        self.lines: list[str] = []
        self.events: list[str] = []
        self.monkeypatch = monkeypatch
        self.info = launch.find_vllm(str(self.shim), cache_dir=tmp_path / "cache")

    def scenario(self, **values) -> None:
        values.setdefault("record", str(self.record))
        values.setdefault("delays", QUICK)
        self.monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps(values))

    def run(self, passthrough=(), startup_timeout=20.0, **params) -> launch.LaunchReport:
        plan = Plan(params={"max_model_len": 8192, "gpu_memory_utilization": 0.9, "max_num_seqs": 64, **params})
        launcher = launch.ProcessLauncher(str(self.shim), port=self.port, printer=self.lines.append,
                                          progress=self.events.append, poll_interval=0.05, stop_grace=5,
                                          info=self.info, startup_timeout=startup_timeout)
        b = _bounds()
        return launch.run_with_recovery(plan, b, launcher, check=lambda p: validate.check(b, plan, p),
                                        max_attempts=2, on_event=self.events.append, model_path="/models/m",
                                        passthrough=tuple(passthrough))

    def pids(self) -> list[int]:
        rows = [json.loads(x) for x in self.record.read_text().splitlines()] if self.record.exists() else []
        return [pid for row in rows for pid in (row["pid"], row["worker_pid"]) if pid]

    def shown(self, report) -> str:
        return "\n".join([*self.lines, *self.events, report.command_line, report.summary,
                          *(line for a in report.attempts for line in a.log_excerpt)])


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Launch:
    return Launch(tmp_path, monkeypatch)


# ---------------------------------------------------------------------------- secrets in every spelling


def test_api_key_with_two_values_never_shows_the_second_dry_run(capsys, tmp_path):
    out_file = tmp_path / "s.json"
    code = main(["model", "run", MODEL, "--dry-run", "--explain", "--hardware", H100, "--api-key", K1, K2,
                 "--session-out", str(out_file)])
    captured = capsys.readouterr()
    assert code == 0
    for text in (captured.out, captured.err, out_file.read_text()):
        assert K1 not in text and K2 not in text
    assert "--api-key '***REDACTED***' '***REDACTED***'" in captured.out


@pytest.mark.parametrize("spelling", [["--api_key=" + K1], ["--api_key", K1], ["--api-key", K2, K1]])
def test_underscore_and_multi_value_api_key_after_dashdash_readiness_still_works(rig, spelling):
    """Typed after `--`, `--api_key=K` was not found: /v1/models was polled without the key and a healthy
    server was reported as a startup timeout; the key also leaked into the output."""
    rig.scenario()
    report = rig.run(passthrough=spelling, startup_timeout=15)
    try:
        assert report.ok and len(report.attempts) == 1, report.summary
    finally:
        report.server.stop()
    shown = rig.shown(report)
    assert K1 not in shown and K2 not in shown
    assert any("non-default args" in line and "REDACTED" in line for line in rig.lines)
    assert all(process_gone(pid) for pid in rig.pids())


def test_hf_token_is_hidden_in_the_attempt_line(rig):
    rig.scenario()
    report = rig.run(passthrough=["--hf-token", HF])
    report.server.stop()
    attempt_lines = [e for e in rig.events if e.startswith("attempt 1/")]
    assert attempt_lines and all(HF not in line for line in attempt_lines)
    assert HF not in rig.shown(report) and "--hf-token '***REDACTED***'" in report.command_line


def _reply(changes, reason) -> dict:
    return {"content": json.dumps({"changes": changes, "reason": reason})}


def _run_cli_until_ready(tmp_path, args, scenario, steps, timeout=90):
    """`model run` as a real process until its final command; then Ctrl+C. (output, LLM requests, record)."""
    session = tmp_path / "session.json"
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SMARTRUN_", "OPENAI_", "VLLM_"))},
           "SMARTRUN_HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "cfg"),
           "FAKE_VLLM_SCENARIO": json.dumps(scenario), "PYTHONUNBUFFERED": "1"}
    with FakeLLM(steps) as llm:
        argv = [sys.executable, "-m", "smartrun", "model", "run", MODEL, "--smart-run", "--hardware", H100,
                "--vllm-bin", str(FAKE_VLLM), "--port", str(_free_port()), "--startup-timeout", "30",
                "--llm-base-url", llm.base_url, "--llm-model", "fake-model", "--session-out", str(session), *args]
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        lines: list[str] = []
        deadline = time.monotonic() + timeout
        try:
            for line in proc.stdout:
                lines.append(line)
                if "final command:" in line or time.monotonic() > deadline:
                    break
            proc.send_signal(signal.SIGINT)
            rest, _ = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        requests = json.dumps(llm.requests)
    return "".join(lines) + rest, requests, session.read_text() if session.exists() else ""


def test_underscore_api_key_and_hf_token_never_reach_terminal_record_or_recover_prompt(tmp_path):
    """`--api_key=K` leaked into the record, the terminal and the recover prompt (vLLM echoes its args and
    the first attempt's log excerpt goes to the LLM)."""
    scenario = {"weights_gib": 14.2, "graph_actual_gib": 11.0, "record": str(tmp_path / "starts.jsonl")}
    steps = [_reply([], "the baseline is fine"),
             _reply([{"knob": "gpu_memory_utilization", "value": 0.85, "reason": "room for graphs"}], "OOM")]
    output, requests, record = _run_cli_until_ready(
        tmp_path, ["--api_key=" + K1, "--hf-token", HF, "--", "--api-key", K2], scenario, steps)
    assert "final command:" in output, output[-3000:]
    assert "attempt 1 failed: oom" in output
    assert '"recover' in requests or "recover" in requests  # the recover prompt was sent
    for secret in (K1, K2, HF):
        assert secret not in output, secret
        assert secret not in requests, secret
        assert secret not in record, secret


# ---------------------------------------------------------------------------- a giant log line


def test_a_giant_vllm_log_line_is_capped_and_the_launch_goes_on(rig):
    """One 40 MiB log line froze smartrun at 100% CPU (a quadratic pattern), deaf to Ctrl+C."""
    rig.scenario(faults={"giant_line_mib": 40})
    started = time.monotonic()
    report = rig.run(api_key=(K1,))
    elapsed = time.monotonic() - started
    report.server.stop()
    assert report.ok and elapsed < 30
    giant = [line for line in rig.lines if line.startswith("AAAA")]
    assert len(giant) == 1 and len(giant[0]) < 20_000 and giant[0].endswith("characters cut]")
    assert all(len(line) < 20_000 for a in report.attempts for line in a.log_excerpt)
    assert all(process_gone(pid) for pid in rig.pids())
