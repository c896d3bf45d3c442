"""The load probe against a scripted OpenAI-compatible server on 127.0.0.1 (real HTTP, real sockets)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from smartrun import probe
from smartrun.cli import main
from smartrun.clock import FakeClock
from smartrun.errors import InputError


class ScriptedServer:
    """Serves /v1/models and /v1/completions; `behaviour(n, body)` says what the n-th completion does.

    behaviour returns a dict: status (200), first_s (delay before the first chunk), total_s (delay
    before the end), stream (honour stream=True), tokens (chunks to send), reject_extras (400 when
    vLLM-only fields are present), real_s (with a clock: real seconds the reply also takes, as on a loaded
    machine). Delays are real unless a `clock` is given.
    """

    def __init__(self, behaviour: Callable[[int, dict], dict], clock: FakeClock | None = None):
        self.behaviour = behaviour
        self.clock = clock  # delays sleep on it (the probe's clock): exact, and no real time
        self.bodies: list[dict] = []
        self.auth: list[str | None] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep test output clean
                pass

            def _send(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                server.auth.append(self.headers.get("authorization"))
                with server.lock:
                    n = len(server.bodies)
                    server.bodies.append(body)
                plan = {"status": 200, "first_s": 0.0, "total_s": 0.0, "stream": True, "tokens": 4,
                        "reject_extras": False, "real_s": 0.0, **server.behaviour(n, body)}
                if plan["reject_extras"] and ("ignore_eos" in body or "stream_options" in body):
                    self._send(400, {"error": "unknown field"})
                    return
                if plan["status"] != 200:
                    self._send(plan["status"], {"error": "scripted failure"})
                    return
                tokens = plan["tokens"]
                pause = server.clock.sleep if server.clock is not None else time.sleep
                if not (body.get("stream") and plan["stream"]):
                    pause(plan["total_s"])
                    self._send(200, {"choices": [{"text": "x" * tokens, "index": 0}],
                                     "usage": {"prompt_tokens": 3, "completion_tokens": tokens}})
                    return
                self.send_response(200)
                self.send_header("content-type", "text/event-stream")
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

                def chunk(text: str) -> None:
                    data = text.encode()
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

                pause(plan["first_s"])
                time.sleep(plan["real_s"])
                for _ in range(tokens):
                    chunk("data: " + json.dumps({"choices": [{"text": "x", "index": 0}]}) + "\n\n")
                pause(max(0.0, plan["total_s"] - plan["first_s"]))
                if (body.get("stream_options") or {}).get("include_usage"):
                    chunk("data: " + json.dumps({"choices": [], "usage": {"completion_tokens": tokens}}) + "\n\n")
                chunk("data: [DONE]\n\n")
                chunk("")

        class Quiet(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that hung up early is expected
                pass

        self.httpd = Quiet(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def settings(**kw) -> probe.ProbeSettings:
    base = {"concurrency": 1, "duration_s": 30.0, "max_requests": 10, "request_timeout_s": 10.0,
            "prompt_tokens": 8, "output_tokens": 4}
    return probe.ProbeSettings(**{**base, **kw})


def test_percentile_interpolates_like_numpy():
    values = [float(v) for v in range(10, 110, 10)]  # 10..100
    assert probe.percentile(values, 50) == pytest.approx(55.0)
    assert probe.percentile(values, 95) == pytest.approx(95.5)
    assert probe.percentile([7.0], 95) == 7.0
    assert probe.percentile([], 50) is None


def test_percentiles_and_ttft_follow_the_scripted_delays():
    # request k waits 20*k ms before its first token and 20*k + 10 ms in total (one client, in order), on the
    # probe's clock: the probe measures exactly what was scripted
    clock = FakeClock()
    script = lambda n, body: {"first_s": 0.02 * n, "total_s": 0.02 * n + 0.01}  # noqa: E731
    with ScriptedServer(script, clock) as server:
        result = probe.run_probe(server.url, settings(max_requests=10), clock=clock)
    assert (result.ok, result.errors, result.requests) == (10, 0, 10)
    assert result.output_tokens == 40 and result.streamed
    assert result.latencies_ms == pytest.approx([20 * k + 10 for k in range(10)])
    # the first token cannot come before its scripted delay nor after the end (the server may sleep its last
    # 10 ms before the client has read the first chunk, so the TTFT itself is a range)
    assert all(20 * k - 1e-6 <= first <= 20 * k + 10 + 1e-6 for k, first in enumerate(result.ttfts_ms))
    assert result.latency_p50_ms == pytest.approx(100) and result.latency_p95_ms == pytest.approx(181)  # 10..190
    assert result.ttft_p95_ms == probe.percentile(list(result.ttfts_ms), 95)
    assert result.elapsed_s == pytest.approx(1.0)  # sum of the delays: 10 * 0.01 + 0.02 * 45
    assert result.tokens_per_s == pytest.approx(40.0) and result.requests_per_s == pytest.approx(10.0)
    assert result.model == "scripted-model"


def test_request_budget_bounds_the_probe_and_the_key_is_sent_not_kept():
    with ScriptedServer(lambda n, body: {}) as server:
        result = probe.run_probe(server.url + "/v1/", settings(concurrency=3, max_requests=7), api_key="sk-probe-9",
                                 clock=FakeClock())
        sent = len(server.bodies)
    assert result.requests == 7 and sent == 7
    assert result.stopped_by == "max_requests"
    assert server.auth == ["Bearer sk-probe-9"] * 7 and "sk-probe-9" not in result.model_dump_json()


def test_duration_bounds_the_probe_and_progress_is_reported():
    # one client, 12.5 ms a request by the clock: a 0.3 s probe sends exactly 24 (a 25th would start at 0.3 s)
    clock = FakeClock()
    seen: list[probe.ProbeProgress] = []
    with ScriptedServer(lambda n, body: {"total_s": 0.0125}, clock) as server:
        result = asyncio.run(probe.run_probe_async(
            server.url, settings(concurrency=1, duration_s=0.3, max_requests=100_000), seen.append, 0.05,
            clock=clock))
    assert result.stopped_by == "duration"
    assert result.requests == result.ok == 24 and result.elapsed_s == pytest.approx(0.3)  # 24 * 0.0125 s
    assert seen and seen[-1].done == result.ok and seen[-1].elapsed_s == pytest.approx(0.3)
    assert [p.done for p in seen] == sorted(p.done for p in seen)


def test_errors_and_timeouts_are_counted_not_raised():
    def script(n, body):
        if n % 3 == 0:
            return {"status": 500}
        if n == 4:
            return {"first_s": 40.0, "total_s": 40.0}  # four times the request timeout, by the clock
        if n == 5:
            return {"first_s": 9.5, "total_s": 9.5}  # just inside it
        return {}

    clock = FakeClock()
    with ScriptedServer(script, clock) as server:
        result = probe.run_probe(server.url, settings(max_requests=9, request_timeout_s=10.0, duration_s=600),
                                 clock=clock)
    assert result.error_kinds == {"HTTP 500": 3, "timeout": 1}
    assert (result.ok, result.errors, result.requests) == (5, 4, 9)
    assert max(result.latencies_ms) == pytest.approx(9500)


def test_a_reply_on_time_by_the_clock_is_not_a_timeout_however_long_it_takes_in_real_time():
    # a loaded machine: the first token comes on the dot of the 0.5 s timeout by the clock, 1 s late by the wall
    # (past the old real-time backstop of the timeout itself); only the clock decides
    clock = FakeClock()
    with ScriptedServer(lambda n, body: {"first_s": 0.5, "total_s": 0.5, "real_s": 1.0}, clock) as server:
        result = probe.run_probe(server.url, settings(max_requests=1, request_timeout_s=0.5, duration_s=600),
                                 clock=clock)
    assert (result.ok, result.errors) == (1, 0) and list(result.latencies_ms) == [pytest.approx(500)]


def test_falls_back_to_plain_requests_when_extras_or_streaming_are_refused():
    with ScriptedServer(lambda n, body: {"reject_extras": True}) as server:
        result = probe.run_probe(server.url, settings(max_requests=4))
        assert all("ignore_eos" not in b for b in server.bodies[1:])
    assert (result.ok, result.errors) == (4, 0) and result.streamed
    assert result.output_tokens == 16  # counted from the chunks when no usage is sent

    with ScriptedServer(lambda n, body: {"stream": False, "tokens": 5}) as server:
        result = probe.run_probe(server.url, settings(max_requests=3))
    assert (result.ok, result.output_tokens, result.streamed) == (3, 15, False)
    assert result.ttft_p50_ms is None and result.latency_p50_ms is not None


def test_bad_settings_and_urls_name_the_flag():
    with pytest.raises(InputError, match="--concurrency 0"):
        probe.make_settings(concurrency=0)
    with pytest.raises(InputError, match="ftp://x"):
        probe.api_root("ftp://x")
    assert probe.api_root("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"


def test_unreachable_server_is_a_one_line_error(capsys):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    capsys.readouterr()
    code = main(["probe", f"http://127.0.0.1:{port}", "--max-requests", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("localaistack: ") and err.count("\n") == 1
    assert "cannot reach the server" in err


def test_cli_prints_json_in_a_real_subprocess():
    with ScriptedServer(lambda n, body: {}) as server:
        proc = subprocess.run(
            [sys.executable, "-m", "smartrun", "probe", server.url, "--max-requests", "5", "--concurrency", "2",
             "--prompt-tokens", "16", "--output-tokens", "4", "--json"],
            capture_output=True, text=True, timeout=60,
        )
        prompts = [b["prompt"] for b in server.bodies]
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["ok"] == 5 and data["output_tokens"] == 20 and data["settings"]["concurrency"] == 2
    assert "latencies_ms" not in data
    assert len(set(prompts)) == 5 and all(len(p.split()) == 16 for p in prompts)
    bad = subprocess.run([sys.executable, "-m", "smartrun", "probe", server.url, "--duration", "-1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("localaistack: --duration -1.0")


class RawServer:
    """Lists one model, then answers every completion with the same raw body (garbage on purpose)."""

    def __init__(self, body: bytes, content_type: str):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _reply(self, data: bytes, ctype: str) -> None:
                self.send_response(200)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._reply(b'{"data": [{"id": "m"}]}', "application/json")

            def do_POST(self):
                self.rfile.read(int(self.headers["content-length"]))
                self._reply(body, content_type)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"data: [1]\n\ndata: [DONE]\n\n", "text/event-stream"),  # an event that is not an object
        (b'data: {"choices": ["x"]}\n\n', "text/event-stream"),  # a choice that is not an object
        (b'data: {"choices": [{"text": "a"}], "usage": {"completion_tokens": "many"}}\n\n', "text/event-stream"),
        (b"[1]", "application/json"),
        (b'{"choices": "abc"}', "application/json"),
        (b"\x00\xffgarbage", "text/plain"),
    ],
)
def test_garbage_replies_are_counted_as_bad_replies_and_the_cli_fails(capsys, body, ctype):
    server = RawServer(body, ctype)
    try:
        result = probe.run_probe(server.url, settings(max_requests=6, concurrency=2))
        # every request is accounted for (before: a worker died on the first odd reply and its requests vanished)
        assert (result.ok, result.errors, result.error_kinds) == (0, 6, {"bad reply": 6})
        capsys.readouterr()
        assert main(["probe", server.url, "--max-requests", "3", "--concurrency", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"localaistack: {server.url}: no request succeeded (bad reply x3)"]
    finally:
        server.close()


@pytest.mark.parametrize(
    ("flag", "value"),
    [("duration_s", float("inf")), ("request_timeout_s", float("inf")), ("max_requests", 10**7),
     ("prompt_tokens", 10**9), ("output_tokens", 10**9), ("duration_s", 1e300)],
)
def test_a_probe_is_bounded_in_time_and_memory(flag, value):
    with pytest.raises(InputError, match=probe.SETTING_FLAGS[flag]):
        probe.make_settings(**{flag: value})


def test_ctrl_c_during_a_probe_exits_130_without_a_traceback():
    import os
    import signal

    with ScriptedServer(lambda n, body: {"first_s": 0.05, "total_s": 0.3}) as server:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smartrun", "probe", server.url, "--concurrency", "4", "--duration", "30"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a shell may start us ignoring it
        )
        deadline = time.monotonic() + 30
        while len(server.bodies) < 4 and time.monotonic() < deadline:  # requests in flight
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert err.strip().splitlines()[-1] == "localaistack: interrupted"


def test_probe_options_are_declared_once_for_the_probe_command_and_for_tune():
    """probe.PROBE_OPTIONS is the one table: `localaistack probe` takes its flags, `model run --tune` the
    --probe-* form of them, and both read back into the same ProbeSettings field."""
    from smartrun.cli import build_parser
    from smartrun.tune import TUNE_OPTIONS

    values = {"concurrency": "3", "duration_s": "2.5", "prompt_tokens": "7", "output_tokens": "5",
              "max_requests": "9", "request_timeout_s": "4"}
    argv = [part for o in probe.PROBE_OPTIONS for part in (o.flag, values[o.field])]
    args = build_parser().parse_args(["probe", "http://127.0.0.1:1", *argv])
    typed = {o.field: getattr(args, o.dest) for o in probe.PROBE_OPTIONS}
    assert probe.make_settings(**typed) == probe.ProbeSettings(
        concurrency=3, duration_s=2.5, prompt_tokens=7, output_tokens=5, max_requests=9, request_timeout_s=4.0)
    assert probe.make_settings(**dict.fromkeys(typed)) == probe.ProbeSettings()  # not typed: the defaults
    tuned = {o.field.removeprefix("probe."): o.flag for o in TUNE_OPTIONS if o.field.startswith("probe.")}
    assert tuned == {o.field: "--probe-" + o.flag[2:] for o in probe.PROBE_OPTIONS if o.field in tuned}
    assert {"concurrency", "duration_s", "max_requests"} <= set(tuned)
