"""The SQLite store, tasks: steps served by another service's workers
(see :class:`~cantata.store.roles.TaskStore`)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from cantata.model.records import (
    TASK_PENDING,
    TASK_WITHDRAWN,
    UNADDRESSED,
    Attempt,
    TaskRecord,
)
from cantata.model.status import FINAL_STATUSES
from cantata.store import audit
from cantata.store.common import ENDED_RUN_ERROR, check_task_outcome
from cantata.store.roles import TASKS
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import TASK_COLS, audit_append, task_row, upsert_attempts

# A task of a run in one of these statuses is never claimed (TaskStore.claim_tasks).
ENDED = tuple(sorted(str(s) for s in FINAL_STATUSES))
ENDED_MARKS = ",".join("?" * len(ENDED))


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
        steps: Sequence[str] | None = None,
    ) -> list[TaskRecord]:
        if not services or (steps is not None and not steps):
            return []

        # With steps: tasks addressed to no service yet too (their step's service, from
        # its declaration, is set as they are claimed).
        addressed = [*services, UNADDRESSED] if steps is not None else list(services)

        def op(c: sqlite3.Connection) -> tuple[list[TaskRecord], bool]:
            marks = ",".join("?" * len(addressed))
            only = "" if steps is None else f" AND t.step IN ({','.join('?' * len(steps))})"
            picked = c.execute(
                f"SELECT t.task_id, EXISTS (SELECT 1 FROM runs r WHERE r.app=t.app"
                f"  AND r.run_id=t.run_id AND r.status IN ({ENDED_MARKS}))"
                f" FROM tasks t INDEXED BY tasks_due LEFT JOIN workers w"
                f"  ON w.app=t.app AND w.worker_id=t.owner"
                f" WHERE t.app=? AND t.status='pending' AND t.service IN ({marks}) AND t.next_at<=?"
                f"{only}"
                f"  AND (t.owner IS NULL OR (t.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.expires_at < ?)))"
                f" ORDER BY t.next_at, t.created_at LIMIT ?",
                (*ENDED, app, *addressed, now, *(steps or ()), worker_id, stale_before, limit),
            ).fetchall()
            over = [task_id for task_id, ended in picked if ended]
            take = [task_id for task_id, ended in picked if not ended]
            if over:  # of an ended run: withdrawn, as the run withdrew its other tasks
                rows = c.execute(
                    f"UPDATE tasks SET status='failed', error=? || run_id || ?, error_type=?,"
                    f" owner=NULL, updated_at=? WHERE app=? AND task_id IN"
                    f" ({','.join('?' * len(over))}) RETURNING task_id, step, service, attempts,"
                    f" error",
                    (*ENDED_RUN_ERROR, TASK_WITHDRAWN, time.time(), app, *over),
                ).fetchall()
                for task_id, step, service, n, error in sorted(rows):
                    audit_append(c, app, audit.task_entry(
                        task_id, worker_id, "withdrawn", step, service, n, error))
            if not take:
                return [], bool(over)
            rows = c.execute(
                f"UPDATE tasks SET owner=?, fence=fence+1, attempts=attempts+1, updated_at=?, "
                f"service=CASE WHEN service<>'' THEN service ELSE COALESCE((SELECT d.service"
                f" FROM declarations d WHERE d.app=tasks.app AND d.kind='step'"
                f" AND d.name=tasks.step AND d.pattern=''), '') END "
                f"WHERE app=? AND task_id IN ({','.join('?' * len(take))}) RETURNING {TASK_COLS}",
                (worker_id, now, app, *take),
            ).fetchall()
            claimed = sorted((task_row(r) for r in rows), key=lambda t: (t.next_at, t.created_at))
            return claimed, bool(over)

        claimed, withdrew = await self._t.write(op)
        if withdrew:
            self._notify([TASKS])
        return claimed

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
        count: int | None = None,
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
            if count is not None:
                n = count
                c.execute("UPDATE tasks SET attempts=? WHERE app=? AND task_id=?", (n, *key))
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

    async def start_task_attempt(
        self, app: str, task_id: str, fence: int, attempts: Sequence[Attempt]
    ) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            row = c.execute(
                "SELECT run_id FROM tasks WHERE app=? AND task_id=? AND fence=? "
                "AND status='pending'",
                (app, task_id, fence),
            ).fetchone()
            if row is None:
                return False
            upsert_attempts(c, app, row[0], attempts)
            return True

        return await self._t.write(op)

    async def withdraw_tasks(
        self,
        app: str,
        run_id: str,
        *,
        stale_before: float,
        error: str,
        actor: str | None = None,
        task_ids: Sequence[str] | None = None,
    ) -> list[str]:
        if task_ids is not None and not task_ids:
            return []

        def op(c: sqlite3.Connection) -> list[str]:
            only = ("" if task_ids is None
                    else f" AND t.task_id IN ({','.join('?' * len(task_ids))})")
            now = time.time()
            rows = c.execute(
                "UPDATE tasks SET status='failed', error=?, error_type=?, owner=NULL, "
                "updated_at=? WHERE app=? AND task_id IN ("
                " SELECT t.task_id FROM tasks t LEFT JOIN workers w"
                "  ON w.app=t.app AND w.worker_id=t.owner"
                f" WHERE t.app=? AND t.run_id=? AND t.status='pending'{only}"
                "  AND (t.owner IS NULL OR w.worker_id IS NULL OR w.expires_at < ?))"
                " RETURNING task_id, step, service, attempts",
                (error, TASK_WITHDRAWN, now, app, app, run_id, *(task_ids or ()),
                 stale_before),
            ).fetchall()
            for task_id, step, service, n in sorted(rows):
                audit_append(c, app, audit.task_entry(
                    task_id, actor, "withdrawn", step, service, n, error))
            return sorted(r[0] for r in rows)

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
