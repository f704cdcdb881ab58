"""The store contract on PostgreSQL, plus what only a server can get wrong.

Every test session works in its own schema (dropped at the end) and every test in
its own random app, so runs against the shared ``test`` database never leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Coroutine
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from cantata.errors import (
    ConfigurationError,
    LeaseLost,
    SerializationError,
    StoreCorrupt,
    StoreUnavailable,
)
from cantata.model.codec import new_id
from cantata.model.records import (
    ENTRY_COMPLETED,
    ENTRY_RUNNING,
    Attempt,
    AuditReport,
    Declaration,
    RunWrite,
    TaskRecord,
)
from cantata.model.status import RunStatus
from cantata.store import migrations
from cantata.store.base import RUNS
from cantata.store.factory import store_from_url
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import entry, ev, new_run
from tests.helpers import drop_schema, eventually, with_schema

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]


async def test_factory_maps_postgres_urls(postgres_url: str) -> None:
    assert isinstance(store_from_url(postgres_url), PostgresStore)
    assert isinstance(store_from_url(postgres_url.replace("postgresql", "postgres", 1)),
                      PostgresStore)
    with pytest.raises(ConfigurationError, match="schema"):
        store_from_url(with_schema(postgres_url, "Bad-Name"))


async def test_unreachable_server_is_unavailable_with_masked_password() -> None:
    store = PostgresStore("postgresql://postgres:s3cret@127.0.0.1:1/test", connect_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as caught:
        await store.open()
    elapsed = time.monotonic() - started
    message = str(caught.value)
    assert "s3cret" not in message and "postgres:***@127.0.0.1:1/test" in message
    assert "cannot reach PostgreSQL" in message and "running" in message
    assert 0.5 <= elapsed < 5  # retried with backoff, then gave up in bounded time


async def test_missing_database_is_named(postgres_url: str) -> None:
    name = f"cantata_missing_{new_id()[-8:]}"
    url = urlsplit(postgres_url)._replace(path=f"/{name}").geturl()
    with pytest.raises(StoreUnavailable, match=f"database '{name}' does not exist"):
        await PostgresStore(url).open()


async def test_unknown_user_is_named(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    url = parts._replace(netloc=f"nobody_{new_id()[-6:]}@{parts.hostname}:{parts.port}").geturl()
    with pytest.raises(StoreUnavailable, match="refused user 'nobody_"):
        await PostgresStore(url).open()


async def test_concurrent_migrations_of_a_fresh_schema(
    postgres_url: str, fresh_schema: str
) -> None:
    stores = [PostgresStore(with_schema(postgres_url, fresh_schema)) for _ in range(5)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        run, _ = await stores[0].create_run(new_run("shop"))
        assert await stores[4].get_run("shop", run.run_id) == run
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    conn = await asyncpg.connect(postgres_url)
    try:
        versions = await conn.fetch(f'SELECT version FROM "{fresh_schema}".schema_version')
        columns = await conn.fetch(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema=$1 AND table_name='runs'", fresh_schema,
        )
        types = {r[0]: r[1] for r in columns}
    finally:
        await conn.close()
    assert [v[0] for v in versions] == sorted(migrations.scripts("postgres"))
    assert types["created_at"] == "double precision" and types["fence"] == "bigint"
    assert types["cancel_requested"] == "boolean"


async def test_newer_schema_or_foreign_tables_are_corrupt(
    postgres_url: str, fresh_schema: str
) -> None:
    url = with_schema(postgres_url, fresh_schema)
    store = PostgresStore(url)
    await store.open()
    await store.close()
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'INSERT INTO "{fresh_schema}".schema_version VALUES (99, 0)')
        with pytest.raises(StoreCorrupt, match="upgrade cantata"):
            await PostgresStore(url).open()
        await conn.execute(f'DROP SCHEMA "{fresh_schema}" CASCADE')
        await conn.execute(f'CREATE SCHEMA "{fresh_schema}"')
        await conn.execute(f'CREATE TABLE "{fresh_schema}".customers (id int)')
        with pytest.raises(StoreCorrupt, match="another application"):
            await PostgresStore(url).open()
    finally:
        await conn.close()


async def test_a_missing_store_is_refused_unless_created(
    postgres_url: str, fresh_schema: str
) -> None:
    url = with_schema(postgres_url, fresh_schema)
    with pytest.raises(StoreUnavailable, match=f"store schema '{fresh_schema}' does not "
                       "exist in .*cantata demo creates a new store"):
        await store_from_url(url, create=False).open()
    conn = await asyncpg.connect(postgres_url)
    try:
        absent = "SELECT NOT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname=$1)"
        assert await conn.fetchval(absent, fresh_schema)
        await conn.execute(f'CREATE SCHEMA "{fresh_schema}"')
        with pytest.raises(StoreUnavailable, match="holds no Cantata store"):
            await store_from_url(url, create=False).open()
        assert not await conn.fetch(
            "SELECT 1 FROM pg_tables WHERE schemaname=$1", fresh_schema)
    finally:
        await conn.close()
    made = store_from_url(url)
    await made.open()
    await made.close()
    existing = store_from_url(url, create=False)
    await existing.open()
    await existing.close()


async def test_a_version_1_schema_is_upgraded_in_place(
    postgres_url: str, fresh_schema: str
) -> None:
    script = resources.files("cantata.store").joinpath("migrations/postgres/0001_initial.sql")
    old = new_run("shop")
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'CREATE SCHEMA "{fresh_schema}"')
        await conn.execute(f'SET search_path TO "{fresh_schema}"')
        await conn.execute(
            "CREATE TABLE schema_version (version integer PRIMARY KEY, "
            "applied_at double precision NOT NULL)"
        )
        await conn.execute(script.read_text())
        await conn.execute("INSERT INTO schema_version VALUES (1, 0)")
        await conn.execute(
            "INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, created_at, "
            "updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
            old.app, old.run_id, old.workflow, str(old.status), old.args, old.correlation_id,
            old.created_at, old.updated_at,
        )
    finally:
        await conn.close()
    store = PostgresStore(with_schema(postgres_url, fresh_schema))
    await store.open()
    try:
        assert await store.get_run("shop", old.run_id) == old
        assert await store.verify_audit("shop") == AuditReport(True, 0)
        await store.commit_run("shop", old.run_id, 0, RunWrite(
            tasks=[TaskRecord(f"{old.run_id}:inv.reserve#1", old.run_id, "inv.reserve#1",
                              "inv.reserve", "inventory", "[]")],
            status=RunStatus.RUNNING,
        ))
        assert len(await store.tasks_of_run("shop", old.run_id)) == 1
        assert [r.seq for r in await store.audit_records("shop")] == [1]
        assert (await store.verify_audit("shop")).ok
        assert await store.apps() == ["shop"]
    finally:
        await store.close()


async def test_the_audit_log_refuses_updates_and_deletes(pg_session_url: str) -> None:
    store = PostgresStore(pg_session_url)
    await store.open()
    app = f"app-{new_id()[-8:]}"
    try:
        await store.create_run(new_run(app))
        for sql in ("UPDATE audit SET actor='mallory' WHERE app=$1",
                    "DELETE FROM audit WHERE app=$1"):
            with pytest.raises(asyncpg.RaiseError, match="append-only"):
                async with store._db.conn() as c:
                    await c.execute(sql, app)
        assert await store.verify_audit(app) == AuditReport(True, 1)
    finally:
        await store.close()


async def test_notify_wakes_a_listener_on_another_instance(pg_session_url: str) -> None:
    a, b = PostgresStore(pg_session_url), PostgresStore(pg_session_url)
    await a.open()
    await b.open()
    try:
        heard: list[str] = []
        a.add_listener(heard.append)
        await b.create_run(new_run(f"app-{new_id()[-8:]}"))
        await eventually(lambda: RUNS in heard)
    finally:
        await a.close()
        await b.close()


async def test_listener_and_pool_survive_killed_connections(pg_session_url: str) -> None:
    store, other = PostgresStore(pg_session_url), PostgresStore(pg_session_url)
    await store.open()
    await other.open()
    admin = await asyncpg.connect(pg_session_url.split("?")[0])
    try:
        heard: list[str] = []
        store.add_listener(heard.append)
        db = store._db  # fault injection needs the server pids of this store's connections
        listen_pid = db.listener.server_pid
        assert listen_pid is not None
        async with db.conn() as c:
            pool_pid = await c.fetchval("SELECT pg_backend_pid()")
        await admin.execute("SELECT pg_terminate_backend($1)", listen_pid)
        await admin.execute("SELECT pg_terminate_backend($1)", pool_pid)
        app = f"app-{new_id()[-8:]}"
        with contextlib.suppress(StoreUnavailable):  # reported as such, never a driver error
            await store.get_run(app, "x")
        assert await store.get_run(app, "x") is None
        await eventually(lambda: RUNS in heard)  # the reconnect wakes everyone once
        heard.clear()
        await other.create_run(new_run(app))
        await eventually(lambda: RUNS in heard)
    finally:
        await admin.close()
        await store.close()
        await other.close()


# -- group commit (cantata.store.postgres_batch) ------------------------------------------


@contextlib.asynccontextmanager
async def opened(url: str, **kw: Any) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(url, **kw)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def count_transactions(store: PostgresStore) -> list[int]:
    """Sizes of the write transactions the store's writer runs from now on."""
    sizes: list[int] = []
    writer = store._w
    run = writer._transaction

    async def counted(c: Any, todo: list[Any], *rest: Any) -> Any:
        sizes.append(len(todo))
        return await run(c, todo, *rest)

    writer._transaction = counted  # type: ignore[method-assign, assignment]
    return sizes


