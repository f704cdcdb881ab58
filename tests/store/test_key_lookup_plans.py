"""The lookups of a few rows by their ids on a worker's paths read those rows by their
key on PostgreSQL, whether or not the tables were ever analyzed: not every row of the
app (or of the handler group).

Planned without statistics (a new store's tables, until autovacuum's ANALYZE a minute
or more later; never, where autovacuum is off), ``key = ANY($n)`` beside ``app=$1`` was a
filter on a read of the app's whole key range: a NATS consumer's lookup of the
deliveries of the copies it fetched (``delivery_holds``, at every batch of copies) read
2,000 deliveries to find 10, the engine's look for cancelled runs among its executions
(``cancelled_runs``) 4,000 rows of ``runs``, the relay's ``mark_published`` 4,000 events,
a queue claim's admission 2,010 runs (docs/performance.md, "Queued runs and deliveries,
planned without statistics")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from cantata import App, Event
from cantata.model.flow import QueueEntry, QueueSpec
from cantata.model.records import Declaration
from cantata.store.base import Store
from cantata.testing.contract.support import new_run
from tests.helpers import with_schema
from tests.store.plan_watch import explaining, rows_read

pytestmark = pytest.mark.postgres

APP = "holds"
ROWS = 2000  # events (each with a delivery per group) and runs


async def test_lookups_by_ids_read_their_rows_by_key_with_or_without_statistics(
    postgres_url: str, pooled_schema: str
) -> None:
    async with App(APP, store=with_schema(postgres_url, pooled_schema)).client() as app:
        store, db = app.store, app.store._db  # type: ignore[attr-defined]
        for table in ("events", "deliveries", "runs"):  # (no autovacuum ANALYZE meanwhile)
            await db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await store.declare(APP, [Declaration("handler", "billing", "order.placed"),
                                  Declaration("handler", "mail", "order.*")])
        events = [Event(type="order.placed", data={"n": i}) for i in range(ROWS)]
        runs = [new_run(APP) for _ in range(ROWS)]
        for i in range(0, ROWS, 500):
            await store.append_events(APP, events[i:i + 500])
            await asyncio.gather(*(store.create_run(r) for r in runs[i:i + 500]))
        cancelled = [r.run_id for r in runs[100:104]]
        await db.execute("UPDATE runs SET cancel_requested=true WHERE app=$1 AND "
                         "run_id = ANY($2::text[])", APP, cancelled)
        batch = [e.id for e in events[100:110]]
        asked: list[tuple[str, list[str], Callable[[Store, list[str]], Awaitable[Any]]]] = [
            ("deliveries", ids, lambda s, ids: s.delivery_holds(
                APP, "billing", ids, stale_before=time.time()))
            for ids in (batch, [events[7].id], [*batch[:3], "not-stored"])
        ] + [
            ("deliveries", batch, lambda s, ids: s.delivery_states(APP, "billing", ids)),
            ("runs", [r.run_id for r in runs[98:108]],
             lambda s, ids: s.cancelled_runs(APP, ids)),
            # (an UPDATE: the events by their key, then each row updated by its key)
            ("events", batch, lambda s, ids: s.mark_published(APP, ids)),
        ]
        answers = []
        async with explaining(app) as never_analyzed:
            for _, ids, look in asked:
                answers.append(await look(store, ids))
        assert sorted(answers[-2]) == sorted(cancelled)
        assert set(answers[0]) == set(batch) and "not-stored" not in answers[2]
        await db.execute("ANALYZE events, deliveries, runs")  # (these tables only)
        async with explaining(app) as analyzed:
            for _, ids, look in asked:
                assert await look(store, ids) == answers.pop(0)
        assert not answers  # (each compared)
    assert len(never_analyzed) == len(analyzed) == len(asked)
    for (sql, plan), (table, ids, _) in zip(never_analyzed + analyzed, asked + asked,
                                            strict=True):
        read = rows_read(plan, table)
        most = len(ids) * (2 if sql.startswith("UPDATE") else 1)
        assert read <= most, f"{read} rows of {table} read to find {len(ids)} by: {sql}"


async def test_a_queue_claim_admits_its_runs_by_key_with_or_without_statistics(
    postgres_url: str, pooled_schema: str
) -> None:
    """The claim's admission (``UPDATE runs ... RETURNING``) of the runs it picked from a
    backlog of ROWS: those runs, not the app's."""
    async with App(APP, store=with_schema(postgres_url, pooled_schema)).client() as app:
        store, db = app.store, app.store._db  # type: ignore[attr-defined]
        for table in ("runs", "queue_runs"):  # (no autovacuum ANALYZE meanwhile)
            await db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await store.declare_queue(APP, QueueSpec("q", concurrency=20), worker_id="w1",
                                  stale_before=0)
        runs = [new_run(APP) for _ in range(ROWS)]
        for i in range(0, ROWS, 500):
            await asyncio.gather(*(store.create_queued_run(r, QueueEntry("q"))
                                   for r in runs[i:i + 500]))
        admitted = []
        for analyzed in (False, True):
            if analyzed:
                await db.execute("ANALYZE runs, queue_runs")  # (these tables only)
            async with explaining(app) as plans:
                claim = await store.claim_queued_runs(APP, "w1", "q", ["wf"],
                                                      now=time.time(), limit=10)
            admitted += [r.run_id for r in claim.runs]
            [(sql, plan)] = [(q, p) for q, p in plans if q.startswith("UPDATE runs r SET owner")]
            read = rows_read(plan, "runs")
            assert read <= 2 * 10, f"{read} rows of runs read to admit 10 by: {sql}"
    # the first 20 queued, in their order, each once
    assert admitted == [r.run_id for r in runs[:20]]
