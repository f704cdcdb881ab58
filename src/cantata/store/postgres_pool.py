"""The connections of a :class:`~cantata.store.postgres.PostgresStore`.

Connecting (retried with backoff, driver errors turned into messages that say
what to do), versioned migrations under an advisory lock (each bounded in how long
it queues for a table lock), the connection pool, and the one dedicated connection
that LISTENs on the schema's channel (:mod:`cantata.store.postgres_listen`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from cantata.cancel_safe import wait_event
from cantata.errors import ConfigurationError, StoreCorrupt, StoreUnavailable
from cantata.store import migrations
from cantata.store import postgres_session as session
from cantata.store.common import NEW_STORE_HINT, newer_schema
from cantata.store.factory import mask_url, url_options
from cantata.store.faults import postgres_fault
from cantata.store.postgres_listen import Listener

log = logging.getLogger("cantata.store")


class _QuietDriverLog(logging.Filter):
    """asyncpg's pool logs a full traceback each time it cannot restore its connection
    floor; during an outage that is a flood restating what Cantata already reports in
    one line. Keep one line (no traceback) per 10 s."""

    every = 10.0

    def __init__(self) -> None:
        super().__init__()
        self._last = float("-inf")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        record.exc_info, record.exc_text = None, None
        now = time.monotonic()
        if now - self._last < self.every:
            return False
        self._last = now
        return True


def _quiet_driver_log() -> None:
    driver = logging.getLogger("asyncpg.pool")
    if not any(isinstance(f, _QuietDriverLog) for f in driver.filters):
        driver.addFilter(_QuietDriverLog())

SCHEMA_VERSION = migrations.latest("postgres")
DEFAULT_SCHEMA = "cantata"
# A migration of a store in use waits at most this long for a table lock, then rolls
# back, lets the workers through and tries again, for up to MIGRATE_PATIENCE seconds.
MIGRATE_LOCK_WAIT = 0.2
MIGRATE_PATIENCE = 60.0
_SCHEMA_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# Errors that mean "the server or the connection is gone", not "the SQL is wrong".
CONN_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.OperatorInterventionError,
    # A backend killed under a pooled connection can leave the protocol mid-operation.
    asyncpg.InternalClientError,
)

# The server refusing a setting sent at connect (an unknown option of the store URL,
# or a bad value): 42704, 22023, 55P02.
_SETTING_REFUSED = (
    asyncpg.UndefinedObjectError,
    asyncpg.InvalidParameterValueError,
    asyncpg.CantChangeRuntimeParamError,
)
_REFUSED_NAME = re.compile(r'parameter "([^"]+)"')

T = TypeVar("T")
Conn: TypeAlias = "PoolConnectionProxy[asyncpg.Record]"
Row: TypeAlias = "asyncpg.Record | tuple[Any, ...]"


_REPLAN_FIRST = 0.5  # seconds after a connection's first use that its plans are redone
_REPLAN_MAX = 300.0
# How long the connection :meth:`PgPool.conn` keeps for the next ``keep=True`` caller
# (the store's writer) waits for it before going back to the pool.
KEEP_IDLE = 0.1


async def connect_apart(connecting: Awaitable[T], timeout: float) -> T:
    """Await ``connecting`` (a new connection) in a task of its own, giving up after
    ``timeout`` seconds with ``TimeoutError``.

    Not asyncpg's own ``timeout=``: that is an ``asyncio.timeout`` in the caller's task,
    which ends the wait by cancelling the caller. The pool connects in whichever task
    acquires a connection, a run's own task too (a read of its step's slot, its remote
    step's task), and a cancel of a run's task during a step is taken for the workflow
    code's cancel of the step's branch (engine/branches.py). Here the caller is never
    cancelled by the timeout; a cancel of the caller still stops the connecting at
    once. A connection that comes after the timeout is closed. (``connecting`` may
    have its driver's own timeout too: it cancels only the task made here.)
    """
    task = asyncio.ensure_future(connecting)
    try:
        await asyncio.wait((task,), timeout=timeout)
    except BaseException:  # the caller was cancelled
        _give_up(task)
        raise
    if not task.done():
        _give_up(task)
        raise TimeoutError(f"no connection to PostgreSQL within {timeout:g} s")
    return task.result()


def _give_up(task: asyncio.Future[Any]) -> None:
    """Nobody takes ``task``'s connection: stop it, or close what it made."""
    task.cancel()
    task.add_done_callback(_close_late)


def _close_late(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    if task.exception() is None:  # (retrieved: asyncio logs nothing for it)
        task.result().terminate()


async def _keep_session(conn: asyncpg.Connection[asyncpg.Record]) -> None:
    """Release a pooled connection without asyncpg's reset query (a round trip).

    asyncpg still rolls back a transaction left open. The reset query
    (``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL``) would undo
    session state that this store never leaves on pooled connections: no ``SET``
    (only ``SET LOCAL``), no session advisory locks, no cursors, no ``LISTEN`` (the
    listener has a connection of its own). A connection that failed is terminated
    rather than released (see :meth:`PgPool.conn`).
    """


class PgPool:
    """A pool of connections to one schema, plus a listening connection.

    Args:
        url: ``postgresql://…``; ``?schema=name`` picks the schema (default ``cantata``),
            ``?idle_in_transaction_session_timeout=``, ``?tcp_keepalives_idle=``,
            ``?tcp_keepalives_interval=`` and ``?tcp_keepalives_count=`` replace the
            settings made from the lease (:mod:`cantata.store.postgres_session`).
        pool_size: most connections the pool opens.
        connect_timeout: seconds :meth:`open` keeps retrying an unreachable server.
        on_change: called with a change channel (``runs``, ``events``, ...: see
            ``store/roles/lifecycle.py``) for every notification, from any process; on
            the event loop.
        create: make the schema and its tables when they are missing (``False``:
            :meth:`open` refuses a schema that holds no Cantata store).
    """

    def __init__(
        self, url: str, *, pool_size: int, connect_timeout: float,
        on_change: Callable[[str], None], create: bool = True,
    ) -> None:
        self.masked_url = mask_url(url)
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        options = url_options(url, parts.query, "store")
        self.schema = options.get("schema", DEFAULT_SCHEMA)
        if not _SCHEMA_RE.fullmatch(self.schema):
            raise ConfigurationError(
                f"schema {self.schema!r} in {self.masked_url} is not a plain lower-case SQL "
                "name: use letters, digits and '_'"
            )
        # (taken out of the URL: asyncpg would send them too, but the server_settings
        # given beside the URL win over the URL's)
        self._chosen = session.given(options, self.masked_url)
        ours = ("schema", *session.OPTIONS)
        rest = urlencode([(k, v) for k, v in query if k not in ours])
        self._dsn = urlunsplit(parts._replace(query=rest))
        self._user = unquote(parts.username) if parts.username else None
        self._database = unquote(parts.path.lstrip("/")) or self._user
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.create = create
        # JIT off: Cantata's statements are short, and a plan whose estimate grows with
        # a table (a skip scan of a million parked runs: estimated 7.7 M, run in 0.05 ms)
        # was JIT-compiled at each execution, ~1.1 s of the server's CPU each time
        # (docs/performance.md, "A million parked runs").
        self._base_settings = {"search_path": f'"{self.schema}"',
                               "application_name": "cantata", "jit": "off"}
        self._settings = self._settings_for(session.DEFAULT_LEASE)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self.listener = Listener(self.connect, on_change, self.masked_url)
        self._closing = False
        self._inflight = 0
        # server pid -> (when its plans are next dropped, the interval that led there)
        self._replan_at: dict[int, tuple[float, float]] = {}
        self._idle = asyncio.Event()
        # The connection kept for the next conn(keep=True), when it was kept, the timer
        # that gives it back once idle, and releases under way.
        self._kept: Conn | None = None
        self._kept_at = 0.0
        self._kept_timer: asyncio.TimerHandle | None = None
        self._releasing: set[asyncio.Task[None]] = set()

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    def _settings_for(self, lease: float) -> dict[str, str]:
        return {**self._base_settings, **session.settings(lease, self._chosen)}

    def adopt_lease(self, lease: float) -> None:
        """The session limits of the connections made from now on follow ``lease``
        (:mod:`cantata.store.postgres_session`; those the URL gives stay)."""
        self._settings = self._settings_for(lease)

    @property
    def session_settings(self) -> dict[str, str]:
        """The server settings new connections are opened with."""
        return dict(self._settings)

    async def connect(self) -> asyncpg.Connection[asyncpg.Record]:
        """One connection, retried with backoff while the server cannot be reached."""
        deadline = time.monotonic() + self.connect_timeout
        delay = 0.1
        while True:
            remaining = deadline - time.monotonic()
            try:
                bound = max(0.5, remaining)
                return await connect_apart(
                    asyncpg.connect(self._dsn, timeout=bound, server_settings=self._settings),
                    bound,
                )
            except asyncpg.InvalidPasswordError:
                raise StoreUnavailable(
                    f"PostgreSQL at {self.masked_url} rejected the password of user "
                    f"{self._user!r}: fix the password in the store URL"
                ) from None
            except asyncpg.InvalidAuthorizationSpecificationError as exc:
                raise StoreUnavailable(
                    f"PostgreSQL at {self.masked_url} refused user {self._user!r} ({exc}): fix "
                    "the user in the store URL, or create that role"
                ) from None
            except asyncpg.InvalidCatalogNameError:
                raise StoreUnavailable(
                    f"database {self._database!r} does not exist on the PostgreSQL server at "
                    f"{self.masked_url}: create it (createdb {self._database}) or fix the URL"
                ) from None
            except (asyncpg.ClientConfigurationError, ValueError) as exc:
                raise ConfigurationError(
                    f"store URL {self.masked_url} is not a valid PostgreSQL URL ({exc}): use "
                    "postgresql://user:password@host:5432/database"
                ) from None
            except _SETTING_REFUSED as exc:
                # An option of the URL that asyncpg does not know is sent as a server
                # setting (SET name = value): the server refusing it is a URL mistake.
                name = _REFUSED_NAME.search(str(exc))
                option = f"option {name[1]!r}" if name else "an option"
                raise ConfigurationError(
                    f"store URL {self.masked_url}: PostgreSQL refused {option} as a setting "
                    f"({exc}): fix or remove it (the options are ?schema=NAME, the driver's, "
                    "such as ?sslmode=, and PostgreSQL settings a session may SET)"
                ) from None
            except (*CONN_ERRORS, asyncpg.TooManyConnectionsError) as exc:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    if isinstance(exc, asyncpg.TooManyConnectionsError):
                        fault = postgres_fault(exc, self.masked_url)
                        assert fault is not None
                        raise fault from None
                    raise StoreUnavailable(
                        f"cannot reach PostgreSQL at {self.masked_url} "
                        f"({type(exc).__name__}: {exc}); check that the server is running and "
                        "that host, port and network settings in the store URL are right"
                    ) from None
                await asyncio.sleep(min(delay, remaining))
                delay = min(delay * 2, 1.0)
            except asyncpg.PostgresError as exc:
                raise StoreUnavailable(
                    f"PostgreSQL at {self.masked_url} refused the connection: {exc}"
                ) from None

    async def _migrate(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        """Bring the schema to SCHEMA_VERSION; concurrent processes wait on one lock.

        A current schema is only read, so a read-only server (a standby) opens. A fresh
        schema gets every script in one transaction; a store in use gets one transaction
        per script, each waiting at most :data:`MIGRATE_LOCK_WAIT` for a table lock
        (:meth:`_apply`), so workers of the older release serving on it never queue
        behind the migration for longer than that.

        Raises:
            StoreUnavailable: not ``create`` and the schema holds no Cantata store, or
                the tables stayed locked for :data:`MIGRATE_PATIENCE`.
        """
        table = f'"{self.schema}".schema_version'
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
            if current == SCHEMA_VERSION:
                return
        elif not self.create:
            exists = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname=$1)", self.schema
            )
            what = "holds no Cantata store" if exists else "does not exist"
            raise StoreUnavailable(
                f"store schema {self.schema!r} {what} in {self.masked_url}: {NEW_STORE_HINT}"
            )
        key = f"cantata-migrate:{self.schema}"
        await conn.execute("SELECT pg_advisory_lock(hashtext($1))", key)
        try:
            version = await self._version_locked(conn)
            pending = [
                (n, script.read_text())
                for n, script in sorted(migrations.scripts("postgres").items()) if n > version
            ]
            # Nobody serves on a fresh schema: one transaction. A store in use: one per
            # script, so no transaction holds one script's locks while the next waits.
            steps = [pending] if version == 0 else [[p] for p in pending]
            for step in steps:
                if step:
                    await self._apply(conn, step)
        finally:
            with contextlib.suppress(*CONN_ERRORS):
                await conn.execute("SELECT pg_advisory_unlock(hashtext($1))", key)

    async def _version_locked(self, conn: asyncpg.Connection[asyncpg.Record]) -> int:
        """The schema's version, read under the migration lock; the schema and its
        version table are made when missing."""
        async with conn.transaction():
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{self.schema}"')
            await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
            tables = {
                r[0] for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname=$1", self.schema
                )
            }
            if "schema_version" not in tables:
                if tables:
                    raise StoreCorrupt(
                        f"schema {self.schema!r} of {self.masked_url} holds tables of another "
                        f"application ({', '.join(sorted(tables)[:5])}); give Cantata its own "
                        "schema with ?schema=name in the store URL"
                    )
                await conn.execute(
                    "CREATE TABLE schema_version (version integer PRIMARY KEY, "
                    "applied_at double precision NOT NULL)"
                )
            version: int = await conn.fetchval(
                "SELECT coalesce(max(version), 0) FROM schema_version"
            )
        if version > SCHEMA_VERSION:
            raise newer_schema(f"the Cantata store in {self.masked_url}", version, SCHEMA_VERSION)
        return version

    async def _apply(
        self, conn: asyncpg.Connection[asyncpg.Record], scripts: list[tuple[int, str]]
    ) -> None:
        """Run ``scripts`` and record their versions, in one transaction whose every
        lock wait is bounded by :data:`MIGRATE_LOCK_WAIT`.

        A migration that waits for a table lock queues every later statement on that
        table behind it: the older release's heartbeats and checkpoints, which time out.
        So a wait that runs out (or a deadlock with such a transaction) rolls the
        script back, lets the others through and tries again, for up to
        :data:`MIGRATE_PATIENCE`.
        """
        until = time.monotonic() + MIGRATE_PATIENCE
        wait_ms = int(MIGRATE_LOCK_WAIT * 1000)
        while True:
            try:
                async with conn.transaction():
                    await conn.execute(f'SET LOCAL search_path TO "{self.schema}"')
                    await conn.execute(f"SET LOCAL lock_timeout = {wait_ms}")
                    for n, sql in scripts:
                        await conn.execute(sql)
                        await conn.execute(
                            "INSERT INTO schema_version (version, applied_at) VALUES ($1, $2)",
                            n, time.time(),
                        )
                return
            except (asyncpg.LockNotAvailableError, asyncpg.DeadlockDetectedError) as exc:
                if time.monotonic() > until:
                    raise StoreUnavailable(
                        f"cannot migrate the Cantata store in schema {self.schema!r} of "
                        f"{self.masked_url} to version {scripts[-1][0]}: its tables stayed "
                        f"locked by other sessions for {MIGRATE_PATIENCE:.0f} s ({exc}); "
                        "look for long transactions in pg_stat_activity, end them, and "
                        "start the worker again"
                    ) from None
                await asyncio.sleep(random.uniform(0.5, 1.5) * MIGRATE_LOCK_WAIT)

    async def open(self) -> None:
        """Connect (retrying briefly), migrate, open the pool and start listening."""
        if self._pool is not None:
            return
        conn = await self.connect()
        try:
            await self._migrate(conn)
            self.listener.channel = await conn.fetchval("SELECT cantata_channel()")
        except CONN_ERRORS as exc:
            raise StoreUnavailable(
                f"lost PostgreSQL at {self.masked_url} while migrating: {exc}"
            ) from None
        except asyncpg.PostgresError as exc:
            fault = postgres_fault(exc, self.masked_url)  # disk full, read-only server
            if fault is not None:
                raise fault from None
            raise StoreCorrupt(
                f"cannot create Cantata's tables in schema {self.schema!r} of "
                f"{self.masked_url}: {exc}"
            ) from None
        finally:
            with contextlib.suppress(*CONN_ERRORS):
                await conn.close()
        self._closing = False
        _quiet_driver_log()
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn, min_size=1, max_size=self.pool_size, server_settings=self._settings,
                reset=_keep_session, connect=self._pool_connect,
            )
            await self.listener.start()
        except CONN_ERRORS as exc:
            await self.close()
            raise StoreUnavailable(
                f"cannot connect to PostgreSQL at {self.masked_url}: {exc}"
            ) from None

    async def _pool_connect(
        self, *args: Any, timeout: float | None = None, **kwargs: Any
    ) -> asyncpg.Connection[asyncpg.Record]:
        """How the pool makes a connection: as asyncpg would, its timeout kept apart
        from the task that acquires it (:func:`connect_apart`), with the settings of the
        lease adopted last."""
        bound = timeout if timeout is not None else max(1.0, self.connect_timeout)
        kwargs["server_settings"] = self._settings  # (the lease's, adopted after open)
        return await connect_apart(asyncpg.connect(*args, timeout=bound, **kwargs), bound)

    @property
    def channel(self) -> str:
        """The schema's NOTIFY channel (``cantata_channel()``), read by :meth:`open`."""
        return self.listener.channel

    @property
    def listening(self) -> bool:
        """Whether notifications arrive (:attr:`Listener.listening`), and the pool is not
        closing."""
        return not self._closing and self.listener.listening

    async def close(self) -> None:
        """Wait for operations in flight, then close the listener and the pool."""
        self._closing = True
        if self._inflight:
            self._idle.clear()
            await wait_event(self._idle, 30)
        await self.listener.close()
        await self._let_go_kept()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(10):  # (not wait_for: a cancel is never lost)
                    await pool.close()
            except (TimeoutError, *CONN_ERRORS):
                pool.terminate()

    @contextlib.asynccontextmanager
    async def conn(self, *, keep: bool = False) -> AsyncIterator[Conn]:
        """A pooled connection; a lost server becomes :class:`StoreUnavailable`.

        ``keep``: take the connection the last ``keep`` caller left, if any, and leave
        this one for the next, instead of asyncpg's acquire and release (~65 us of this
        process' CPU together, a task and a shield per release: docs/performance.md,
        "Round twenty-two (saga)"). For the store's writer, whose next transaction usually
        follows within a millisecond: one connection at most is kept, for
        :data:`KEEP_IDLE` seconds idle, and none when the pool has only one.
        """
        pool = self._pool
        if pool is None or self._closing:
            raise StoreUnavailable(
                f"store {self.masked_url} is not open: use `async with app:` first"
            )
        self._inflight += 1
        try:
            conn = self._take_kept() if keep else None
            if conn is None:
                conn = await pool.acquire()
            kept = False
            try:
                await self._replan_as_tables_grow(conn)
                yield conn
                kept = keep and self._keep(conn)
            except CONN_ERRORS:
                # Its protocol state is unknown (a query may be half done): never
                # hand it out again. (The pool runs no reset query that would
                # notice, see _keep_session.) asyncpg may have taken it back already
                # (a connection it saw closed): then there is nothing to terminate.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
                raise
            finally:
                if not kept:
                    await pool.release(conn)
        except CONN_ERRORS as exc:
            raise StoreUnavailable(
                f"lost the connection to PostgreSQL at {self.masked_url} "
                f"({type(exc).__name__}: {exc}); the operation may not have been applied"
            ) from exc
        except asyncpg.PostgresError as exc:
            fault = postgres_fault(exc, self.masked_url)  # disk full, read-only, damaged
            if fault is None:
                raise
            raise fault from None
        finally:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.set()

    def _take_kept(self) -> Conn | None:
        """The kept connection (now the caller's), or ``None``."""
        conn, self._kept = self._kept, None
        if conn is None:
            return None
        try:
            closed = conn.is_closed()
        except asyncpg.InterfaceError:  # asyncpg took it back when it was lost
            return None
        if closed:  # lost: give its place in the pool back, take another
            conn.terminate()
            return None
        return conn

    def _keep(self, conn: Conn) -> bool:
        """Keep ``conn`` for the next ``keep`` caller, if it can be (idle, open, no
        other kept, the pool not closing and larger than one)."""
        if (self._kept is not None or self._closing or self.pool_size < 2
                or conn.is_closed() or conn.is_in_transaction()):
            return False
        self._kept = conn
        loop = asyncio.get_running_loop()
        self._kept_at = loop.time()
        if self._kept_timer is None:
            self._kept_timer = loop.call_later(KEEP_IDLE, self._kept_idle)
        return True

    def _kept_idle(self) -> None:
        """Timer: give the kept connection back once it has waited :data:`KEEP_IDLE`."""
        self._kept_timer = None
        if self._kept is None:
            return
        loop = asyncio.get_running_loop()
        left = self._kept_at + KEEP_IDLE - loop.time()
        if left > 0:  # used since: look again when it has been idle long enough
            self._kept_timer = loop.call_later(left, self._kept_idle)
            return
        conn = self._take_kept()
        if conn is not None and self._pool is not None:
            task = loop.create_task(self._pool.release(conn))
            self._releasing.add(task)
            task.add_done_callback(self._released)

    def _released(self, task: asyncio.Task[None]) -> None:
        self._releasing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.debug("releasing an idle writer connection failed", exc_info=task.exception())

    async def _let_go_kept(self) -> None:
        """Give the kept connection back to the pool, and wait for releases under way."""
        if self._kept_timer is not None:
            self._kept_timer.cancel()
            self._kept_timer = None
        conn = self._take_kept()
        if conn is not None and self._pool is not None:
            with contextlib.suppress(*CONN_ERRORS):
                await self._pool.release(conn)
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)

    async def _replan_as_tables_grow(self, conn: Conn) -> None:
        """Drop a connection's cached query plans 0.5 s after it opened, then after 1 s,
        2 s, 4 s, ... and every 5 minutes.

        A prepared statement's generic plan is made once, from the table sizes of that
        moment: made while a new store's tables are empty, it scans them, and every
        lookup by key then reads more of the table as it grows (until autovacuum's next
        ANALYZE, a minute or more later). Planning again as time passes keeps the plans
        in step with the tables, for one round trip now and then.
        """
        pid = conn.get_server_pid()
        now = time.monotonic()
        due = self._replan_at.get(pid)
        if due is None:
            if len(self._replan_at) > 256:  # connections replaced over time: forget them
                self._replan_at.clear()
            self._replan_at[pid] = (now + _REPLAN_FIRST, _REPLAN_FIRST)
        elif now >= due[0]:
            every = min(due[1] * 2, _REPLAN_MAX)
            self._replan_at[pid] = (now + every, every)
            await conn.execute("DISCARD PLANS")

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[Conn]:
        """A pooled connection inside one transaction."""
        async with self.conn() as conn, conn.transaction():
            yield conn

    async def execute(self, sql: str, *args: Any) -> str:
        """Run one statement on a pooled connection (its own transaction)."""
        async with self.conn() as c:
            return await c.execute(sql, *args)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of one query on a pooled connection."""
        async with self.conn() as c:
            return await c.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        """The first row of one query on a pooled connection, or ``None``."""
        async with self.conn() as c:
            return await c.fetchrow(sql, *args)

    @staticmethod
    async def notify(c: Conn, app: str, *channels: str) -> None:
        """Queue ``<app>:<channel>`` notifications; PostgreSQL sends them at commit."""
        await c.execute(
            "SELECT pg_notify(cantata_channel(), $1::text || ':' || ch) "
            "FROM unnest($2::text[]) AS ch",
            app, list(channels),
        )
