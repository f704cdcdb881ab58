"""PostgreSQL store (asyncpg): many worker processes on many hosts share one database.

Tables live in their own schema (``cantata`` unless the URL says ``?schema=name``),
so a database that other applications use is fine. Work is claimed with
``FOR UPDATE SKIP LOCKED``; every write that other processes should react to sends
``'<app>:<channel>'`` on the schema's NOTIFY channel (``cantata_changes.<schema>``:
stores in other schemas of the database do not hear it) in its transaction, and one
dedicated listening connection (see :mod:`cantata.store.postgres_pool`) turns those
notifications, from any process including this one, into calls of the listeners.
Audited writes append to the app's audit chain as their last statement (see
:mod:`cantata.store.postgres_ops`, which also holds the columns, rows and task code).

The hot writes (creating, claiming and committing runs, appending events, claiming
and settling deliveries, claiming and finishing tasks, marking events published)
are group-committed: operations that arrive while a transaction is in flight run
together in the next one, with one COMMIT (see :mod:`cantata.store.postgres_batch`;
the operations are in :mod:`cantata.store.postgres_writes`). Reads and rare writes
use pooled connections directly.

One module per role of :mod:`cantata.store.roles`, each a subclass of
:class:`~cantata.store.postgres_core.PostgresCore`: runs in
:mod:`cantata.store.postgres_runs`, events, deliveries and the outbox in
:mod:`cantata.store.postgres_events`, trace reads in :mod:`cantata.store.postgres_trace`,
operating runs in :mod:`cantata.store.postgres_operate`, the console in
:mod:`cantata.store.postgres_console`, flow control in
:mod:`cantata.store.postgres_flow`; workers, tasks and the audit log here.
"""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg

from cantata.model.records import (
    Attempt,
    AuditRecord,
    Declaration,
    TaskRecord,
    WorkerInfo,
)
from cantata.store import postgres_event_writes as event_writes
from cantata.store import postgres_ops as ops
from cantata.store.base import (
    EVENTS,
    RUNS,
    SLOTS,
    TASKS,
)
from cantata.store.common import check_task_outcome, worker_lease
from cantata.store.postgres_console import PostgresConsole
from cantata.store.postgres_events import PostgresEvents
from cantata.store.postgres_flow import PostgresFlow
from cantata.store.postgres_holds import PostgresHolds
from cantata.store.postgres_operate import PostgresOperate
from cantata.store.postgres_ops import (
    TASK_COLS,
)
from cantata.store.postgres_parking import PostgresParking
from cantata.store.postgres_runs import PostgresRuns
from cantata.store.postgres_trace import PostgresTrace
from cantata.store.tx import T, TxBody


