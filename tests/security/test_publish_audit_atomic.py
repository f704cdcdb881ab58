"""An operator's publish (``app.publish(actor=...)``, ``cantata publish``, the API) and its
``event.published`` record are one write: the record exists if and only if the event
does, whatever fails or dies in between, and a retried publish records it once
(docs/security.md, "What the audit log records")."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from cantata import App
from cantata.errors import StoreCorrupt
from cantata.model.records import AuditRecord
from cantata.store.base import Store
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import forged_after
from tests.helpers import eventually, with_schema
from tests.security.publish_child import ACTOR, APP, KEY
from tests.store.tamper import pg_tamper, record, sqlite_tamper

CHILD = Path(__file__).with_name("publish_child.py")


def shop(store_url: str) -> App:
    app = App(APP, store=store_url, audit_key=KEY, poll_interval=0.05)

    @app.on("order.placed", group="ledger")
    async def book(event: object) -> None:
        pass

    return app


async def tamper(store: Store, url: str, rec: AuditRecord, how: str) -> None:
    """Forge a record after ``rec`` (``"forge"``) or delete ``rec`` (``"delete"``) behind
    the store's back, as someone with access to its database would."""
    if isinstance(store, PostgresStore):
        await pg_tamper(url.split("?")[0], store._db.schema, APP, rec, how)
        return
    assert isinstance(store, SQLiteStore)  # memory:// too: only its own connection sees it
    await store._t.write(lambda c: sqlite_tamper(c, APP, rec, how))


async def published(store: Store) -> tuple[set[str], list[str]]:
    """The ids of the stored ``order.placed`` events, and the targets of the
    ``event.published`` records (a list: a record written twice shows twice)."""
    events = await store.find_events(APP, "order.placed", since=0, exclude=[], limit=1000)
    records = await store.audit_records(APP, limit=10_000)
    return {e.id for e in events}, [r.target for r in records if r.action == "event.published"]


async def handled(store: Store, event_id: str) -> bool:
    """Whether group ``ledger`` has handled ``event_id`` (its record written)."""
    records = await store.audit_records(APP, limit=10_000)
    return any(r.action == "delivery.done" and r.target == f"ledger:{event_id}" for r in records)


async def test_a_publish_whose_record_cannot_be_written_stores_no_event(
    store_url: str,
) -> None:
    """The record's write fails (a record forged past the chain head takes its place):
    the event is not stored either; once the store is restored, the same publish stores
    both, once."""
    app = shop(store_url)
    async with app:
        await app.publish("order.placed", {"n": 0}, id="evt-0", actor=ACTOR)
        await eventually(lambda: handled(app.store, "evt-0"), what="evt-0 handled")
        last = await record(app.store, APP, await app.store.audit_head_seq(APP))
        await tamper(app.store, store_url, last, "forge")
        with pytest.raises(StoreCorrupt, match="tampered"):
            await app.publish("order.placed", {"n": 1}, id="evt-1", actor=ACTOR)
        assert await app.store.get_event(APP, "evt-1") is None
        assert await published(app.store) == ({"evt-0"}, ["evt-0"])

        await tamper(app.store, store_url, forged_after(last), "delete")  # restored
        again = await app.publish("order.placed", {"n": 1}, id="evt-1", actor=ACTOR)
        repeat = await app.publish("order.placed", {"n": 1}, id="evt-1", actor=ACTOR)
        assert not again.duplicate and repeat.duplicate
        assert await published(app.store) == ({"evt-0", "evt-1"}, ["evt-0", "evt-1"])
        report = await app.store.verify_audit(APP, key=app.audit_key)
    assert report.ok, report


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store another process can open: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/pub.db"
        return
    base: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")  # migrated ahead (tests/conftest.py)
    yield with_schema(base, schema)


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTATA_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    return env


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
async def test_a_publisher_killed_once_the_event_is_written_leaves_its_record(
    shared_url: str,
) -> None:
    app = shop(shared_url)
    async with app:  # the store, its chain keyed from its first record
        await app.publish("order.placed", {"n": 0}, id="evt-0", actor=ACTOR)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        shared_url,
        "evt-1",
        env=child_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL, out.decode()
    async with app.client():
        events, records = await published(app.store)
        assert events == {"evt-0", "evt-1"}  # the kill came after the write
        assert records == ["evt-0", "evt-1"], "the killed publish's event has no record"
        # The operator, not knowing, publishes it again: a repeat, recorded as one.
        repeat = await app.publish("order.placed", {"n": 1}, id="evt-1", actor=ACTOR)
        assert repeat.duplicate
        assert (await published(app.store))[1] == ["evt-0", "evt-1"]
        actions = [r.action for r in await app.store.audit_records(APP, limit=10_000)]
        assert actions.count("event.publish_repeated") == 1
        assert (await app.store.verify_audit(APP, key=app.audit_key)).ok


async def _blocked_by(url: str, holder: int, timeout: float = 30.0) -> int:
    """The pid of the backend waiting for a lock that backend ``holder`` holds (read on a
    connection of its own: pg_stat_activity is a snapshot per transaction)."""
    conn = await asyncpg.connect(url)
    try:

        async def waiting() -> int | None:
            pid: int | None = await conn.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) LIMIT 1",
                holder,
            )
            return pid

        pid = await eventually(waiting, timeout=timeout, what="a publish waiting")
    finally:
        await conn.close()
    assert isinstance(pid, int)
    return pid


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
async def test_cantata_publish_killed_while_its_record_waits_leaves_no_event(
    postgres_url: str,
    pooled_schema: str,
) -> None:
    """`cantata publish` is killed while its audit record waits for the chain head (held
    by another transaction): the event it wrote is rolled back with the record."""
    url = with_schema(postgres_url, pooled_schema)
    app = shop(url)
    async with app:
        await app.publish("order.placed", {"n": 0}, id="evt-0", actor=ACTOR)
    conn = await asyncpg.connect(postgres_url)
    try:
        tx = conn.transaction()
        await tx.start()
        await conn.execute(
            f'SELECT 1 FROM "{pooled_schema}".audit_head WHERE app=$1 FOR UPDATE', APP
        )
        env = {**child_env(), "CANTATA_AUDIT_KEY": KEY}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cantata",
            "publish",
            "order.placed",
            "--data",
            '{"n": 1}',
            "--app",
            APP,
            "--store",
            url,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            backend = await _blocked_by(postgres_url, conn.get_server_pid())
        finally:
            proc.kill()  # SIGKILL
            out, _ = await proc.communicate()
        assert proc.returncode == -signal.SIGKILL, out.decode()
        await tx.rollback()

        async def gone() -> bool:  # (its transaction rolled back, or committed)
            await conn.execute("SELECT pg_stat_clear_snapshot()")
            return not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid=$1", backend
            )

        await eventually(gone, timeout=30, what="the killed publish's backend to end")
    finally:
        await conn.close()
    async with app.client():
        assert await published(app.store) == ({"evt-0"}, ["evt-0"])
        assert (await app.store.verify_audit(APP, key=app.audit_key)).ok
