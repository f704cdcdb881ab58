"""Storage faults as Cantata errors: one clear line instead of a driver's exception.

A full disk, a read-only file or database and a damaged file are faults of the
machine, not of the code: callers get :class:`~cantata.errors.StoreFull`,
:class:`~cantata.errors.StoreReadOnly` or :class:`~cantata.errors.StoreCorrupt`
naming the store and what to do, translated here at the backend's edge; so is a
server short of connections or memory (:class:`~cantata.errors.StoreUnavailable`, an
outage), except where a transactional step's own transaction may have caused the
shortage (:func:`postgres_statement_fault`: then it is the step's error). Other
driver errors (constraint violations the store handles itself) pass unchanged.

:func:`wait_out` is how the engine and the consumer keep a write whose work is done
(a checkpoint, a handler's or a task's outcome) through an outage or a full disk.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cantata.errors import StoreCorrupt, StoreError, StoreFull, StoreReadOnly, StoreUnavailable
from cantata.quietlog import QuietLog, reason

T = TypeVar("T")

# SQLite's primary result codes (https://www.sqlite.org/rescode.html).
_SQLITE_BUSY = 5
_SQLITE_READONLY = 8
_SQLITE_IOERR = 10
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26


def sqlite_fault(exc: BaseException, where: str) -> StoreError | None:
    """The Cantata error for a SQLite fault of the file at ``where``; ``None`` when
    ``exc`` is not a storage fault (the caller re-raises it as it is)."""
    if not isinstance(exc, sqlite3.Error):
        return None
    code = getattr(exc, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None
    text = str(exc)
    if primary == _SQLITE_FULL or "disk is full" in text:
        return StoreFull(f"disk full at {where}: free space and retry (SQLite: {text})")
    if primary == _SQLITE_READONLY or "readonly database" in text:
        return StoreReadOnly(
            f"store {where} is read-only ({text}): writes are refused, reading works; make "
            "the file and its folder writable to change anything"
        )
    if primary in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return StoreCorrupt(
            f"store {where} is damaged ({text}): restore it from a backup, or move it aside "
            "and start a new store"
        )
    if primary == _SQLITE_IOERR:
        return StoreUnavailable(
            f"I/O error on store {where} ({text}): check the disk (full, failing or gone) "
            "and retry"
        )
    if primary == _SQLITE_CANTOPEN:
        return StoreUnavailable(
            f"cannot open store {where} ({text}): check that the file and its folder exist "
            "and are readable"
        )
    if primary == _SQLITE_BUSY:
        return StoreUnavailable(
            f"store {where} stayed locked by another process past the busy timeout "
            f"({text}): a long write transaction of another process (a transactional "
            "step, a sqlite3 shell) holds it; retry once it ended, or have writes wait "
            "longer with the store URL's ?busy_timeout= (milliseconds; 30000 by default)"
        )
    return None


def postgres_fault(exc: BaseException, where: str) -> StoreError | None:
    """The Cantata error for a PostgreSQL storage fault met by the store's own work;
    ``None`` for other errors.

    The server's shortage of a resource (SQLSTATE class 53) is its condition, which the
    store's small statements did not cause: a full disk is :class:`StoreFull`; too many
    connections (53300), memory or shared memory run out (53200: "out of shared memory"
    when the lock table is full), a configured limit reached (53400) and any other
    shortage (53000) are an outage, :class:`StoreUnavailable`: waited out and retried,
    as a server that cannot be reached is. (A transactional step's own statements
    meeting 53000, 53200 or 53400 fail the step instead: :func:`postgres_statement_fault`.)
    """
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - only called by the PostgreSQL store
        return None
    if isinstance(exc, asyncpg.DiskFullError):
        return StoreFull(
            f"PostgreSQL at {where} is out of disk space ({_said(exc)}): free disk space "
            "on the database server and retry"
        )
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return StoreUnavailable(
            f"PostgreSQL at {where} refused a new connection: too many connections "
            f"({_said(exc)}). Retry once other sessions have ended; for good, close idle "
            "sessions, raise the server's max_connections or the role's or database's "
            "CONNECTION LIMIT, or give the workers smaller pools "
            "(PostgresStore(url, pool_size=N))"
        )
    if isinstance(exc, asyncpg.InsufficientResourcesError):
        return StoreUnavailable(
            f"PostgreSQL at {where} ran short of a resource ({_said(exc)}): the server's "
            "condition, not the request's. Retry once it has what it lacks (memory, lock "
            "table slots that other sessions hold); for good, raise the setting its hint "
            "names"
        )
    if isinstance(exc, asyncpg.ReadOnlySQLTransactionError):
        return StoreReadOnly(
            f"PostgreSQL at {where} is read-only ({exc}): writes are refused, reading "
            "works; point the store at the primary server"
        )
    if isinstance(exc, (asyncpg.DataCorruptedError, asyncpg.IndexCorruptedError)):
        return StoreCorrupt(f"PostgreSQL at {where} reports damaged data ({exc})")
    return None


def postgres_statement_fault(exc: BaseException, where: str) -> StoreError | None:
    """:func:`postgres_fault` for a statement of a transactional step (or its
    transaction's checkpoint and COMMIT): ``None`` also for a shortage the step's own
    transaction can cause and would meet again at every try, which is the step's error
    (retried by its retry policy, then failed), never an outage to wait out: memory or
    shared memory run out (53200, such as "out of shared memory" from a transaction that
    locks more tables than ``max_locks_per_transaction`` allows), a configured limit
    (53400, such as ``temp_file_limit``), or another shortage (53000)."""
    if is_step_shortage(exc):
        return None
    return postgres_fault(exc, where)


def is_step_shortage(exc: BaseException) -> bool:
    """Whether ``exc`` is PostgreSQL's SQLSTATE 53000, 53200 or 53400 (not a full disk,
    not too many connections): see :func:`postgres_statement_fault`."""
    try:
        import asyncpg
    except ImportError:  # pragma: no cover - only called by the PostgreSQL store
        return False
    return isinstance(exc, asyncpg.InsufficientResourcesError) and not isinstance(
        exc, (asyncpg.DiskFullError, asyncpg.TooManyConnectionsError))


def _said(exc: BaseException) -> str:
    """The server's message on one line, with its SQLSTATE (and its hint: asyncpg
    gives the message's detail and hint on lines of their own)."""
    lines = "; ".join(" ".join(line.split()) for line in str(exc).splitlines() if line.strip())
    return f"SQLSTATE {getattr(exc, 'sqlstate', '?')}: {lines}"


# What a write waits out (it is retried until the store takes it): the machine's
# condition, not the write's; a read-only store among them, since it is one for a while
# (a failover) as often as for good (a read-only file refuses a worker at its start).
WAITED_OUT = (StoreUnavailable, StoreFull, StoreReadOnly)


async def wait_out(
    record: Callable[[], Awaitable[T]],
    *,
    quiet: QuietLog,
    key: str,
    what: str,
    give_up: Callable[[], bool],
    max_delay: float,
) -> T:
    """Call ``record`` until the store takes it, waiting out an outage, a full disk or
    a store turned read-only (a demoted primary, a server in recovery: the work it
    records is done, and doing it again because its commit failed would repeat its
    side effects). ``give_up()`` true (a stop) raises the store's error. Other errors
    are raised at once.
    """
    delay = 0.05
    while True:
        try:
            return await record()
        except WAITED_OUT as exc:
            if give_up():
                raise
            quiet.warning(key, f"{what} failed (%s); retrying", reason(exc))
            await asyncio.sleep(delay)
            delay = min(delay * 2, max(max_delay, 0.05))
