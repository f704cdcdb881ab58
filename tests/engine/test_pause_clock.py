"""The pause clock's readings while its thread notes a stall: each stall counted once.

A reading taken while the thread is between noting a gap and moving its last tick (or
between the reading's own steps) must neither lose the gap nor count it twice: a
handler's guard and the check made at its stop must agree (docs/leases.md, "Paused past
the lease")."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator

import pytest

from cantata.fencing import PauseClock

EVERY = 0.05
STALL = 2.0


class _Gaps(deque[tuple[float, float]]):
    """The clock's gaps, running ``tick`` (the thread's turn) at one point of a copy."""

    def __init__(self, tick: Callable[[], None], when: str) -> None:
        super().__init__(maxlen=64)
        self.tick, self.when, self.armed = tick, when, True

    def __iter__(self) -> Iterator[tuple[float, float]]:
        if self.armed and self.when == "before copy":
            self.armed = False
            self.tick()
        items = list(super().__iter__())
        if self.armed and self.when == "after copy":
            self.armed = False
            self.tick()
        return iter(items)


def _stalled_clock(when: str) -> tuple[PauseClock, float]:
    """A clock (no thread of its own) whose last tick was STALL seconds ago, its thread
    noting that gap during the next reading, at ``when``."""
    clock = object.__new__(PauseClock)
    clock._every = EVERY
    clock._last = time.monotonic() - STALL

    def tick() -> None:  # (PauseClock._run's turn, after the stall)
        now = time.monotonic()
        clock._gaps.append((clock._last, now))
        clock._last = now

    clock._gaps = _Gaps(tick, when)
    return clock, clock._last


@pytest.mark.parametrize("when", ["before copy", "after copy"])
def test_a_stall_noted_during_a_reading_is_counted_once(when: str) -> None:
    clock, began = _stalled_clock(when)
    first = clock.stood_still(began - 1, time.monotonic() + 1)
    second = clock.stood_still(began - 1, time.monotonic() + 1)
    assert STALL <= first < STALL + 0.5, f"the stall read as {first:.2f} s"
    assert STALL <= second < STALL + 0.5, f"the stall read as {second:.2f} s, then"


def test_a_stall_noted_between_its_gap_and_its_last_tick_is_counted_once() -> None:
    """The thread appended the gap but has not moved its last tick yet."""
    clock, began = _stalled_clock("never")
    clock._gaps.append((clock._last, time.monotonic()))  # (the thread, half way)
    read = clock.stood_still(began - 1, time.monotonic() + 1)
    assert STALL <= read < STALL + 0.5, f"the stall read as {read:.2f} s"
    assert clock.longest(began - 1, time.monotonic() + 1) == pytest.approx(read, abs=0.1)
