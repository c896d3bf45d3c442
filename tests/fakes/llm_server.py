"""A scripted OpenAI-compatible chat-completions server on 127.0.0.1, for tests and session fixtures.

It answers `POST .../chat/completions` with the next step of a script, answers `GET .../models` with
one model, and records every request it gets. Standard library only, so it runs anywhere the tests do.

In-process (a thread; port 0 picks a free port):

    with FakeLLM([{"content": '{"changes": [], "reason": "fine"}'}]) as llm:
        client = openai.OpenAI(base_url=llm.base_url, api_key="x")
        ...
        llm.requests      # [{"method", "path", "headers", "body"}, ...] as received

As a subprocess (the port is written to --port-file once the server listens; stop it with SIGTERM):

    python tests/fakes/llm_server.py --script SCRIPT.json --port-file PORT.txt [--log REQUESTS.jsonl]

Script format: a JSON list of steps, or an object {"model": "fake-model", "structured": true,
"steps": [...]}. Steps are served in order, one per chat-completions request; each step is an object:

    content        text of choices[0].message.content (default ""; null sends "content": null)
    status         HTTP status (default 200); a non-200 step sends an OpenAI-style error body
    error          the error message for a non-200 step (default "scripted error")
    delay_s        seconds to wait before answering (default 0): longer than the client timeout = timeout
    content_type   Content-Type of the answer (default "application/json")
    body           raw body text sent as is (overrides content/status-built bodies)
    usage          {"prompt_tokens": P, "completion_tokens": C} (default 100 / 20)
    finish_reason  default "stop" ("length" for a truncated answer)
    times          serve this step this many times in a row (default 1)
    headers        extra response headers, e.g. {"Retry-After": "0"}
    trickle_s      send the answer one byte every trickle_s seconds (a server that never quite stops)
    real_s         with clock=: real seconds the answer also takes, after its delay_s on the clock (a loaded
                   machine: on time by the clock, late by the wall)

In-process, `clock=` (a smartrun.clock.FakeClock shared with the code under test) makes delay_s and trickle_s
sleeps on that clock: a 30 s delay answers at once in real time but 30 s later by the clock, so budget and
timeout tests are exact and fast. A trickle still takes 20 ms of real time per byte, so a client that hangs
up mid-answer is seen to (the server stops sending) long before the whole body would have been sent.

When the script is used up every further request gets HTTP 410 "fake LLM script exhausted" (not a
status the advisor retries, so a test that asks more than it scripted fails fast and visibly).
With "structured": false the server refuses any request carrying `response_format` with HTTP 400
("response_format is not supported"), without using a step, like a server that lacks JSON-schema output.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


def _expand(steps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Steps with `times` unrolled, so serving is a simple pop from the front."""
    out: list[dict[str, Any]] = []
    for step in steps:
        out.extend([step] * int(step.get("times", 1)))
    return out


