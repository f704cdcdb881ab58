"""The injected clock: timers, retries and deadlines read time from one place."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Protocol


class Clock(Protocol):
    """Where the engine reads the time and waits.

    A clock whose time moves on its own account (a test's skipping or manual clock)
    says so with a class attribute ``virtual = True``: a worker then judges its own
    hold by the system's wall clock, not by that clock's jumps (:func:`wall_time`).
    """

    def now(self) -> float:
        """POSIX seconds."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""


class SystemClock:
    """Wall-clock time and real waiting."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


def wall_time(clock: Clock) -> Callable[[], float]:
    """The wall clock a worker judges its own hold by, beside monotonic time
    (docs/leases.md, "Paused"): the clock its heartbeats are stamped with and the other
    workers judge it by, ``clock.now``; ``time.time`` itself for the system clock (the
    same reading, without a call of Python code: the step guard asks on every
    resumption of a body) and for a virtual clock, whose jumps are a test's, not a
    pause."""
    if type(clock) is SystemClock or getattr(clock, "virtual", False):
        return time.time
    return clock.now
