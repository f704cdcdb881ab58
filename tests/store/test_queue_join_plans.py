"""The statements that read queued runs with their runs (``queue_runs`` joined to
``runs``) look each run up by its key, on PostgreSQL, whether or not the tables were
ever analyzed: what they read of ``runs`` grows with the backlog, never with its square.

A store's tables grow from empty, and until an ANALYZE (autovacuum's, a minute or more
later) PostgreSQL plans by default selectivities: it took a queue's waiting runs for
one row, and joined them to ``runs`` by ``runs_status_newest`` (every pending run of the
app, for each queued run) instead of by the primary key. The queue loop's version check
(``foreign_runs(queued=True)``) read 245,000 rows of ``runs`` for a backlog of 700:
0.2 s of every pass on this machine, 1.3 s on a loaded one, so that a run of another
partition began that much late (docs/performance.md, "Queued runs and deliveries,
planned without statistics")."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata import App
from cantata.model.flow import QueueEntry, QueueSpec
from cantata.testing.contract.support import new_run
from tests.helpers import with_schema
from tests.store.plan_watch import explaining, rows_read

pytestmark = pytest.mark.postgres

APP = "joins"
BACKLOG = 2000  # the quadratic plans read 2 million rows of runs at this size
OLD = 5  # runs of the backlog retried on an older version (with history)


async def backlog(app: App) -> list[str]:
    """Key A's one slot held by a run of worker ``w1``, ``BACKLOG`` runs of A waiting
    behind it (``OLD`` of them retried on version ``v0``, with history), in tables that
    were never analyzed; the waiting runs' ids."""
    store = app.store
    db = store._db  # type: ignore[attr-defined]
    for table in ("runs", "queue_runs", "history"):  # (no autovacuum ANALYZE meanwhile)
        await db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
    await store.declare_queue(APP, QueueSpec("q", concurrency=1, per_worker=5),
                              worker_id="w1", stale_before=0)
    await store.create_queued_run(new_run(APP, version="v1"), QueueEntry("q", "A"))
    first = await store.claim_queued_runs(APP, "w1", "q", ["wf"], now=time.time(), limit=5)
    assert len(first.runs) == 1
    runs = [new_run(APP, version="v1") for _ in range(BACKLOG)]
    for i in range(0, BACKLOG, 500):
        await asyncio.gather(*(store.create_queued_run(r, QueueEntry("q", "A"))
                               for r in runs[i:i + 500]))
    old = [r.run_id for r in runs[:OLD]]
    await db.execute("UPDATE runs SET version='v0', epoch=1 WHERE app=$1 AND "
                     "run_id = ANY($2::text[])", APP, old)
    await db.execute("INSERT INTO history (app, run_id, key, seq, kind, name, status) "
                     "SELECT $1, id, 'step#1', 1, 'step', 'step', 'completed' "
                     "FROM unnest($2::text[]) id", APP, old)
    assert not await db.fetchrow(
        "SELECT 1 FROM pg_stat_user_tables WHERE relname IN ('runs', 'queue_runs') AND "
        "schemaname = current_schema() AND (last_analyze IS NOT NULL OR "
        "last_autoanalyze IS NOT NULL)"
    ), "this test needs tables that were never analyzed"
    return [r.run_id for r in runs]


async def each_queue_read(app: App, waiting: list[str]) -> None:
    """The store's reads of queued runs with their runs: a worker's version checks and
    claims, the console's queue figures and a run's place, a takeover, stalled flows."""
    store, now = app.store, time.time()
    assert len(await store.foreign_runs(APP, "w2", ["wf"], versions=["v1"],
                                        stale_before=0.0, limit=100, queued=True)) == OLD
    claim = await store.claim_queued_runs(
        APP, "w2", "q", ["wf"], now=now, limit=50, exclude_versions=["v9"],
        only_versions=["v0", "v1"], pin_version="v1", replay_checked={"x": 1.0},
    )
    assert not claim.runs  # (A's slot is held)
    [stats] = await store.queue_stats(APP, now=now)
    assert stats.waiting == BACKLOG
    place = await store.queue_position(APP, waiting[-1])
    assert place is not None and place.ahead == BACKLOG - 1
    await store.claim_runs(APP, "w2", ["wf"], stale_before=now + 60, limit=10, now=now)
    await store.stale_correlations(APP, older_than=now + 3600, limit=10, now=now)


async def test_the_reads_of_queued_runs_find_their_runs_by_key_with_or_without_statistics(
    postgres_url: str, pooled_schema: str
) -> None:
    async with App(APP, store=with_schema(postgres_url, pooled_schema)).client() as app:
        waiting = await backlog(app)
        async with explaining(app) as plans:
            await each_queue_read(app, waiting)
        unanalyzed = len(plans)
        # (these tables only: a bare ANALYZE would analyze every schema of the
        # database, those of the tests beside this one that need tables never analyzed)
        await app.store._db.execute(  # type: ignore[attr-defined]
            "ANALYZE runs, queue_runs, history")
        async with explaining(app) as plans_analyzed:
            await each_queue_read(app, waiting)
    checked = [(sql, plan, False) for sql, plan in plans]
    checked += [(sql, plan, True) for sql, plan in plans_analyzed]
    assert unanalyzed > 10, [sql for sql, _ in plans]  # (the proxy saw the statements)
    # Each queued run's run at most a few times over (its row, its version, a check
    # that it may begin), never the backlog once per queued run.
    over = [f"{rows} rows of runs read ({'analyzed' if analyzed else 'never analyzed'}) "
            f"by: {sql}"
            for sql, plan, analyzed in checked
            for rows in [rows_read(plan, "runs")] if rows > 4 * BACKLOG]
    assert not over, f"for a backlog of {BACKLOG}:\n" + "\n".join(over)
