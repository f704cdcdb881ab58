"""PostgreSQL short of a resource (SQLSTATE class 53), each code where it belongs.

A shortage a transactional step's own transaction causes, and would meet again at
every try (the lock table full: "out of shared memory", 53200; ``temp_file_limit``,
53400), is the step's error: its attempts are charged by its retry policy, then it
fails and the run compensates, never retried for ever as an outage. Too many
connections (53300) is an outage of the server, named as such (``StoreUnavailable``,
not a full disk): the run waits it out, no attempt charged. Real server errors only:
a private server with a small lock table, the shared one with a session's
``temp_file_limit``, a role of the test's own with a ``CONNECTION LIMIT``
(docs/workflow-api.md, docs/deploy.md)."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from cantata import (
    App,
    Retry,
    StoreFull,
    StoreUnavailable,
    Tx,
    WorkflowCompensated,
    WorkflowContext,
)
from cantata.store.faults import postgres_fault
from cantata.store.postgres import PostgresStore
from tests.engine.test_store_stalls import no_worker_lost
from tests.faults.servers import PrivatePostgres, ServerError
from tests.helpers import drop_schema, eventually, with_schema

pytestmark = pytest.mark.postgres

# One session may lock about 200 objects at once here: a transaction creating a few
# thousand temporary tables fills the lock table ("out of shared memory").
LOCK_STARVED = {"max_locks_per_transaction": "10", "max_connections": "20"}


@pytest.fixture(scope="module")
def lock_starved() -> Iterator[PrivatePostgres]:
    """A PostgreSQL of this module's own with a small lock table."""
    try:
        pg = PrivatePostgres(LOCK_STARVED)
        pg.start()
    except ServerError as exc:
        pytest.skip(f"cannot start a private PostgreSQL: {exc}")
    yield pg
    pg.destroy()


async def fill_the_lock_table(tx: Tx) -> None:
    await tx.execute("DO $$ BEGIN FOR i IN 1..3000 LOOP "
                     "EXECUTE format('CREATE TEMP TABLE starve_%s (x int)', i); END LOOP; END $$")


FAST_PATH_TABLES = 20  # more than a session's 16 fast-path lock slots


async def fill_the_lock_table_for_the_checkpoint(tx: Tx) -> None:
    """Leave the lock table full for the step's checkpoint: the session's fast-path
    slots (weak locks kept apart from the table) taken by reads of tables of the test's
    own, then temporary tables made until the table is full (the one that failed rolled
    back): the checkpoint's statements then need slots the table no longer has."""
    for i in range(FAST_PATH_TABLES):
        await tx.fetch(f"SELECT * FROM public.fast_path_{i}")
    await tx.execute("DO $$ BEGIN FOR i IN 1..5000 LOOP BEGIN "
                     "EXECUTE format('CREATE TEMP TABLE starve_%s (x int)', i); "
                     "EXCEPTION WHEN out_of_memory THEN EXIT; END; END LOOP; END $$")


async def exceed_temp_file_limit(tx: Tx) -> None:
    await tx.execute("SET LOCAL temp_file_limit = '64kB'")
    await tx.execute("SET LOCAL work_mem = '64kB'")  # (the sort spills to a file)
    await tx.fetch("SELECT g FROM generate_series(1, 200000) g ORDER BY md5(g::text)")


SHORTAGES: dict[str, tuple[Callable[[Tx], Awaitable[None]], type[Exception], list[str]]] = {
    "out-of-shared-memory": (fill_the_lock_table, asyncpg.OutOfMemoryError,
                             ["out of shared memory", "max_locks_per_transaction"]),
    "checkpoint-out-of-shared-memory": (fill_the_lock_table_for_the_checkpoint,
                                        asyncpg.OutOfMemoryError, ["out of shared memory"]),
    "temp-file-limit": (exceed_temp_file_limit, asyncpg.ConfigurationLimitExceededError,
                        ["temp_file_limit"]),
}


