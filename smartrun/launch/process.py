"""`vllm serve` as a child process group: its log streamed, its startup watched until ready, then supervised."""

from __future__ import annotations

import atexit
import contextlib
import os
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

from pydantic import Field

from smartrun import fileio
from smartrun.argv import with_defaults
from smartrun.clock import SYSTEM, Clock
from smartrun.contracts import Plan
from smartrun.errors import InputError
from smartrun.frozen import Frozen
from smartrun.hardware import HardwareSnapshot
from smartrun.launch.command import adapt_argv, endpoint, gpu_env, launch_secrets, served_name
from smartrun.launch.vllm import DEFAULT_STARTUP_TIMEOUT, HEARTBEAT_S, PHASE_WORDS, VllmInfo, find_vllm
from smartrun.secrets import MAX_LINE, redact_text
from smartrun.vllm_log import Failure, Phase, StartupFacts, classify_failure, parse_startup, phase_of

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
    """Starts the real `vllm serve` (or anything that behaves like it) and waits until it is ready.

    The startup deadline, the heartbeat, the polling pace and each attempt's duration are read from `clock`;
    stopping a process group (its grace after SIGTERM) stays on the real clock.
    """

    def __init__(self, vllm_bin: str | None = None, hardware: HardwareSnapshot | None = None, host: str | None = None,
                 port: int | None = None, startup_timeout: float = DEFAULT_STARTUP_TIMEOUT, *,
                 printer: Callable[[str], None] | None = None, progress: Callable[[str], None] | None = None,
                 poll_interval: float = 0.5, keep_lines: int = 400, stop_grace: float = 10.0,
                 info: VllmInfo | None = None, cache_dir: str | Path | None = None,
                 heartbeat_s: float | None = None, ray_address: str | None = None, clock: Clock = SYSTEM):
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
        self.clock = clock

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
        started = self.clock.monotonic()
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
                                 duration_s=round(self.clock.monotonic() - started, 3), **common), None
        tail, startup = stream.snapshot()
        duration = round(self.clock.monotonic() - started, 3)
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
                if self.clock.monotonic() >= next_beat:  # minutes of loading weights must not look like a hang
                    next_beat = self.clock.monotonic() + self.heartbeat_s
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
                if self.clock.monotonic() > deadline:
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
                self._pause(proc)

    def _pause(self, proc: subprocess.Popen) -> None:
        """One poll interval on the clock, cut short when the child exits (checked every 50 ms, as
        Popen.wait(timeout) does)."""
        end = self.clock.monotonic() + self.poll_interval
        while proc.poll() is None and (left := end - self.clock.monotonic()) > 0:
            self.clock.sleep(min(left, 0.05))

    def _heartbeat(self, stream: _LogStream, started: float) -> str:
        """`still starting (loading weights, 45 s of at most 900 s); vLLM last said: ...`."""
        phase = PHASE_WORDS.get(stream.phase, "starting") if stream.phase else "starting up"
        last = stream.last_line() or "(nothing yet)"
        return (f"still starting ({phase}, {self.clock.monotonic() - started:.0f} s of at most "
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
