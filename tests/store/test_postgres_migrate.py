"""Migrating a PostgreSQL store that workers of the older release serve on
(docs/deploy.md "Upgrading Cantata").

A migration that waits for a table lock queues every later statement on that table
behind it, so the older workers' heartbeats and checkpoints wait with it and time out;
two such transactions deadlock when each holds what the other wants. Each script of an
upgrade runs in its own transaction that waits for a lock at most
``MIGRATE_LOCK_WAIT`` and tries again, so the older workers go on.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from cantata.errors import StoreUnavailable
from cantata.model.event import Event
from cantata.model.records import Declaration
from cantata.store import migrations
from cantata.store import postgres_pool as pool
from cantata.store.base import Settlement
from cantata.store.postgres import PostgresStore
from tests.helpers import with_schema

pytestmark = pytest.mark.postgres

# The release before the handled-dead-letter trigger on deliveries (0025) and the
# workers' lease columns (0030): its upgrade locks deliveries, then workers.
OLDER = 24


async def older_store(postgres_url: str, schema: str, version: int = OLDER) -> None:
    """The schema as the older release's migration left it."""
    conn = await asyncpg.connect(postgres_url)
    try:
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{schema}"')
            await conn.execute(
                "CREATE TABLE schema_version (version integer PRIMARY KEY, "
                "applied_at double precision NOT NULL)"
            )
            for n, script in sorted(migrations.scripts("postgres").items()):
                if n <= version:
                    await conn.execute(script.read_text())
                    await conn.execute("INSERT INTO schema_version VALUES ($1, 0)", n)
    finally:
        await conn.close()


HELD = 3.0  # seconds the older batch holds the workers table in the test below


async def test_an_upgrade_never_holds_up_the_older_workers(
    postgres_url: str, fresh_schema: str
) -> None:
    """An older worker's transaction holds the workers table (a heartbeat in a write
    batch) for 3 s and then writes deliveries, while a newer worker migrates; another
    older worker heartbeats every 20 ms, each statement allowed 1.2 s of lock waiting.
    No statement of theirs times out or deadlocks, and the migration finishes.

    A migration queued behind the batch would hold the heartbeats for the rest of its
    3 s; one that gives way waits at most MIGRATE_LOCK_WAIT (0.2 s) in that queue, and
    holds the table for one script's run (tens of ms, but a loaded CI machine was seen
    taking over 0.3 s more than that): the 1.2 s allowed lies between."""
    await older_store(postgres_url, fresh_schema)
    q = f'"{fresh_schema}"'
    batch = await asyncpg.connect(postgres_url)
    beats = await asyncpg.connect(postgres_url)
    failures: list[str] = []
    stop = asyncio.Event()

    async def older_batch() -> None:
        try:
            async with batch.transaction():
                await batch.execute("SET LOCAL lock_timeout = 1500")
                await batch.execute(f"LOCK TABLE {q}.workers IN ROW EXCLUSIVE MODE")
                await asyncio.sleep(HELD)
                await batch.execute(f"LOCK TABLE {q}.deliveries IN ROW EXCLUSIVE MODE")
        except asyncpg.PostgresError as exc:
            failures.append(f"the older batch: {exc}")

    async def older_heartbeats() -> None:
        while not stop.is_set():
            began = time.monotonic()
            try:
                async with beats.transaction():
                    await beats.execute("SET LOCAL lock_timeout = 1200")
                    await beats.execute(f"LOCK TABLE {q}.workers IN ROW EXCLUSIVE MODE")
                    await beats.execute(f"LOCK TABLE {q}.deliveries IN ROW EXCLUSIVE MODE")
            except asyncpg.PostgresError as exc:
                failures.append(f"a heartbeat, after {time.monotonic() - began:.2f} s: {exc}")
            await asyncio.sleep(0.02)

    store = PostgresStore(with_schema(postgres_url, fresh_schema))
    try:
        held = asyncio.create_task(older_batch())
        beating = asyncio.create_task(older_heartbeats())
        await asyncio.sleep(0.2)  # the batch holds the workers table
        began = time.monotonic()
        await store.open()
        took = time.monotonic() - began
        await held
        stop.set()
        await beating
    finally:
        await store.close()
        await batch.close()
        await beats.close()
    assert not failures, failures
    assert took >= HELD - 0.5, (
        f"the migration took the workers table in {took:.2f} s, under the batch")
    conn = await asyncpg.connect(postgres_url)
    try:
        versions = [r[0] for r in await conn.fetch(f"SELECT version FROM {q}.schema_version")]
    finally:
        await conn.close()
    assert sorted(versions) == sorted(migrations.scripts("postgres"))


