"""The schemas tests/schema_pool.py makes ahead are what a store's own first open makes
of a new schema, a store opened there migrates nothing, and every schema the pool made
is dropped by the end."""

from __future__ import annotations

import time

import asyncpg
import pytest

from cantata.store import migrations
from cantata.store.postgres import PostgresStore
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool

pytestmark = pytest.mark.postgres


async def catalog(conn: asyncpg.Connection[asyncpg.Record], schema: str) -> dict[str, object]:
    """What a schema holds, its own name written ``<schema>``: columns, indexes,
    constraints, triggers, functions (their bodies and settings), the version rows."""

    def named(rows: list[asyncpg.Record]) -> list[tuple[object, ...]]:
        return sorted(
            tuple(str(v).replace(schema, "<schema>") if v is not None else None for v in r)
            for r in rows
        )

    ns = "(SELECT oid FROM pg_namespace WHERE nspname = $1)"
    return {
        "columns": named(await conn.fetch(
            "SELECT table_name, column_name, data_type, is_nullable, column_default "
            "FROM information_schema.columns WHERE table_schema = $1", schema)),
        "indexes": named(await conn.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", schema)),
        "constraints": named(await conn.fetch(
            f"SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            f"WHERE connamespace = {ns}", schema)),
        "triggers": named(await conn.fetch(
            f"SELECT tgname, pg_get_triggerdef(t.oid) FROM pg_trigger t "
            f"JOIN pg_class c ON c.oid = t.tgrelid WHERE c.relnamespace = {ns} "
            "AND NOT t.tgisinternal", schema)),
        "functions": named(await conn.fetch(
            f"SELECT proname, pg_get_functiondef(oid) FROM pg_proc WHERE pronamespace = {ns}",
            schema)),
        "versions": [r[0] for r in await conn.fetch(
            f'SELECT version FROM "{schema}".schema_version ORDER BY version')],
    }


async def test_a_pooled_schema_is_a_new_stores_own_and_opening_it_migrates_nothing(
    postgres_url: str, fresh_schema: str
) -> None:
    store = PostgresStore(with_schema(postgres_url, fresh_schema))
    await store.open()
    await store.close()
    pool = SchemaPool(postgres_url, ready=1)
    try:
        pooled = pool.take()
        conn = await asyncpg.connect(postgres_url)
        try:
            made = await catalog(conn, pooled)
            assert made == await catalog(conn, fresh_schema)
            assert made["versions"] == sorted(migrations.scripts("postgres"))
            applied = await conn.fetch(f'SELECT * FROM "{pooled}".schema_version')
            opened_at = time.time()
            store = PostgresStore(with_schema(postgres_url, pooled))
            await store.open()
            try:
                assert await store.identity()
            finally:
                await store.close()
            assert await conn.fetch(f'SELECT * FROM "{pooled}".schema_version') == applied
            assert all(r["applied_at"] < opened_at for r in applied)
        finally:
            await conn.close()
        pool.give_back(pooled)
    finally:
        pool.close()


async def test_every_schema_the_pool_made_is_dropped_by_its_close(postgres_url: str) -> None:
    prefix = f"tpt_{int(time.time() * 1000) % 10**9}_"
    pool = SchemaPool(postgres_url, ready=2, prefix=prefix)
    try:
        taken = [pool.take() for _ in range(3)]
        assert len(set(taken)) == 3
        pool.give_back(taken[0])
        pool.give_back(taken[1])
    finally:
        pool.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        left = [r[0] for r in await conn.fetch(
            "SELECT nspname FROM pg_namespace WHERE starts_with(nspname, $1)", prefix)]
    finally:
        await conn.close()
    # The one not given back is the test's own to drop (as a test still using it).
    assert left == [taken[2]]
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA "{taken[2]}" CASCADE')
    finally:
        await conn.close()
