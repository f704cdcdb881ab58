"""Opening a SQLite store: connect, refuse foreign files, WAL, versioned migrations.

Migrations are ``migrations/sqlite/NNNN_*.sql``, applied in order inside one
``BEGIN IMMEDIATE`` transaction (so processes opening one new file at once apply
them once), with the version kept in ``cantata_meta``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from typing import Any

from cantata.errors import StoreCorrupt, StoreUnavailable
from cantata.store import migrations
from cantata.store.sqlite_thread import TxConnection

SCHEMA_VERSION = migrations.latest("sqlite")
STORE_MARK = "cantata-store"
BUSY_TIMEOUT_MS = 30_000


def connect(path: str, url: str, synchronous: str) -> TxConnection:
    """Open ``path`` (creating it), refuse foreign files, switch to WAL and migrate.

    Raises:
        StoreUnavailable: the file cannot be opened.
        StoreCorrupt: it is not a (compatible) Cantata store.
    """
    try:
        conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False,
            timeout=BUSY_TIMEOUT_MS / 1000, factory=TxConnection,
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(
            f"cannot open SQLite store {url}: {exc}; check that the folder exists and "
            "is writable"
        ) from None
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if path != ":memory:":
            # Refuse another application's file before WAL (a persistent change) touches it.
            retry_locked(lambda: refuse_foreign(url, conn))
            retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
        conn.execute(f"PRAGMA synchronous = {synchronous}")
        conn.execute("PRAGMA foreign_keys = OFF")
        retry_locked(lambda: migrate(url, conn))
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreCorrupt(
            f"{url} is not a usable SQLite database ({exc}); point CANTATA_STORE at "
            "another file, or move this one aside if it is damaged"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def retry_locked(fn: Callable[[], Any]) -> Any:
    """Call ``fn``, retrying while another process holds the file locked."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
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


def migrate(url: str, conn: sqlite3.Connection) -> None:
    """Create or upgrade the schema to :data:`SCHEMA_VERSION` in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        tables = refuse_foreign(url, conn)
        if "cantata_meta" not in tables:
            conn.execute(
                "CREATE TABLE cantata_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"
            )
            conn.execute(
                "INSERT INTO cantata_meta VALUES ('mark', ?), ('schema_version', '0')",
                (STORE_MARK,),
            )
        row = conn.execute("SELECT value FROM cantata_meta WHERE key='mark'").fetchone()
        if row is None or row[0] != STORE_MARK:
            raise StoreCorrupt(f"{url} is not a Cantata store (its marker is missing)")
        version = int(
            conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'")
            .fetchone()[0]
        )
        if version > SCHEMA_VERSION:
            raise StoreCorrupt(
                f"{url} has schema version {version}, newer than this Cantata "
                f"({SCHEMA_VERSION}); upgrade cantata"
            )
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
