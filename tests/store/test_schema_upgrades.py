"""A newer Cantata migrates the store while a worker of this one still runs on it
(docs/deploy.md "Upgrading Cantata", docs/leases.md).

A future migration is simulated from outside, as a newer release would run it: a column
with a default added to every table, and the schema version the store records bumped
past the one this code knows. This code must

- keep writing once columns are added (every INSERT names its columns), and
- notice the newer schema with its heartbeat (a cheap read once every
  ``SCHEMA_CHECK_EVERY`` heartbeats, and after a heartbeat that failed) and stop:
  the store's heartbeat raises :class:`cantata.StoreUpgraded`, the engine logs it once,
  stops claiming and ``app.run_worker()`` drains and raises it.

The same with real ``cantata worker`` processes: tests/test_audit_upgrade.py.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import cantata
from cantata import Event, Rate, Retry, StoreCorrupt, StoreUpgraded, WorkflowContext
from cantata.store.factory import store_from_url
from cantata.store.postgres_pool import SCHEMA_VERSION as PG_SCHEMA
from cantata.store.roles.lifecycle import SCHEMA_CHECK_EVERY
from cantata.store.sqlite_open import SCHEMA_VERSION as SQLITE_SCHEMA
from tests.helpers import drop_schema, eventually, make_app, with_schema

SRC = Path(__file__).resolve().parents[2] / "src" / "cantata"

# INSERT INTO <table> followed by VALUES or SELECT: no column list.
_BARE_INSERT = re.compile(
    r"INSERT\s+(?:OR\s+\w+\s+)?INTO\s+[\w\".{}]+\s+(?:VALUES|SELECT)\b", re.IGNORECASE
)


def test_every_insert_names_its_columns() -> None:
    """An INSERT without a column list breaks (SQLite: 'table X has 9 columns but 8
    values were supplied') as soon as a newer release adds a column, under every worker
    of this release still running: each names its columns, in the code and in the
    migrations' server functions."""
    bare = []
    for path in sorted([*SRC.rglob("*.py"), *(SRC / "store" / "migrations").rglob("*.sql")]):
        if "testing" in path.relative_to(SRC).parts:
            continue  # the contract suite's own tables of a transactional step's test
        text = path.read_text()
        for m in _BARE_INSERT.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            bare.append(f"{path.relative_to(SRC)}:{line}: {m.group(0)}")
    assert not bare, "INSERTs without a column list:\n" + "\n".join(bare)


# -- the store seen from outside, as a newer release's migration sees it ---------------


@dataclass
class Outside:
    """SQL on the store's tables from outside Cantata."""

    kind: str
    url: str  # the store's URL
    target: str  # SQLite: the file; PostgreSQL: the server's URL
    schema: str = ""

    @property
    def known(self) -> int:
        return SQLITE_SCHEMA if self.kind == "sqlite" else PG_SCHEMA

    async def run(self, *statements: str) -> None:
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.target, timeout=30, isolation_level=None)
            try:
                for s in statements:
                    conn.execute(s)
            finally:
                conn.close()
            return
        conn2 = await asyncpg.connect(self.target)
        try:
            await conn2.execute(f'SET search_path TO "{self.schema}"')
            for s in statements:
                await conn2.execute(s)
        finally:
            await conn2.close()

    async def tables(self) -> list[str]:
        if self.kind == "sqlite":
            conn = sqlite3.connect(self.target)
            try:
                return [r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type='table' "
                    "AND name NOT LIKE 'sqlite_%'")]
            finally:
                conn.close()
        conn2 = await asyncpg.connect(self.target)
        try:
            rows = await conn2.fetch(
                "SELECT tablename FROM pg_tables WHERE schemaname=$1", self.schema)
            return [r[0] for r in rows]
        finally:
            await conn2.close()

    async def add_a_column_everywhere(self) -> None:
        """What a newer migration may do to any table: add a column with a default."""
        await self.run(*[
            f"ALTER TABLE {t} ADD COLUMN added_later TEXT NOT NULL DEFAULT 'later'"
            for t in await self.tables()
        ])

    async def restore(self) -> None:
        """Record this release's schema version again (to read the store with it)."""
        if self.kind == "sqlite":
            await self.bump(self.known)
        else:
            await self.run(f"DELETE FROM schema_version WHERE version > {self.known}")

    async def bump(self, to: int) -> None:
        """Record schema version ``to``, as the newer release's migration does."""
        if self.kind == "sqlite":
            await self.run(
                f"UPDATE cantata_meta SET value='{to}' WHERE key='schema_version'")
        else:
            await self.run(
                f"INSERT INTO schema_version (version, applied_at) VALUES ({to}, 0)")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def outside(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[Outside]:
    if request.param == "sqlite":
        path = tmp_path / "store.db"
        yield Outside("sqlite", f"sqlite:///{path}", str(path))
        return
    postgres_url = request.getfixturevalue("postgres_url")
    schema = f"cantata_fresh_{uuid.uuid4().hex[:10]}"  # as tests/conftest.py's fresh_schema
    try:
        yield Outside("postgres", with_schema(postgres_url, schema), postgres_url, schema)
    finally:
        await drop_schema(postgres_url, schema)


def upgraded_message(outside: Outside) -> str:
    return (rf"was upgraded by a newer Cantata while this worker ran on it: it has schema "
            rf"version {outside.known + 1}, newer than this Cantata \({outside.known}\); "
            r".*restart it with the new release")


# -- (a) columns added by a newer release ---------------------------------------------


def busy_app(url: str) -> tuple[cantata.App, Any]:
    """An app whose runs write every kind of row: runs, history and attempts, a limited
    and rate-limited step's slot and begin, step heartbeats, emitted events and their
    deliveries, a handler's dead letter, the audit chain (keyed), queue and schedule
    declarations."""
    app = make_app(url, name="later", audit_key="k" * 32)
    app.queue("q", concurrency=2)

    @app.step
    async def plain(i: int) -> int:
        return i + 1

    @app.step(concurrency=1, rate=Rate(1000, per=1))
    async def limited(i: int) -> int:
        cantata.heartbeat({"i": i})
        await asyncio.sleep(0.01)
        return i

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, i: int) -> int:
        n: int = await ctx.run(plain, i)
        await ctx.run(limited, n)
        await ctx.emit("job.done", {"i": i})
        return n

    @app.on("job.done", group="refuses", retry=Retry(max_attempts=1))
    async def refuses(event: Event[Any]) -> None:
        raise ValueError("refused, for the dead letter")

    @app.schedule(every=3600)
    @app.workflow
    async def hourly(ctx: WorkflowContext, at: Any) -> None:
        return None

    return app, job


