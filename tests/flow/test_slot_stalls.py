"""Runs held back by a step's limit say so in their trace and stall.

An operator who throttles a fragile downstream (`@app.step(concurrency=...)`) while
runs pile up sees each waiting run as waiting for a slot of that step, and behind how
many others, not as a run no worker serves.
"""

from __future__ import annotations

import asyncio

from cantata import App, WorkflowContext
from cantata.observability.timeline import where_it_stands
from cantata.testing.wait import eventually
from tests.engine.helpers import make_app


async def test_runs_waiting_for_a_steps_slot_say_so(store_url: str) -> None:
    app: App = make_app(store_url, "throttled")
    gate = asyncio.Event()

    @app.step(concurrency=1)
    async def fragile(i: int) -> int:
        await gate.wait()
        return i

    @app.workflow
    async def pile(ctx: WorkflowContext, i: int) -> int:
        result: int = await ctx.run(fragile, i)
        return result

    async with app:
        first = await app.start(pile, 0)
        await eventually(lambda: _holds(app), timeout=10)
        waiting = [await app.start(pile, i) for i in (1, 2)]
        # Each says so, one behind the other: in the order they asked for the slot,
        # which two runs started at once may take in either order.
        seen: dict[str, str | None] = {}
        try:
            await eventually(lambda: _details(app, [h.run_id for h in waiting], seen),
                             timeout=15, what="each waiting run's stall says it waits for a slot")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the runs' stalls said {seen}") from None
        stalls = {s.correlation_id: s for s in await app.stalled(older_than=0)}
        for h in waiting:
            assert stalls[h.run_id].reason == "pending_step"
            where = where_it_stands(await app.trace(h.run_id), now=app.clock.now())
            assert "waiting for a slot of step 'fragile' behind" in where, where
            assert "is a worker serving" not in where, where
        assert stalls[first.run_id].node.detail is None  # its step runs
        gate.set()
        assert [await h.result(timeout=10) for h in (first, *waiting)] == [0, 1, 2]
        assert await app.stalled(older_than=0) == []


async def _holds(app: App) -> bool:
    return await app.store.slots_held(app.name, "step:fragile") == 1


async def _details(app: App, run_ids: list[str], seen: dict[str, str | None]) -> bool:
    found = {s.correlation_id: s.node.detail for s in await app.stalled(older_than=0)}
    seen.update((run_id, found.get(run_id)) for run_id in run_ids)
    return sorted(seen[run_id] or "" for run_id in run_ids) == [
        f"waiting for a slot of step 'fragile' behind {ahead} run(s)" for ahead in (0, 1)]
