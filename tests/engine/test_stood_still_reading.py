"""How long a worker's whole process stood still, as its guards read it
(``Ownership.stood_still``): the wall clock's lead over monotonic time since the last
heartbeat (a paused VM's monotonic clock stands still), or the pause clock's stalls.

A reader held between its two clock readings (its thread preempted on a starved
machine) must not take that hold for the wall clock running ahead: a handler's guard
that did stopped its body on one reading, and the check at its stop, a moment later,
read no pause (docs/leases.md, "Paused past the lease")."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import pytest

from cantata.engine import ownership
from cantata.engine.ownership import Ownership


class HeldClock:
    """A wall clock read ``held`` seconds after it is asked (the reader preempted just
    then), ``offset`` seconds ahead of the system's."""

    def __init__(self) -> None:
        self.held = 0.0
        self.offset = 0.0

    def now(self) -> float:
        time.sleep(self.held)
        return time.time() + self.offset


class StillPauseClock:
    """No stall of the whole process (what the pause clock's thread, starved itself on
    a loaded machine, might add is not what these tests read)."""

    def stood_still(self, began: float, ended: float) -> float:
        return 0.0

    def longest(self, began: float, ended: float) -> float:
        return 0.0


@pytest.fixture(autouse=True)
def _still(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ownership, "pause_clock", StillPauseClock)


def _ownership(clock: HeldClock) -> Ownership:
    return Ownership(cast(Any, SimpleNamespace(lease=2.0, clock=clock)))


def test_a_reader_held_between_its_clock_readings_reads_no_pause() -> None:
    clock = HeldClock()
    own = _ownership(clock)
    clock.held = 0.6
    assert own.stood_still() < 0.2
    assert not own.process_paused()


def test_a_wall_clock_ahead_of_monotonic_time_still_reads_as_a_pause() -> None:
    clock = HeldClock()
    own = _ownership(clock)
    clock.offset = 1.0  # (a VM paused for a second: its monotonic clock stood still)
    assert own.stood_still() >= 0.9
    assert own.process_paused()
