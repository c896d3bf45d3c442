"""Stage 7, launch: a validated plan -> a healthy `vllm serve`, recovering inside the bounds when it fails.

- `find_vllm` finds the binary, its version and the flags it accepts (cached by path + mtime);
  `adapt_argv` drops or translates flags this version does not know, with a warning naming each.
- `ProcessLauncher` starts vllm in its own process group, streams its log, shows the startup phases,
  polls /health then /v1/models until ready, a timeout, or the child's death; Ctrl+C / SIGTERM stop
  the whole group. `Server` supervises a ready child.
- `run_with_recovery` loops: launch, classify the failure (vllm_log), ask the advisor and then the
  recovery ladder for the next plan, pass it through the validator, bounded attempts.
The process part sits behind the `Launcher` protocol so a session replay can serve recorded outcomes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

from smartrun.argv import with_defaults
from smartrun.contracts import Change, LaunchEvent, Plan, Proposal
from smartrun.errors import InputError, LaunchError
from smartrun.fileio import atomic_write_text
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.secrets import MAX_LINE, redact_text
from smartrun.vllm_log import Failure, Phase, StartupFacts, classify_failure, parse_startup, phase_of

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


# ------------------------------------------------------------------------------ finding vllm


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
    from importlib import resources

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
        import platformdirs

        cache_dir = platformdirs.user_cache_dir("localaistack")
    return Path(cache_dir) / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    from smartrun import fileio

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


# ------------------------------------------------------------------------------ argv and env


def _translate(flag: str, value: str | None, info: VllmInfo) -> tuple[list[str] | None, str]:
    """Tokens replacing a flag this vllm does not know (None = drop), and the warning to print."""
    ver = info.version or "?"
    if flag in ("--optimization-level", "-O"):
        if value == "0" and "--enforce-eager" in info.flags:
            return ["--enforce-eager"], f"vllm {ver} has no --optimization-level: -O0 translated to --enforce-eager"
        return None, f"vllm {ver} has no --optimization-level (before 0.12 -O meant --compilation-config): dropped"
    shown = f"{flag} {value}" if value is not None else flag
    if flag == "--swap-space":
        return None, f"vllm {ver} does not accept {shown} (removed in 0.18): dropped"
    pairs = [("--no-enable-", "--disable-"), ("--disable-", "--no-enable-"), ("--enable-", "--"),
             ("--no-", "--disable-")]
    for old, new in pairs:
        if flag.startswith(old) and (alt := new + flag[len(old):]) in info.flags:
            return [alt], f"vllm {ver} does not know {flag}: translated to {alt}"
    return None, f"vllm {ver} does not accept {shown}: dropped"


def adapt_argv(argv: Sequence[str], info: VllmInfo) -> tuple[list[str], list[str]]:
    """The argv this vllm accepts: unknown flags dropped or translated, each with a warning naming it."""
    from smartrun.argv import tokenize

    if not info.flags:
        return list(argv), [f"could not read the flags of {info.path} (serve --help): argv passed unchanged"]
    out: list[str] = []
    warnings: list[str] = []
    for token in tokenize(argv, info.arity_of):
        flag = token.flag
        if flag is None or (token.dotted is not None and flag in info.flags):  # -cc.cudagraph_mode=NONE
            out += token.raw
            continue
        if flag == "-O":  # before 0.12, -O meant --compilation-config: same spelling, other meaning
            known = _version_tuple(info.version) >= (0, 12) if info.version else "--optimization-level" in info.flags
        else:
            known = flag in info.flags
        if known:
            out += token.raw
            continue
        replacement, warning = _translate(flag, token.values[0] if token.values else None, info)
        warnings.append(warning)
        if replacement:
            out += replacement
    return out, warnings


def gpu_env(hardware: HardwareSnapshot | None, params: dict[str, Any],
            ray_address: str | None = None) -> tuple[dict[str, str], list[str]]:
    """CUDA_VISIBLE_DEVICES for tp*pp*dp GPUs chosen by rules.select_gpus, in NVML's (PCI) order; on a Ray cluster
    RAY_ADDRESS instead (Ray gives every worker its GPU on its own node).

    The indices are nvidia-smi's (a snapshot restricted by --gpus / CUDA_VISIBLE_DEVICES maps its GPUs back),
    and CUDA_DEVICE_ORDER=PCI_BUS_ID makes CUDA number them the same way, so vLLM's cuda:0.. are exactly these.
    """
    if ray_address:
        return {"RAY_ADDRESS": ray_address}, []
    if hardware is None or not hardware.gpus:
        return {}, []
    from smartrun import rules
    from smartrun.contracts import gpus_used
    from smartrun.hardware import physical_index

    count = gpus_used(params)
    chosen = rules.select_gpus(hardware, count)
    indices = ",".join(str(physical_index(hardware, g.index)) for g in chosen)
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": indices}
    warnings = []
    if hardware.source != "nvml":
        warnings.append(f"the plan was made for the machine in the snapshot {hardware.source}; "
                        f"CUDA_VISIBLE_DEVICES={indices} comes from its GPU indices")
    return env, warnings


def command_line(argv: Sequence[str], env_changes: dict[str, str] | None = None) -> str:
    """The shell line to rerun this launch by hand: env prefix, then the quoted argv."""
    prefix = [f"{k}={shlex.quote(v)}" for k, v in sorted((env_changes or {}).items())]
    return " ".join([*prefix, shlex.join(list(argv))])


def shown_command_line(argv: Sequence[str], env_changes: dict[str, str] | None = None) -> str:
    """command_line for printing, events and records: secret flag values and credential env vars hidden."""
    from smartrun.secrets import redact_argv, redact_env, redact_text

    secrets = launch_secrets(argv, env_changes)
    return redact_text(command_line(redact_argv(argv, secrets), redact_env(env_changes or {}, secrets)), secrets)


def launch_secrets(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[str, ...]:
    """The secrets of one launch: secret flag values in argv and credentials in the child's environment."""
    from smartrun.secrets import launch_env_secrets, secret_values

    return tuple(dict.fromkeys((*secret_values(argv), *launch_env_secrets(env))))


