"""Stand-ins the tests run as real processes: the `vllm` stand-in, the scripted LLM server, the perf model."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from smartrun.clock import FakeClock

FAKE_VLLM = Path(__file__).resolve().parent / "fake_vllm.py"


def install_vllm_shim(bin_dir: Path) -> Path:
    """Write an executable `vllm` in bin_dir that runs the stand-in with this interpreter; returns its path."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    shim = bin_dir / "vllm"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{FAKE_VLLM}" "$@"\n')
    shim.chmod(0o755)
    return shim


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (tests run in parallel: never a fixed port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def process_gone(pid: int) -> bool:
    """True when pid no longer runs (absent, or a zombie waiting for its reaper)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


class HeldClock(FakeClock):
    """A FakeClock held still, in real time too, until `ready()` holds: its first sleep waits for it (polling
    every 10 ms; an AssertionError after `patience_s`). For a real process that must get somewhere (its
    worker started, loading weights) before the timeout under test may run out; from then on only the code
    under test moves the clock, so how long the process really took does not matter."""

    def __init__(self, ready: Callable[[], bool], patience_s: float = 60.0, **kw):
        super().__init__(**kw)
        self._ready, self._patience_s, self._open = ready, patience_s, False

    def sleep(self, seconds: float) -> None:
        if not self._open:
            give_up = time.monotonic() + self._patience_s
            while not self._ready():
                assert time.monotonic() < give_up, f"HeldClock: not ready after {self._patience_s:g} s"
                time.sleep(0.01)
            self._open = True
        super().sleep(seconds)