async def test_columns_a_newer_release_adds_break_no_write(
    outside: Outside, caplog: pytest.LogCaptureFixture
) -> None:
    """Every table gains a column with a default (a newer release's migration, its
    version not recorded yet): the runs of this release still write every kind of row."""
    app, job = busy_app(outside.url)
    async with app:
        assert await (await app.start(job, 0)).result(timeout=60) == 1
    await outside.add_a_column_everywhere()
    app, job = busy_app(outside.url)
    with caplog.at_level(logging.WARNING, "cantata"):
        async with app:
            handles = [await app.start(job, i) for i in range(1, 4)]
            assert [await h.result(timeout=60) for h in handles] == [2, 3, 4]
            await eventually(lambda: _dead_letters(app, 4), timeout=60)
            report = await app.store.verify_audit("later", key=app.audit_key)
            assert report.ok, report
    assert not [r.getMessage() for r in caplog.records
                if r.levelno >= logging.WARNING and "dead-lettering" not in r.getMessage()]


async def _dead_letters(app: cantata.App, n: int) -> bool:
    return len(await app.dead_letters()) >= n


# -- (b) a newer schema version under a running worker -------------------------------


async def test_a_heartbeat_says_the_store_was_upgraded_within_a_few_beats(
    outside: Outside,
) -> None:
    """The store's heartbeat reads the schema version every SCHEMA_CHECK_EVERY beats:
    within that many beats of a bump it raises StoreUpgraded (a StoreCorrupt, as the
    refusal at start-up) naming the store, both versions and what to do, once; later
    beats go on (the worker drains meanwhile)."""
    store = store_from_url(outside.url)
    await store.open()
    try:
        for _ in range(2 * SCHEMA_CHECK_EVERY):
            await store.heartbeat("a", "w", 100.0, None, lease=10)
        await outside.bump(outside.known + 1)
        raised: list[StoreUpgraded] = []
        for _ in range(SCHEMA_CHECK_EVERY):
            try:
                await store.heartbeat("a", "w", 100.0, None, lease=10)
            except StoreUpgraded as exc:
                raised.append(exc)
        assert len(raised) == 1, raised
        assert isinstance(raised[0], StoreCorrupt) and raised[0].code == "store_upgraded"
        assert re.search(upgraded_message(outside), str(raised[0])), str(raised[0])
        for _ in range(2 * SCHEMA_CHECK_EVERY):  # said once: the drain's heartbeats go on
            await store.heartbeat("a", "w", 101.0, None, lease=10)
        assert [w.heartbeat_at for w in await store.workers("a")] == [101.0]
    finally:
        await store.close()