def load_script(path: str | Path) -> dict[str, Any]:
    """A script file as {"model", "structured", "steps"} (a bare list means steps with defaults)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, list):
        data = {"steps": data}
    return {"model": data.get("model", "fake-model"), "structured": data.get("structured", True),
            "steps": data.get("steps", [])}


class FakeLLM:
    """The server: a ThreadingHTTPServer in a daemon thread, serving `steps` in order."""

    def __init__(self, steps: list[dict[str, Any]], *, model: str = "fake-model", structured: bool = True,
                 port: int = 0, log_path: str | Path | None = None, clock: Any = None):
        self.model = model
        self.clock = clock
        self.structured = structured
        self.requests: list[dict[str, Any]] = []
        self._steps = _expand(steps)
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._log_path = Path(log_path) if log_path else None
        self._server = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._server.daemon_threads = True
        self._server.handle_error = self._handle_error  # type: ignore[method-assign]
        self._thread: threading.Thread | None = None

    def _handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hung up (it gave up on a slow or trickled answer) is expected, not a traceback."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            ThreadingHTTPServer.handle_error(self._server, request, client_address)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.02},
                                        name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()  # wakes handlers sleeping in a delay step
        self._server.shutdown()
        self._server.server_close()
        if self._thread:
            self._thread.join(timeout=5)

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)
            if self._log_path:
                with self._log_path.open("a", encoding="utf-8") as log:
                    log.write(json.dumps(entry) + "\n")

    def _pause(self, seconds: float, real_s: float = 0.0) -> bool:
        """Wait `seconds` (on the clock when one was given: then only `real_s` of real time); True once closing."""
        if self.clock is None:
            return self._closing.wait(seconds)
        self.clock.sleep(seconds)
        return self._closing.wait(real_s) if real_s else self._closing.is_set()

    def _next_step(self) -> dict[str, Any] | None:
        with self._lock:
            return self._steps.pop(0) if self._steps else None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                pass

            def _send(self, status: int, body: str, content_type: str = "application/json",
                      headers: dict[str, str] | None = None, trickle_s: float = 0.0) -> None:
                data = body.encode("utf-8")
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    for name, value in (headers or {}).items():
                        self.send_header(name, str(value))
                    self.end_headers()
                    if not trickle_s:
                        self.wfile.write(data)
                        return
                    for i in range(len(data)):
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                        if fake._pause(trickle_s, real_s=0.02):
                            return
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): nothing to answer

            def _headers(self) -> dict[str, str]:
                return {name.lower(): value for name, value in self.headers.items()}

            def do_GET(self) -> None:
                fake._record({"method": "GET", "path": self.path, "headers": self._headers(), "body": None})
                if self.path.rstrip("/").endswith("/models"):
                    self._send(200, json.dumps({"object": "list", "data": [
                        {"id": fake.model, "object": "model", "created": 0, "owned_by": "fake"}]}))
                else:
                    self._send(404, _error_body("not found", 404))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8") if length else ""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                fake._record({"method": "POST", "path": self.path, "headers": self._headers(), "body": body})
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, _error_body("not found", 404))
                    return
                if not fake.structured and isinstance(body, dict) and "response_format" in body:
                    self._send(400, _error_body("response_format is not supported by this server", 400))
                    return
                step = fake._next_step()
                if step is None:
                    self._send(410, _error_body("fake LLM script exhausted", 410))
                    return
                if step.get("delay_s") or step.get("real_s"):
                    fake._pause(float(step.get("delay_s", 0.0)), real_s=float(step.get("real_s", 0.0)))
                self._send(*_answer(step, fake.model), trickle_s=float(step.get("trickle_s", 0.0)))

        return Handler


def _error_body(message: str, status: int) -> str:
    return json.dumps({"error": {"message": message, "type": "scripted", "code": status}})


def _answer(step: dict[str, Any], model: str) -> tuple[int, str, str, dict[str, str]]:
    """(status, body, content type, headers) for one step."""
    status = int(step.get("status", 200))
    content_type = step.get("content_type", "application/json")
    headers = step.get("headers", {})
    if "body" in step:
        return status, step["body"], content_type, headers
    if status != 200:
        return status, _error_body(step.get("error", "scripted error"), status), content_type, headers
    usage = {"prompt_tokens": 100, "completion_tokens": 20, **step.get("usage", {})}
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    completion = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": step.get("content", "")},
            "finish_reason": step.get("finish_reason", "stop"),
        }],
        "usage": usage,
    }
    return status, json.dumps(completion), content_type, headers


def _write_port_file(path: Path, port: int) -> None:
    """Atomic, so a reader polling for the file never sees it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(str(port), encoding="utf-8")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Scripted OpenAI-compatible chat server (tests).",
                                     allow_abbrev=False)
    parser.add_argument("--script", required=True, help="JSON script file (see module docstring)")
    parser.add_argument("--port", type=int, default=0, help="port to bind on 127.0.0.1 (0 = a free one)")
    parser.add_argument("--port-file", help="write the bound port here once listening")
    parser.add_argument("--log", help="append each request received as a JSON line to this file")
    args = parser.parse_args(argv)
    script = load_script(args.script)
    server = FakeLLM(script["steps"], model=script["model"], structured=script["structured"],
                     port=args.port, log_path=args.log)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with server:
        if args.port_file:
            _write_port_file(Path(args.port_file), server.port)
        print(f"fake LLM listening on {server.base_url}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
