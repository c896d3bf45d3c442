"""Hostile input, end to end: each break an adversarial pass found has a regression test here.

Secrets in every spelling vLLM accepts (never printed, kept or sent to the LLM; readiness still finds the
key), a vLLM stand-in printing a giant log line, and (further below) hangs, crafted files and records.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FIXTURES, REPO
from fakes import HeldClock, free_port, install_vllm_shim, process_gone
from fakes.llm_server import FakeLLM
from test_launch import Rig
from test_launch import bounds as launch_bounds

from smartrun import launch, validate
from smartrun.cli import main
from smartrun.clock import SYSTEM
from smartrun.contracts import Bounds, Plan
from smartrun.errors import LaunchError

MODEL = str(FIXTURES / "models" / "qwen2.5-7b-instruct")
H100 = str(FIXTURES / "hardware" / "1x-h100-80gb.json")
FAKE_VLLM = REPO / "tests" / "fakes" / "fake_vllm.py"
K1, K2 = "served-key-one-7c1e2a90", "served-key-two-4d8b3f61"
HF = "hftoken-value-55e0c1b2a3"
QUICK = {"import_s": 0.0, "load_s": 0.02, "profile_s": 0.0, "capture_s": 0.0}


def _bounds() -> Bounds:
    return launch_bounds()


class Launch(Rig):
    """test_launch's rig, run with passthrough flags; `shown` is everything a person or a record would see."""

    def scenario(self, **values) -> None:
        values.setdefault("delays", QUICK)
        super().scenario(**values)

    def run(self, passthrough=(), startup_timeout=20.0, clock=SYSTEM, **params) -> launch.LaunchReport:
        plan = Plan(params={"max_model_len": 8192, "gpu_memory_utilization": 0.9, "max_num_seqs": 64, **params})
        b = _bounds()
        return launch.run_with_recovery(plan, b, self.launcher(startup_timeout=startup_timeout, clock=clock),
                                        check=lambda p: validate.check(b, plan, p), max_attempts=2,
                                        on_event=lambda e: self.events.append(str(e)), model_path="/models/m",
                                        passthrough=tuple(passthrough))

    def pids(self) -> list[int]:
        return self.started_pids()

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
                "--vllm-bin", str(FAKE_VLLM), "--port", str(free_port()), "--startup-timeout", "30",
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


@pytest.mark.realtime  # a CPU hang guard: only real time shows it
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


# ---------------------------------------------------------------------------- files that are not what they say


def _cli(args, cwd, timeout=30, env_extra=None):
    """`localaistack ...` as a process with a hard timeout: a hang fails the test instead of stalling it."""
    env = {"SMARTRUN_HOME": str(cwd / "home"), "PATH": "/usr/bin:/bin", "XDG_CONFIG_HOME": str(cwd / "cfg"),
           "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "smartrun", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env=env)


def _one_line_exit_2(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    lines = [ln for ln in proc.stderr.strip().splitlines() if not ln.startswith("session record: ")]
    assert len(lines) == 1 and lines[0].startswith("localaistack: ") and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in lines[0], (word, lines[0])


def _model_copy(tmp_path, name="qwen2.5-7b-instruct"):
    import shutil

    target = tmp_path / "model"
    shutil.copytree(FIXTURES / "models" / name, target)
    return target


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory", "dangling", "loop"])
def test_a_safetensors_that_is_not_a_regular_file_is_one_line(tmp_path, kind):
    model = _model_copy(tmp_path)
    shard = model / "model-00001-of-00004.safetensors"
    shard.unlink()
    if kind == "fifo":
        os.mkfifo(shard)
    elif kind == "dev-zero":
        shard.symlink_to("/dev/zero")
    elif kind == "directory":
        shard.mkdir()
    elif kind == "dangling":
        shard.symlink_to(tmp_path / "nowhere")
    else:
        shard.symlink_to(shard)
    proc = _cli(["model", "run", str(model), "--dry-run", "--hardware", H100], tmp_path)
    _one_line_exit_2(proc, "model-00001-of-00004.safetensors")


@pytest.mark.parametrize("which", ["--hardware", "--bounds"])
@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "directory"])
def test_a_snapshot_or_bounds_file_that_is_a_fifo_or_dev_zero_is_one_line(tmp_path, which, kind):
    path = tmp_path / "input"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        path = "/dev/zero"
    else:
        path.mkdir()
    args = ["model", "run", MODEL, "--dry-run", "--hardware", H100, which, str(path)]
    proc = _cli(args, tmp_path)
    _one_line_exit_2(proc, str(path))