class PostgresStore(
    PostgresRuns,
    PostgresEvents,
    PostgresHolds,
    PostgresTrace,
    PostgresOperate,
    PostgresConsole,
    PostgresFlow,
    PostgresParking,
):
    """A :class:`~cantata.store.base.Store` on PostgreSQL.

    Args:
        url: ``postgresql://user:password@host:5432/database``; ``?schema=name`` picks
            the schema holding Cantata's tables (default ``cantata``).
        pool_size: most connections the pool opens.
        connect_timeout: seconds :meth:`open` keeps retrying an unreachable server.
        writers: most group-committed write transactions in flight at once (each
            holds one of the pool's connections while it runs).
        create: make the schema and its tables if they do not exist (``False``: opening
            a schema without a Cantata store is an error, as for the CLI's query
            commands).
    """

    # -- declarations and workers -------------------------------------------------------

    async def declare(self, app: str, declarations: Sequence[Declaration]) -> None:
        if not declarations:
            return
        async with self._db.tx() as c:
            await c.executemany(
                "INSERT INTO declarations (app, kind, name, pattern, service, detail) "
                "VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT "
                "(app, kind, name, pattern) DO UPDATE SET service=excluded.service, "
                "detail=excluded.detail",
                [(app, d.kind, d.name, d.pattern, d.service, d.detail) for d in declarations],
            )

    async def declarations(self, app: str) -> list[Declaration]:
        rows = await self._db.fetch(
            "SELECT kind, name, pattern, service, detail FROM declarations WHERE app=$1 "
            'ORDER BY kind COLLATE "C", name COLLATE "C", pattern COLLATE "C"',
            app,
        )
        return [Declaration(*r) for r in rows]

    async def heartbeat(
        self, app: str, worker_id: str, now: float, info: str | None, *, lease: float
    ) -> bool:
        seconds = worker_lease(lease)

        async def write() -> bool:
            # Held: the row's expiry (as this statement's snapshot has it, before the
            # upsert) not passed at this renewal, by ``now`` nor by the server's own
            # clock (WorkerStore.heartbeat).
            row = await self._db.fetchrow(
                "WITH old AS (SELECT expires_at FROM workers WHERE app=$1 AND worker_id=$2), "
                "beat AS (INSERT INTO workers (app, worker_id, started_at, heartbeat_at, info, "
                "lease) VALUES ($1,$2,$3,$3,$4,$5) ON CONFLICT (app, worker_id) DO UPDATE SET "
                "heartbeat_at=excluded.heartbeat_at, info=excluded.info, "
                "lease=excluded.lease RETURNING 1) "
                "SELECT COALESCE((SELECT expires_at FROM old) >= GREATEST($3::float8, "
                "extract(epoch FROM clock_timestamp())::float8), false), "
                "(SELECT count(*) FROM beat)",
                app, worker_id, now, info, seconds,
            )
            return row is not None and bool(row[0])

        return await self._beat(write)

    async def remove_worker(self, app: str, worker_id: str) -> None:
        async with self._db.tx() as c:
            await c.execute("DELETE FROM workers WHERE app=$1 AND worker_id=$2", app, worker_id)
            await c.execute("UPDATE runs SET owner=NULL WHERE app=$1 AND owner=$2", app, worker_id)
            for table in ("deliveries", "tasks"):
                await c.execute(
                    f"UPDATE {table} SET owner=NULL WHERE app=$1 AND owner=$2 "
                    "AND status='pending'",
                    app, worker_id,
                )
            await self._db.notify(c, app, RUNS, EVENTS, TASKS, SLOTS)

    async def workers(self, app: str) -> list[WorkerInfo]:
        rows = await self._db.fetch(
            "SELECT worker_id, heartbeat_at, started_at, info, lease FROM workers "
            "WHERE app=$1 ORDER BY started_at",
            app,
        )
        return [WorkerInfo(*r[:4], lease=r[4]) for r in rows]

    async def identity(self) -> str:
        row = await self._db.fetchrow("SELECT id FROM store_identity")
        assert row is not None  # made by the migration that created the table
        return str(row[0])

    async def location(self) -> tuple[str, ...]:
        """The server (its system identifier, kept by its streaming replicas, so a
        failover keeps it), the database and the schema: by name, and by object id (a
        renamed database keeps its id; a restored one gets new ones)."""
        try:
            row = await self._db.fetchrow("SELECT system_identifier FROM pg_control_system()")
            server = "?" if row is None else str(row[0])
        except asyncpg.PostgresError:  # not allowed here (a managed service may refuse)
            server = "?"
        names = await self._db.fetchrow(
            "SELECT d.datname, d.oid, n.oid FROM pg_database d, pg_namespace n "
            "WHERE d.datname = current_database() AND n.nspname = $1",
            self._db.schema,
        )
        assert names is not None  # (the store's own database and schema)
        return (
            f"postgresql:{server}/{names[0]}/{self._db.schema}",
            f"postgresql-oid:{server}/{names[1]}/{names[2]}",
        )

    async def run_transaction(
        self, app: str, run_id: str, fence: int, body: TxBody[T]
    ) -> T:
        """See :class:`~cantata.store.base.TransactionalStore`."""
        from cantata.store.postgres_tx import run_transaction

        return await run_transaction(self._db, app, run_id, fence, body, self._audit_keys)

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
        steps: Sequence[str] | None = None,
    ) -> list[TaskRecord]:
        if not services or (steps is not None and not steps):
            return []
        return await self._w.run(lambda c, b: event_writes.claim_tasks(
            c, b, app, worker_id, services, now, stale_before, limit, steps
        ))

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
        return await self._w.run(lambda c, b: event_writes.finish_task(
            c, b, app, task_id, fence, outcome, attempts, result, error, error_type, next_at,
            count,
        ))

    async def start_task_attempt(
        self, app: str, task_id: str, fence: int, attempts: Sequence[Attempt]
    ) -> bool:
        return await self._w.run(lambda c, b: event_writes.start_task_attempt(
            c, b, app, task_id, fence, attempts
        ))

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
        return await self._w.run(lambda c, b: event_writes.withdraw_tasks(
            c, b, app, run_id, stale_before, error, actor, task_ids
        ))

    async def get_task(self, app: str, task_id: str) -> TaskRecord | None:
        row = await self._db.fetchrow(
            f"SELECT {TASK_COLS} FROM tasks WHERE app=$1 AND task_id=$2", app, task_id
        )
        return None if row is None else ops.task_row(row)

    async def tasks_of_run(self, app: str, run_id: str) -> list[TaskRecord]:
        rows = await self._db.fetch(
            f"SELECT {TASK_COLS} FROM tasks WHERE app=$1 AND run_id=$2 "
            'ORDER BY created_at, task_id COLLATE "C"',
            app, run_id,
        )
        return [ops.task_row(r) for r in rows]

    # -- audit --------------------------------------------------------------------------

    async def audit_records(
        self, app: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditRecord]:
        async with self._db.conn() as c:
            return await ops.audit_records(c, app, after_seq, limit)

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        async with self._db.conn() as c:
            return await ops.audit_head(c, app)

    async def _unaudited_runs(self, app: str) -> tuple[list[str], list[str]]:
        async with self._db.conn() as c:
            return await ops.unaudited_runs(c, app)

    # -- apps and observability ---------------------------------------------------------


