"""A stall of the whole process while the store is away (docs/leases.md, "Pauses and
store outages"): a handler runs on through a store outage, and a stall shorter than
the fence in the middle of it is not a pause past the lease. Only a stall past the
fence in one go stops the handler.

The CI failure this pins (tests/faults/test_disk.py, a full disk then freed, on a
loaded machine): the worker's heartbeats failed while the disk was full, so its own
hold had lapsed; a stall of its whole process of 0.8 s (lease 2 s) was then taken for
a pause past the lease, because the hold was in doubt already (by the outage), and its
three handlers, running on through the outage, were cut and run again by the worker
itself (``steps_twice_live=3``; their effects once).

The stalls are real: this process is stopped (SIGSTOP, a child sends SIGCONT), so the
worker's pause-clock thread stands still with it, as it does under CPU starvation.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from typing import Any

import pytest

import cantata
from cantata import App, StoreUnavailable
from cantata.engine.ownership import FENCE_AT
from cantata.store.sqlite import SQLiteStore

from .helpers import eventually

LEASE = 2.0  # a quarter 0.5 s, the fence 1.5 s: as in the fault suite


class HeartbeatsFail(SQLiteStore):
    """A SQLite store whose heartbeats are lost to an outage while ``away`` is set."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.away = False

    async def heartbeat(self, *args: Any, **kwargs: Any) -> Any:
        if self.away:
            await asyncio.sleep(0.01)
            raise StoreUnavailable("the store did not answer (a test's outage)")
        return await super().heartbeat(*args, **kwargs)


def stop_this_process(seconds: float) -> None:
    """SIGSTOP this process; a child sends SIGCONT after ``seconds``."""
    waker = subprocess.Popen(["sh", "-c", f"sleep {seconds}; kill -CONT {os.getpid()}"])
    os.kill(os.getpid(), signal.SIGSTOP)
    waker.wait()


async def handler_through_an_outage(tmp_path: Any, stalls: tuple[float, ...]) -> list[str]:
    """A handler in progress when the heartbeats begin to fail; once the worker's hold
    has lapsed, ``stalls`` (seconds each, apart), then the handler's body resumes, still
    in the outage; then the store answers again. Returns what its bodies did."""
    store = HeartbeatsFail(str(tmp_path / "outage.db"))
    app = App("shop", store=store, lease=LEASE, poll_interval=0.05, shutdown_grace=0.2)
    began, gate = asyncio.Event(), asyncio.Event()
    outcomes: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event[dict[str, int]]) -> None:
        began.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            outcomes.append("stopped")
            raise
        outcomes.append("billed")  # the side effect

    async with app:
        ownership = app.engine.ownership
        await app.publish("order.placed", {"id": 1})
        await asyncio.wait_for(began.wait(), 10)
        store.away = True
        await eventually(lambda: ownership.lapsed, 10, "the hold lapsed in the outage")
        for seconds in stalls:
            stop_this_process(seconds)  # (no await: the loop stands still too)
            await asyncio.sleep(0.3)  # (the watchdog's ticks, the heartbeat's tries)
        gate.set()
        await asyncio.sleep(0.3)  # the body resumes (or is stopped) in the outage
        store.away = False
        await eventually(lambda: "billed" in outcomes, 15, "the event handled")
    return outcomes


@pytest.mark.parametrize("stalls", [(0.8,), (0.3, 0.3, 0.3)], ids=["one", "three"])
async def test_a_stall_shorter_than_the_fence_in_an_outage_cuts_no_handler(
    tmp_path: Any, stalls: tuple[float, ...]
) -> None:
    """One stall of 0.8 s (CI's), or three of 0.3 s (each under a quarter lease, 0.9 s
    in all): each shorter than the fence, so none lapses a hold the outage had not.
    The handler runs on, once (before: stopped and run again by the same worker)."""
    assert max(stalls) < LEASE * FENCE_AT
    assert await handler_through_an_outage(tmp_path, stalls) == ["billed"]


async def test_a_stall_past_the_fence_in_an_outage_still_stops_a_handler(
    tmp_path: Any,
) -> None:
    """A pause past the fence in one go during an outage is a pause as ever: the store
    may have come back meanwhile and another worker taken the delivery over. The body
    is stopped and the event handed back, then handled."""
    began = time.monotonic()
    outcomes = await handler_through_an_outage(tmp_path, (LEASE * FENCE_AT + 0.5,))
    assert outcomes == ["stopped", "billed"], outcomes
    assert time.monotonic() - began < 30
