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
    takes its time), a wait (this thread waits on work another thread does, until a deadline on this clock)
    and the real-time limit to put on I/O (a socket or asyncio timeout) that stands for seconds of this clock."""

    def monotonic(self) -> float: ...

    def now(self) -> datetime: ...

    def sleep(self, seconds: float) -> None: ...

    def wait_until(self, event: threading.Event, deadline: float) -> bool: ...

    def io_limit(self, seconds: float) -> float: ...


class SystemClock:
    """The machine's clocks: time.monotonic, UTC now, time.sleep."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)

    def sleep(self, seconds: float) -> None:
        time.sleep(max(0.0, seconds))

    def wait_until(self, event: threading.Event, deadline: float) -> bool:
        return event.wait(max(0.0, deadline - time.monotonic()))

    def io_limit(self, seconds: float) -> float:
        return seconds


SYSTEM = SystemClock()

EPOCH = datetime(2026, 1, 1, tzinfo=timezone.utc)


class FakeClockStuck(RuntimeError):
    """A wait on a FakeClock that nothing ended within its real-time patience: a test that hangs."""


class FakeClock:
    """A clock that stands still until something sleeps on it: `sleep(s)` returns at once, s seconds later.

    Shared by threads (a test's scripted server sleeps on the same clock as the code under test, so a reply
    "delayed 30 s" arrives 30 s late by this clock and at once in real time). `slept` lists every sleep, in
    order, for tests that check the waits themselves. Replay runs on one too: its wall time is the record's
    start and nothing it does takes time.
    """

    PATIENCE_S = 30.0  # real seconds after which a wait (or I/O timed by this clock) is a stuck test, not a timeout

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

    def wait_until(self, event: threading.Event, deadline: float) -> bool:
        """True once `event` is set; False once other threads' sleeps have moved the clock past `deadline`.

        Time stands still while this thread waits: work done elsewhere in real time takes none of it, however
        slow the machine (only this clock decides: no real-time limit may end a wait early). Work that ends
        exactly at the deadline is waited for (a deadline is met on the dot). After PATIENCE_S of real time with
        neither, the test is stuck: FakeClockStuck, never a timeout decided by the machine's speed."""
        given_up = time.monotonic() + self.PATIENCE_S
        while not event.is_set():
            if self.monotonic() > deadline:
                return False
            if time.monotonic() > given_up:
                raise FakeClockStuck(f"FakeClock: nothing set the event nor moved the clock past {deadline:g} "
                                     f"in {self.PATIENCE_S:g} s of real time")
            event.wait(0.001)
        return True

    def io_limit(self, seconds: float) -> float:
        """This clock's seconds pass only by sleeps, never in real time: I/O that stands for them is given the
        patience of a stuck test, so a loaded machine's slow socket never cuts short what is on time by it."""
        return max(seconds, self.PATIENCE_S)

    def advance(self, seconds: float) -> None:
        """Move the time on without it counting as a sleep (time that passes elsewhere)."""
        with self._lock:
            self._now += max(0.0, seconds)