def served_name(argv: Sequence[str]) -> str | None:
    """The first --served-model-name in argv: the name vLLM serves (and /v1/models lists) the model under."""
    from smartrun import argv as argv_mod

    names = argv_mod.values_of(argv, "served_model_name")
    return str(names[0]) if names else None


def endpoint(argv: Sequence[str], host: str | None = None, port: int | None = None) -> tuple[str, int, str | None]:
    """(host, port, first API key) vllm will serve with: the last --host/--port/--api-key in any spelling,
    else the given defaults (vLLM's port 8000) and VLLM_API_KEY."""
    from smartrun.argv import last, tokenize

    tokens = tokenize(argv)
    found = {name: (tok.values if tok is not None else ()) for name in ("host", "port", "api_key")
             for tok in [last(tokens, name)]}
    host_text = found["host"][0] if found["host"] else (host or "127.0.0.1")
    try:
        port_number = int(found["port"][0]) if found["port"] else int(port or 8000)
    except ValueError:
        raise InputError(f"--port {found['port'][0]!r}: not a TCP port") from None
    key = found["api_key"][0] if found["api_key"] else None
    return host_text, port_number, key


# ------------------------------------------------------------------------------ attempts and servers

Outcome = Literal["ready", "failed", "interrupted"]


class LaunchAttempt(Frozen):
    """One start of vllm serve and how it ended; `number` is set by run_with_recovery."""

    number: int = 0
    params: dict[str, Any] = Field(default_factory=dict)
    argv: tuple[str, ...] = ()
    env_changes: dict[str, str] = Field(default_factory=dict)
    outcome: Outcome
    failure_class: str | None = None
    evidence: str | None = None
    estimated_max_model_len: int | None = None
    failure_details: dict[str, Any] = Field(default_factory=dict)
    exit_code: int | None = None
    log_excerpt: tuple[str, ...] = ()
    duration_s: float = 0.0
    facts: StartupFacts | None = None
    base_url: str | None = None
    served_max_model_len: int | None = None  # from /v1/models: the effective value after auto-fit

    @property
    def failure(self) -> Failure | None:
        if self.failure_class is None:
            return None
        return Failure(klass=self.failure_class, evidence=self.evidence or "", exit_code=self.exit_code,
                       estimated_max_model_len=self.estimated_max_model_len, details=self.failure_details)


