"""Wall-clock limits for blocking calls whose own timeouts are per read (a server that trickles its answer a
byte at a time never trips a per-read timeout, so only the wall clock can end the wait)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from smartrun.clock import SYSTEM, Clock


def within(seconds: float, call: Callable[[], Any], on_abandon: Callable[[], None] | None = None,
           clock: Clock = SYSTEM) -> Any:
    """`call()`'s result, or TimeoutError once `seconds` have passed; its exception is re-raised here.

    The call runs in a daemon thread; an abandoned one is left to end on its own per-read timeout after
    `on_abandon` (e.g. closing the client) has dropped what it can. Ctrl+C still interrupts the wait.
    The wait is on `clock`, until the one deadline read before the call starts (a second read could fall after
    other threads moved the clock); a call that finished past it by the clock timed out too (on a test's
    FakeClock a server "delayed" 30 s answers at once in real time, but 30 s late by the clock).
    """
    box: dict[str, Any] = {}
    done = threading.Event()
    deadline = clock.monotonic() + max(0.0, seconds)

    def work() -> None:
        try:
            box["value"] = call()
        except BaseException as err:  # handed to the waiting thread
            box["error"] = err
        finally:
            box["finished"] = clock.monotonic()
            done.set()

    threading.Thread(target=work, name="smartrun-deadline", daemon=True).start()
    if not clock.wait_until(done, deadline) or box["finished"] > deadline:
        if on_abandon is not None:
            on_abandon()
        raise TimeoutError(f"no complete answer within {seconds:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]