def first_alone(store: PostgresStore, app: str) -> Coroutine[Any, Any, list[int]]:
    """A write that goes first, alone: an idle store's writer sends its first write at
    once (postgres_batch._started), so the writes gathered after it go together."""
    return store.append_events(app, [ev()])


@pytest.mark.parametrize("writers", [1, 2])
async def test_writes_one_after_another_never_wait_for_a_writer(
    pg_session_url: str, writers: int
) -> None:
    """A caller answered by a batch that emptied the queue writes again at once."""
    app = f"app-{new_id()[-8:]}"
    async with opened(pg_session_url, writers=writers) as store:

        async def chain() -> None:
            for _ in range(15):
                run, _ = await store.create_run(new_run(app))
                await store.commit_run(app, run.run_id, 0, RunWrite(
                    entries=[entry("a#1", 1)], status=RunStatus.COMPLETED, release=True,
                ))
                await store.append_events(app, [ev()])

        await asyncio.wait_for(asyncio.gather(*(chain() for _ in range(writers))), 30)
        assert len(await store.list_runs(app, status=RunStatus.COMPLETED, limit=100)) == (
            15 * writers
        )


async def test_a_write_sent_at_once_stands_when_its_caller_is_cancelled(
    pg_session_url: str,
) -> None:
    """An idle store's writer sends a write in its caller's turn; the rest of the
    write is the writer's own, in a task of its own: a cancel of the caller then stops
    the caller's wait, never the write (as for a write a writer took from the queue;
    one cancelled before a writer took it is not written)."""
    app = f"app-{new_id()[-8:]}"
    async with opened(pg_session_url) as store:
        for _ in range(10):
            event = ev()
            caller = asyncio.ensure_future(store.append_events(app, [event]))
            await asyncio.sleep(0)  # the caller's turn: the write is sent
            caller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await caller
            for _ in range(100):
                if await store.get_event(app, event.id) is not None:
                    break
                await asyncio.sleep(0.02)
            assert await store.get_event(app, event.id) == event
        assert (await store.verify_audit(app)).ok


