"""By-key writes first run while their table was tiny stay fast as the table grows.

PostgreSQL keeps a prepared statement's generic plan until the table is analyzed (where
autovacuum is off, for ever); the batch writer makes it at once. Planned without
statistics, an ``UPDATE ... WHERE key IN (SELECT ... each_by_key)`` could scan the
group's (or app's) rows and look every id up again for each of them: a NATS consumer's
take of 500 deliveries among 6,000 took 7.8 s (now found by key, then updated by ctid:
0.02 s), and a relay's ``mark_published``, planned so, ran for hours in a benchmark,
a CPU each (docs/performance.md, "Plans made on a tiny table"). The by-key writes are
planned at each run now (``postgres_ops.planned_now``) and update each row by the ctid
its lookup found (``postgres_ops.by_ctid``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from cantata import App, Event
from cantata.model.flow import QueueEntry, QueueSpec
from cantata.model.records import Declaration
from cantata.testing.contract.support import new_run
from tests.helpers import with_schema

pytestmark = pytest.mark.postgres

APP = "tiny"
GROWN = 6000  # events, each with a delivery: far more than the plan was made for
ASKED = 500  # ids in one call (the relay's batch)
WITHIN = 3.0  # seconds: 0.01 to 0.02 s here; 7 s and more (hours, for a relay) before


async def bounded(postgres_url: str, what: str, call: Awaitable[Any]) -> float:
    """Seconds ``call`` took; fails after :data:`WITHIN`, cancelling what the server
    still runs of it."""
    start = time.monotonic()
    try:
        await asyncio.wait_for(call, WITHIN)
    except TimeoutError:
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(
                "SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE "
                "datname=current_database() AND state='active' AND pid<>pg_backend_pid() "
                "AND now()-query_start > make_interval(secs => $1)", WITHIN - 1)
        finally:
            await conn.close()
        pytest.fail(f"{what} of {ASKED} ids took over {WITHIN} s on {GROWN} events")
    return time.monotonic() - start


async def test_statements_by_key_planned_on_a_tiny_table_stay_fast_as_it_grows(
    postgres_url: str, pooled_schema: str
) -> None:
    async with App(APP, store=with_schema(postgres_url, pooled_schema)).client() as app:
        store, db = app.store, app.store._db  # type: ignore[attr-defined]
        for table in ("events", "deliveries"):  # (no autovacuum ANALYZE meanwhile)
            await db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await store.declare(APP, [Declaration("handler", "billing", "order.placed")])
        await store.heartbeat(APP, "w1", time.time(), None, lease=30)
        few = [Event(type="order.placed", data={"n": i}) for i in range(5)]
        await store.append_events(APP, few)
        ids = [e.id for e in few]
        calls: list[Callable[[list[str]], Awaitable[Any]]] = [
            lambda ids: store.mark_published(APP, ids),
            lambda ids: store.take_deliveries(APP, "billing", ids, "w1",
                                              stale_before=time.time()),
        ]
        # first runs on the tiny tables, on every connection of the pool (a generic plan
        # is kept per connection: at once in the batch writer, after five runs elsewhere)
        for _ in range(8):
            for call in calls:
                await asyncio.gather(*(call(ids) for _ in range(4)))
        for i in range(0, GROWN, 500):
            await store.append_events(
                APP, [Event(type="order.placed", data={"n": n}) for n in range(i, i + 500)])
        rows = await db.fetch("SELECT id FROM events WHERE app=$1 AND NOT published "
                              "ORDER BY seq LIMIT $2", APP, ASKED)
        grown = [r[0] for r in rows]
        took = [await bounded(postgres_url, name, call(grown))
                for name, call in zip(("mark_published", "take_deliveries"), calls,
                                      strict=True)]
        print(f"\non {GROWN} events, {ASKED} ids: mark_published {took[0]:.3f} s, "
              f"take_deliveries {took[1]:.3f} s")
        [n] = await db.fetch("SELECT count(*) FROM events WHERE app=$1 AND published "
                             "AND id = ANY($2::text[])", APP, grown)
        assert n[0] == ASKED
        held = await store.delivery_holds(APP, "billing", grown, stale_before=float("-inf"))
        assert {h.holder for h in held.values()} == {"w1"}


STEP, SMALL = 125, 20  # rows added between calls; ids in each call
SMALL_WITHIN = 0.25  # seconds: ~1 ms here; 0.15-1.1 s a call at 250-500 rows before


async def test_writes_by_key_stay_fast_while_their_table_is_a_few_hundred_rows(
    postgres_url: str, pooled_schema: str
) -> None:
    """Planned at each run on a table of a few hundred rows never analyzed, ``key IN
    (SELECT ... each_by_key)`` read the app's rows and looked every id up again for each
    (each lookup itself a scan of the app's rows by another index): 20 ids took 0.15 s
    at 250 events and 1.1 s at 500. Each call is bounded here, table size by size."""
    async with App(APP, store=with_schema(postgres_url, pooled_schema)).client() as app:
        store, db = app.store, app.store._db  # type: ignore[attr-defined]
        for table in ("events", "deliveries", "runs", "queue_runs"):
            await db.execute(f"ALTER TABLE {table} SET (autovacuum_enabled = false)")
        await store.declare(APP, [Declaration("handler", "billing", "order.placed")])
        await store.declare_queue(APP, QueueSpec("q", concurrency=10_000), worker_id="w1",
                                  stale_before=0)
        slow: list[str] = []

        async def timed(what: str, rows: int, call: Awaitable[Any]) -> Any:
            start = time.monotonic()
            out = await call
            if (took := time.monotonic() - start) > SMALL_WITHIN:
                slow.append(f"{what} on {rows} rows: {took:.3f} s")
            return out

        for rows in range(STEP, 8 * STEP + 1, STEP):
            await store.append_events(
                APP, [Event(type="order.placed", data={"n": n}) for n in range(STEP - SMALL)])
            outside = [Event(type="order.placed", data={"x": n}) for n in range(SMALL)]
            await timed("append_external", rows, store.append_external(APP, outside))
            asked = [r[0] for r in await db.fetch(
                "SELECT id FROM events WHERE app=$1 AND NOT published ORDER BY seq DESC "
                "LIMIT $2", APP, SMALL)]
            await timed("mark_published", rows, store.mark_published(APP, asked))
            queued = [new_run(APP) for _ in range(STEP)]
            await asyncio.gather(*(store.create_queued_run(r, QueueEntry("q"))
                                   for r in queued))
            claim = await timed("claim_queued_runs", rows, store.claim_queued_runs(
                APP, "w1", "q", ["wf"], now=time.time(), limit=SMALL))
            assert len(claim.runs) == SMALL
            [n] = await db.fetch("SELECT count(*) FROM events WHERE app=$1 AND published "
                                 "AND id = ANY($2::text[])", APP,
                                 asked + [e.id for e in outside])
            assert n[0] == 2 * SMALL
        assert not slow, slow