async def test_an_upgrade_held_off_too_long_says_what_holds_it(
    postgres_url: str, fresh_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transaction that keeps the tables past the migration's patience: the worker
    does not start, and says why and what to do; the scripts it did apply stay applied
    and the next start goes on from there."""
    monkeypatch.setattr(pool, "MIGRATE_PATIENCE", 1.0)
    await older_store(postgres_url, fresh_schema)
    holder = await asyncpg.connect(postgres_url)
    url = with_schema(postgres_url, fresh_schema)
    try:
        async with holder.transaction():
            await holder.execute(f'LOCK TABLE "{fresh_schema}".workers IN ROW EXCLUSIVE MODE')
            with pytest.raises(StoreUnavailable, match="pg_stat_activity"):
                await PostgresStore(url).open()
            done = await holder.fetchval(
                f'SELECT max(version) FROM "{fresh_schema}".schema_version'
            )
            assert OLDER < done < 30, done
        store = PostgresStore(url)
        await store.open()
        await store.close()
    finally:
        await holder.close()


async def test_deliveries_in_flight_keep_their_lookups_across_the_key_by_event(
    postgres_url: str, fresh_schema: str
) -> None:
    """Migration 0035 keys the deliveries by event first: the deliveries of a store of
    version 34 are found by event, by group, claimed (one of them taken over from a
    worker that is gone) and settled as before, and a settlement's held delivery is
    found by its event."""
    await older_store(postgres_url, fresh_schema, version=34)
    placed = [Event("order.placed", {"n": n}) for n in range(3)]
    q = f'"{fresh_schema}"'
    conn = await asyncpg.connect(postgres_url)
    now = time.time()
    try:
        for e in placed:
            await conn.execute(
                f"INSERT INTO {q}.events (app, id, type, source, time, data, correlation_id, "
                "stored_at) VALUES ('shop', $1, $2, 'test', $3, $4, $1, $5)",
                e.id, e.type, e.time, '{"n": 1}', now)
        for grp, e, status, owner in [("inventory", placed[0], "pending", None),
                                      ("ledger", placed[0], "pending", "gone-worker"),
                                      ("inventory", placed[1], "done", None),
                                      ("inventory", placed[2], "pending", None)]:
            await conn.execute(
                f"INSERT INTO {q}.deliveries (app, grp, event_id, status, attempts, owner, "
                "fence, updated_at) VALUES ('shop', $1, $2, $3, $4, $5, $6, $7)",
                grp, e.id, status, 1 if owner else 0, owner, 1 if owner else 0, now)
    finally:
        await conn.close()
    store = PostgresStore(with_schema(postgres_url, fresh_schema))
    await store.open()
    try:
        await store.declare("shop", [Declaration("handler", "inventory", "order.placed"),
                                     Declaration("handler", "ledger", "order.placed"),
                                     Declaration("handler", "payment", "inventory.reserved")])
        assert [(d.group, str(d.status)) for d in await store.deliveries("shop", placed[0].id)
                ] == [("inventory", "pending"), ("ledger", "pending")]
        assert await store.delivery_states("shop", "inventory", [e.id for e in placed]) == {
            placed[0].id: ("pending", 0), placed[1].id: ("done", 0),
            placed[2].id: ("pending", 0)}
        assert [e.id for e in await store.pending_events("shop", "inventory", limit=10)] == [
            placed[0].id, placed[2].id]
        later = time.time() + 1
        claimed = await store.claim_deliveries("shop", "w1", ["inventory", "ledger"],
                                               now=later, stale_before=later, limit=10)
        assert sorted((d.group, d.event.id) for d in claimed) == sorted(
            [("inventory", placed[0].id), ("ledger", placed[0].id),
             ("inventory", placed[2].id)])
        reserved = Event("inventory.reserved", {"n": 0}, correlation_id=placed[0].id)
        assert await store.settle_delivery("shop", "inventory", placed[0].id, Settlement(
            "done", 1, events=[reserved], hold_for="w1", hold=[("payment", reserved.id)]))
        [held] = await store.deliveries("shop", reserved.id)
        assert (held.group, str(held.status), held.attempts) == ("payment", "pending", 1)
        assert (await store.verify_audit("shop")).ok
    finally:
        await store.close()
