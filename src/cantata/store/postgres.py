"""PostgreSQL store (asyncpg): many worker processes on many hosts share one database.

Tables live in their own schema (``cantata`` unless the URL says ``?schema=name``),
so a database that other applications use is fine. Work is claimed with
``FOR UPDATE SKIP LOCKED``; every write that other processes should react to sends
``NOTIFY cantata_changes, '<app>:<channel>'`` in its transaction, and one dedicated
listening connection (see :mod:`cantata.store.postgres_pool`) turns those
notifications, from any process including this one, into calls of the listeners.
Audited writes append to the app's audit chain as their last statement (see
:mod:`cantata.store.postgres_ops`, which also holds the task, trace and row code).

The hot writes (creating, claiming and committing runs, appending events, claiming
and settling deliveries, claiming and finishing tasks, marking events published)
are group-committed: operations that arrive while a transaction is in flight run
together in the next one, with one COMMIT (see :mod:`cantata.store.postgres_batch`;
the operations are in :mod:`cantata.store.postgres_writes`). Reads and rare writes
use pooled connections directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cantata.errors import DeadLetterNotFound
from cantata.model.access import RunQuery, TokenRecord
from cantata.model.event import Event, like_pattern, matches
from cantata.model.records import (
    Attempt,
    AuditRecord,
    AuditReport,
    DeadLetter,
    Declaration,
    Delivery,
    HistoryEntry,
    RunRecord,
    RunWrite,
    StepHeartbeat,
    TaskRecord,
    WorkerInfo,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store import postgres_console as console
from cantata.store import postgres_onetrip as onetrip
from cantata.store import postgres_operate as operate
from cantata.store import postgres_ops as ops
from cantata.store import postgres_writes as writes
from cantata.store.base import (
    CANCEL,
    EVENTS,
    RUNS,
    TASKS,
    ChangeListener,
    Settlement,
    TraceRecords,
)
from cantata.store.postgres_batch import BatchWriter
from cantata.store.postgres_flow import PostgresFlow
from cantata.store.postgres_ops import (
    ATTEMPT_COLS,
    D_DELIVERY_COLS,
    E_EVENT_COLS,
    EVENT_COLS,
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    TASK_COLS,
    dead_letter_row,
    delivery_row,
    event_row,
    run_row,
)
from cantata.store.postgres_parking import PostgresParking
from cantata.store.postgres_pool import PgPool
from cantata.store.tx import T, TxBody

log = logging.getLogger("cantata.store")

TASK_OUTCOMES = ("done", "failed", "retry")


class PostgresStore(PostgresFlow, PostgresParking):
    """A :class:`~cantata.store.base.Store` on PostgreSQL.

    Args:
        url: ``postgresql://user:password@host:5432/database``; ``?schema=name`` picks
            the schema holding Cantata's tables (default ``cantata``).
        pool_size: most connections the pool opens.
        connect_timeout: seconds :meth:`open` keeps retrying an unreachable server.
        writers: most group-committed write transactions in flight at once (each
            holds one of the pool's connections while it runs).
    """

    def __init__(
        self, url: str, *, pool_size: int = 10, connect_timeout: float = 3.0, writers: int = 2
    ) -> None:
        self.url = url
        self._listeners: list[ChangeListener] = []
        self._db = PgPool(
            url, pool_size=pool_size, connect_timeout=connect_timeout, on_change=self._emit
        )
        self._w = BatchWriter(self._db, writers=writers, one_statement=onetrip)

    async def open(self) -> None:
        """Connect (retrying briefly), migrate the schema, open the pool and LISTEN."""
        await self._db.open()
        self._w.reopen()

    async def close(self) -> None:
        """Commit queued writes, let operations in flight finish, close every connection."""
        await self._w.close()
        await self._db.close()

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _emit(self, channel: str) -> None:
        for listener in list(self._listeners):
            try:
                listener(channel)
            except Exception:
                log.exception("store change listener %r failed", listener)

    # -- declarations and workers -------------------------------------------------------

    async def declare(self, app: str, declarations: Sequence[Declaration]) -> None:
        if not declarations:
            return
        async with self._db.tx() as c:
            await c.executemany(
                "INSERT INTO declarations VALUES ($1,$2,$3,$4,$5,$6) ON CONFLICT "
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

    async def heartbeat(self, app: str, worker_id: str, now: float, info: str | None) -> None:
        await self._db.execute(
            "INSERT INTO workers VALUES ($1,$2,$3,$3,$4) ON CONFLICT (app, worker_id) DO "
            "UPDATE SET heartbeat_at=excluded.heartbeat_at, info=excluded.info",
            app, worker_id, now, info,
        )

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
            await self._db.notify(c, app, RUNS, EVENTS, TASKS)

    async def workers(self, app: str) -> list[WorkerInfo]:
        rows = await self._db.fetch(
            "SELECT worker_id, heartbeat_at, started_at, info FROM workers WHERE app=$1 "
            "ORDER BY started_at",
            app,
        )
        return [WorkerInfo(*r) for r in rows]

    # -- runs -------------------------------------------------------------------------

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None
    ) -> tuple[RunRecord, bool]:
        return await self._w.run_many(writes.create_runs, (run, first))

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        row = await self._db.fetchrow(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id=$2", app, run_id
        )
        return None if row is None else run_row(row)

    async def list_runs(
        self,
        app: str,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        rows = await self._db.fetch(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND ($2::text IS NULL OR status=$2) "
            "AND ($3::text IS NULL OR workflow=$3) "
            'ORDER BY created_at DESC, run_id COLLATE "C" LIMIT $4',
            app, None if status is None else str(status), workflow, limit,
        )
        return [run_row(r) for r in rows]

    async def claim_runs(
        self,
        app: str,
        worker_id: str,
        workflows: Sequence[str],
        *,
        stale_before: float,
        limit: int,
        versions: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        now: float | None = None,
    ) -> list[RunRecord]:
        if not workflows or (run_ids is not None and not run_ids):
            return []
        return await self._w.run(
            lambda c, b: writes.claim_runs(c, b, app, worker_id, workflows, stale_before, limit,
                                           versions, run_ids, now)
        )

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        await self._w.run_many(writes.commit_runs, (app, run_id, fence, write))

    async def request_cancel(
        self, app: str, run_id: str, *, actor: str = audit.SYSTEM
    ) -> RunRecord | None:
        async with self._db.tx() as c:
            status = await c.execute(
                "UPDATE runs SET cancel_requested=true, updated_at=$3, wake_at=NULL, "
                f"waits_for=NULL, wait_match=NULL WHERE app=$1 "
                f"AND run_id=$2 AND status IN {LIVE_SQL}",
                app, run_id, time.time(),
            )
            row = await c.fetchrow(
                f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id=$2", app, run_id
            )
            if row is None:
                return None
            run = run_row(row)
            await self._db.notify(c, app, CANCEL)
            await ops.audit_append(c, app, audit.cancel_entry(
                run_id, actor, str(run.status), status != "UPDATE 0"
            ), self._w.audit_keys.get(app))
        return run

    async def owned_runs(self, app: str, worker_id: str) -> dict[str, int]:
        rows = await self._db.fetch(
            f"SELECT run_id, fence FROM runs WHERE app=$1 AND owner=$2 AND status IN {LIVE_SQL}",
            app, worker_id,
        )
        return {r[0]: r[1] for r in rows}

    async def cancelled_runs(self, app: str, run_ids: Sequence[str]) -> list[str]:
        if not run_ids:
            return []
        rows = await self._db.fetch(
            "SELECT run_id FROM runs WHERE app=$1 AND cancel_requested "
            "AND run_id = ANY($2::text[])",
            app, list(run_ids),
        )
        return [r[0] for r in rows]

    async def load_history(self, app: str, run_id: str) -> list[HistoryEntry]:
        rows = await self._db.fetch(
            f"SELECT {HISTORY_COLS} FROM history WHERE app=$1 AND run_id=$2 ORDER BY seq",
            app, run_id,
        )
        return [HistoryEntry(*r) for r in rows]

    async def load_attempts(self, app: str, run_id: str) -> list[Attempt]:
        rows = await self._db.fetch(
            f"SELECT {ATTEMPT_COLS} FROM attempts WHERE app=$1 AND run_id=$2 "
            "ORDER BY started_at, attempt",
            app, run_id,
        )
        return [Attempt(*r) for r in rows]

    async def excuse_attempts(self, app: str, run_id: str, attempts: Sequence[Attempt]) -> int:
        if not attempts:
            return 0
        status = await self._db.execute(
            ops.EXCUSE_ATTEMPTS, app, run_id, [a.key for a in attempts],
            [a.attempt for a in attempts], [a.started_at for a in attempts],
            [a.ended_at for a in attempts], [a.error_type for a in attempts],
            [a.error for a in attempts],
        )
        return int(status.rsplit(" ", 1)[-1])

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        rows = await self._db.fetch(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND parent_run_id=$2 "
            "ORDER BY created_at",
            app, parent_run_id,
        )
        return [run_row(r) for r in rows]

    async def record_step_heartbeat(self, app: str, run_id: str, beat: StepHeartbeat) -> None:
        await self._db.execute(
            "INSERT INTO step_heartbeats VALUES ($1,$2,$3,$4,$5,$6) "
            "ON CONFLICT (app, run_id, key) DO UPDATE SET attempt=excluded.attempt, "
            "at=excluded.at, details=excluded.details "
            "WHERE excluded.attempt >= step_heartbeats.attempt",
            app, run_id, beat.key, beat.attempt, beat.at, beat.details,
        )

    async def last_step_heartbeat(
        self, app: str, run_id: str, key: str
    ) -> StepHeartbeat | None:
        row = await self._db.fetchrow(
            "SELECT key, attempt, at, details FROM step_heartbeats WHERE app=$1 "
            "AND run_id=$2 AND key=$3",
            app, run_id, key,
        )
        return None if row is None else StepHeartbeat(*row)

    async def run_transaction(
        self, app: str, run_id: str, fence: int, body: TxBody[T]
    ) -> T:
        """See :class:`~cantata.store.base.TransactionalStore`."""
        from cantata.store.postgres_tx import run_transaction

        return await run_transaction(self._db, app, run_id, fence, body)
    # -- operating runs ----------------------------------------------------------------

    async def find_runs(
        self,
        app: str,
        *,
        idempotency_key: str | None = None,
        attributes: Mapping[str, str] | None = None,
        workflow: str | None = None,
        status: RunStatus | None = None,
        limit: int = 100,
    ) -> list[RunRecord]:
        async with self._db.conn() as c:
            return await operate.find_runs(
                c, app, idempotency_key, attributes, workflow, status, limit
            )

    async def run_attributes(
        self, app: str, run_ids: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        async with self._db.conn() as c:
            return await operate.run_attributes(c, app, run_ids)

    async def attribute_names(self, app: str) -> list[str]:
        async with self._db.conn() as c:
            return await operate.attribute_names(c, app)

    async def runs_by_prefix(self, app: str, prefix: str, *, limit: int) -> list[RunRecord]:
        async with self._db.conn() as c:
            return await operate.runs_by_prefix(c, app, prefix, limit)

    async def foreign_runs(
        self,
        app: str,
        worker_id: str,
        workflows: Sequence[str],
        *,
        versions: Sequence[str],
        stale_before: float,
        limit: int,
        now: float | None = None,
    ) -> list[RunRecord]:
        if not workflows:
            return []
        async with self._db.conn() as c:
            return await operate.foreign_runs(
                c, app, worker_id, workflows, versions, stale_before, limit, now
            )

    async def retry_run(
        self,
        app: str,
        run_id: str,
        *,
        include_compensated: bool,
        version: str | None,
        actor: str,
        now: float,
    ) -> RunRecord:
        async with self._db.tx() as c:
            return await operate.retry_run(
                c, app, run_id, include_compensated, version, actor, now
            )

    async def fork_run(
        self, app: str, source_run_id: str, run: RunRecord, *, before_key: str, actor: str
    ) -> RunRecord:
        async with self._db.tx() as c:
            return await operate.fork_run(c, app, source_run_id, run, before_key, actor)

    async def superseded_history(
        self, app: str, run_id: str
    ) -> list[tuple[int, HistoryEntry]]:
        async with self._db.conn() as c:
            return await operate.superseded_history(c, app, run_id)

    async def discard_dead_letter(
        self, app: str, dead_letter_id: str, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        async with self._db.tx() as c:
            return await operate.discard_dead_letter(c, app, dead_letter_id, actor)

    # -- events and deliveries --------------------------------------------------------



    async def append_events(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        if not events:
            return []
        return await self._w.run_many(writes.append_many, (app, events))

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        row = await self._db.fetchrow(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, event_id
        )
        return None if row is None else event_row(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int
    ) -> list[Event[Any]]:
        wildcard = "*" in event_type
        rows = await self._db.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND "
            + ("type LIKE $2 ESCAPE '\\'" if wildcard else "type=$2")
            + " AND stored_at>=$3 AND NOT (id = ANY($4::text[])) ORDER BY seq LIMIT $5",
            app, like_pattern(event_type) if wildcard else event_type, since, list(exclude),
            limit,
        )
        found = [event_row(r) for r in rows]
        return [e for e in found if matches(event_type, e.type)] if wildcard else found

    async def claim_deliveries(
        self,
        app: str,
        worker_id: str,
        groups: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
    ) -> list[Delivery]:
        if not groups:
            return []
        return await self._w.run_many(
            writes.claim_deliveries_many, (app, worker_id, groups, now, stale_before, limit)
        )

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        return await self._w.run_many(
            writes.settle_many, (app, group, event_id, settlement)
        )

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._db.fetch(
            f"SELECT {D_DELIVERY_COLS}, {E_EVENT_COLS} FROM deliveries d JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id WHERE d.app=$1 AND d.event_id=$2 "
            'ORDER BY d.grp COLLATE "C"',
            app, event_id,
        )
        return [delivery_row(r, event_row(r[8:])) for r in rows]

    async def delivery_states(
        self, app: str, group: str, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        if not event_ids:
            return {}
        rows = await self._db.fetch(
            "SELECT event_id, status, attempts FROM deliveries WHERE app=$1 AND grp=$2 "
            "AND event_id = ANY($3::text[])",
            app, group, list(event_ids),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    async def dead_letters(self, app: str, *, limit: int = 100) -> list[DeadLetter]:
        rows = await self._db.fetch(
            f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
            f"{E_EVENT_COLS} FROM dead_letters d JOIN events e ON e.app=d.app "
            "AND e.id=d.event_id WHERE d.app=$1 ORDER BY d.failed_at LIMIT $2",
            app, limit,
        )
        return [dead_letter_row(r, event_row(r[6:])) for r in rows]

    async def replay_dead_letter(
        self, app: str, dead_letter_id: str, now: float, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        async with self._db.tx() as c:
            row = await c.fetchrow(
                "DELETE FROM dead_letters WHERE app=$1 AND id=$2 "
                "RETURNING id, grp, event_id, error, attempts, failed_at",
                app, dead_letter_id,
            )
            ev_row = None if row is None else await c.fetchrow(
                f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, row[2]
            )
            if row is None or ev_row is None:
                raise DeadLetterNotFound(
                    f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
                    "`cantata dlq list`"
                )
            await c.execute(
                "UPDATE deliveries SET status='pending', attempts=0, next_at=$4, owner=NULL, "
                "error=NULL, updated_at=$4 WHERE app=$1 AND grp=$2 AND event_id=$3",
                app, row[1], row[2], now,
            )
            await self._db.notify(c, app, EVENTS)
            await ops.audit_append(
                c, app, audit.replay_entry(row[1], row[2], dead_letter_id, actor),
                self._w.audit_keys.get(app),
            )
        return dead_letter_row(row, event_row(ev_row))

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._db.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND NOT published ORDER BY seq "
            "LIMIT $2",
            app, limit,
        )
        return [event_row(r) for r in rows]

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        await self._w.run(lambda c, b: writes.mark_published(c, b, app, event_ids))

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        if not events:
            return []
        return await self._w.run(lambda c, b: writes.append_external(c, b, app, events))

    async def redrive_events(
        self, app: str, *, stored_before: float, limit: int
    ) -> list[Event[Any]]:
        return await self._w.run(
            lambda c, b: writes.redrive_events(c, b, app, stored_before, limit)
        )

    async def identity(self) -> str:
        row = await self._db.fetchrow("SELECT id FROM store_identity")
        assert row is not None  # made by the migration that created the table
        return str(row[0])

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
        return await self._w.run(lambda c, b: writes.claim_tasks(
            c, b, app, worker_id, services, now, stale_before, limit
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
    ) -> bool:
        if outcome not in TASK_OUTCOMES:
            raise ValueError(f"task outcome {outcome!r} is none of {', '.join(TASK_OUTCOMES)}")
        return await self._w.run(lambda c, b: writes.finish_task(
            c, b, app, task_id, fence, outcome, attempts, result, error, error_type, next_at
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

    def set_audit_key(self, app: str, key: audit.AuditKey | None) -> None:
        if key is None:
            self._w.audit_keys.pop(app, None)
        else:
            self._w.audit_keys[app] = key

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        async with self._db.conn() as c:
            return await ops.audit_head(c, app)

    async def verify_audit(
        self, app: str, *, key: audit.AuditKey | None = None,
        head: tuple[int, str] | None = None,
    ) -> AuditReport:
        recorded = await self.audit_head(app)

        async def fetch(after: int) -> list[AuditRecord]:
            return await self.audit_records(app, after_seq=after, limit=audit.PAGE)

        async def unaudited() -> tuple[list[str], list[str]]:
            async with self._db.conn() as c:
                return await ops.unaudited_runs(c, app, key is not None)

        return await audit.verify_all(
            fetch, recorded, subject=f"app {app!r}", key=key, exported=head,
            unaudited=unaudited,
        )

    # -- apps and observability ---------------------------------------------------------

    async def apps(self) -> list[str]:
        async with self._db.conn() as c:
            return await ops.apps(c)

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        async with self._db.conn() as c, c.transaction(isolation="repeatable_read", readonly=True):
            return await ops.trace_records(c, app, correlation_id, limit)

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int
    ) -> list[str]:
        async with self._db.conn() as c:
            return await ops.stale_correlations(c, app, older_than, limit)

    # -- the console ----------------------------------------------------------------------

    async def query_runs(self, app: str, query: RunQuery) -> list[RunRecord]:
        async with self._db.conn() as c:
            return await console.query_runs(c, app, query)

    async def count_runs(self, app: str) -> dict[str, int]:
        async with self._db.conn() as c:
            return await console.count_runs(c, app)

    async def record_action(
        self, app: str, actor: str, action: str, target: str, data: dict[str, Any]
    ) -> None:
        async with self._db.tx() as c:
            await console.record_action(c, app, actor, action, target, data,
                                        self._w.audit_keys.get(app))

    async def audit_head_seq(self, app: str) -> int:
        async with self._db.conn() as c:
            head = await ops.audit_head(c, app)
        return 0 if head is None else head[0]

    async def create_token(self, token: TokenRecord) -> None:
        async with self._db.tx() as c:
            await console.create_token(c, token)

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        async with self._db.conn() as c:
            return await console.token_by_hash(c, token_hash)

    async def tokens(self) -> list[TokenRecord]:
        async with self._db.conn() as c:
            return await console.tokens(c)

    async def revoke_token(self, name: str, now: float) -> bool:
        async with self._db.tx() as c:
            return await console.revoke_token(c, name, now)
