"""The store contract on PostgreSQL, plus what only a server can get wrong.

Every test session works in its own schema (dropped at the end) and every test in
its own random app, so runs against the shared ``test`` database never leak.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from cantata.errors import ConfigurationError, StoreCorrupt, StoreUnavailable
from cantata.model.codec import new_id
from cantata.model.records import AuditReport, RunWrite, TaskRecord
from cantata.model.status import RunStatus
from cantata.store.base import RUNS, Store
from cantata.store.factory import store_from_url
from cantata.store.postgres import PostgresStore
from tests.contract.store_contract import StoreContract
from tests.contract.store_support import eventually, new_run
from tests.store.tamper import pg_tamper, record

pytestmark = pytest.mark.postgres
ROOT = Path(__file__).resolve().parents[2]


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def drop_schema(url: str, schema: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_session_url(postgres_url: str) -> Iterator[str]:
    """The server URL with a schema of this test session's own."""
    schema = f"cantata_test_{new_id()[:10]}"
    yield with_schema(postgres_url, schema)
    asyncio.run(drop_schema(postgres_url, schema))


@pytest.fixture
async def fresh_schema(postgres_url: str) -> AsyncIterator[str]:
    """A schema name nobody has used yet (dropped after the test)."""
    schema = f"cantata_fresh_{new_id()[:10]}"
    yield schema
    await drop_schema(postgres_url, schema)


class TestPostgresStore(StoreContract):
    url: str

    @pytest.fixture(autouse=True)
    def _url(self, pg_session_url: str) -> None:
        self.url = pg_session_url

    async def make_store(self) -> Store:
        return PostgresStore(self.url)

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        assert isinstance(store, PostgresStore)
        rec = await record(store, app, seq)
        await pg_tamper(self.url.split("?")[0], store._db.schema, app, rec, how)


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
    name = f"cantata_missing_{new_id()[:8]}"
    url = urlsplit(postgres_url)._replace(path=f"/{name}").geturl()
    with pytest.raises(StoreUnavailable, match=f"database '{name}' does not exist"):
        await PostgresStore(url).open()


async def test_unknown_user_is_named(postgres_url: str) -> None:
    parts = urlsplit(postgres_url)
    url = parts._replace(netloc=f"nobody_{new_id()[:6]}@{parts.hostname}:{parts.port}").geturl()
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
    assert [v[0] for v in versions] == [1, 2]
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
    app = f"app-{new_id()[:8]}"
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
        await b.create_run(new_run(f"app-{new_id()[:8]}"))
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
        assert db._listen_conn is not None
        listen_pid = db._listen_conn.get_server_pid()
        async with db.conn() as c:
            pool_pid = await c.fetchval("SELECT pg_backend_pid()")
        await admin.execute("SELECT pg_terminate_backend($1)", listen_pid)
        await admin.execute("SELECT pg_terminate_backend($1)", pool_pid)
        app = f"app-{new_id()[:8]}"
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


CLAIMER = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from cantata.store.postgres import PostgresStore

    async def main(url, app, worker, start_at):
        store = PostgresStore(url)
        await store.open()
        await store.heartbeat(app, worker, time.time(), None)
        await asyncio.sleep(max(0.0, start_at - time.time()))
        got = []
        while True:
            runs = await store.claim_runs(
                app, worker, ["wf"], stale_before=time.time() - 60, limit=3
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
    app = f"app-{new_id()[:8]}"
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
