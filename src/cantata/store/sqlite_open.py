"""Opening a SQLite store: connect, refuse foreign files, WAL, versioned migrations.

Migrations are ``migrations/sqlite/NNNN_*.sql``, applied in order inside one
``BEGIN IMMEDIATE`` transaction (so processes opening one new file at once apply
them once), with the version kept in ``cantata_meta``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

from cantata.errors import (
    CantataError,
    ConfigurationError,
    StoreCorrupt,
    StoreFull,
    StoreReadOnly,
    StoreUnavailable,
)
from cantata.store import migrations
from cantata.store.common import NEW_STORE_HINT, newer_schema
from cantata.store.faults import sqlite_fault
from cantata.store.sqlite_thread import TxConnection
from cantata.store.sqlite_wal import wal_has_header

SCHEMA_VERSION = migrations.latest("sqlite")
STORE_MARK = "cantata-store"
# How long a write waits for another process's write lock before it fails as an
# outage (StoreUnavailable), by default; a store URL's ?busy_timeout= sets it.
BUSY_TIMEOUT_MS = 30_000
BUSY_TIMEOUT_MAX_MS = 2**31 - 1  # (SQLite's busy_timeout is a C int of milliseconds)
_EMPTY_GRACE = 1.0  # seconds an empty file may take to get its header (a concurrent open)


def check_busy_timeout(ms: object, what: str) -> int:
    """``ms`` (milliseconds another process's write lock is waited for) as an int.

    Raises:
        ConfigurationError: not a number, or outside 1 ms .. about 24.8 days (0 would
            fail every write that meets another process's lock at once).
    """
    if isinstance(ms, bool) or not isinstance(ms, int | float) or ms != ms:
        raise ConfigurationError(
            f"{what} is not a number of milliseconds: give the busy timeout in "
            "milliseconds, such as 5000"
        )
    if not 1 <= round(ms) <= BUSY_TIMEOUT_MAX_MS:
        raise ConfigurationError(
            f"{what} is out of range: the busy timeout is from 1 ms to "
            f"{BUSY_TIMEOUT_MAX_MS} ms (0 would fail every write that meets another "
            f"process's lock at once; the default is {BUSY_TIMEOUT_MS} ms)"
        )
    return round(ms)


def connect(path: str, url: str, synchronous: str, *, create: bool = True,
            busy_ms: int = BUSY_TIMEOUT_MS) -> TxConnection:
    """Open ``path``, refuse foreign or emptied files, switch to WAL and migrate;
    ``busy_ms``: how long it and its writes wait for another process's write lock.

    A file that cannot be written (read-only file, folder or file system) is opened
    read-only when its schema is current: reading works, writes raise StoreReadOnly.

    Raises:
        StoreUnavailable: the file cannot be opened (or is missing and ``create`` is
            false).
        StoreCorrupt: it is not a (compatible) Cantata store, or it is empty.
        StoreFull: the disk is full.
        StoreReadOnly: it needs a migration but cannot be written.
    """
    if path != ":memory:":
        check_file(path, url, create)
        if not os.path.exists(path):
            _create_whole(path, url, synchronous, busy_ms)
    new = path != ":memory:" and not os.path.exists(path)
    try:
        conn = _connect(path, url, synchronous, busy_ms)
    except BaseException:
        if new:
            _remove_empty(path)  # a failed creation must not leave an "emptied" store
        raise
    if path != ":memory:" and synchronous in ("FULL", "EXTRA"):
        conn.wal_to_lengthen = f"{path}-wal"  # (at its first write: sqlite_wal.py)
    return conn


def _connect(path: str, url: str, synchronous: str, busy_ms: int) -> TxConnection:
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False,
            timeout=busy_ms / 1000, factory=TxConnection,
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(
            f"cannot open SQLite store {url}: {exc}; check that the folder exists and "
            "is writable"
        ) from None
    try:
        try:
            _set_up(conn, path, url, synchronous, busy_ms)
        except sqlite3.Error as exc:
            fault = sqlite_fault(exc, path)
            if path == ":memory:" or not isinstance(fault, (StoreReadOnly, StoreUnavailable)):
                raise
            # A read-only folder or file system: SQLite cannot make the WAL's side files.
            conn.close()
            conn = _open_read_only(path, url, busy_ms)
    except sqlite3.Error as exc:
        conn.close()
        fault = sqlite_fault(exc, path)
        if isinstance(fault, (StoreFull, StoreReadOnly, StoreUnavailable)):
            raise fault from None
        raise StoreCorrupt(
            f"{url} is not a usable SQLite database ({exc}); point the store URL (--store, "
            "App(store=...) or $CANTATA_STORE) at another file, or move this one aside if "
            "it is damaged"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _create_whole(path: str, url: str, synchronous: str, busy_ms: int) -> None:
    """Create a new store at ``path`` whole, or leave it to be created in place.

    The store is made and migrated under a name of its own in the same folder, then
    linked to ``path`` (a hard link: it fails if ``path`` appeared meanwhile, where a
    rename would replace it), so another process opening ``path`` never meets the empty
    file that SQLite leaves while it creates one (which :func:`check_file` waits for only
    a moment, then refuses as a truncated store). Whoever links first wins; the others
    drop their copy and open that one. Where this cannot be done (no hard links, or the
    copy fails), nothing is left behind and the caller creates ``path`` in place, as
    before, and reports its errors."""
    folder, name = os.path.split(os.path.abspath(path))
    _sweep_drafts(folder, name)
    draft = os.path.join(folder, f".{name}.{os.getpid()}.{os.urandom(4).hex()}.new")
    try:
        try:
            _connect(draft, url, synchronous, busy_ms).close()  # (its WAL merged on close)
        except (CantataError, sqlite3.Error, OSError):
            return
        with contextlib.suppress(OSError):  # FileExistsError: another process was first
            os.link(draft, path)
    finally:
        for side in (draft, f"{draft}-wal", f"{draft}-shm"):
            with contextlib.suppress(OSError):
                os.remove(side)


def _sweep_drafts(folder: str, name: str) -> None:
    """Remove the drafts of ``name`` (:func:`_create_whole`) that processes which no
    longer exist left (killed while they created the store): those of a live process
    are its own, under way. (Not on Windows, where no signal only asks whether a
    process lives.)"""
    if os.name == "nt":
        return
    prefix = f".{name}."
    try:
        entries = os.listdir(folder)
    except OSError:
        return
    for entry in entries:
        if not entry.startswith(prefix) or ".new" not in entry[len(prefix):]:
            continue
        pid = entry[len(prefix):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, entry))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (PermissionError: another user's process)
        return True
    return True


def _remove_empty(path: str) -> None:
    try:
        if os.path.getsize(path) != 0:
            return  # it holds something: leave it alone
    except OSError:
        return
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with contextlib.suppress(OSError):
            os.remove(name)


def check_file(path: str, url: str, create: bool) -> None:
    """Refuse a missing file (unless creating) and an empty one (a truncated store
    must not silently become a new, empty store)."""
    if not os.path.exists(path):
        if not create:
            raise StoreUnavailable(
                f"store file {os.path.abspath(path)} does not exist ({url}): {NEW_STORE_HINT}"
            )
        return
    # A process creating the file right now leaves it empty for a moment.
    deadline = time.monotonic() + _EMPTY_GRACE
    while os.path.getsize(path) == 0:
        if wal_has_header(f"{path}-wal"):
            return  # its content is still in the write-ahead log
        if time.monotonic() > deadline:
            raise StoreCorrupt(
                f"store file {os.path.abspath(path)} is empty (0 bytes): it is not a Cantata "
                "store, or it was truncated. Restore it from a backup, or delete it to "
                "start a new, empty store"
            )
        time.sleep(0.05)


def _set_up(conn: TxConnection, path: str, url: str, synchronous: str, busy_ms: int) -> None:
    conn.execute(f"PRAGMA busy_timeout = {busy_ms}")
    if path != ":memory:":
        # Refuse another application's file before WAL (a persistent change) touches it.
        retry_locked(lambda: refuse_foreign(url, conn), busy_ms)
        retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"), busy_ms)
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    conn.execute("PRAGMA foreign_keys = OFF")
    retry_locked(lambda: migrate(url, conn), busy_ms)


def _open_read_only(path: str, url: str, busy_ms: int) -> TxConnection:
    """Open an existing store for reading only; its schema must be current."""
    uri = f"file:{urllib.parse.quote(os.path.abspath(path))}?mode=ro"
    last: sqlite3.Error | None = None
    # immutable=1: no side files at all (read-only media; nobody may write meanwhile).
    for suffix in ("", "&immutable=1"):
        conn = sqlite3.connect(
            uri + suffix, uri=True, isolation_level=None, check_same_thread=False,
            timeout=busy_ms / 1000, factory=TxConnection,
        )
        try:
            refuse_foreign(url, conn)
            version = _version(conn)
        except sqlite3.Error as exc:
            conn.close()
            last = exc
            continue
        if version is None or version < SCHEMA_VERSION:
            conn.close()
            raise StoreReadOnly(
                f"store {url} needs its schema brought to version {SCHEMA_VERSION} but "
                "it is read-only: make the file and its folder writable"
            )
        _check_version(url, version)
        return conn
    assert last is not None
    raise last


def retry_locked(fn: Callable[[], Any], busy_ms: int = BUSY_TIMEOUT_MS) -> Any:
    """Call ``fn``, retrying while another process holds the file locked (for up to
    ``busy_ms`` milliseconds)."""
    deadline = time.monotonic() + busy_ms / 1000
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def refuse_foreign(url: str, conn: sqlite3.Connection) -> set[str]:
    """The file's tables; raises if they belong to another application."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "cantata_meta" not in tables and tables - {"sqlite_sequence"}:
        raise StoreCorrupt(
            f"{url} is a SQLite database of another application (tables: "
            f"{', '.join(sorted(tables)[:5])}); give Cantata its own file"
        )
    return tables


def _version(conn: sqlite3.Connection) -> int | None:
    """The schema version of an opened file (``None``: not set up yet)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "cantata_meta" not in tables:
        return None
    row = conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'").fetchone()
    return None if row is None else int(row[0])


def _check_version(url: str, version: int) -> None:
    if version > SCHEMA_VERSION:
        raise newer_schema(url, version, SCHEMA_VERSION)


def recorded_version(conn: sqlite3.Connection) -> int | None:
    """The schema version an open store's file records now (a newer Cantata may have
    migrated it since it was opened)."""
    row = conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'").fetchone()
    return None if row is None else int(row[0])


def migrate(url: str, conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema to :data:`SCHEMA_VERSION` in one transaction.

    A current schema is only read (so a read-only file opens).
    """
    current = _version(conn)
    if current is not None:
        _check_version(url, current)
        if current == SCHEMA_VERSION:
            return
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = refuse_foreign(url, conn)
        if "cantata_meta" not in tables:
            conn.execute(
                "CREATE TABLE cantata_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT INTO cantata_meta (key, value) VALUES ('mark', ?), ('schema_version', '0')",
                (STORE_MARK,),
            )
        row = conn.execute("SELECT value FROM cantata_meta WHERE key='mark'").fetchone()
        if row is None or row[0] != STORE_MARK:
            raise StoreCorrupt(f"{url} is not a Cantata store (its marker is missing)")
        version = int(
            conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'")
            .fetchone()[0]
        )
        _check_version(url, version)
        for n, script in sorted(migrations.scripts("sqlite").items()):
            if n <= version:
                continue
            for statement in script_statements(script.read_text()):
                conn.execute(statement)
            conn.execute(
                "UPDATE cantata_meta SET value=? WHERE key='schema_version'", (str(n),)
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def script_statements(script: str) -> Iterator[str]:
    """The statements of a migration script (trigger bodies hold ``;`` too)."""
    buf = ""
    for line in script.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            yield buf
            buf = ""
    if any(ln.strip() and not ln.strip().startswith("--") for ln in buf.splitlines()):
        yield buf