async def test_concurrent_writes_share_transactions_and_all_land(pg_session_url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    async with opened(pg_session_url) as store:
        await store.declare(app, [Declaration("handler", "g", "order.*")])
        runs = [(await store.create_run(new_run(app)))[0] for _ in range(60)]
        sizes = count_transactions(store)
        events = [ev() for _ in range(20)]
        results = await asyncio.gather(
            *(store.commit_run(app, r.run_id, 0, RunWrite(
                entries=[entry("a#1", 1), entry("b#1", 2, ENTRY_RUNNING)],
                attempts=[Attempt("a#1", 1, 1.0, 2.0), Attempt("b#1", 1, 2.0)],
                status=RunStatus.RUNNING,
            )) for r in runs),
            *(store.append_events(app, [e]) for e in events),
            *(store.create_run(new_run(app)) for _ in range(20)),
        )
        assert results[:60] == [None] * 60 and results[60:80] == [[1]] * 20
        assert sum(sizes) == 100 and len(sizes) < 10  # a handful of COMMITs for 100 writes
        for r in runs:
            assert [h.key for h in await store.load_history(app, r.run_id)] == ["a#1", "b#1"]
            assert len(await store.load_attempts(app, r.run_id)) == 2
        for e in events:
            assert [d.group for d in await store.deliveries(app, e.id)] == ["g"]
        assert await store.verify_audit(app) == AuditReport(True, 60 + 60 + 20)


async def test_an_sql_error_fails_only_its_own_call(pg_session_url: str) -> None:
    """Not a refusal: the transaction is rolled back and the others run again without it."""
    app = f"app-{new_id()[-8:]}"
    async with opened(pg_session_url) as store:
        taken, _ = await store.create_run(new_run(app))
        a, _ = await store.create_run(new_run(app))
        b, _ = await store.create_run(new_run(app))
        sizes = count_transactions(store)
        done = ev()
        first, *results = await asyncio.gather(
            first_alone(store, app),
            store.commit_run(app, a.run_id, 0, RunWrite(status=RunStatus.COMPLETED)),
            store.create_run(new_run(app, run_id=taken.run_id)),  # primary key violation
            store.commit_run(app, b.run_id, 0, RunWrite(  # in the same grouped statement
                events=[ev(data={"not json": object()})], status=RunStatus.COMPLETED)),
            store.append_events(app, [done]),
            store.commit_run(app, a.run_id, 5, RunWrite(status=RunStatus.FAILED)),  # refused
            return_exceptions=True,
        )
        assert first == [0]
        assert results[0] is None and results[3] == [0]
        assert isinstance(results[1], asyncpg.UniqueViolationError)
        assert isinstance(results[2], SerializationError)
        assert isinstance(results[4], LeaseLost)
        assert sizes[:2] == [1, 5] and len(sizes) > 2
        got_a, got_b = [await store.get_run(app, r.run_id) for r in (a, b)]
        assert got_a is not None and got_a.status == RunStatus.COMPLETED
        assert got_b is not None and got_b.status == RunStatus.PENDING
        assert await store.get_event(app, done.id) == done
        assert (await store.verify_audit(app)).ok


async def test_keys_named_twice_end_as_if_written_in_turn(pg_session_url: str) -> None:
    """A key twice in one write, and one run twice in one transaction."""
    app = f"app-{new_id()[-8:]}"
    async with opened(pg_session_url, writers=1) as store:
        run, _ = await store.create_run(new_run(app))
        await store.commit_run(app, run.run_id, 0, RunWrite(
            entries=[entry("a#1", 1, ENTRY_RUNNING), entry("a#1", 9, result='"x"')],
            attempts=[Attempt("a#1", 1, 1.0), Attempt("a#1", 1, 5.0, 2.0, "E", "E: e")],
        ))
        [h] = await store.load_history(app, run.run_id)
        assert (h.seq, h.status, h.result) == (1, ENTRY_COMPLETED, '"x"')  # seq kept
        assert await store.load_attempts(app, run.run_id) == [
            Attempt("a#1", 1, 1.0, 2.0, "E", "E: e")  # started_at kept
        ]
        sizes = count_transactions(store)
        await asyncio.gather(
            first_alone(store, app),
            store.commit_run(app, run.run_id, 0, RunWrite(
                entries=[entry("b#1", 2, ENTRY_RUNNING)], status=RunStatus.RUNNING)),
            store.commit_run(app, run.run_id, 0, RunWrite(
                entries=[entry("b#1", 7, result='"y"')], status=RunStatus.COMPLETED,
                release=True)),
        )
        assert sizes == [1, 2]
        history = await store.load_history(app, run.run_id)
        assert [(e.key, e.seq, e.status) for e in history] == [
            ("a#1", 1, ENTRY_COMPLETED), ("b#1", 2, ENTRY_COMPLETED)
        ]
        stored = await store.get_run(app, run.run_id)
        assert stored is not None and stored.status == RunStatus.COMPLETED
        statuses = [json.loads(r.data).get("status") for r in await store.audit_records(app)]
        assert statuses[-2:] == ["running", "completed"]  # in turn: from pending, then running


async def test_a_writer_connection_killed_mid_batch(pg_session_url: str) -> None:
    """Its callers hear StoreUnavailable; the connection is never used again."""
    app = f"app-{new_id()[-8:]}"
    admin = await asyncpg.connect(pg_session_url.split("?")[0])
    async with opened(pg_session_url) as store:
        run, _ = await store.create_run(new_run(app))
        lock = admin.transaction()
        await lock.start()
        try:
            await admin.execute(
                f'SELECT 1 FROM "{store._db.schema}".runs WHERE app=$1 FOR UPDATE', app
            )
            blocked = asyncio.ensure_future(store.commit_run(app, run.run_id, 0, RunWrite(
                status=RunStatus.COMPLETED)))

            async def writer_pid() -> int | None:
                # (the one blocked by this lock: a test running beside this one may have
                # a connection of its own waiting on a lock, not to be killed)
                pid: int | None = await admin.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE application_name='cantata' "
                    "AND $1 = ANY(pg_blocking_pids(pid))", admin.get_server_pid()
                )
                return pid

            deadline = time.monotonic() + 5
            while (pid := await writer_pid()) is None:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            with pytest.raises(StoreUnavailable, match="may not have been applied"):
                await blocked
        finally:
            await lock.rollback()
            await admin.close()
        for _ in range(12):  # every pooled connection in turn: none is broken
            await store.commit_run(app, run.run_id, 0, RunWrite(entries=[entry("a#1", 1)]))
            assert await store.get_run(app, run.run_id) is not None


