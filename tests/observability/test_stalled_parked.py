"""``cantata stalled`` with many runs parked until later (docs/performance.md, "A
million parked runs"): runs that sleep as they were told to are not stalls and do not
crowd out the ones that are (a parked wait for an event that has not come)."""

from __future__ import annotations

import asyncio
import time

from cantata import App, WorkflowContext
from cantata.observability.stalled import WAITING_EVENT, Stall, find_stalls
from tests.helpers import eventually

SLEEPERS = 450  # more than the transactions `stalled` looks at (4 x its limit of 100)
WAITERS = 3
AHEAD = 3600.0


def build(url: str, **kw: object) -> App:
    app = App("parked-ops", store=url, **kw)  # type: ignore[arg-type]

    @app.workflow
    async def sleeper(ctx: WorkflowContext, i: int) -> None:
        await ctx.sleep(2 * AHEAD)

    @app.workflow
    async def waiter(ctx: WorkflowContext, i: int) -> None:
        await ctx.wait_for_event("ops.never", match={"i": i}, timeout=4 * AHEAD)

    return app


async def test_parked_sleepers_do_not_hide_the_stalled_waits(store_url: str) -> None:
    async with build(store_url, park_after=0.0, poll_interval=0.05) as worker:
        # the sleepers first: older than the waiters, they came first in the old read
        for first in range(0, SLEEPERS, 150):
            await asyncio.gather(*(worker.start("sleeper", i)
                                   for i in range(first, first + 150)))
        waiters = [await worker.start("waiter", i) for i in range(WAITERS)]

        async def all_waiting() -> bool:
            counts = await worker.store.count_runs(worker.name)
            return counts.get("running", 0) == SLEEPERS + WAITERS

        await eventually(all_waiting, timeout=60)

        # as `cantata stalled` sees them an hour later (a run is running once claimed,
        # its wait recorded a moment later: on a loaded machine, after the count above)
        async def stalled() -> list[Stall]:
            return await find_stalls(worker.store, worker.name, older_than=300,
                                     now=time.time() + AHEAD)

        async def waits_recorded() -> bool:
            return len(await stalled()) >= WAITERS

        await eventually(waits_recorded, timeout=30)
        stalls = await stalled()
        runs = [await worker.store.get_run(worker.name, h.run_id) for h in waiters]
        assert sorted(s.correlation_id for s in stalls) == sorted(
            r.correlation_id for r in runs if r is not None)
        assert {s.reason for s in stalls} == {WAITING_EVENT}