def _failed(failure: Failure, **fields: Any) -> LaunchAttempt:
    return LaunchAttempt(outcome="failed", failure_class=failure.klass, evidence=failure.evidence,
                         estimated_max_model_len=failure.estimated_max_model_len,
                         failure_details=failure.details, exit_code=failure.exit_code, **fields)


class _LogStream(threading.Thread):
    """Reads the child's output: prints it, keeps the tail (and the startup lines), announces phases."""

    def __init__(self, stream: Any, printer: Callable[[str], None], progress: Callable[[str], None], keep: int,
                 secrets: Sequence[str] = ()):
        super().__init__(daemon=True)
        self.stream, self.printer, self.progress = stream, printer, progress
        self.secrets = tuple(secrets)  # vLLM echoes its args ("non-default args: {... 'api_key': ...}")
        self.tail: deque[str] = deque(maxlen=keep)
        self.startup: list[str] = []
        self.collect_startup = True
        self.lock = threading.Lock()
        self.seen: set[Phase] = set()
        self.phase: Phase | None = None  # the latest startup phase vLLM's log showed

    def run(self) -> None:
        for raw in _capped_lines(self.stream):
            line = redact_text(raw, self.secrets)
            with self.lock:
                self.tail.append(line)
                if self.collect_startup and len(self.startup) < 50000:
                    self.startup.append(line)
            with contextlib.suppress(Exception):
                self.printer(line)
            phase = phase_of(line)
            if phase:
                self.phase = phase
            if phase and phase not in self.seen:
                self.seen.add(phase)
                with contextlib.suppress(Exception):
                    self.progress(PHASE_WORDS[phase])
        with contextlib.suppress(OSError):
            self.stream.close()

    def snapshot(self) -> tuple[list[str], list[str]]:
        with self.lock:
            return list(self.tail), list(self.startup)

    def last_line(self, limit: int = 160) -> str:
        """vLLM's latest non-blank line, shortened for a one-line status."""
        with self.lock:
            line = next((ln.strip() for ln in reversed(self.tail) if ln.strip()), "")
        return line if len(line) <= limit else line[: limit - 3] + "..."


def _capped_lines(stream: Any, limit: int = MAX_LINE) -> Iterator[str]:
    """The stream's lines without their newline, each cut to `limit` characters (counted, then discarded)
    while it is read, so a giant line never sits in memory whole nor reaches a regex."""
    while True:
        piece = stream.readline(limit + 1)
        if not piece:
            return
        if piece.endswith("\n") or len(piece) <= limit:
            yield piece.rstrip("\n")
            continue
        cut = len(piece) - limit
        while True:  # the rest of this line: count it, keep none of it
            more = stream.readline(1 << 20)
            if not more:
                break
            cut += len(more) - more.endswith("\n")
            if more.endswith("\n"):
                break
        yield f"{piece[:limit]} ... [{cut} characters cut]"


_LIVE: set[subprocess.Popen] = set()


