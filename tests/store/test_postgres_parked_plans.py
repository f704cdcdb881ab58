"""With many runs parked on PostgreSQL, the statements a worker runs at each pass read
no parked run that is not due, even planned without statistics (docs/performance.md,
"A million parked runs").

A store's tables grow from empty, and until an ANALYZE (autovacuum's, a minute or
more later, or never when it is off) PostgreSQL plans with default selectivities. So
planned, the claim's read of due parked runs went through ``runs_live`` and filtered
out every parked run at each claim: 1.4 s late wake-ups at the p50 with a million
parked. Each statement is run here under ``EXPLAIN ANALYZE`` (rolled back) on a fresh
schema that was never analyzed, and what it read is counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any, cast

import pytest

from cantata import App, WorkflowContext
from cantata.store import postgres_parking, postgres_writes
from cantata.store.postgres_batch import Batch
from cantata.store.postgres_operate import foreign_runs
from cantata.store.postgres_pool import Conn
from cantata.store.postgres_trace import STALE_CORRELATIONS
from tests.helpers import eventually, with_schema
from tests.store.plan_watch import Explaining, read

pytestmark = pytest.mark.postgres

PARKED = 3000  # the old plans filtered out every one of them at this size already


def build(url: str) -> App:
    app = App("parks", store=url, park_after=0.0, poll_interval=0.05)

    @app.workflow
    async def long_sleep(ctx: WorkflowContext, i: int) -> None:
        await ctx.sleep(3600)

    return app


@contextlib.asynccontextmanager
async def parked_unanalyzed(postgres_url: str, schema: str) -> AsyncIterator[Any]:
    """A connection to ``schema`` holding PARKED runs parked in ``ctx.sleep`` by
    ``app.start``, in a ``runs`` table that was never analyzed."""
    async with build(with_schema(postgres_url, schema)) as app:
        db = app.store._db  # type: ignore[attr-defined]
        # (this test's own table: no autovacuum's ANALYZE comes meanwhile on a server
        # that has it on)
        await db.execute("ALTER TABLE runs SET (autovacuum_enabled = false)")
        for first in range(0, PARKED, 500):
            await asyncio.gather(*(app.start("long_sleep", i)
                                   for i in range(first, first + 500)))

        async def all_parked() -> bool:
            n = await db.fetchrow(
                "SELECT count(*) FROM runs WHERE app=$1 AND wake_at IS NOT NULL "
                "AND owner IS NULL", app.name,
            )
            return bool(n[0] == PARKED)

        await eventually(all_parked, timeout=30)
        async with db.conn() as conn:
            assert not await conn.fetchval(
                "SELECT last_analyze IS NOT NULL OR last_autoanalyze IS NOT NULL "
                "FROM pg_stat_user_tables WHERE relid = 'runs'::regclass"
            ), "this test needs a runs table that was never analyzed"
            yield app, conn


@pytest.mark.slow
async def test_the_per_pass_statements_read_no_parked_run_without_statistics(
    postgres_url: str, pooled_schema: str
) -> None:
    async with parked_unanalyzed(postgres_url, pooled_schema) as (app, conn):
        c = Explaining(conn)
        now = time.time()
        workflows = ["long_sleep"]
        # the claim (no run due), the version check of parked runs that are due,
        # the next wake-up
        # (Explaining stands in for the store's connection)
        await postgres_writes.claim_runs(
            cast(Conn, c), Batch(), app.name, "explainer", workflows, now, 10, now=now
        )
        await foreign_runs(cast(Conn, c), app.name, "explainer", workflows, ["v-other"], now, 10,
                           now=now)
        await c.fetchrow(postgres_parking.NEXT_WAKE, app.name, now, workflows)
    claim, version_check, next_wake = (read(p) for p in c.plans)
    # Nothing is due: the claim and the version check read no run at all (the old
    # plans filtered out all 3,000), by runs_parked for the due ones.
    assert claim[0] <= 2 and "runs_parked" in claim[2], claim
    assert version_check[0] <= 2 and "runs_parked" in version_check[2], version_check
    # The next wake-up is the first entry of runs_parked (not every parked run sorted).
    assert next_wake[0] <= 2 and next_wake[2] == {"runs_parked"}, next_wake


@pytest.mark.slow
async def test_stalled_reads_no_parked_sleeper_without_statistics(
    postgres_url: str, pooled_schema: str
) -> None:
    async with parked_unanalyzed(postgres_url, pooled_schema) as (app, conn):
        c = Explaining(conn)
        now = time.time() + 600  # the sleepers made no progress for 10 minutes
        await c.fetch(STALE_CORRELATIONS, app.name, now - 300, 400, now)
        await conn.execute("ANALYZE runs")
        await c.fetch(STALE_CORRELATIONS, app.name, now - 300, 400, now)
    for plan in c.plans:  # never analyzed, then analyzed
        rows, _, indexes = read(plan)
        # The parked sleepers, not due, are not read (the old statement read all 3,000
        # through runs_live or runs_status_newest): the parked runs by runs_parked
        # (due) and runs_waiting (event waits); nor are they read for the flagged runs
        # (none here), by runs_flagged (before schema 33, every run of the app).
        assert rows <= 2, (rows, indexes)
        assert {"runs_parked", "runs_waiting", "runs_flagged"} <= indexes, indexes


async def test_the_claim_reads_no_parked_or_ended_run_once_analyzed(
    postgres_url: str, pooled_schema: str
) -> None:
    """Analyzed, with parked runs beside ended ones, PostgreSQL took the live share and
    the not-parked share of ``runs`` as independent and expected many claimable runs:
    the claim's pick read every run of the app in ``runs_newest`` order (5,461 rows
    here) to find the few that are. It reads them by ``runs_claimable`` per workflow."""
    now = time.time()
    async with App("parks", store=with_schema(postgres_url, pooled_schema)).client() as app:
        db = app.store._db  # type: ignore[attr-defined]
        async with db.conn() as conn:
            await conn.execute("ALTER TABLE runs SET (autovacuum_enabled = false)")
            for prefix, workflow, status, n, wake, age in [  # (the claimable ones newest)
                ("sleep", "long_sleep", "running", PARKED, now + 3600, 7200),
                ("done", "saga", "completed", 2000, None, 3600),
                ("new", "saga", "pending", 100, None, 60),
            ]:
                await conn.execute(
                    "INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, "
                    "created_at, updated_at, wake_at) SELECT 'parks', $1 || i, $2, $3, '[]', "
                    "'c-' || $1 || i, "
                    "$4::float8 + i * 0.001, $4::float8, $5 FROM generate_series(1, $6::int) i",
                    f"{prefix}-", workflow, status, now - age, wake, n,
                )
            await conn.execute("ANALYZE runs")
            c = Explaining(conn)
            await postgres_writes.claim_runs(
                cast(Conn, c), Batch(), "parks", "explainer", ["long_sleep", "saga"], now, 10,
                now=now,
            )
    rows, _, indexes = read(c.plans[0])
    # (a few rows per claimed run: the pick, the lock, the update by key; none of the
    # 5,000 parked and ended)
    assert rows <= 300 and "runs_claimable" in indexes, (rows, indexes)
