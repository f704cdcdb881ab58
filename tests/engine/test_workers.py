"""Several workers on one store: each run is executed by exactly one of them."""

from __future__ import annotations

import asyncio
from collections import Counter

import cantata
from cantata import App, RunStatus, WorkflowContext

from .helpers import make_app


def worker(url: str, executed: list[tuple[str, str]], tag: str) -> App:
    app = make_app(url)

    @app.step
    async def work(n: int) -> int:
        executed.append((cantata.step_info().run_id, tag))
        await asyncio.sleep(0.01)
        return n * n

    @app.workflow
    async def square(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(work, n))

    return app


async def test_runs_are_shared_out_and_each_executed_once(sqlite_url: str) -> None:
    executed: list[tuple[str, str]] = []
    a, b = worker(sqlite_url, executed, "a"), worker(sqlite_url, executed, "b")
    client = make_app(sqlite_url)
    async with a, b, client.client():
        handles = [await client.start("square", n) for n in range(20)]
        results = [await h.result(timeout=10) for h in handles]
        statuses = {await h.status() for h in handles}
    assert results == [n * n for n in range(20)]
    assert statuses == {RunStatus.COMPLETED}
    per_run = Counter(run_id for run_id, _ in executed)
    assert len(per_run) == 20 and set(per_run.values()) == {1}