def _stop_group(proc: subprocess.Popen, grace: float = 10.0) -> int | None:
    """SIGTERM the child's whole process group, wait, then SIGKILL what is left (no orphans)."""
    pgid = proc.pid  # start_new_session=True: the child leads its own group
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
    _kill_leftovers(pgid)
    _LIVE.discard(proc)
    return proc.returncode


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies waiting for their reaper do not count)."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _kill_leftovers(pgid: int, wait_s: float = 3.0) -> None:
    """Workers the child left behind in its group (vLLM engine cores) get SIGKILL; wait until they are gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        with contextlib.suppress(Exception):
            _stop_group(proc, grace=3.0)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _ensure_sigterm_handler() -> None:
    """Once a vllm child exists, SIGTERM must unwind like Ctrl+C (atexit then stops the group), not kill us
    on the spot and orphan it. Only where nobody installed a handler of their own."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_interrupt)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While waiting on vllm, SIGTERM behaves like Ctrl+C so the child group is stopped, not orphaned."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class Server:
    """A ready vllm serve: `base_url`, `wait()` to supervise it, `stop()` to end its whole group."""

    def __init__(self, proc: subprocess.Popen, stream: _LogStream, base_url: str, attempt: LaunchAttempt,
                 progress: Callable[[str], None]):
        self.proc, self.stream, self.base_url, self.attempt = proc, stream, base_url, attempt
        self.progress = progress
        self.failure: Failure | None = None
        self._stopped = False

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """Supervise until the child exits; a death we did not ask for sets `failure` (died_after_ready)."""
        try:
            with _sigterm_as_interrupt():
                code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        except KeyboardInterrupt:
            self.stop()
            raise
        _kill_leftovers(self.proc.pid)  # workers hold the log pipe open: end them before draining it
        self.stream.join(5)
        _LIVE.discard(self.proc)
        if not self._stopped:
            tail, _ = self.stream.snapshot()
            cause = classify_failure(tail, code)
            evidence = cause.evidence if cause else f"exit status {code}"
            self.failure = Failure(klass="died_after_ready", evidence=evidence, exit_code=code,
                                   details={"cause": cause.klass if cause else None})
            self.progress(f"vllm serve died after it was ready (exit {code}): {evidence}")
        return code

    def stop(self, grace: float = 10.0) -> int | None:
        self._stopped = True
        code = _stop_group(self.proc, grace)
        self.stream.join(5)
        return code


class Launcher(Protocol):
    def start(self, plan: Plan, argv: list[str], env: dict[str, str]) -> tuple[LaunchAttempt, Server | None]: ...


def _default_printer(line: str) -> None:
    print(line, flush=True)


def _default_progress(text: str) -> None:
    print(f"localaistack: [{text}]", file=sys.stderr, flush=True)