def test_model_config_that_is_a_fifo_is_one_line(tmp_path):
    model = _model_copy(tmp_path)
    (model / "config.json").unlink()
    os.mkfifo(model / "config.json")
    _one_line_exit_2(_cli(["model", "inspect", str(model)], tmp_path), "config.json")


@pytest.mark.parametrize(
    ("key", "value"),
    [("hidden_size", "Infinity"), ("num_hidden_layers", "NaN"), ("intermediate_size", "1e999"),
     ("vocab_size", "1" * 5000)],
)
def test_config_json_with_infinity_or_huge_integers_is_one_line(tmp_path, key, value):
    """Infinity (or 1e999) in a size was a traceback (int(inf)); so was an integer over 4300 digits."""
    model = _model_copy(tmp_path)
    config = json.loads((model / "config.json").read_text())
    config[key] = "VALUE"
    (model / "config.json").write_text(json.dumps(config).replace('"VALUE"', value))
    _one_line_exit_2(_cli(["model", "run", str(model), "--dry-run", "--hardware", H100], tmp_path), "config.json")


@pytest.mark.parametrize("total", ["Infinity", "1e999", "1" * 5000, "-5"])
def test_index_total_size_that_is_not_a_size_is_one_line(tmp_path, total):
    model = _model_copy(tmp_path, "gemma-3-27b-it")
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"]["total_size"] = "TOTAL"
    index.write_text(json.dumps(data).replace('"TOTAL"', total))
    _one_line_exit_2(_cli(["model", "run", str(model), "--dry-run", "--hardware", H100], tmp_path),
                     "model.safetensors.index.json")


@pytest.mark.parametrize("name", ["../../../../../../etc/passwd", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_paths_stay_inside_the_model_directory(tmp_path, name):
    model = _model_copy(tmp_path, "gemma-3-27b-it")
    index = model / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["metadata"].pop("total_size", None)
    first = next(iter(data["weight_map"]))
    data["weight_map"][first] = name
    index.write_text(json.dumps(data))
    _one_line_exit_2(_cli(["model", "inspect", str(model)], tmp_path), "outside the model directory")


@pytest.mark.parametrize("where", ["snapshot", "bounds", "session"])
def test_integers_over_4300_digits_are_one_line_and_session_list_survives_them(tmp_path, where):
    big = "7" * 5000
    if where == "snapshot":
        path = tmp_path / "snap.json"
        snap = json.loads(Path(H100).read_text())
        path.write_text(json.dumps(snap).replace('"schema_version": 1', f'"schema_version": 1, "cpu_count": {big}'))
        _one_line_exit_2(_cli(["model", "run", MODEL, "--dry-run", "--hardware", str(path)], tmp_path), str(path))
    elif where == "bounds":
        path = tmp_path / "b.toml"
        path.write_text(f"version = 1\n[knobs.max_num_seqs]\nmax = {big}\n")
        proc = _cli(["bounds", "check", str(path)], tmp_path)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and "digits" in proc.stdout + proc.stderr
        _one_line_exit_2(_cli(["model", "run", MODEL, "--dry-run", "--hardware", H100, "--bounds", str(path)],
                              tmp_path), str(path))
    else:
        sessions = tmp_path / "home" / "sessions"
        sessions.mkdir(parents=True)
        bad = sessions / "20260101T000000.000000Z-m.json"
        bad.write_text('{"schema_version": 1, "tool_version": "x", "started_at": "x", "n": ' + big + "}")
        proc = _cli(["session", "list"], tmp_path)
        assert proc.returncode == 0 and "unreadable" in proc.stdout and "Traceback" not in proc.stderr
        _one_line_exit_2(_cli(["session", "show", str(bad)], tmp_path), str(bad))


# ---------------------------------------------------------------------------- records are data, not code


def _crafted_record(tmp_path, error_type: str, message: str | None) -> Path:
    record = json.loads((FIXTURES / "sessions" / "llm-unreachable-fallback.json").read_text())
    for exchange in record["llm_exchanges"]:
        if exchange.get("error"):
            exchange["error"] = {"type": error_type, "message": message or exchange["error"]["message"]}
    path = tmp_path / "crafted.json"
    path.write_text(json.dumps(record))
    return path


@pytest.mark.parametrize("error_type", ["evilmod_14.Boom", "os.system", "builtins.OSError", "subprocess.Popen",
                                        "smartrun.launch.ProcessLauncher", "builtins.SystemExit", ".", ""])
def test_replay_never_imports_or_instantiates_what_a_record_names(tmp_path, error_type):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evilmod_14.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\nclass Boom(Exception):\n"
                                        f"    def __init__(self, m):\n        open({str(marker)!r}, 'w').write(m)\n")
    path = _crafted_record(tmp_path, error_type, f"touch {marker}")
    proc = _cli(["session", "replay", str(path)], tmp_path, env_extra={"PYTHONPATH": f"{REPO}:{evil}"})
    assert not marker.exists()
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 2, 5), proc.stderr
    if proc.returncode:
        assert len([ln for ln in proc.stderr.strip().splitlines() if ln.startswith("localaistack: ")]) == 1


