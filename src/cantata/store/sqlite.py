"""SQLite store: one file in WAL mode, safe for several processes; ``memory://`` too.

One module per role of :mod:`cantata.store.roles`, each a subclass of
:class:`~cantata.store.sqlite_core.SQLiteCore`: runs in :mod:`cantata.store.sqlite_runs`,
events, deliveries and the outbox in :mod:`cantata.store.sqlite_events`, tasks in
:mod:`cantata.store.sqlite_tasks`, trace reads in :mod:`cantata.store.sqlite_trace`,
operating runs in :mod:`cantata.store.sqlite_operate`, the console in
:mod:`cantata.store.sqlite_console`, flow control in :mod:`cantata.store.sqlite_flow`;
workers and the audit log here. Opening and migrating is in
:mod:`cantata.store.sqlite_open`; columns, rows and the writes several roles share in
:mod:`cantata.store.sqlite_ops`; the connection thread with group commit in
:mod:`cantata.store.sqlite_thread`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import time
from collections.abc import Sequence

from cantata.model.records import (
    AuditRecord,
    Declaration,
    WorkerInfo,
)
from cantata.store import sqlite_ops as ops
from cantata.store.base import (
    CLAIMS,
    EVENTS,
    RUNS,
    SLOTS,
    TASKS,
)
from cantata.store.common import worker_lease
from cantata.store.sqlite_console import SQLiteConsole
from cantata.store.sqlite_core import declarations_changed
from cantata.store.sqlite_events import SQLiteEvents
from cantata.store.sqlite_flow import SQLiteFlow
from cantata.store.sqlite_holds import SQLiteHolds
from cantata.store.sqlite_operate import SQLiteOperate
from cantata.store.sqlite_parking import SQLiteParking
from cantata.store.sqlite_runs import SQLiteRuns
from cantata.store.sqlite_tasks import SQLiteTasks
from cantata.store.sqlite_trace import SQLiteTrace
from cantata.store.tx import T, TxBody


class SQLiteStore(
    SQLiteRuns,
    SQLiteEvents,
    SQLiteHolds,
    SQLiteTasks,
    SQLiteTrace,
    SQLiteOperate,
    SQLiteConsole,
    SQLiteFlow,
    SQLiteParking,
):
    """A :class:`~cantata.store.base.Store` on one SQLite file (or in memory).

    Args:
        path: file path, or ``":memory:"`` for a private in-memory database.
        synchronous: SQLite ``synchronous`` setting; ``FULL`` (the default) fsyncs
            every commit, so a committed checkpoint survives power loss.
        create: make the file if it does not exist (``False``: opening a missing file
            is an error, as for the CLI's query commands).
        busy_timeout: milliseconds a write waits for another process's write lock
            (SQLite's busy timeout; 30000 by default) before it fails as an outage
            (``StoreUnavailable``); the URL's ``?busy_timeout=``.
    """

    # -- declarations and workers -------------------------------------------------------

    async def declare(self, app: str, declarations: Sequence[Declaration]) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO declarations (app, kind, name, pattern, service, detail) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "service=excluded.service, detail=excluded.detail",
                [(app, d.kind, d.name, d.pattern, d.service, d.detail) for d in declarations],
            )
            declarations_changed(c, app)

        await self._t.write(op)

    async def declarations(self, app: str) -> list[Declaration]:
        rows = await self._t.read(
            lambda c: c.execute(
                "SELECT kind, name, pattern, service, detail FROM declarations WHERE app=? "
                "ORDER BY kind, name, pattern",
                (app,),
            ).fetchall()
        )
        return [Declaration(*r) for r in rows]

    async def heartbeat(
        self, app: str, worker_id: str, now: float, info: str | None, *, lease: float
    ) -> bool:
        seconds = worker_lease(lease)

        def op(c: sqlite3.Connection) -> bool:
            # Held: the row's expiry not passed at this renewal, by ``now`` nor by the
            # clock the file's other processes read, inside the write lock that orders
            # this renewal with their claims (WorkerStore.heartbeat).
            row = c.execute("SELECT expires_at FROM workers WHERE app=? AND worker_id=?",
                            (app, worker_id)).fetchone()
            held = row is not None and row[0] >= max(now, time.time())
            c.execute(
                "INSERT INTO workers (app, worker_id, started_at, heartbeat_at, info, lease) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "heartbeat_at=excluded.heartbeat_at, info=excluded.info, lease=excluded.lease",
                (app, worker_id, now, now, info, seconds),
            )
            return held

        return await self._beat(lambda: self._t.write(op))

    async def remove_worker(self, app: str, worker_id: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM workers WHERE app=? AND worker_id=?", (app, worker_id))
            c.execute("UPDATE runs SET owner=NULL WHERE app=? AND owner=?", (app, worker_id))
            for table in ("deliveries", "tasks"):
                c.execute(
                    f"UPDATE {table} SET owner=NULL WHERE app=? AND owner=? AND status='pending'",
                    (app, worker_id),
                )

        await self._t.write(op, RUNS, EVENTS, CLAIMS, TASKS, SLOTS)

    async def workers(self, app: str) -> list[WorkerInfo]:
        rows = await self._t.read(
            lambda c: c.execute(
                "SELECT worker_id, heartbeat_at, started_at, info, lease FROM workers "
                "WHERE app=? ORDER BY started_at",
                (app,),
            ).fetchall()
        )
        return [WorkerInfo(*r[:4], lease=r[4]) for r in rows]

    async def identity(self) -> str:
        row = await self._t.read(
            lambda c: c.execute("SELECT id FROM store_identity").fetchone()
        )
        return str(row[0])

    async def location(self) -> tuple[str, ...]:
        """The file's full path, and the file itself (device and inode: the same file
        opened by another path, in a container say, is the same store; a copy is
        another file)."""
        if self.path == ":memory:":
            return (f"memory:{await self.identity()}",)
        return await asyncio.to_thread(_file_marks, self.path)

    async def run_transaction(
        self, app: str, run_id: str, fence: int, body: TxBody[T]
    ) -> T:
        """See :class:`~cantata.store.base.TransactionalStore`."""
        from cantata.store.sqlite_tx import run_transaction

        return await run_transaction(self, app, run_id, fence, body)

    # -- tasks ------------------------------------------------------------------------


    # -- audit --------------------------------------------------------------------------

    async def audit_records(
        self, app: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditRecord]:
        return await self._t.read(lambda c: ops.audit_records(c, app, after_seq, limit))

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        return await self._t.read(lambda c: ops.audit_head(c, app))

    async def _unaudited_runs(self, app: str) -> tuple[list[str], list[str]]:
        return await self._t.read(lambda c: ops.unaudited_runs(c, app))

    # -- apps and observability ---------------------------------------------------------


def _file_marks(path: str) -> tuple[str, ...]:
    full = os.path.realpath(path)
    marks = [f"path:{full}"]
    with contextlib.suppress(OSError):
        st = os.stat(full)
        marks.append(f"file:{st.st_dev}:{st.st_ino}")
    return tuple(marks)