def shortage_app(store: Any, ran: list[str], in_step: Callable[[Tx], Awaitable[None]],
                 met: list[BaseException]) -> App:
    """``reserve`` (compensated by ``undo``), then ``book``: a transactional step of two
    attempts whose statements meet ``in_step``'s shortage."""
    app = App("shortage", store=store, lease=10, poll_interval=0.05, shutdown_grace=1)

    @app.step
    async def reserve() -> int:
        ran.append("reserve")
        return 1

    @app.step
    async def undo() -> None:
        ran.append("undo")

    @app.transaction(retry=Retry(max_attempts=2, initial_interval=0.1))
    async def book(tx: Tx, n: int) -> int:
        ran.append("book")
        await tx.execute("CREATE TABLE IF NOT EXISTS bookings (n INTEGER)")
        await tx.execute("INSERT INTO bookings (n) VALUES (?)", n)
        try:
            await in_step(tx)
        except Exception as exc:
            met.append(exc)
            raise
        return n

    @app.workflow
    async def booking(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(reserve, compensate=undo)
        return f"booked {await ctx.run(book, n)}"

    return app


@pytest.mark.parametrize("shortage", sorted(SHORTAGES))
async def test_a_shortage_the_steps_own_transaction_causes_is_its_error_not_an_outage(
    request: pytest.FixtureRequest, shortage: str
) -> None:
    meet, expected, said = SHORTAGES[shortage]
    if shortage.endswith("out-of-shared-memory"):
        server = request.getfixturevalue("lock_starved").url
        conn = await asyncpg.connect(server)
        try:
            for i in range(FAST_PATH_TABLES):
                await conn.execute(f"CREATE TABLE IF NOT EXISTS public.fast_path_{i} (x int)")
        finally:
            await conn.close()
    else:
        server = request.getfixturevalue("postgres_url")
    schema = f"short_{uuid.uuid4().hex[:10]}"
    ran: list[str] = []
    met: list[BaseException] = []
    app = shortage_app(PostgresStore(with_schema(server, schema), pool_size=4), ran, meet, met)
    try:
        async with app:
            handle = await app.start("booking", 3)
            # (before: StoreFull, an outage waited out for ever: no end within 20 s)
            with pytest.raises(WorkflowCompensated):
                await handle.result(timeout=20)
            # the step was given the server's error, as for any SQL error of its own
            # (met by its checkpoint: raised after the rollback, the step's all the same)
            at_checkpoint = shortage.startswith("checkpoint")
            assert [type(e) for e in met] == [] if at_checkpoint else [expected] * 2, met
            assert ran == ["reserve", "book", "book", "undo"], ran
            attempts = await app.store.load_attempts(app.name, handle.run_id)
            books = [a for a in attempts if a.key == "book#1"]
            assert [a.error_type for a in books] == [expected.__name__] * 2, attempts
            for words in said:  # what was wrong, and the server's hint what to do
                assert words in (books[-1].error or ""), books[-1].error
    finally:
        await drop_schema(server, schema)


async def test_the_stores_own_work_meeting_a_shortage_is_an_outage_naming_it(
    lock_starved: PrivatePostgres, postgres_url: str
) -> None:
    """The same shortages met by the store's own statements (a checkpoint, a read):
    the server's condition, not theirs: ``StoreUnavailable`` with the server's words
    and hint, never ``StoreFull`` ("out of space")."""
    errors: list[asyncpg.PostgresError] = []
    for server, make in ((lock_starved.url, "DO $$ BEGIN FOR i IN 1..3000 LOOP EXECUTE "
                          "format('CREATE TEMP TABLE own_%s (x int)', i); END LOOP; END $$"),
                         (postgres_url, "SELECT g FROM generate_series(1, 200000) g "
                          "ORDER BY md5(g::text)")):
        conn = await asyncpg.connect(server)
        try:
            await conn.execute("BEGIN")
            await conn.execute("SET LOCAL temp_file_limit = '64kB'")
            await conn.execute("SET LOCAL work_mem = '64kB'")
            with pytest.raises(asyncpg.InsufficientResourcesError) as caught:
                await conn.execute(make)
            errors.append(caught.value)
            await conn.execute("ROLLBACK")
        finally:
            await conn.close()
    assert [e.sqlstate for e in errors] == ["53200", "53400"]
    for exc, words in zip(errors, (["out of shared memory", "max_locks_per_transaction"],
                                   ["temp_file_limit"]), strict=True):
        fault = postgres_fault(exc, "postgresql://db")
        assert isinstance(fault, StoreUnavailable) and not isinstance(fault, StoreFull), fault
        text = str(fault)
        assert "\n" not in text and f"SQLSTATE {exc.sqlstate}" in text, text
        for word in words:
            assert word in text, text
        assert "out of space" not in text and "disk" not in text, text


@pytest.fixture
def limited_role(postgres_url: str) -> Iterator[str]:
    """A login role of this test's own (not a superuser: a CONNECTION LIMIT binds it),
    which may create its schema in the database; dropped with what it owns."""
    role = f"faultmap_{uuid.uuid4().hex[:10]}"

    async def admin(*sql: str) -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            for statement in sql:
                await conn.execute(statement)
        finally:
            await conn.close()

    database = postgres_url.rsplit("/", 1)[-1].split("?")[0]
    asyncio.run(admin(f"CREATE ROLE {role} LOGIN NOSUPERUSER",
                      f'GRANT CREATE ON DATABASE "{database}" TO {role}'))
    try:
        yield role
    finally:
        asyncio.run(admin(
            f"ALTER ROLE {role} CONNECTION LIMIT -1",
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'",
            f"DROP OWNED BY {role} CASCADE",
            f"DROP ROLE {role}",
        ))


async def test_too_many_connections_is_an_outage_waited_out_not_a_full_disk(
    postgres_url: str, limited_role: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    role = limited_role
    url = with_schema(postgres_url.replace("://postgres@", f"://{role}@", 1),
                      f"s_{role}")
    ran: list[str] = []
    gate = asyncio.Event()

    async def admin(*sql: str) -> None:
        conn = await asyncpg.connect(postgres_url)
        try:
            for statement in sql:
                await conn.execute(statement)
        finally:
            await conn.close()

    app = App("toomany", store=PostgresStore(url, pool_size=2, connect_timeout=1.0),
              lease=10, poll_interval=0.05, shutdown_grace=1)

    @app.step
    async def wait_gate() -> int:
        ran.append("gate")
        await gate.wait()
        return 1

    @app.transaction(retry=Retry(max_attempts=1))
    async def book(tx: Tx, n: int) -> int:
        ran.append("book")
        await tx.execute("CREATE TABLE IF NOT EXISTS bookings (n INTEGER)")
        await tx.execute("INSERT INTO bookings (n) VALUES (?)", n)
        return n

    @app.workflow
    async def booking(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(wait_gate)
        return f"booked {await ctx.run(book, n)}"

    async with app:
        handle = await app.start("booking", 5)
        await eventually(lambda: "gate" in ran, what="the gate step")
        # No new connection for the role from now on; its connections are cut.
        await admin(f"ALTER ROLE {role} CONNECTION LIMIT 0",
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE usename = '{role}'")
        refused: list[BaseException] = []

        async def refused_for_too_many() -> bool:
            try:
                await app.store.get_run(app.name, handle.run_id)
            except Exception as exc:
                refused.append(exc)
                return "too many connections" in str(exc)
            return False

        await eventually(refused_for_too_many, timeout=10,
                         what="a store call refused for too many connections")
        fault = refused[-1]
        # (before: StoreFull, "out of space: free disk space")
        assert type(fault) is StoreUnavailable, fault
        text = str(fault)
        assert "SQLSTATE 53300" in text and "CONNECTION LIMIT" in text, text
        assert "disk" not in text, text
        gate.set()  # the run's checkpoints and its transactional step meet it too
        await asyncio.sleep(1.5)
        assert ran == ["gate"], ran  # (its transaction has no connection)
        await admin(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        assert await handle.result(timeout=30) == "booked 5"
        assert ran == ["gate", "book"], ran  # its transaction ran once, not charged
        attempts = await app.store.load_attempts(app.name, handle.run_id)
        assert [(a.key, a.error_type) for a in attempts] == [
            ("wait_gate#1", None), ("book#1", None)], attempts
        await no_worker_lost(app, handle.run_id)
    warned = [r.getMessage() for r in caplog.records if "too many connections" in r.getMessage()]
    assert warned, [r.getMessage() for r in caplog.records]
    assert not any("out of space" in r.getMessage() for r in caplog.records)
