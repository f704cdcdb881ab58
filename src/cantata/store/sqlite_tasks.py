"""The SQLite store, tasks: steps served by another service's workers
(see :class:`~cantata.store.roles.TaskStore`)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from cantata.model.records import (
    TASK_PENDING,
    Attempt,
    TaskRecord,
)
from cantata.store import audit
from cantata.store.common import check_task_outcome
from cantata.store.roles import TASKS
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import TASK_COLS, audit_append, task_row, upsert_attempts


class SQLiteTasks(SQLiteCore):
    """The tasks role of :class:`~cantata.store.sqlite.SQLiteStore`."""

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

        def op(c: sqlite3.Connection) -> list[TaskRecord]:
            marks = ",".join("?" * len(services))
            rows = c.execute(
                f"UPDATE tasks SET owner=?, fence=fence+1, attempts=attempts+1, updated_at=? "
                f"WHERE app=? AND task_id IN ("
                f" SELECT t.task_id FROM tasks t INDEXED BY tasks_due LEFT JOIN workers w"
                f"  ON w.app=t.app AND w.worker_id=t.owner"
                f" WHERE t.app=? AND t.status='pending' AND t.service IN ({marks}) AND t.next_at<=?"
                f"  AND (t.owner IS NULL OR (t.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.heartbeat_at < ?)))"
                f" ORDER BY t.next_at, t.created_at LIMIT ?) RETURNING {TASK_COLS}",
                (worker_id, now, app, app, *services, now, worker_id, stale_before, limit),
            ).fetchall()
            return sorted((task_row(r) for r in rows), key=lambda t: (t.next_at, t.created_at))

        return await self._t.write(op)

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

        def op(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT run_id, fence, status, owner, step, service, attempts FROM tasks "
                "WHERE app=? AND task_id=?",
                (app, task_id),
            ).fetchone()
            if row is None or row[1] != fence or row[2] != TASK_PENDING:
                return False
            run_id, _, _, owner, step, service, n = row
            upsert_attempts(c, app, run_id, attempts)
            now = time.time()
            key = (app, task_id)
            if outcome == "done":
                c.execute(
                    "UPDATE tasks SET status='done', result=?, error=NULL, error_type=NULL, "
                    "owner=NULL, "
                    "updated_at=? WHERE app=? AND task_id=?",
                    (result, now, *key),
                )
            elif outcome == "failed":
                c.execute(
                    "UPDATE tasks SET status='failed', error=?, error_type=?, owner=NULL, "
                    "updated_at=? "
                    "WHERE app=? AND task_id=?",
                    (error, error_type, now, *key),
                )
            else:
                c.execute(
                    "UPDATE tasks SET owner=NULL, next_at=?, error=?, error_type=?, updated_at=? "
                    "WHERE app=? AND task_id=?",
                    (next_at, error, error_type, now, *key),
                )
                return True
            audit_append(c, app, audit.task_entry(task_id, owner, outcome, step, service, n, error))
            return True

        return await self._t.write(op, TASKS)

    async def get_task(self, app: str, task_id: str) -> TaskRecord | None:
        row = await self._t.read(
            lambda c: c.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE app=? AND task_id=?", (app, task_id)
            ).fetchone()
        )
        return None if row is None else task_row(row)

    async def tasks_of_run(self, app: str, run_id: str) -> list[TaskRecord]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {TASK_COLS} FROM tasks WHERE app=? AND run_id=? "
                "ORDER BY created_at, task_id",
                (app, run_id),
            ).fetchall()
        )
        return [task_row(r) for r in rows]
