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
from cantata.store import migrations
from cantata.store import postgres_pool as pool
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


async def test_an_upgrade_never_holds_up_the_older_workers(
    postgres_url: str, fresh_schema: str
) -> None:
    """An older worker's transaction holds the workers table (a heartbeat in a write
    batch) for 1.5 s and then writes deliveries, while a newer worker migrates; another
    older worker heartbeats every 20 ms, each statement allowed 0.5 s of lock waiting.
    No statement of theirs times out or deadlocks, and the migration finishes."""
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
                await asyncio.sleep(1.5)
                await batch.execute(f"LOCK TABLE {q}.deliveries IN ROW EXCLUSIVE MODE")
        except asyncpg.PostgresError as exc:
            failures.append(f"the older batch: {exc}")

    async def older_heartbeats() -> None:
        while not stop.is_set():
            try:
                async with beats.transaction():
                    await beats.execute("SET LOCAL lock_timeout = 500")
                    await beats.execute(f"LOCK TABLE {q}.workers IN ROW EXCLUSIVE MODE")
                    await beats.execute(f"LOCK TABLE {q}.deliveries IN ROW EXCLUSIVE MODE")
            except asyncpg.PostgresError as exc:
                failures.append(f"a heartbeat: {exc}")
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
    assert took >= 1.0, f"the migration took the workers table in {took:.2f} s, under the batch"
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
