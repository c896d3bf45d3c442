"""Time as a part that can be swapped: the real clock for runs, a clock that only moves when told for tests
and replay, so every timeout, budget, backoff and heartbeat can be checked without waiting for it.

Whatever decides on time (the advisor's --llm-timeout budget and retries, the launcher's --startup-timeout,
readiness polling and heartbeat, the probe's duration and per-request timeout) reads `monotonic()` and
paces itself with `sleep()` of the clock it was handed. Waits on the operating system (a child process
group dying after SIGTERM) stay on the real clock: those are not decisions.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from typing import Protocol


class Clock(Protocol):
    """Monotonic seconds for durations and deadlines, wall time for record timestamps, a sleep (this thread
    takes its time) and a wait (this thread waits on work another thread does, at most `seconds`)."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...

    def wait(self, event: threading.Event, seconds: float) -> bool: ...


class SystemClock:
    """The machine's clocks: time.monotonic, UTC now, time.sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(max(0.0, seconds))


SYSTEM = SystemClock()

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


class FakeClock:
    """A clock that stands still until something sleeps on it: `sleep(s)` returns at once, s seconds later.

    Shared by threads (a test's scripted server sleeps on the same clock as the code under test, so a reply
    "delayed 30 s" arrives 30 s late by this clock and at once in real time). `slept` lists every sleep, in
    order, for tests that check the waits themselves. Replay runs on one too: its wall time is the record's
    start and nothing it does takes time.
    """

    PATIENCE_S = 30.0  # real seconds a wait lasts when nothing sets its event nor moves the clock (a stuck test)

    def __init__(self, start: float = 0.0, wall: datetime = EPOCH):
        self._lock = threading.Lock()
        self._start = self._now = float(start)
        self._wall = wall
        self.slept: list[float] = []

    def monotonic(self) -> float:
        with self._lock:
            return self._now

    def now(self) -> datetime:
        return self._wall + timedelta(seconds=self.monotonic() - self._start)

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self.slept.append(seconds)
            self._now += max(0.0, seconds)
        time.sleep(0)  # let other threads run, as a real sleep would

    def wait(self, event: threading.Event, seconds: float) -> bool:
        """True once `event` is set; False once other threads' sleeps have moved the clock past `seconds` on.

        Time stands still while this thread waits: work done elsewhere in real time takes none of it. Work that
        ends exactly at the end of the wait is waited for (a deadline is met on the dot)."""
        end = self.monotonic() + max(0.0, seconds)
        given_up = time.monotonic() + self.PATIENCE_S
        while not event.is_set():
            if self.monotonic() > end:
                return False
            if time.monotonic() > given_up:
                with self._lock:
                    self._now = max(self._now, end)
                return event.is_set()
            event.wait(0.001)
        return True

    def advance(self, seconds: float) -> None:
        """Move the time on without it counting as a sleep (time that passes elsewhere)."""
        with self._lock:
            self._now += max(0.0, seconds)