def test_replay_of_an_allowed_error_type_still_matches(tmp_path):
    path = _crafted_record(tmp_path, "smartrun.advisor.LLMUnavailable", None)
    proc = _cli(["session", "replay", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_session_show_escapes_terminal_control_sequences(tmp_path):
    record = json.loads((FIXTURES / "sessions" / "llm-accepted.json").read_text())
    record["warnings"] = ["\x1b]0;owned\x07\x1b[2J\x1b[31mred\nfake line\u202egnp.exe"]
    path = tmp_path / "r.json"
    path.write_text(json.dumps(record))
    proc = _cli(["session", "show", str(path)], tmp_path)
    assert proc.returncode == 0
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout and "\u202e" not in proc.stdout
    assert "\\x1b[2J" in proc.stdout and "\\nfake line" in proc.stdout


# ---------------------------------------------------------------------------- smaller surprises


def test_session_out_into_a_missing_folder_is_refused_and_creates_nothing(tmp_path):
    target = tmp_path / "no" / "such" / "dir" / "x.json"
    _one_line_exit_2(_cli(["model", "run", MODEL, "--dry-run", "--hardware", H100, "--session-out", str(target)],
                          tmp_path), "--session-out", "does not exist")
    assert not (tmp_path / "no").exists()


def test_bounds_on_security_knobs_are_called_out(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('version = 1\n[knobs.host]\nchoices = ["127.0.0.1"]\n[knobs.trust_remote_code]\nfixed = false\n')
    proc = _cli(["bounds", "check", str(path)], tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("warning: ")
    assert "b.toml:2: host is a security setting" in proc.stdout and "trust_remote_code" in proc.stdout
    assert "does not lock it down" in proc.stdout
    planning = tmp_path / "n.toml"
    planning.write_text("version = 1\n[knobs.nodes]\nmax = 2\n")  # a knob the rules use: no warning
    assert _cli(["bounds", "check", str(planning)], tmp_path).stdout.startswith("OK ")


def test_a_smartrun_toml_from_a_parent_folder_is_named(tmp_path):
    (tmp_path / "smartrun.toml").write_text("version = 1\n")
    below = tmp_path / "a" / "b"
    below.mkdir(parents=True)
    proc = _cli(["model", "run", MODEL, "--dry-run", "--hardware", H100], below)
    assert proc.returncode == 0, proc.stderr
    assert f"bounds file in force: {tmp_path / 'smartrun.toml'}" in proc.stdout


def test_vllm_bin_dot_slash_runs_that_file_not_the_one_on_path(tmp_path, monkeypatch):
    """`--vllm-bin ./vllm` became `vllm` and ran PATH's vllm (or, with none on PATH, a traceback)."""
    here = tmp_path / "here"
    install_vllm_shim(here)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "vllm").write_text("#!/bin/sh\necho WRONG VLLM\nexit 3\n")
    (wrong / "vllm").chmod(0o755)
    monkeypatch.chdir(here)
    monkeypatch.setenv("PATH", f"{wrong}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_VLLM_SCENARIO", json.dumps({"delays": QUICK}))
    port = free_port()
    info = launch.find_vllm("./vllm", cache_dir=tmp_path / "cache")
    assert info.path == str(here / "vllm") and info.version == "0.33.0"
    lines: list[str] = []
    launcher = launch.ProcessLauncher("./vllm", port=port, printer=lines.append, progress=lambda _: None,
                                      poll_interval=0.05, stop_grace=5, info=info, startup_timeout=20)
    plan = Plan(params={"max_model_len": 8192})
    report = launch.run_with_recovery(plan, _bounds(), launcher, check=lambda p: None, max_attempts=1,
                                      on_event=lambda _: None, model_path="/m")
    report.server.stop()
    assert report.ok and not any("WRONG" in line for line in lines)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # none on PATH: still the file given
    assert launch.find_vllm("./vllm", cache_dir=tmp_path / "cache2").path == str(here / "vllm")


# ---------------------------------------------------------------------------- waits with a wall-clock deadline


def test_readiness_gives_up_at_its_deadline_on_a_trickling_server(rig):
    """/v1/models answering a byte at a time kept the readiness poll in one GET for ever."""
    rig.scenario(faults={"trickle_models": True})
    # the clock starts 1 s (real) after the stand-in listens: by then the readiness check, started before the
    # launcher's first poll, has had /health 200 and sits in the trickling GET of /v1/models
    listening: list[float] = []

    def trickling() -> bool:
        if not listening and any("Application startup complete" in line for line in rig.lines):
            listening.append(time.monotonic())
        return bool(listening) and time.monotonic() - listening[0] > 1.0

    clock = HeldClock(trickling)
    with pytest.raises(LaunchError, match=r"startup_timeout: not ready after 3 s"):
        rig.run(startup_timeout=3, clock=clock)
    assert 3 <= clock.monotonic() <= 3.1  # the deadline ended the wait, the trickling GET did not hold it
    assert all(process_gone(pid) for pid in rig.pids())


class _Hostile:
    """An HTTP server on 127.0.0.1 answering GET /v1/models and POST /v1/completions with `handler`."""

    def __init__(self, handler):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                handler(self)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("content-length") or 0))
                handler(self)

        class Quiet(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _send(req, body: bytes, status=200, trickle=0.0, length=None):
    try:
        req.send_response(status)
        req.send_header("content-type", "application/json")
        req.send_header("content-length", str(length or len(body)))
        req.end_headers()
        for i in range(len(body)) if trickle else [None]:
            req.wfile.write(body if i is None else body[i:i + 1])
            req.wfile.flush()
            if trickle:
                time.sleep(trickle)
    except OSError:
        pass


@pytest.mark.realtime  # a hang guard, CLI in a real process
def test_probe_without_model_gives_up_on_a_trickling_model_list(tmp_path):
    body = json.dumps({"data": [{"id": "m"}]}).encode() * 20
    with _Hostile(lambda req: _send(req, body, trickle=0.3)) as server:
        started = time.monotonic()
        proc = _cli(["probe", server.url, "--request-timeout", "2", "--duration", "1"], tmp_path, timeout=40)
    assert time.monotonic() - started < 25
    _one_line_exit_2(proc, "/v1/models")


def test_probe_survives_a_deeply_nested_model_list(tmp_path):
    body = b"[" * 200_000 + b"]" * 200_000
    with _Hostile(lambda req: _send(req, body)) as server:
        proc = _cli(["probe", server.url, "--duration", "1"], tmp_path)
    _one_line_exit_2(proc, "/v1/models")


def test_probe_does_not_believe_absurd_completion_tokens():
    from smartrun import probe

    reply = json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": 10 ** 12}}).encode()
    with _Hostile(lambda req: _send(req, reply if req.command == "POST" else b'{"data": [{"id": "m"}]}')) as srv:
        result = probe.run_probe(srv.url, probe.ProbeSettings(concurrency=1, duration_s=0.5, max_requests=3,
                                                              output_tokens=8, prompt_tokens=4))
    assert result.output_tokens < 100 and result.error_kinds.get("bad reply") == result.requests


def test_a_truncated_json_body_from_the_llm_counts_as_a_bad_reply_and_falls_back(tmp_path, capsys):
    steps = [{"body": '{"id": "x", "choices": [{"message": {"content": "{\\"changes\\"'}] * 4
    with FakeLLM(steps) as llm:
        code = main(["model", "run", MODEL, "--smart-run", "--dry-run", "--hardware", H100, "--llm-base-url",
                     llm.base_url, "--llm-model", "m", "--session-out", str(tmp_path / "s.json")])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    assert _plan_source(tmp_path / "s.json") == "static" and "not JSON" in captured.out + captured.err


@pytest.mark.realtime  # --llm-timeout on the real clock, end to end
def test_an_llm_that_trickles_its_reply_is_cut_off_at_the_llm_timeout(tmp_path, capsys):
    """One byte a second kept --smart-run waiting far past --llm-timeout (per-read timeouts never fire)."""
    reply = json.dumps({"changes": [], "reason": "slow"})
    steps = [{"content": reply, "trickle_s": 0.5}] * 4
    with FakeLLM(steps) as llm:
        started = time.monotonic()
        code = main(["model", "run", MODEL, "--smart-run", "--dry-run", "--hardware", H100, "--llm-base-url",
                     llm.base_url, "--llm-model", "m", "--llm-timeout", "1", "--session-out",
                     str(tmp_path / "s.json")])
        elapsed = time.monotonic() - started
    capsys.readouterr()
    assert code == 0 and _plan_source(tmp_path / "s.json") == "static"
    assert elapsed < 30, elapsed  # 4 tries of 1 s plus backoff; it waited out the whole trickle (minutes)


def _plan_source(record_path) -> str:
    from smartrun.session import load_record

    return load_record(record_path).final_plan.source


def test_usage_errors_and_error_lines_never_echo_a_secret(tmp_path):
    """argparse echoes what it did not recognise (`unrecognized arguments: --api-key K`)."""
    proc = _cli(["hardware", "show", "x.json", "--api_key", K1, K2], tmp_path)
    assert proc.returncode == 2 and K1 not in proc.stderr and K2 not in proc.stderr and "REDACTED" in proc.stderr


@pytest.mark.realtime  # a CPU hang guard
def test_a_giant_log_line_through_the_whole_cli_leaves_a_small_record_and_no_orphan(tmp_path):
    """The freeze was in the pipeline: the record's log excerpt went through a quadratic pattern."""
    starts = tmp_path / "starts.jsonl"
    started = time.monotonic()
    output, _, record = _run_cli_until_ready(tmp_path, [], {"faults": {"giant_line_mib": 30}, "worker": True,
                                                           "record": str(starts)}, [_reply([], "fine")] * 2)
    assert "final command:" in output and time.monotonic() - started < 60
    assert max(len(line) for line in output.splitlines()) < 20_000
    assert record and max(len(line) for line in record.splitlines()) < 20_000
    rows = [json.loads(x) for x in starts.read_text().splitlines()]
    assert rows and all(process_gone(pid) for row in rows for pid in (row["pid"], row["worker_pid"]) if pid)
