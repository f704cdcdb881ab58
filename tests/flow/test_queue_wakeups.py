"""A throttled queue begins its next run as soon as a slot frees (a run ends, fails or
is cancelled), in every store: not at the queue loop's next look on its own (every
5 poll intervals, or PostgreSQL's safety-net wait), and not later for runs cancelled
while they waited ahead of it (docs/flow-control.md)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata import App, RunStatus, WorkflowContext, WorkflowFailed
from tests.flow.helpers import until

# Seconds from a slot freed to the next run's begin that count as "at once": far above
# a claim's round trips, well below the loop's own look (1 s in process with the default
# poll interval, about 5 s while PostgreSQL's listener hears other processes).
AT_ONCE = 0.8


async def test_a_freed_slot_begins_the_next_run_at_once_past_cancelled_ones(
    store_url: str,
) -> None:
    app = App("wake", store=store_url)  # the default poll interval
    app.queue("q", concurrency=1)
    begun: dict[int, float] = {}
    ended: dict[int, float] = {}
    gate = asyncio.Event()

    @app.step
    async def work(i: int) -> int:
        begun[i] = time.monotonic()
        if i == 0:
            await gate.wait()
        ended[i] = time.monotonic()  # the slot frees a few writes later, not earlier
        return i

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, i: int) -> int:
        out: int = await ctx.run(work, i)
        if i == 5:
            raise ValueError("job 5 fails: its slot frees all the same")
        return out

    async with app:
        first = await app.start(job, 0)
        await until(lambda: 0 in begun)  # job 0 holds the one slot
        handles = [await app.start(job, i) for i in range(1, 7)]
        cancelled = [handles[0], handles[1], handles[3]]  # jobs 1, 2 and 4
        for h in cancelled:
            await h.cancel()
        for h in cancelled:
            await until(lambda h=h: _is(h, RunStatus.CANCELLED))  # type: ignore[misc]
        gate.set()
        assert await first.result(timeout=30) == 0
        assert await handles[2].result(timeout=30) == 3
        with pytest.raises(WorkflowFailed):
            await handles[4].result(timeout=30)
        assert await handles[5].result(timeout=30) == 6
    assert sorted(begun) == [0, 3, 5, 6]
    waits = {
        "3 after 0 ended (1 and 2 cancelled between)": begun[3] - ended[0],
        "5 after 3 ended (4 cancelled between)": begun[5] - ended[3],
        "6 after 5 failed": begun[6] - ended[5],
    }
    assert all(w < AT_ONCE for w in waits.values()), waits


async def _is(handle: object, status: RunStatus) -> bool:
    return await handle.status() == status  # type: ignore[attr-defined, no-any-return]
