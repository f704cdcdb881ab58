"""The timeouts of local ``result()`` waits share one loop timer (engine/deadlines.py):
each wait still ends at its own deadline, not before, whatever the order the waits
came in or ended."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cantata import ResultTimeout, WorkflowContext
from cantata.engine.deadlines import WaitDeadlines

from .helpers import make_app


async def test_each_wait_ends_at_its_own_deadline() -> None:
    loop = asyncio.get_running_loop()
    deadlines = WaitDeadlines()
    start = loop.time()
    ended: dict[str, float] = {}
    waits = {name: loop.create_future() for name in ("late", "early", "middle", "left",
                                                      "answered")}
    for name, fut in waits.items():
        def at_end(f: asyncio.Future[Any], name: str = name) -> None:
            ended.setdefault(name, loop.time())

        fut.add_done_callback(at_end)
    at = {"late": 0.30, "early": 0.05, "middle": 0.15, "left": 0.10, "answered": 0.12}
    for name in ("late", "early", "middle", "left", "answered"):  # (not in time order)
        assert deadlines.add(waits[name], start + at[name], loop)
    deadlines.discard(waits["left"])  # its caller gave up waiting: never touched
    waits["answered"].set_result("run")  # done first: left as it is
    await asyncio.wait_for(waits["late"], timeout=2)
    for name in ("early", "middle", "late"):
        assert waits[name].result() is None
        assert ended[name] >= start + at[name], name  # not before its deadline
        assert ended[name] < start + at[name] + 0.25, name
    assert ended["early"] <= ended["middle"] <= ended["late"]
    assert not waits["left"].done()
    assert waits["answered"].result() == "run"
    # nothing left: a new wait sets the timer again
    again = loop.create_future()
    assert deadlines.add(again, loop.time() + 0.02, loop)
    assert await asyncio.wait_for(again, timeout=1) is None


async def test_waits_of_another_loop_still_open_are_not_taken() -> None:
    deadlines = WaitDeadlines()
    other = asyncio.new_event_loop()
    try:
        assert deadlines.add(other.create_future(), other.time() + 60, other)
        loop = asyncio.get_running_loop()
        assert not deadlines.add(loop.create_future(), loop.time() + 1, loop)
    finally:
        other.close()
    loop = asyncio.get_running_loop()  # the other loop closed: its waits are dropped
    assert deadlines.add(fut := loop.create_future(), loop.time() + 0.01, loop)
    assert await asyncio.wait_for(fut, timeout=1) is None


async def test_results_with_timeouts_end_in_their_order(sqlite_url: str) -> None:
    """Local waits on a run with a short and a long timeout: the short one times out
    at its time; the long one is not woken by it and gets the run's result."""
    app = make_app(sqlite_url)
    release = asyncio.Event()

    @app.step
    async def slow(n: int) -> int:
        await release.wait()
        return n + 1

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(slow, n))

    async with app:
        h = await app.start(order, 1)
        loop = asyncio.get_running_loop()
        long_wait = asyncio.ensure_future(h.result(timeout=30))
        began = loop.time()
        with pytest.raises(ResultTimeout):
            await h.result(timeout=0.2)
        assert loop.time() - began >= 0.2
        await asyncio.sleep(0.1)
        assert not long_wait.done()
        release.set()
        assert await asyncio.wait_for(long_wait, timeout=10) == 2
