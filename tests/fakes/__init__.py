"""Stand-ins the tests run as real processes: the `vllm` stand-in, the scripted LLM server, the perf model."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

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
