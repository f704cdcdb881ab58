"""A delivery settled done after it was dead-lettered takes its dead letters with it
(SQLite migration 0019, PostgreSQL 0025): on every write path of each store, and for
the dead letters earlier versions left, which the upgrade removes. And a dead-lettered
delivery takes no late retry nor a second dead letter (PostgreSQL 0026): on every path.

Two copies of one delivery can run at once (a broker's redelivery, a lease run out):
one dead-letters it, the other completes it. Replaying the dead letter left behind
used to put the handled delivery back to pending, and its effect was applied twice.
The store contract (``test_a_delivery_handled_after_its_dead_letter_leaves_none_to_
replay``) checks the behaviour; these check each path and the upgrade.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cantata.errors import DeadLetterNotFound
from cantata.model.codec import new_id
from cantata.model.records import DELIVERY_DEAD, DELIVERY_DONE, DELIVERY_PENDING, Declaration
from cantata.store.base import Settlement, Store
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import ev
from tests.helpers import with_schema
from tests.store.test_postgres import opened
from tests.store.test_sqlite import assert_latest_version

APP = "shop"


async def dead_then_done(store: Store) -> tuple[str, str]:
    """An event dead-lettered by one copy and completed by another; and another event
    dead-lettered only. Their dead letter ids."""
    await store.declare(APP, [Declaration("handler", "g", "order.placed")])
    e, other = ev(), ev()
    await store.append_events(APP, [e, other])
    gone, stays = new_id(), new_id()
    assert await store.settle_delivery(APP, "g", e.id, Settlement(
        "dead", 3, error="E: one copy", dead_letter_id=gone))
    assert await store.settle_delivery(APP, "g", other.id, Settlement(
        "dead", 1, error="E: stays", dead_letter_id=stays))
    assert await store.settle_delivery(APP, "g", e.id, Settlement(
        "done", 1, [ev("order.paid", causation_id=e.id)]))
    [row] = await store.deliveries(APP, e.id)
    assert row.status == DELIVERY_DONE
    return gone, stays


async def dead_stays_dead(store: Store) -> None:
    """Second copies that fail after the first dead-lettered their delivery (one
    settlement at a time, then several in one batch): neither a retry nor a dead
    changes it, and a pending delivery in the same batch still takes its retry."""
    import asyncio

    await store.declare(APP, [Declaration("handler", "g", "order.placed")])
    a, b, c = ev(), ev(), ev()
    await store.append_events(APP, [a, b, c])
    for x in (a, b):
        assert await store.settle_delivery(APP, "g", x.id, Settlement(
            "dead", 3, error="E: first copy", dead_letter_id=f"dl-{x.id}"))
    assert not await store.settle_delivery(APP, "g", a.id, Settlement(
        "retry", 2, error="E: late", retry_at=time.time()))
    assert not await store.settle_delivery(APP, "g", a.id, Settlement(
        "dead", 3, error="E: late", dead_letter_id=new_id()))
    late = list(await asyncio.gather(  # (gather gives a list, typed as a tuple)
        store.settle_delivery(APP, "g", a.id, Settlement(
            "retry", 2, error="E: late", retry_at=time.time())),
        store.settle_delivery(APP, "g", b.id, Settlement(
            "dead", 3, error="E: late", dead_letter_id=new_id())),
        store.settle_delivery(APP, "g", c.id, Settlement(
            "retry", 1, error="E: c", retry_at=time.time())),
    ))
    assert late == [False, False, True]
    for x in (a, b):
        [row] = await store.deliveries(APP, x.id)
        assert (row.status, row.error) == (DELIVERY_DEAD, "E: first copy")
    assert sorted(d.id for d in await store.dead_letters(APP)) == sorted(
        f"dl-{x.id}" for x in (a, b))
    [row] = await store.deliveries(APP, c.id)
    assert (row.status, row.error) == (DELIVERY_PENDING, "E: c")


async def check_handled(store: Store, gone: str, stays: str) -> None:
    listed = [d.id for d in await store.dead_letters(APP)]
    assert stays in listed and gone not in listed
    with pytest.raises(DeadLetterNotFound):
        await store.replay_dead_letter(APP, gone, time.time())
    replayed = await store.replay_dead_letter(APP, stays, time.time())
    assert replayed.id == stays  # a dead letter of a delivery not handled replays


# -- SQLite ----------------------------------------------------------------------------


async def test_sqlite_done_after_dead_drops_the_dead_letter(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await check_handled(store, *await dead_then_done(store))
    finally:
        await store.close()


async def test_sqlite_a_dead_delivery_takes_no_late_retry_nor_dead(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "s.db"))
    await store.open()
    try:
        await dead_stays_dead(store)
    finally:
        await store.close()


async def test_sqlite_upgrade_removes_dead_letters_of_handled_deliveries(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await store.declare(APP, [Declaration("handler", "g", "order.placed")])
        e, other = ev(), ev()
        await store.append_events(APP, [e, other])
        for x in (e, other):
            await store.settle_delivery(APP, "g", x.id, Settlement("dead", 1, error="E: x"))
    finally:
        await store.close()
    # as version 18 left it: no trigger, and a dead letter whose delivery was handled
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER deliveries_handled_drop_dead_letters")
        conn.execute("UPDATE deliveries SET status='done' WHERE event_id=?", (e.id,))
        conn.execute("UPDATE cantata_meta SET value='18' WHERE key='schema_version'")
        assert conn.execute("SELECT count(*) FROM dead_letters").fetchone() == (2,)
    finally:
        conn.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert [d.event.id for d in await store.dead_letters(APP)] == [other.id]
        [row] = await store.deliveries(APP, other.id)
        assert row.status == DELIVERY_DEAD
    finally:
        await store.close()
    assert_latest_version(path)


async def test_sqlite_replay_never_reopens_a_handled_delivery(tmp_path: Path) -> None:
    """The replay's own guard, with the trigger out of the way: a dead letter of a
    handled delivery (written by hand, say) is taken off the list, and the delivery
    stays handled."""
    path = tmp_path / "s.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await store.declare(APP, [Declaration("handler", "g", "order.placed")])
        e = ev()
        await store.append_events(APP, [e])
        await store.settle_delivery(APP, "g", e.id, Settlement("done", 1))
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            conn.execute("INSERT INTO dead_letters VALUES (?,?,?,?,?,?,?)",
                         (APP, "dl-by-hand", "g", e.id, "E: x", 1, time.time()))
        finally:
            conn.close()
        await store.replay_dead_letter(APP, "dl-by-hand", time.time())
        [row] = await store.deliveries(APP, e.id)
        assert row.status == DELIVERY_DONE
        assert not await store.settle_delivery(APP, "g", e.id, Settlement("done", 2))
    finally:
        await store.close()


# -- PostgreSQL ------------------------------------------------------------------------


@pytest.fixture
def pg_url(postgres_url: str, pooled_schema: str) -> str:
    return with_schema(postgres_url, pooled_schema)


@pytest.fixture(params=["one statement", "transaction"])
async def pg_store(request: pytest.FixtureRequest, pg_url: str) -> AsyncIterator[PostgresStore]:
    async with opened(pg_url) as s:
        if request.param == "transaction":
            s._w._one = None  # every batch BEGIN ... COMMIT: the other write path
        yield s


@pytest.mark.postgres
async def test_postgres_done_after_dead_drops_the_dead_letter(pg_store: PostgresStore) -> None:
    await check_handled(pg_store, *await dead_then_done(pg_store))


@pytest.mark.postgres
async def test_postgres_a_dead_delivery_takes_no_late_retry_nor_dead(
    pg_store: PostgresStore,
) -> None:
    await dead_stays_dead(pg_store)


@pytest.mark.postgres
async def test_postgres_upgrade_removes_dead_letters_of_handled_deliveries(
    pg_url: str,
) -> None:
    import asyncpg

    async with opened(pg_url) as store:
        await store.declare(APP, [Declaration("handler", "g", "order.placed")])
        e, other = ev(), ev()
        await store.append_events(APP, [e, other])
        for x in (e, other):
            await store.settle_delivery(APP, "g", x.id, Settlement("dead", 1, error="E: x"))
        schema = store._db.schema
    # as version 24 left it: no trigger, and a dead letter whose delivery was handled
    conn = await asyncpg.connect(pg_url.split("?")[0])
    try:
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute("DROP TRIGGER deliveries_handled_drop_dead_letters ON deliveries")
        await conn.execute("DROP FUNCTION cantata_drop_handled_dead_letters()")
        await conn.execute("UPDATE deliveries SET status='done' WHERE event_id=$1", e.id)
        await conn.execute("DELETE FROM schema_version WHERE version >= 25")
        assert await conn.fetchval("SELECT count(*) FROM dead_letters") == 2
    finally:
        await conn.close()
    async with opened(pg_url) as store:
        assert [d.event.id for d in await store.dead_letters(APP)] == [other.id]
        [row] = await store.deliveries(APP, other.id)
        assert row.status == DELIVERY_DEAD
        await check_handled(store, *await dead_then_done(store))


@pytest.mark.postgres
async def test_postgres_replay_never_reopens_a_handled_delivery(pg_url: str) -> None:
    """As on SQLite: a dead letter of a handled delivery written by hand."""
    import asyncpg

    async with opened(pg_url) as store:
        await store.declare(APP, [Declaration("handler", "g", "order.placed")])
        e = ev()
        await store.append_events(APP, [e])
        await store.settle_delivery(APP, "g", e.id, Settlement("done", 1))
        conn = await asyncpg.connect(pg_url.split("?")[0])
        try:
            await conn.execute(
                f'INSERT INTO "{store._db.schema}".dead_letters VALUES ($1,$2,$3,$4,$5,$6,$7)',
                APP, "dl-by-hand", "g", e.id, "E: x", 1, time.time())
        finally:
            await conn.close()
        await store.replay_dead_letter(APP, "dl-by-hand", time.time())
        [row] = await store.deliveries(APP, e.id)
        assert row.status == DELIVERY_DONE
        assert not await store.settle_delivery(APP, "g", e.id, Settlement("done", 2))