async def test_a_failed_heartbeat_on_an_upgraded_store_says_so_at_once(
    outside: Outside,
) -> None:
    """A newer release changed what this one writes (here: the workers table is gone):
    the first heartbeat that fails reads the version and raises StoreUpgraded instead of
    the driver's error; on a store that was not upgraded the failure is its own."""
    store = store_from_url(outside.url)
    await store.open()
    try:
        await store.heartbeat("a", "w", 100.0, None, lease=10)
        await outside.run("ALTER TABLE workers RENAME TO workers_before")
        with pytest.raises(Exception) as plain:
            await store.heartbeat("a", "w", 100.0, None, lease=10)
        assert not isinstance(plain.value, StoreUpgraded)
        await outside.bump(outside.known + 1)
        with pytest.raises(StoreUpgraded, match=upgraded_message(outside)):
            await store.heartbeat("a", "w", 100.0, None, lease=10)
    finally:
        await store.close()


async def test_a_worker_on_an_upgraded_store_stops_and_says_so(
    outside: Outside, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker of this release serving (``app.run_worker()``), a step in progress: the
    store is upgraded under it. It logs one error naming what happened and what to do,
    claims no new run, lets the step in progress finish (a graceful stop), leaves the
    run to others and ``run_worker`` raises StoreUpgraded, within a few leases."""
    app = make_app(outside.url, name="up", lease=1.0)
    began: list[int] = []
    ended: list[int] = []

    @app.step
    async def slow(i: int) -> int:
        began.append(i)
        await asyncio.sleep(1.5)
        ended.append(i)
        return i

    @app.workflow
    async def job(ctx: WorkflowContext, i: int) -> int:
        await ctx.run(slow, i)
        result: int = await ctx.run(slow, i + 100)
        return result

    caplog.set_level(logging.INFO, "cantata")
    serving = asyncio.create_task(app.run_worker())
    await eventually(lambda: app._engine is not None and app._engine.serving, timeout=30)
    handle = await app.start(job, 1)
    await eventually(lambda: began == [1], timeout=30)
    await outside.bump(outside.known + 1)
    loop = asyncio.get_running_loop()
    bumped = loop.time()
    with pytest.raises(StoreUpgraded, match=upgraded_message(outside)):
        await asyncio.wait_for(serving, 45)
    # A lease (1 s) to notice, the step's 1.5 s to drain: far less than this bound,
    # unless the machine is very busy. (Before the check it never stopped.)
    assert loop.time() - bumped < 30
    assert ended == [1] and began == [1]  # drained; the next step was not begun here
    said = [r for r in caplog.records if re.search(upgraded_message(outside), r.getMessage())]
    assert len(said) == 1 and said[0].levelno == logging.ERROR, said
    # Left for others: owned by no one, not ended, the first step's result kept.
    await outside.restore()  # (as a newer release would read it)
    store = store_from_url(outside.url)
    await store.open()
    try:
        run = await store.get_run("up", handle.run_id)
        assert run is not None and run.owner is None and not run.status.is_final, run
        history = await store.load_history("up", handle.run_id)
        assert [(e.name, e.result) for e in history if e.result is not None] == [
            ("slow", "1")], history
    finally:
        await store.close()