async def test_notifications_carry_any_app_name(pg_session_url: str) -> None:
    """The batch's NOTIFY is sent as SQL text: quotes and backslashes stay themselves."""
    app = f"it's \\ a\'pp-{new_id()[-6:]}"
    listener = await asyncpg.connect(pg_session_url.split("?")[0])
    heard: list[str] = []
    try:
        async with opened(pg_session_url) as store:
            channel = f"cantata_changes.{urlsplit(pg_session_url).query.split('=')[1]}"
            await listener.add_listener(channel, lambda *a: heard.append(str(a[3])))
            run, _ = await store.create_run(new_run(app))
            assert await store.get_run(app, run.run_id) == run
            await eventually(lambda: f"{app}:{RUNS}" in heard)
    finally:
        await listener.close()


async def test_a_store_hears_its_own_schema_only(postgres_url: str) -> None:
    """NOTIFY's channels are one name space per database: each schema notifies its
    own (migration 0027), so a store in another schema, another environment in the
    same database, does not wake for this one's commits; and no function of the
    schema is left notifying the old shared channel."""
    # the second name too long for 'cantata_changes.<schema>' (63 bytes): its md5
    schemas = [f"cantata_chan_{new_id()[-10:]}", f"cantata_chan_{new_id()[-10:]}".ljust(60, "x")]
    channels = [f"cantata_changes.{schemas[0]}",
                f"cantata_changes.{hashlib.md5(schemas[1].encode()).hexdigest()}"]
    heard: dict[str, list[str]] = {s: [] for s in schemas}
    listener = await asyncpg.connect(postgres_url)
    try:
        async with opened(with_schema(postgres_url, schemas[0])) as a, \
                opened(with_schema(postgres_url, schemas[1])) as b:
            for schema, channel in zip(schemas, channels, strict=True):
                await listener.add_listener(
                    channel, lambda *args, schema=schema: heard[schema].append(str(args[3])))
            app = f"app-{new_id()[-6:]}"  # one app name in both: only the schema differs
            run, _ = await a.create_run(new_run(app))
            await a.commit_run(app, run.run_id, 0, RunWrite(status=RunStatus.COMPLETED))
            await a.append_events(app, [ev("order.placed")])
            await b.get_run(app, run.run_id)
            await eventually(lambda: f"{app}:{RUNS}" in heard[schemas[0]])
            await asyncio.sleep(0.3)
            assert heard[schemas[1]] == [], heard
            left = await listener.fetch(
                "SELECT p.proname FROM pg_proc p JOIN pg_namespace n ON n.oid=p.pronamespace "
                "WHERE n.nspname = ANY($1::text[]) "
                "AND p.prosrc LIKE '%pg_notify(''cantata_changes''%'", schemas)
            assert left == [], [r["proname"] for r in left]
            for schema, channel in zip(schemas, channels, strict=True):
                assert await listener.fetchval(f'SELECT "{schema}".cantata_channel()') == channel
    finally:
        await listener.close()
        for schema in schemas:
            await drop_schema(postgres_url, schema)


