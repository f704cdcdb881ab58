"""SQLite store: one file in WAL mode, safe for several processes; ``memory://`` too.

One module per role: runs in :mod:`cantata.store.sqlite_runs`, events, deliveries and
the outbox in :mod:`cantata.store.sqlite_events`, operating runs in
:mod:`cantata.store.sqlite_operate`, the console in :mod:`cantata.store.sqlite_console`,
flow control in :mod:`cantata.store.sqlite_flow`; workers, tasks, the audit log and
trace reads here. Opening and migrating is in :mod:`cantata.store.sqlite_open`; rows,
settling deliveries, tasks, the audit log and trace queries in
:mod:`cantata.store.sqlite_ops`; the connection thread with group commit in
:mod:`cantata.store.sqlite_thread`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cantata.model import codec
from cantata.model.records import (
    Attempt,
    AuditRecord,
    Declaration,
    TaskRecord,
    WorkerInfo,
)
from cantata.store import sqlite_ops as ops
from cantata.store.base import (
    EVENTS,
    RUNS,
    TASKS,
    TraceRecords,
)
from cantata.store.common import check_task_outcome
from cantata.store.sqlite_console import SQLiteConsole
from cantata.store.sqlite_events import SQLiteEvents
from cantata.store.sqlite_flow import SQLiteFlow
from cantata.store.sqlite_operate import SQLiteOperate
from cantata.store.sqlite_ops import (
    TASK_COLS,
)
from cantata.store.sqlite_runs import SQLiteRuns
from cantata.store.tx import T, TxBody


class SQLiteStore(SQLiteRuns, SQLiteEvents, SQLiteOperate, SQLiteConsole, SQLiteFlow):
    """A :class:`~cantata.store.base.Store` on one SQLite file (or in memory).

    Args:
        path: file path, or ``":memory:"`` for a private in-memory database.
        synchronous: SQLite ``synchronous`` setting; ``FULL`` (the default) fsyncs
            every commit, so a committed checkpoint survives power loss.
        create: make the file if it does not exist (``False``: opening a missing file
            is an error, as for the CLI's query commands).
    """


    # -- declarations and workers -------------------------------------------------------

    async def declare(self, app: str, declarations: Sequence[Declaration]) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.executemany(
                "INSERT INTO declarations VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "service=excluded.service, detail=excluded.detail",
                [(app, d.kind, d.name, d.pattern, d.service, d.detail) for d in declarations],
            )
            c.execute(
                "INSERT INTO cantata_meta VALUES (?, ?) ON CONFLICT DO UPDATE SET value=?",
                (f"decl:{app}", codec.new_id(), codec.new_id()),
            )

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

    async def heartbeat(self, app: str, worker_id: str, now: float, info: str | None) -> None:
        await self._t.write(
            lambda c: c.execute(
                "INSERT INTO workers VALUES (?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "heartbeat_at=excluded.heartbeat_at, info=excluded.info",
                (app, worker_id, now, now, info),
            )
        )

    async def remove_worker(self, app: str, worker_id: str) -> None:
        def op(c: sqlite3.Connection) -> None:
            c.execute("DELETE FROM workers WHERE app=? AND worker_id=?", (app, worker_id))
            c.execute("UPDATE runs SET owner=NULL WHERE app=? AND owner=?", (app, worker_id))
            for table in ("deliveries", "tasks"):
                c.execute(
                    f"UPDATE {table} SET owner=NULL WHERE app=? AND owner=? AND status='pending'",
                    (app, worker_id),
                )

        await self._t.write(op, RUNS, EVENTS, TASKS)

    async def workers(self, app: str) -> list[WorkerInfo]:
        rows = await self._t.read(
            lambda c: c.execute(
                "SELECT worker_id, heartbeat_at, started_at, info FROM workers WHERE app=? "
                "ORDER BY started_at",
                (app,),
            ).fetchall()
        )
        return [WorkerInfo(*r) for r in rows]

    async def identity(self) -> str:
        row = await self._t.read(
            lambda c: c.execute("SELECT id FROM store_identity").fetchone()
        )
        return str(row[0])

    async def run_transaction(
        self, app: str, run_id: str, fence: int, body: TxBody[T]
    ) -> T:
        """See :class:`~cantata.store.base.TransactionalStore`."""
        from cantata.store.sqlite_tx import run_transaction

        return await run_transaction(self, app, run_id, fence, body)

    # -- tasks ------------------------------------------------------------------------

    async def claim_tasks(
        self,
        app: str,
        worker_id: str,
        services: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
    ) -> list[TaskRecord]:
        if not services:
            return []
        return await self._t.write(
            lambda c: ops.claim_tasks(c, app, worker_id, services, now, stale_before, limit)
        )

    async def finish_task(
        self,
        app: str,
        task_id: str,
        fence: int,
        *,
        outcome: str,
        attempts: Sequence[Attempt],
        result: str | None = None,
        error: str | None = None,
        error_type: str | None = None,
        next_at: float = 0.0,
    ) -> bool:
        check_task_outcome(outcome)
        return await self._t.write(
            lambda c: ops.finish_task(
                c, app, task_id, fence, outcome, attempts, result, error, error_type, next_at
            ),
            TASKS,
        )

    async def get_task(self, app: str, task_id: str) -> TaskRecord | None:
        row = await self._t.read(
            lambda c: c.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE app=? AND task_id=?", (app, task_id)
            ).fetchone()
        )
        return None if row is None else ops.task_row(row)

    async def tasks_of_run(self, app: str, run_id: str) -> list[TaskRecord]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE app=? AND run_id=? "
                "ORDER BY created_at, task_id",
                (app, run_id),
            ).fetchall()
        )
        return [ops.task_row(r) for r in rows]

    # -- audit --------------------------------------------------------------------------

    async def audit_records(
        self, app: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditRecord]:
        return await self._t.read(lambda c: ops.audit_records(c, app, after_seq, limit))

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        return await self._t.read(lambda c: ops.audit_head(c, app))

    async def _unaudited_runs(self, app: str, strict: bool) -> tuple[list[str], list[str]]:
        return await self._t.read(lambda c: ops.unaudited_runs(c, app, strict))

    # -- apps and observability ---------------------------------------------------------

    async def apps(self) -> list[str]:
        return await self._t.read(ops.apps)

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        return await self._t.read(lambda c: ops.trace_records(c, app, correlation_id, limit))

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int
    ) -> list[str]:
        return await self._t.read(lambda c: ops.stale_correlations(c, app, older_than, limit))