def port_in_use(host: str, port: int) -> bool:
    """True when host:port cannot be bound (something listens there), checked the way vLLM binds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


class ProcessLauncher:
    """Starts the real `vllm serve` (or anything that behaves like it) and waits until it is ready."""

    def __init__(self, vllm_bin: str | None = None, hardware: HardwareSnapshot | None = None, host: str | None = None,
                 port: int | None = None, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT, *,
                 printer: Callable[[str], None] | None = None, progress: Callable[[str], None] | None = None,
                 poll_interval: float = 0.5, keep_lines: int = 400, stop_grace: float = 10.0,
                 info: VllmInfo | None = None, cache_dir: str | Path | None = None,
                 heartbeat_s: float | None = None, ray_address: str | None = None):
        if not (isinstance(startup_timeout, int | float) and 0 < startup_timeout < float("inf")):
            raise InputError(f"--startup-timeout {startup_timeout}: must be a positive number of seconds")
        self.vllm_bin, self.hardware, self.host, self.port = vllm_bin, hardware, host, port
        self.startup_timeout, self.poll_interval, self.keep_lines = startup_timeout, poll_interval, keep_lines
        self.printer = printer or _default_printer
        self.progress = progress or _default_progress
        self.stop_grace, self.cache_dir = stop_grace, cache_dir
        self.heartbeat_s = HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.ray_address = ray_address  # launching on a Ray cluster: vllm serve finds it through RAY_ADDRESS
        self._info = info
        self._warned: set[str] = set()

    @property
    def info(self) -> VllmInfo:
        if self._info is None:
            self._info = find_vllm(self.vllm_bin, cache_dir=self.cache_dir)
        return self._info

    def prepare(self, plan: Plan, argv: Sequence[str]) -> tuple[list[str], dict[str, str], list[str]]:
        """The argv this vllm accepts (its path first, --host/--port as asked) and the env changes."""
        info = self.info
        argv = list(argv)
        if argv and Path(argv[0]).name == "vllm":
            argv[0] = info.path
        argv = with_defaults(argv, {"host": self.host, "port": self.port})
        argv, warnings = adapt_argv(argv, info)
        env, env_warnings = gpu_env(self.hardware, plan.params, self.ray_address)
        fresh = [w for w in warnings + env_warnings if w not in self._warned]  # once per launcher, not per attempt
        self._warned.update(fresh)
        return argv, env, fresh

    def start(self, plan: Plan, argv: list[str], env: dict[str, str]) -> tuple[LaunchAttempt, Server | None]:
        started = time.monotonic()
        host, port, key = endpoint(argv, self.host, self.port)
        key = key or {**os.environ, **env}.get("VLLM_API_KEY")
        poll_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
        base_url = f"http://{'[' + poll_host + ']' if ':' in poll_host else poll_host}:{port}"
        common = {"params": dict(plan.params), "argv": tuple(argv), "env_changes": dict(env), "base_url": base_url}
        if port_in_use(host if host not in ("",) else "0.0.0.0", port):
            busy = Failure(klass="port_in_use", evidence=f"{host}:{port} is already in use (checked before "
                                                            "starting vllm): [Errno 98] Address already in use")
            return _failed(busy, **common), None
        _ensure_sigterm_handler()
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env}, start_new_session=True, text=True, errors="replace",
                                    bufsize=1)
        except OSError as err:  # not executable after all, a bad interpreter line, gone since find_vllm
            raise InputError(f"cannot start {argv[0]}: {err.strerror or err}") from None
        _LIVE.add(proc)
        stream = _LogStream(proc.stdout, self.printer, self.progress, self.keep_lines, launch_secrets(argv, env))
        stream.start()
        try:
            with _sigterm_as_interrupt():
                served_len, failure = self._await_ready(proc, stream, base_url, started, key, served_name(argv))
        except KeyboardInterrupt:
            _stop_group(proc, self.stop_grace)
            stream.join(5)
            tail, _ = stream.snapshot()
            return LaunchAttempt(outcome="interrupted", log_excerpt=tuple(tail[-40:]), exit_code=proc.returncode,
                                 duration_s=round(time.monotonic() - started, 3), **common), None
        tail, startup = stream.snapshot()
        duration = round(time.monotonic() - started, 3)
        if failure is not None:
            return _failed(failure, log_excerpt=tuple(tail[-40:]), duration_s=duration,
                           facts=parse_startup(startup), **common), None
        stream.collect_startup = False
        attempt = LaunchAttempt(outcome="ready", log_excerpt=tuple(tail[-40:]), duration_s=duration,
                                facts=parse_startup(startup), served_max_model_len=served_len, **common)
        return attempt, Server(proc, stream, base_url, attempt, self.progress)

    def _await_ready(self, proc: subprocess.Popen, stream: _LogStream, base_url: str, started: float,
                     api_key: str | None = None, name: str | None = None) -> tuple[int | None, Failure | None]:
        """Poll /health then /v1/models until ready, the child's death or the startup deadline.

        Refused connections are normal while vllm loads. Each check runs in a daemon thread, one at a time,
        so a server that trickles its answers cannot stretch the wait past the deadline.
        Ready means /v1/models lists `name` (the --served-model-name clients will ask for), when one is given.
        """
        import httpx

        deadline = started + self.startup_timeout
        next_beat = started + self.heartbeat_s
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        check = _Background()
        with httpx.Client(timeout=2.0, trust_env=False, headers=headers) as client:
            while True:
                if time.monotonic() >= next_beat:  # minutes of loading weights must not look like a hang
                    next_beat = time.monotonic() + self.heartbeat_s
                    self.progress(self._heartbeat(stream, started))
                code = proc.poll()
                if code is not None:
                    _kill_leftovers(proc.pid)
                    stream.join(5)
                    _LIVE.discard(proc)
                    tail, _ = stream.snapshot()
                    found = classify_failure(tail, code) or Failure(
                        klass="unknown", evidence=f"vllm serve exited with status {code} before it was ready",
                        exit_code=code)
                    return None, found
                if time.monotonic() > deadline:
                    before_stop, _ = stream.snapshot()  # its last word, not the "Shutting down" our stop causes
                    _stop_group(proc, self.stop_grace)
                    stream.join(5)
                    last = next((ln for ln in reversed(before_stop) if ln.strip()), "(no output)")
                    return None, Failure(klass="startup_timeout", exit_code=proc.returncode,
                                         evidence=f"not ready after {self.startup_timeout:g} s; last line: {last}",
                                         details={"startup_timeout_s": self.startup_timeout})
                done, listing = check.take()
                if done and listing is not None and proc.poll() is None:
                    return self._served_card(proc, stream, listing[0], name)
                if not check.running():
                    check.start(lambda: _ready_check(client, base_url))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(self.poll_interval)


    def _heartbeat(self, stream: _LogStream, started: float) -> str:
        """`still starting (loading weights, 45 s of at most 900 s); vLLM last said: ...`."""
        phase = PHASE_WORDS.get(stream.phase, "starting") if stream.phase else "starting up"
        last = stream.last_line() or "(nothing yet)"
        return (f"still starting ({phase}, {time.monotonic() - started:.0f} s of at most "
                f"{self.startup_timeout:g} s); vLLM last said: {last}")

    def _served_card(self, proc: subprocess.Popen, stream: _LogStream, listing: Any,
                     name: str | None) -> tuple[int | None, Failure | None]:
        """max_model_len of the card for `name` (else the first card); a server that does not list `name` is
        stopped and reported: clients asking for that name would get 404."""
        cards = [c for c in (listing.get("data") or []) if isinstance(c, dict)] or [{}]
        if name is None:
            return cards[0].get("max_model_len"), None
        card = next((c for c in cards if c.get("id") == name), None)
        if card is not None:
            return card.get("max_model_len"), None
        listed = ", ".join(str(c.get("id")) for c in cards)
        _stop_group(proc, self.stop_grace)
        stream.join(5)
        return None, Failure(klass="unknown", exit_code=proc.returncode,
                             evidence=f"vllm serve came up but /v1/models lists {listed}, not the served name {name}")


MAX_MODELS_BYTES = 4 * 1024 * 1024  # a /v1/models answer larger than this is not vLLM's


def _ready_check(client: Any, base_url: str) -> tuple[dict[str, Any]] | None:
    """(the /v1/models listing,) when /health is 200 and /v1/models answers a JSON object; None when not yet."""
    import httpx

    from smartrun import fileio

    try:
        if client.get(base_url + "/health").status_code != 200:
            return None
        with client.stream("GET", base_url + "/v1/models") as models:
            if models.status_code != 200:
                return None
            body = bytearray()
            for chunk in models.iter_bytes():
                body += chunk
                if len(body) > MAX_MODELS_BYTES:
                    return None
        data = fileio.loads_json(bytes(body))
        if not isinstance(data, dict) or not isinstance(data.get("data") or [], list):
            return None
        return (data,)
    except (httpx.HTTPError, ValueError, RecursionError, UnicodeDecodeError):
        return None


class _Background:
    """One call at a time in a daemon thread; `take()` hands over a finished call's result once."""

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._result: Any = None
        self._done = False

    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, fn: Callable[[], Any]) -> None:
        self._done = False

        def work() -> None:
            try:
                self._result = fn()
            except Exception:  # a check that broke is a check that said "not yet"
                self._result = None
            self._done = True

        self._thread = threading.Thread(target=work, name="smartrun-readiness", daemon=True)
        self._thread.start()

    def take(self) -> tuple[bool, Any]:
        if self._thread is None or self.running() or not self._done:
            return False, None
        self._thread, done, result = None, self._done, self._result
        return done, result