CLAIMER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from cantata.store.postgres import PostgresStore

    async def main(url, app, worker, start_at):
        store = PostgresStore(url)
        await store.open()
        await store.heartbeat(app, worker, time.time(), None, lease=60.0)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        got = []
        while True:
            runs = await store.claim_runs(
                app, worker, ["wf"], stale_before=time.time(), limit=3
            )
            if not runs:
                break
            got += [r.run_id for r in runs]
        await store.close()
        print(json.dumps(got))

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])))
    """
)


@pytest.mark.slow
async def test_two_processes_never_claim_the_same_run(pg_session_url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    store = PostgresStore(pg_session_url)
    await store.open()
    try:
        runs = [new_run(app) for _ in range(90)]
        for run in runs:
            await store.create_run(run)
        start_at = time.time() + 1.5
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable, "-c", CLAIMER, pg_session_url, app, f"w{i}", str(start_at),
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
            for i in range(2)
        ]
        claimed: list[str] = []
        for proc in procs:
            out, err = await asyncio.wait_for(proc.communicate(), 60)
            assert proc.returncode == 0, err.decode()
            claimed += json.loads(out)
        assert sorted(claimed) == sorted(r.run_id for r in runs)
        owners = {r.owner for r in await store.list_runs(app, limit=100)}
        assert owners <= {"w0", "w1"}
    finally:
        await store.close()


async def test_checkpoints_of_many_runs_in_one_statement(pg_session_url: str) -> None:
    """Checkpoints of different runs share one statement; a stale fence refuses only
    its own, and writes none of its history or attempts."""
    app = f"app-{new_id()[-8:]}"
    async with opened(pg_session_url, writers=1) as store:
        runs = [(await store.create_run(new_run(app)))[0] for _ in range(4)]
        sizes = count_transactions(store)
        _, *results = await asyncio.gather(
            first_alone(store, app),
            *(store.commit_run(app, r.run_id, 5 if n == 2 else 0, RunWrite(
                entries=[entry("a#1", 1, ENTRY_RUNNING), entry("a#1", 9, result=f'"{n}"')],
                attempts=[Attempt("a#1", 1, 1.0), Attempt("a#1", 1, 7.0, 2.0)],
                status=RunStatus.RUNNING,
            )) for n, r in enumerate(runs)),
            return_exceptions=True,
        )
        assert sizes[:2] == [1, 4]
        assert [type(x).__name__ for x in results] == ["NoneType"] * 2 + ["LeaseLost", "NoneType"]
        for n, r in enumerate(runs):
            got = await store.get_run(app, r.run_id)
            history = await store.load_history(app, r.run_id)
            attempts = await store.load_attempts(app, r.run_id)
            assert got is not None
            if n == 2:
                assert got.status == RunStatus.PENDING and history == [] and attempts == []
                continue
            assert got.status == RunStatus.RUNNING
            assert [(h.key, h.seq, h.result) for h in history] == [("a#1", 1, f'"{n}"')]
            assert attempts == [Attempt("a#1", 1, 1.0, 2.0)]
        assert (await store.verify_audit(app)).ok


async def test_lookups_by_key_stay_on_the_key_as_a_new_store_grows(
    postgres_url: str, pooled_schema: str
) -> None:
    """Plans made while a new store's tables are empty are made again as they grow: a
    checkpoint finds its run by its key, not by scanning an index of every run."""
    url = with_schema(postgres_url, pooled_schema)
    app = f"app-{new_id()[-8:]}"
    async with opened(url, writers=1) as store:
        first, _ = await store.create_run(new_run(app))
        await store.commit_run(app, first.run_id, 0, RunWrite(status=RunStatus.RUNNING))
        runs = await asyncio.gather(*(store.create_run(new_run(app)) for _ in range(3000)))
        await asyncio.sleep(1.2)  # past the first re-planning
        for run, _ in runs[:50]:
            await store.commit_run(app, run.run_id, 0, RunWrite(status=RunStatus.RUNNING))
    conn = await asyncpg.connect(postgres_url)
    try:
        await asyncio.sleep(0.7)  # the statistics collector reports with a delay
        read = await conn.fetchval(
            "SELECT (SELECT coalesce(sum(idx_tup_read), 0) FROM pg_stat_user_indexes "
            "WHERE schemaname=$1 AND relname='runs' AND indexrelname <> 'runs_pkey') + "
            "(SELECT coalesce(sum(seq_tup_read), 0) FROM pg_stat_user_tables "
            "WHERE schemaname=$1 AND relname='runs')",
            pooled_schema,
        )
    finally:
        await conn.close()
    # A plan scanning the table or another index reads every run per checkpoint.
    assert read < 20_000, f"{read} rows of runs read other than by their key"


async def _past_every_older_snapshot(url: str) -> None:
    """Wait until no transaction or snapshot older than now is left on the server.

    A HOT update needs room on its page, which pruning makes from the versions no
    snapshot can still see. Any older snapshot on the server, in any database (the
    tests beside this one, a psql left open in a transaction), keeps the first
    checkpoint's old versions alive and sends the second checkpoint's new versions to
    other pages: that would measure the neighbours, not the store."""
    conn = await asyncpg.connect(url)
    try:
        now = await conn.fetchval("SELECT txid_current() % 4294967296")

        async def none_older() -> bool:
            return not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                "(backend_xid::text::bigint <= $1 OR backend_xmin::text::bigint <= $1)",
                now,
            )

        await eventually(none_older, 60.0, "the end of the snapshots older than the "
                         "first checkpoint (a transaction left open on the server?)",
                         interval=0.02)
    finally:
        await conn.close()


async def test_a_checkpoint_that_keeps_the_indexed_columns_is_a_hot_update(
    postgres_url: str, pooled_schema: str
) -> None:
    """Pages of runs, history and attempts keep room for their rows' next versions
    (migration 0021): a checkpoint that changes no indexed column of its run (no
    status, no owner) is a HOT update, which adds no entry to runs' indexes; so are
    the updates of its history entry and attempt. Every row of a page updated in one
    batch, as the saga's writer does (at fillfactor 100: ~5 % HOT; at 70, ~45 %)."""
    url = with_schema(postgres_url, pooled_schema)
    app = f"app-{new_id()[-8:]}"
    async with opened(url, writers=1) as store:
        runs = await asyncio.gather(*(store.create_run(new_run(app)) for _ in range(600)))
        for seq, result in ((1, None), (2, '"done"')):
            if seq == 2:
                await _past_every_older_snapshot(postgres_url)
            await asyncio.gather(*(store.commit_run(app, run.run_id, 0, RunWrite(
                entries=[entry("a#1", seq, ENTRY_RUNNING if result is None else ENTRY_COMPLETED,
                               result=result)],
                attempts=[Attempt("a#1", 1, 1.0, None if result is None else 2.0)],
            )) for run, _ in runs))
        assert (await store.verify_audit(app)).ok
    conn = await asyncpg.connect(postgres_url)
    try:
        for _ in range(50):  # the statistics of closed connections arrive with a delay
            rows = await conn.fetch(
                "SELECT relname, n_tup_upd, n_tup_hot_upd, "
                "(SELECT reloptions FROM pg_class c WHERE c.oid = s.relid) AS options "
                "FROM pg_stat_user_tables s WHERE schemaname=$1 "
                "AND relname IN ('runs', 'history', 'attempts')",
                pooled_schema,
            )
            got = {r["relname"]: (r["n_tup_upd"], r["n_tup_hot_upd"], r["options"])
                   for r in rows}
            # runs: 1,200 updates; history and attempts: 600 each (the second checkpoint)
            if len(got) == 3 and min(updated for updated, _, _ in got.values()) >= 600:
                break
            await asyncio.sleep(0.1)
    finally:
        await conn.close()
    assert all(options == ["fillfactor=50"] for _, _, options in got.values()), got
    for table, (updated, hot, _) in got.items():
        assert updated >= 600 and hot >= 0.9 * updated, (table, updated, hot)


async def test_the_stores_statements_are_never_jit_compiled(pg_session_url: str) -> None:
    """A plan whose estimate grows with a table (the skip scan of parked waits: 7.7 M at
    a million parked runs, for a statement that runs in 0.05 ms) was JIT-compiled at each
    execution, ~1.1 s of the server's CPU each time: the store's connections have JIT
    off, so that even a plan above any cost threshold compiles nothing."""
    async with opened(pg_session_url) as store, store._db.conn() as c, c.transaction():
        await c.execute("SET LOCAL jit_above_cost = 0")
        plan = await c.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) SELECT count(*) FROM runs WHERE app = 'x'"
        )
        assert "JIT" not in json.loads(plan)[0], plan
