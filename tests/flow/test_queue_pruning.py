"""A serving worker deletes the queue rows of ended runs once they have left every
window they count in (the rate's, that of ``cantata queues``); the figures of the
queue stay what they were, and a run in progress keeps its row."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from cantata import App, WorkflowContext
from cantata.flow.queues import PRUNE_EVERY
from tests.flow.helpers import ManualClock
from tests.helpers import with_schema

T0 = 1_900_000_000.0
LEASE = 10.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file or a fresh PostgreSQL schema (dropped after the test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    postgres_url: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")
    return with_schema(postgres_url, schema)


async def queue_rows(url: str) -> int:
    """The rows of queue ``q`` in ``queue_runs``, read past the store."""
    if url.startswith("sqlite:///"):
        with sqlite3.connect(url.removeprefix("sqlite:///")) as c:
            return int(c.execute(
                "SELECT count(*) FROM queue_runs WHERE queue='q'").fetchone()[0])
    import asyncpg

    base, schema = url.split("?schema=")
    conn = await asyncpg.connect(base)
    try:
        return int(await conn.fetchval(
            f"SELECT count(*) FROM \"{schema}\".queue_runs WHERE queue='q'"))
    finally:
        await conn.close()


async def _until_rows(url: str, n: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while (rows := await queue_rows(url)) != n:
        assert time.monotonic() < deadline, f"{rows} rows in queue_runs, expected {n}"
        await asyncio.sleep(0.05)


async def test_rows_of_ended_runs_are_pruned_once_out_of_every_window(
    durable_url: str,
) -> None:
    app = App("prune", store=durable_url, broker="embedded", poll_interval=0.05, lease=LEASE)
    app.queue("q", concurrency=5)
    gate = asyncio.Event()

    @app.step
    async def work(i: int) -> int:
        if i == 0:
            await gate.wait()
        return i

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, i: int) -> int:
        return await ctx.run(work, i)  # type: ignore[no-any-return]

    # A run queued here wakes the queue loop at once, and its pass prunes what is due:
    # without it, the loop passes (nothing waiting) at its own look, on PostgreSQL the
    # safety net's few seconds, after the test moved the clock.
    app.queue("poke")

    @app.workflow(queue="poke")
    async def poke(ctx: WorkflowContext) -> None:
        return None

    async def prune_soon() -> None:
        await (await app.start(poke)).result(timeout=15)

    async def stats() -> tuple[int, int, int]:
        [q] = [s for s in await app.queue_stats() if s.name == "q"]
        return q.in_progress, q.began_last_window, q.waiting

    clock = ManualClock(T0)
    app.clock = clock
    async with app:
        held = await app.start(job, 0)  # in progress all along: its row stays
        for i in range(1, 4):
            assert await (await app.start(job, i)).result(timeout=15) == i
        assert await queue_rows(durable_url) == 4
        clock.advance(30)  # still in the stats' window (60 s) and the first prune's
        late = [await app.start(job, i) for i in (4, 5)]
        for h in late:
            await h.result(timeout=15)
        assert await stats() == (1, 6, 0)
        # At T0 + 80 (a pruning due: the first was at T0), the rows begun at T0 have
        # left the stats' window (60 s) and a lease more for the clocks (10 s); the
        # two begun at T0 + 30 not yet.
        clock.advance(50)
        await prune_soon()
        await _until_rows(durable_url, 3)
        assert await stats() == (1, 2, 0)
        clock.advance(PRUNE_EVERY + 1)  # T0 + 141: the next pruning, past T0 + 30 + 70
        await prune_soon()
        await _until_rows(durable_url, 1)  # the run in progress keeps its row
        gate.set()
        assert await held.result(timeout=15) == 0
        clock.advance(PRUNE_EVERY + 1)
        await prune_soon()
        await _until_rows(durable_url, 0)
        assert await stats() == (0, 0, 0)
