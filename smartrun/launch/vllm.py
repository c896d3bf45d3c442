"""The vllm binary: where it is, its version, the flags it accepts (cached by path and mtime)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path
from typing import Any

import platformdirs
from pydantic import Field

from smartrun import fileio
from smartrun.errors import InputError
from smartrun.fileio import atomic_write_text
from smartrun.frozen import Frozen

DEFAULT_STARTUP_TIMEOUT = 900.0
HEARTBEAT_S = 10.0  # a "still starting" line at least this often (plus one poll) while vLLM loads for minutes
CACHE_FILE = "vllm_info.json"
PHASE_WORDS: dict[str, str] = {
    "loading_weights": "loading weights",
    "weights_loaded": "weights loaded",
    "profiling_memory": "profiling memory",
    "kv_cache_allocated": "KV cache allocated",
    "capturing_cuda_graphs": "capturing CUDA graphs",
    "ready": "ready",
}




class VllmInfo(Frozen):
    """The installed vllm: where, which version, and its accepted flags (flag -> takes a value)."""

    path: str
    version: str | None = None
    flags: dict[str, bool] = Field(default_factory=dict)
    arity: dict[str, str] = Field(default_factory=dict)  # flags taking several ("+") or an optional ("?") value

    def arity_of(self, flag: str) -> str | None:
        """How many values this vllm's `flag` takes, for argv.tokenize (None: not one of its flags)."""
        if flag not in self.flags:
            return None
        return self.arity.get(flag) or ("1" if self.flags[flag] else "0")


def parse_help_flags(text: str) -> dict[str, bool]:
    """Flags from argparse help output (`  --max-model-len MAX_MODEL_LEN, -x X` lines) -> takes a value."""
    return {flag: kind != "0" for flag, kind in parse_help_arity(text).items()}


def parse_help_arity(text: str) -> dict[str, str]:
    """Flags from argparse help output -> "0", "1", "?" (`--x [X]`) or "+" (`--x X [X ...]`)."""
    flags: dict[str, str] = {}
    for line in text.splitlines():
        if not re.match(r"^ {1,4}-", line):
            continue
        for part in re.split(r",\s+(?=-)", line.strip()):
            tokens = part.split()
            if not tokens or not re.fullmatch(r"--?[A-Za-z0-9][\w.-]*", tokens[0]):
                continue
            takes = len(tokens) > 1 and not tokens[1].startswith("-") and tokens[1][:1] != "("
            if not takes:
                flags[tokens[0]] = "0"
            elif tokens[1].startswith("["):
                flags[tokens[0]] = "?"
            else:
                flags[tokens[0]] = "+" if len(tokens) > 2 and tokens[2].startswith("[") else "1"
    return flags


SHIPPED_HELP = "vllm-0.33.0-serve-help-all.txt"  # smartrun/data: `vllm serve --help=all` of vLLM 0.33.0


def shipped_vllm_info() -> VllmInfo:
    """The flags of vLLM 0.33.0 as shipped with smartrun, for a dry run on a machine without vLLM."""

    text = resources.files("smartrun").joinpath("data", SHIPPED_HELP).read_text(encoding="utf-8")
    arity = parse_help_arity(text)
    return VllmInfo(path=f"smartrun/data/{SHIPPED_HELP}", version="0.33.0",
                    flags={f: kind != "0" for f, kind in arity.items()},
                    arity={f: kind for f, kind in arity.items() if kind in ("+", "?")})


def _version_tuple(version: str | None) -> tuple[int, ...]:
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version or "")
    return tuple(int(x or 0) for x in m.groups()) if m else ()


def _run_text(argv: list[str], timeout: float) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, errors="replace",
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as err:
        return 1, str(err)
    return done.returncode, done.stdout + done.stderr


def _cache_path(cache_dir: str | Path | None) -> Path:
    if cache_dir is None:
        cache_dir = platformdirs.user_cache_dir("localaistack")
    return Path(cache_dir) / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = fileio.loads_json(fileio.read_bytes(path, 16 * 1024 * 1024))
    except (InputError, ValueError, RecursionError):
        return {}  # missing, not a regular file, or corrupt: ignored, rebuilt
    return data if isinstance(data, dict) else {}


def find_vllm(vllm_bin: str | None = None, *, cache_dir: str | Path | None = None, timeout: float = 120.0) -> VllmInfo:
    """Locate vllm (--vllm-bin, else PATH) and learn its version and flags; cached by binary path + mtime."""
    where = vllm_bin or shutil.which("vllm")
    if where is None:
        raise InputError("vllm not found on PATH: install vLLM or pass --vllm-bin PATH")
    binary = Path(where)
    if not binary.is_file() or not os.access(binary, os.X_OK):
        raise InputError(f"--vllm-bin {where}: not an executable file")
    # the very file checked: `./vllm` made `vllm` (Path drops "./") and then ran whatever PATH had
    binary = Path(os.path.abspath(binary))
    real = binary.resolve()
    stat = real.stat()
    key = f"{binary.absolute()}|{real}|{stat.st_mtime_ns}|{stat.st_size}"
    cache_file = _cache_path(cache_dir)
    cache = _read_cache(cache_file)
    if isinstance(cache.get(key), dict):
        with contextlib.suppress(ValueError):
            return VllmInfo.model_validate(cache[key]).model_copy(update={"path": str(binary)})
    _, out = _run_text([str(binary), "--version"], timeout)
    versions = re.findall(r"\b(\d+\.\d+\.\d+[\w.+-]*|\d+\.\d+)\b", out)
    version = versions[-1] if versions else None
    arity: dict[str, str] = {}
    for help_arg in ("--help=all", "--help"):
        rc, text = _run_text([str(binary), "serve", help_arg], timeout)
        arity = parse_help_arity(text) if rc == 0 else {}
        if arity:
            break
    info = VllmInfo(path=str(binary), version=version, flags={f: k != "0" for f, k in arity.items()},
                    arity={f: k for f, k in arity.items() if k in ("?", "+")})
    cache[key] = info.model_dump()
    with contextlib.suppress(OSError):
        atomic_write_text(cache_file, json.dumps(cache, indent=1), make_parents=True)
    return info
