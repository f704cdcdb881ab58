"""Shared helpers of the flow-control tests: overlap and window checks of begin/end logs."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

from tests.helpers import eventually


def max_overlap(spans: Sequence[tuple[float, float]]) -> int:
    """The most spans (begin, end) open at one time (an end before a begin at a tie)."""
    points = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    top = cur = 0
    for _, d in points:
        cur += d
        top = max(top, cur)
    return top


def max_in_window(begins: Sequence[float], per: float) -> int:
    """The most begins in any half-open window of ``per`` seconds."""
    times = sorted(begins)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - per:
            j += 1
        best = max(best, i - j + 1)
    return best


class ManualClock:
    """A clock that moves only when the test calls :meth:`advance` (sleeps wait for it)."""

    virtual = True  # its jumps are the test's, not a pause (cantata.engine.clock.wall_time)

    def __init__(self, start: float) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def now(self) -> float:
        return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._now + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self._now += seconds
        due = [s for s in self._sleepers if s[0] <= self._now]
        self._sleepers = [s for s in self._sleepers if s[0] > self._now]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)


def touch(path: str) -> None:
    Path(path).touch()


def remove(path: str) -> None:
    Path(path).unlink()


async def until(predicate: Callable[[], object], timeout: float = 60.0) -> None:
    """:func:`tests.helpers.eventually` with room for the flow tests' slower conditions."""
    await eventually(predicate, timeout, interval=0.02)
