"""The pause clock's readings while its thread notes a stall: each stall counted once,
and a later reading never finds less stood still than an earlier one.

A handler's guard stops its body on one reading, and the check made at the body's stop
(the fault suite's) reads again a moment later: the two must agree (docs/leases.md,
"Paused past the lease"). The thread may lose the CPU (the GIL) at any point of a tick,
between reading the time and noting the gap too."""

from __future__ import annotations

import threading
import time
from collections import deque

import pytest

from cantata.fencing import PauseClock

EVERY = 0.05
STALL = 2.0


def _stalled_clock() -> tuple[PauseClock, float]:
    """A clock (no thread of its own: the test ticks it) whose last tick was STALL
    seconds ago."""
    clock = object.__new__(PauseClock)
    clock._every = EVERY
    clock._last = time.monotonic() - STALL
    clock._gaps = deque(maxlen=64)
    clock._lock = threading.Lock()
    return clock, clock._last


def _read(clock: PauseClock, began: float) -> float:
    return clock.stood_still(began - 1, time.monotonic() + 1)


def test_a_stall_reads_the_same_before_and_after_its_tick() -> None:
    clock, began = _stalled_clock()
    before = _read(clock, began)  # not noted yet: the ongoing gap, up to now
    clock._tick()
    after = _read(clock, began)
    assert STALL <= before < STALL + 0.5, f"the stall read as {before:.2f} s"
    assert before <= after < STALL + 0.5, f"the stall read as {before:.2f} s, then {after:.2f}"
    assert clock.longest(began - 1, time.monotonic() + 1) == pytest.approx(after, abs=0.1)
    clock._tick()  # a tick on time adds nothing
    assert _read(clock, began) == pytest.approx(after, abs=0.01)


def test_a_reading_during_a_tick_half_done_never_counts_more_than_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The thread read the time, then lost the CPU before noting the gap; a reading
    meanwhile must not take the gap as ongoing up to its own, later time (the next
    reading, the gap noted, would find the stall shorter)."""
    clock, began = _stalled_clock()
    real = time.monotonic
    read_the_time = threading.Event()
    ticker = threading.Thread(target=clock._tick)

    def monotonic() -> float:
        now = real()
        if threading.current_thread() is ticker:
            read_the_time.set()
            time.sleep(0.15)  # (the thread loses the CPU right after reading the time)
        return now

    monkeypatch.setattr(time, "monotonic", monotonic)
    ticker.start()
    assert read_the_time.wait(5)
    time.sleep(0.1)  # (both well inside 4 ticks: no gap since the tick, once noted)
    first = _read(clock, began)
    ticker.join()
    second = _read(clock, began)
    assert STALL <= first < STALL + 0.5, f"the stall read as {first:.2f} s"
    assert second >= first, (
        f"the stall read as {first:.3f} s, then as {second:.3f} s once its tick was done")
