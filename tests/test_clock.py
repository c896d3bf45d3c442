"""The injectable clock: FakeClock's rules (time moves only by sleeps), and deadline.within on it."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from smartrun.clock import EPOCH, SYSTEM, FakeClock, FakeClockStuck
from smartrun.deadline import within


def test_a_fake_clock_moves_only_when_something_sleeps_and_lists_the_sleeps():
    clock = FakeClock(start=100.0)
    assert clock.monotonic() == 100.0 and clock.now() == EPOCH
    clock.sleep(1.5)
    clock.sleep(-3)  # a negative sleep is no sleep, as time.sleep would refuse it
    clock.advance(0.5)  # time passing elsewhere: not a sleep
    assert clock.monotonic() == 102.0 and clock.slept == [1.5, -3]
    assert clock.now() == EPOCH + timedelta(seconds=2)


def test_a_wait_on_a_fake_clock_ends_when_the_event_is_set_or_others_move_the_clock_past_its_end():
    clock, event = FakeClock(), threading.Event()
    threading.Timer(0.05, event.set).start()  # real time passes; the clock stands still
    assert clock.wait_until(event, 1.0) and clock.monotonic() == 0.0

    stop = threading.Event()

    def ticking() -> None:  # another thread taking its time: 0.1 s by the clock every real millisecond
        while not stop.wait(0.001):
            clock.sleep(0.1)

    ticker = threading.Thread(target=ticking)
    ticker.start()
    try:
        end = clock.monotonic() + 1.0
        assert not clock.wait_until(threading.Event(), end)  # ended by the other thread's sleeps, within real ms
        assert clock.monotonic() > end
    finally:
        stop.set()
        ticker.join()


def test_a_wait_nothing_ends_is_a_stuck_test_not_a_timeout(monkeypatch):
    # real time never decides on a FakeClock: a wait neither the event nor the clock ends fails loudly
    clock = FakeClock()
    monkeypatch.setattr(FakeClock, "PATIENCE_S", 0.05)
    with pytest.raises(FakeClockStuck, match="nothing set the event nor moved the clock past 7"):
        clock.wait_until(threading.Event(), 7.0)
    assert clock.monotonic() == 0.0  # no time was made up


def test_io_timed_by_a_clock_gets_its_seconds_on_the_real_clock_and_patience_on_a_fake_one():
    assert SYSTEM.io_limit(0.3) == 0.3
    assert FakeClock().io_limit(0.3) == FakeClock.PATIENCE_S and FakeClock().io_limit(99.0) == 99.0


def test_within_waits_for_the_deadline_read_when_the_call_started():
    # the call's thread moves the clock past the deadline before the waiting thread reaches its wait: the wait
    # is still for the deadline read at the start (not one read again later), so it ends now, not when the call
    # ends in real time
    moved, release, finished = threading.Event(), threading.Event(), threading.Event()

    class LateWaiter(FakeClock):
        def wait_until(self, event: threading.Event, deadline: float) -> bool:
            moved.wait(5)
            return super().wait_until(event, deadline)

    clock = LateWaiter()

    def call() -> None:
        clock.sleep(6.0)
        moved.set()
        release.wait(10)  # no answer in real time until released
        finished.set()

    with pytest.raises(TimeoutError):
        within(5.0, call, clock=clock)
    assert not finished.is_set()
    release.set()


def test_within_counts_a_call_that_ended_past_its_deadline_by_the_clock_as_timed_out():
    clock = FakeClock()
    assert within(5.0, lambda: (clock.sleep(5.0), "on the dot")[1], clock=clock) == "on the dot"
    abandoned: list[bool] = []
    with pytest.raises(TimeoutError, match="no complete answer within 5 s"):
        within(5.0, lambda: clock.sleep(5.001), on_abandon=lambda: abandoned.append(True), clock=clock)
    assert abandoned == [True]
    with pytest.raises(ValueError, match="its own error"):
        within(5.0, lambda: (_ for _ in ()).throw(ValueError("its own error")), clock=clock)


def test_within_on_the_real_clock_abandons_a_call_at_its_deadline():
    release = threading.Event()
    with pytest.raises(TimeoutError):
        within(0.05, lambda: release.wait(10), clock=SYSTEM)
    release.set()
    assert within(5.0, lambda: 42) == 42
