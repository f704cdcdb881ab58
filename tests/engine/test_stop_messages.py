"""What a graceful stop says: the runs it waits for are those in a step (not those
asleep or waiting for an event, which park at once), and handlers cut by the grace
are said to be cut by it, not by a store that did not answer (docs/leases.md)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from cantata import App, Event, WorkflowContext
from cantata.testing.wait import eventually
from tests.engine.helpers import make_app


async def test_a_stop_names_the_runs_in_a_step_and_handlers_cut_by_the_grace(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app: App = make_app(sqlite_url, "stopping", shutdown_grace=0.3, park_after=60.0)
    in_step, in_handler = asyncio.Event(), asyncio.Event()

    @app.step
    async def slow() -> None:
        in_step.set()
        await asyncio.sleep(30)

    @app.workflow
    async def busy(ctx: WorkflowContext) -> None:
        await ctx.run(slow)

    @app.workflow
    async def napping(ctx: WorkflowContext) -> None:
        await ctx.sleep(60)

    @app.workflow
    async def waiting(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("never.comes", timeout=60)

    @app.on("job.go", group="jobs")
    async def job(event: Event[Any], ctx: object) -> None:
        in_handler.set()
        await asyncio.sleep(30)

    caplog.set_level(logging.INFO, logger="cantata")
    async with app:
        await app.start(napping)
        await app.start(waiting)
        await eventually(lambda: len(app.engine.executions) == 2, timeout=10)
        await app.start(busy)
        await app.publish("job.go", {})
        await asyncio.wait_for(asyncio.gather(in_step.wait(), in_handler.wait()), 10)
        caplog.clear()
    said = [r.getMessage() for r in caplog.records]
    waits = [m.split(" s for ")[-1] for m in said if m.startswith("stopping: waiting up to")]
    assert waits == ["1 run(s) in a step"], said
    cut = [m for m in said if "handler(s) still running after the grace" in m]
    assert cut == ["stopping: 1 handler(s) still running after the grace; cancelling "
                   "them and handing their events back"], said

