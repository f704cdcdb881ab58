"""The PostgreSQL store's writer keeps the connection of its last transaction for the
next one (``PgPool.conn(keep=True)``, docs/performance.md "Round twenty-two"): never
when the pool has one connection only, never one the server lost, and never past the
store's close."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import asyncpg
import pytest

from cantata.model.codec import new_id
from cantata.model.records import ENTRY_COMPLETED, RunWrite
from cantata.model.status import RunStatus
from cantata.store import postgres_pool
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import entry, new_run
from tests.engine import test_pg_shortages
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool
from tests.store.test_postgres import opened

pytestmark = pytest.mark.postgres

# A login role of the test's own, whose sessions it can end (tests/engine/test_pg_shortages.py).
limited_role = test_pg_shortages.limited_role


@pytest.fixture
def url(postgres_url: str, schema_pool: SchemaPool) -> Iterator[str]:
    schema = schema_pool.take()
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)


async def _run(store: PostgresStore, app: str) -> str:
    run = new_run(app, owner="w1", fence=1, status=RunStatus.RUNNING)
    assert (await store.create_run(run))[1]
    return run.run_id


def _step(n: int) -> RunWrite:
    return RunWrite(entries=[entry(f"s#{n}", n, ENTRY_COMPLETED, result="1")])


async def test_a_pool_of_one_connection_is_not_held_between_writes(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reads between writes on a pool of one never wait for the writer's connection
    (kept, each would wait until it is given back: 1 s here, 30 s in all)."""
    monkeypatch.setattr(postgres_pool, "KEEP_IDLE", 1.0)
    app = f"app-{new_id()[-8:]}"
    async with opened(url, pool_size=1) as store:
        run_id = await _run(store, app)
        began = time.monotonic()
        for n in range(30):
            await store.commit_run(app, run_id, 1, _step(n))
            assert await store.get_run(app, run_id) is not None
        took = time.monotonic() - began
    assert took < 10.0, f"30 writes and reads on a pool of one took {took:.2f} s"


async def test_the_store_closes_at_once_after_a_write(url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    store = PostgresStore(url)
    await store.open()
    try:
        run_id = await _run(store, app)
        await store.commit_run(app, run_id, 1, _step(1))
    finally:
        began = time.monotonic()
        await store.close()
    took = time.monotonic() - began
    assert took < 5.0, f"the store took {took:.2f} s to close"


async def test_a_connection_the_server_ended_is_not_written_on_again(
    postgres_url: str, limited_role: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every session of the store (a role of its own) is ended by the server between two
    writes, the writer's kept one too (kept for 5 s here): the next writes go on new
    connections, and succeed."""
    monkeypatch.setattr(postgres_pool, "KEEP_IDLE", 5.0)
    role = limited_role
    url = with_schema(postgres_url.replace("://postgres@", f"://{role}@", 1), f"s_{role}")
    app = f"app-{new_id()[-8:]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        async with opened(url) as store:
            run_id = await _run(store, app)
            await store.commit_run(app, run_id, 1, _step(1))
            ended = await admin.fetchval(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM "
                "pg_stat_activity WHERE usename = $1) t", role)
            assert ended, "no session of the store to end"
            for _ in range(100):  # until the server has ended them all
                if not await admin.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE usename = $1", role):
                    break
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # (and this process has seen its sockets close)
            for n in range(2, 5):
                await store.commit_run(app, run_id, 1, _step(n))
            history = await store.load_history(app, run_id)
    finally:
        await admin.close()
    assert [e.key for e in history] == [f"s#{n}" for n in range(1, 5)]