# ------------------------------------------------------------------------------ the recovery loop


class LaunchReport(BaseModel):
    """What run_with_recovery did: every attempt, the final plan and argv, and the running server."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    ok: bool
    attempts: tuple[LaunchAttempt, ...]
    plan: Plan
    argv: tuple[str, ...] = ()
    env_changes: dict[str, str] = Field(default_factory=dict)
    command_line: str = ""
    summary: str = ""
    server: Any = Field(default=None, exclude=True)


def _cumulative(original: Plan, current: Plan, changes: Sequence[Change], source: str, reason: str) -> Proposal:
    """All differences from the validated original plan plus the new changes, so `check` sees the whole step."""
    merged: dict[str, Change] = {}
    for knob, value in current.params.items():
        if original.params.get(knob) != value:
            merged[knob] = Change(knob=knob, value=value, reason=current.provenance.get(knob, "earlier recovery"))
    for change in changes:
        merged[change.knob] = change
    return Proposal(changes=tuple(merged.values()), reason=reason, source=source)


def _as_changes(current: Plan, suggestion: Any) -> tuple[list[Change], str]:
    if isinstance(suggestion, Proposal):
        return list(suggestion.changes), suggestion.reason
    if isinstance(suggestion, Plan):
        changes = [Change(knob=k, value=v, reason=suggestion.provenance.get(k, suggestion.reason or "advisor"))
                   for k, v in suggestion.params.items() if current.params.get(k) != v]
        return changes, suggestion.reason or "advisor recover"
    return [], ""


def _summary(attempts: Sequence[LaunchAttempt], stop: str | None) -> str:
    parts = [f"#{a.number} {a.failure_class or a.outcome}: {(a.evidence or '')[:160]}" for a in attempts]
    text = f"vllm serve did not become healthy after {len(attempts)} attempt(s): " + "; ".join(parts)
    return text + (f". Stopped: {stop}" if stop else ". Attempt limit reached: raise --max-attempts or widen the bounds")


def _describe_change(before: Plan, after: Plan) -> str:
    diffs = [f"{k} {before.params.get(k)} -> {v} ({after.provenance.get(k, after.source)})"
             for k, v in after.params.items() if before.params.get(k) != v]
    return "; ".join(diffs) or "no change"


def run_with_recovery(plan: Plan, bounds: Any, launcher: Launcher, *, check: Callable[[Proposal], Any],
                      advisor_recover: Callable[..., Any] | None = None, max_attempts: int = 3,
                      on_event: Callable[[LaunchEvent], None] = print, model_path: str | None = None,
                      passthrough: Sequence[str] = (), build_argv: Callable[..., list[str]] | None = None,
                      ) -> LaunchReport:
    """Launch; on failure classify, ask the advisor then the ladder, validate, retry; bounded attempts.

    `check(proposal)` is the validator bound to `plan`; every retry is expressed as the full set of
    changes from `plan`, so the validator judges the whole step. `advisor_recover(current_plan, attempts,
    failure)` may return a Plan, a Proposal or None. Raises LaunchError (exit 4) with a summary when no
    attempt becomes healthy; KeyboardInterrupt after stopping the child when the user interrupts.
    """
    from smartrun import recovery
    from smartrun.knobs import build_argv as catalogue_argv

    make_argv = build_argv if build_argv is not None else catalogue_argv
    model = model_path or getattr(launcher, "model_path", None)
    if model is None:
        raise InputError("run_with_recovery needs model_path (the model argument of vllm serve)")
    attempts: list[LaunchAttempt] = []
    current, stop_reason = plan, None
    for number in range(1, max_attempts + 1):
        argv = make_argv(model, current.params, tuple(passthrough))
        env: dict[str, str] = {}
        prepare: Callable[..., Any] | None = getattr(launcher, "prepare", None)
        if prepare is not None:
            argv, env, warnings = prepare(current, argv)
            for warning in warnings:
                on_event(LaunchEvent(kind="warning", text=warning))
        on_event(LaunchEvent(text=f"attempt {number}/{max_attempts}: {shown_command_line(argv, env)}"))
        attempt, server = launcher.start(current, list(argv), dict(env))
        attempt = attempt.model_copy(update={"number": number})
        attempts.append(attempt)
        if attempt.outcome == "interrupted":
            on_event(LaunchEvent(text=f"attempt {number} interrupted; vllm serve stopped"))
            raise KeyboardInterrupt
        if attempt.outcome == "ready" and server is not None:
            line = shown_command_line(argv, env)
            on_event(LaunchEvent(text=f"vllm serve is ready at {attempt.base_url} (attempt {number}, "
                                      f"{attempt.duration_s:.1f} s)"))
            on_event(LaunchEvent(kind="command", text=line))
            return LaunchReport(ok=True, attempts=tuple(attempts), plan=current, argv=tuple(argv), env_changes=env,
                                command_line=line, summary=f"ready after {number} attempt(s)", server=server)
        failure = attempt.failure or Failure(klass="unknown", evidence="no server handle returned")
        on_event(LaunchEvent(text=f"attempt {number} failed: {failure.klass}: {failure.evidence}"))
        if number == max_attempts:
            break
        nxt, stop_reason = _next_plan(plan, current, bounds, failure, attempts, check, advisor_recover, on_event,
                                      recovery)
        if nxt is None:
            break
        on_event(LaunchEvent(text=f"retrying with {_describe_change(current, nxt)}"))
        current = nxt
    summary = _summary(attempts, stop_reason)
    on_event(LaunchEvent(text=summary))
    error = LaunchError(summary)
    error.report = LaunchReport(ok=False, attempts=tuple(attempts), plan=current, summary=summary)  # type: ignore[attr-defined]
    raise error


def _next_plan(original: Plan, current: Plan, bounds: Any, failure: Failure, attempts: Sequence[LaunchAttempt],
               check: Callable[[Proposal], Any], advisor_recover: Callable[..., Any] | None,
               on_event: Callable[[LaunchEvent], None], recovery: Any) -> tuple[Plan | None, str | None]:
    """The advisor's proposal if the validator accepts it, else the first accepted ladder rung, else Stop."""
    tried = [dict(a.params) for a in attempts]

    def accept(changes: Sequence[Change], source: str, reason: str) -> Plan | None:
        if not changes:
            return None
        verdict = check(_cumulative(original, current, changes, source, reason))
        if not verdict.accepted:
            why = "; ".join(f"{r.knob}={r.value}: {r.reason}" for r in verdict.rejections)
            on_event(LaunchEvent(text=f"{source} proposal rejected by the bounds: {why}"))
            return None
        if dict(verdict.plan.params) in tried:
            return None
        return verdict.plan

    if advisor_recover is not None:
        try:
            suggestion = advisor_recover(current, tuple(attempts), failure)
        except Exception as err:  # the LLM is optional: fall back to the ladder
            on_event(LaunchEvent(text=f"advisor recover failed ({err}); using the recovery ladder"))
            suggestion = None
        changes, reason = _as_changes(current, suggestion)
        if (got := accept(changes, "llm", reason or "advisor recover")) is not None:
            return got, None
    proposals, stop = recovery.candidates(failure, current, bounds, attempts)
    for proposal in proposals:
        if (got := accept(proposal.changes, "recovery", proposal.reason)) is not None:
            return got, None
    on_event(LaunchEvent(text=f"no recovery: {stop.message()}"))
    return None, stop.message()
