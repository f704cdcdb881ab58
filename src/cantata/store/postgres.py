"""PostgreSQL store (asyncpg): many worker processes on many hosts share one database.

Tables live in their own schema (``cantata`` unless the URL says ``?schema=name``),
so a database that other applications use is fine. Work is claimed with
``FOR UPDATE SKIP LOCKED``; every write that other processes should react to sends
``NOTIFY cantata_changes, '<app>:<channel>'`` in its transaction, and one dedicated
listening connection (see :mod:`cantata.store.postgres_pool`) turns those
notifications, from any process including this one, into calls of the listeners.
Audited writes append to the app's audit chain as their last statement (see
:mod:`cantata.store.postgres_ops`, which also holds the task, trace and row code).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from cantata.errors import DeadLetterNotFound, IdempotencyConflict, LeaseLost
from cantata.model import codec
from cantata.model.event import Event, matches
from cantata.model.records import (
    DELIVERY_PENDING,
    Attempt,
    AuditRecord,
    AuditReport,
    DeadLetter,
    Declaration,
    Delivery,
    HistoryEntry,
    RunRecord,
    RunWrite,
    TaskRecord,
    WorkerInfo,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store.base import (
    CANCEL,
    EVENTS,
    RUNS,
    TASKS,
    ChangeListener,
    Settlement,
    TraceRecords,
)
from cantata.store.postgres_ops import (
    ATTEMPT_COLS,
    D_DELIVERY_COLS,
    E_EVENT_COLS,
    EVENT_COLS,
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    TASK_COLS,
    U_EVENT_COLS,
    dead_letter_row,
    delivery_row,
    event_row,
    run_row,
)
from cantata.store.postgres_pool import Conn, PgPool

log = logging.getLogger("cantata.store")

TASK_OUTCOMES = ("done", "failed", "retry")


class PostgresStore:
    """A :class:`~cantata.store.base.Store` on PostgreSQL.

    Args:
        url: ``postgresql://user:password@host:5432/database``; ``?schema=name`` picks
            the schema holding Cantata's tables (default ``cantata``).
        pool_size: most connections the pool opens.
        connect_timeout: seconds :meth:`open` keeps retrying an unreachable server.
    """

    def __init__(self, url: str, *, pool_size: int = 10, connect_timeout: float = 3.0) -> None:
        self.url = url
        self._listeners: list[ChangeListener] = []
        self._db = PgPool(
            url, pool_size=pool_size, connect_timeout=connect_timeout, on_change=self._emit
        )

    async def open(self) -> None:
        """Connect (retrying briefly), migrate the schema, open the pool and LISTEN."""
        await self._db.open()

    async def close(self) -> None:
        """Let operations in flight finish, then close every connection."""
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

    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        async with self._db.tx() as c:
            inserted = await c.fetchval(
                f"INSERT INTO runs ({RUN_COLS}) VALUES ({', '.join(f'${i}' for i in range(1, 21))})"
                " ON CONFLICT (app, idempotency_key) WHERE idempotency_key IS NOT NULL "
                "DO NOTHING RETURNING run_id",
                run.run_id, run.app, run.workflow, str(run.status), run.args, run.created_at,
                run.updated_at, run.correlation_id, run.causation_id, run.idempotency_key,
                run.args_hash, run.parent_run_id, run.deadline_at, run.result, run.error,
                run.cancel_requested, run.owner, run.fence, run.flagged, run.service,
            )
            if inserted is not None:
                await self._db.notify(c, run.app, RUNS)
                await ops.audit_append(c, run.app, audit.run_created_entry(
                    run.run_id, run.workflow, run.correlation_id, run.parent_run_id
                ))
                return run, True
            row = await c.fetchrow(
                f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND idempotency_key=$2",
                run.app, run.idempotency_key,
            )
        assert row is not None
        existing = run_row(row)
        if existing.args_hash != run.args_hash or existing.workflow != run.workflow:
            raise IdempotencyConflict(
                f"idempotency key {run.idempotency_key!r} was already used for run "
                f"{existing.run_id} of {existing.workflow} with different arguments; use a "
                "new key for a new request"
            )
        return existing, False

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
    ) -> list[RunRecord]:
        if not workflows:
            return []
        # MATERIALIZED: the pick runs once (a rescanned LIMIT ... SKIP LOCKED subquery
        # yields more rows). The owner's liveness is a correlated subquery, not a join,
        # so that when a locked row was claimed meanwhile, the READ COMMITTED re-check
        # sees the new owner's heartbeat.
        async with self._db.tx() as c:
            rows = await c.fetch(
                f"WITH pick AS MATERIALIZED ("
                f" SELECT run_id FROM runs c WHERE c.app=$1 AND c.status IN {LIVE_SQL}"
                f"  AND c.workflow = ANY($2::text[]) AND (c.owner IS NULL OR (c.owner<>$3 AND"
                f"  NOT EXISTS (SELECT 1 FROM workers w WHERE w.app=c.app"
                f"   AND w.worker_id=c.owner AND w.heartbeat_at >= $4)))"
                f" ORDER BY c.created_at LIMIT $5 FOR UPDATE SKIP LOCKED)"
                f" UPDATE runs r SET owner=$3, fence=r.fence+1 FROM pick"
                f" WHERE r.app=$1 AND r.run_id=pick.run_id"
                f" RETURNING {', '.join('r.' + col.strip() for col in RUN_COLS.split(','))}",
                app, list(workflows), worker_id, stale_before, limit,
            )
        return [run_row(r) for r in rows]

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        async with self._db.tx() as c:
            current = await c.fetchrow(
                "SELECT fence, owner, status, correlation_id FROM runs WHERE app=$1 "
                "AND run_id=$2 FOR UPDATE",
                app, run_id,
            )
            if current is None or current[0] != fence:
                raise LeaseLost(
                    f"run {run_id} was taken over by another worker (fence {fence} is stale); "
                    "this worker stops executing it"
                )
            if write.entries:
                await c.executemany(
                    f"INSERT INTO history (app, run_id, {HISTORY_COLS}) VALUES "
                    f"({', '.join(f'${i}' for i in range(1, 16))}) "
                    "ON CONFLICT (app, run_id, key) DO UPDATE SET "
                    "status=excluded.status, result=excluded.result, error=excluded.error, "
                    "error_type=excluded.error_type, attempts=excluded.attempts, "
                    "started_at=excluded.started_at, ended_at=excluded.ended_at, "
                    "wake_at=excluded.wake_at, detail=excluded.detail",
                    [
                        (app, run_id, e.key, e.kind, e.name, e.status, e.seq, e.result, e.error,
                         e.error_type, e.attempts, e.started_at, e.ended_at, e.wake_at, e.detail)
                        for e in write.entries
                    ],
                )
            await ops.upsert_attempts(c, app, run_id, write.attempts)
            if write.events:
                await self._append(c, app, write.events)
            if write.tasks:
                await ops.insert_tasks(c, app, current[3], write.tasks)
            await c.execute(
                "UPDATE runs SET updated_at=$3, status=coalesce($4, status), "
                "result=coalesce($5, result), error=coalesce($6, error), "
                "flagged=coalesce($7, flagged), owner=CASE WHEN $8 THEN NULL ELSE owner END "
                "WHERE app=$1 AND run_id=$2",
                app, run_id, time.time(), None if write.status is None else str(write.status),
                write.result, write.error, write.flagged, write.release,
            )
            channels = [RUNS]
            if write.events:
                channels.append(EVENTS)
            if write.tasks:
                channels.append(TASKS)
            await self._db.notify(c, app, *channels)
            entry = audit.checkpoint_entry(run_id, current[1], current[2], write)
            if entry is not None:
                await ops.audit_append(c, app, entry)  # last: holds the chain head briefly

    async def request_cancel(
        self, app: str, run_id: str, *, actor: str = audit.SYSTEM
    ) -> RunRecord | None:
        async with self._db.tx() as c:
            status = await c.execute(
                f"UPDATE runs SET cancel_requested=true, updated_at=$3 WHERE app=$1 "
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
            ))
        return run

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

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        rows = await self._db.fetch(
            f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND parent_run_id=$2 "
            "ORDER BY created_at",
            app, parent_run_id,
        )
        return [run_row(r) for r in rows]

    # -- events and deliveries --------------------------------------------------------

    async def _append(self, c: Conn, app: str, events: Sequence[Event[Any]]) -> list[int]:
        if not events:
            return []
        now = time.time()
        values = [
            (ev.type, codec.dumps(ev.data, f"data of event {ev.type}"), ev.id, ev.source,
             ev.subject, ev.time, ev.correlation_id, ev.causation_id, ev.traceparent,
             ev.signature)
            for ev in events
        ]
        columns = [list(column) for column in zip(*values, strict=True)]
        inserted = {
            r[0] for r in await c.fetch(
                f"INSERT INTO events (app, {EVENT_COLS}, stored_at) "
                f"SELECT $1::text, {U_EVENT_COLS}, $12::float8 FROM unnest("
                f"{', '.join(f'${i}::text[]' for i in range(2, 12))}) WITH ORDINALITY "
                f"AS u({EVENT_COLS}, ord) ORDER BY ord ON CONFLICT (app, id) DO NOTHING "
                "RETURNING id",
                app, *columns, now,
            )
        }
        if not inserted:
            return [0] * len(events)
        subs = await c.fetch(
            "SELECT name, pattern FROM declarations WHERE app=$1 AND kind IN ('handler','trigger')",
            app,
        )
        counts: list[int] = []
        rows: list[tuple[str, str]] = []
        for ev in events:
            if ev.id not in inserted:
                counts.append(0)
                continue
            inserted.discard(ev.id)  # a repeated id in one batch counts once
            groups = sorted({s[0] for s in subs if matches(s[1], ev.type)})
            rows += [(g, ev.id) for g in groups]
            counts.append(len(groups))
        if rows:
            await c.execute(
                "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                "SELECT $1::text, g, e, 'pending', $4::float8 "
                "FROM unnest($2::text[], $3::text[]) AS u(g, e) "
                "ON CONFLICT DO NOTHING",
                app, [r[0] for r in rows], [r[1] for r in rows], now,
            )
        return counts

    async def append_events(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        if not events:
            return []
        async with self._db.tx() as c:
            counts = await self._append(c, app, events)
            await self._db.notify(c, app, EVENTS)
        return counts

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        row = await self._db.fetchrow(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, event_id
        )
        return None if row is None else event_row(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int
    ) -> list[Event[Any]]:
        rows = await self._db.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND type=$2 AND stored_at>=$3 "
            "AND NOT (id = ANY($4::text[])) ORDER BY seq LIMIT $5",
            app, event_type, since, list(exclude), limit,
        )
        return [event_row(r) for r in rows]

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
        async with self._db.tx() as c:
            rows = await c.fetch(
                f"WITH pick AS MATERIALIZED ("
                f" SELECT grp, event_id FROM deliveries d WHERE d.app=$1 AND d.status='pending'"
                f"  AND d.grp = ANY($2::text[]) AND d.next_at <= $3"
                f"  AND (d.owner IS NULL OR (d.owner<>$4 AND NOT EXISTS (SELECT 1 FROM workers w"
                f"   WHERE w.app=d.app AND w.worker_id=d.owner AND w.heartbeat_at >= $5)))"
                f" ORDER BY d.next_at LIMIT $6 FOR UPDATE SKIP LOCKED"
                f"), upd AS ("
                f" UPDATE deliveries d SET owner=$4, fence=d.fence+1, attempts=d.attempts+1,"
                f"  updated_at=$3 FROM pick WHERE d.app=$1 AND d.grp=pick.grp"
                f"  AND d.event_id=pick.event_id"
                f" RETURNING d.grp, d.attempts, d.next_at, d.error, d.fence, d.event_id"
                f") SELECT upd.grp, upd.attempts, upd.next_at, upd.error, upd.fence, "
                f"{E_EVENT_COLS} FROM upd JOIN events e ON e.app=$1 AND e.id=upd.event_id "
                f"ORDER BY upd.next_at, e.seq",
                app, list(groups), now, worker_id, stale_before, limit,
            )
        return [
            Delivery(r[0], event_row(r[5:]), DELIVERY_PENDING, r[1], r[2], r[3], now, r[4])
            for r in rows
        ]

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        s = settlement
        key = (app, group, event_id)
        where = "WHERE app=$1 AND grp=$2 AND event_id=$3"
        async with self._db.tx() as c:
            now = time.time()
            lock = f"SELECT status, owner FROM deliveries {where} FOR UPDATE"
            row = await c.fetchrow(lock, *key)
            if row is None:
                await c.execute(
                    "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                    "VALUES ($1,$2,$3,'pending',$4) ON CONFLICT DO NOTHING",
                    *key, now,
                )
                row = await c.fetchrow(lock, *key)
            assert row is not None
            if row[0] == "done":
                return False
            entry: audit.Entry | None = None
            if s.outcome == "done":
                await c.execute(
                    f"UPDATE deliveries SET status='done', attempts=$4, owner=NULL, error=NULL, "
                    f"updated_at=$5 {where}",
                    *key, s.attempts, now,
                )
                if s.events:
                    await self._append(c, app, s.events)
                entry = audit.delivery_entry(
                    group, event_id, row[1], "done", s.attempts, emitted=[e.id for e in s.events]
                )
            elif s.outcome == "retry":
                await c.execute(
                    f"UPDATE deliveries SET status='pending', attempts=$4, owner=NULL, error=$5, "
                    f"next_at=$6, updated_at=$7 {where}",
                    *key, s.attempts, s.error, s.retry_at, now,
                )
            else:
                await c.execute(
                    f"UPDATE deliveries SET status='dead', attempts=$4, owner=NULL, error=$5, "
                    f"updated_at=$6 {where}",
                    *key, s.attempts, s.error, now,
                )
                dead_letter_id = s.dead_letter_id or codec.new_id()
                await c.execute(
                    "INSERT INTO dead_letters VALUES ($1,$2,$3,$4,$5,$6,$7)",
                    app, dead_letter_id, group, event_id, s.error or "unknown error",
                    s.attempts, now,
                )
                entry = audit.delivery_entry(
                    group, event_id, row[1], "dead", s.attempts, error=s.error,
                    dead_letter_id=dead_letter_id,
                )
            await self._db.notify(c, app, EVENTS)
            if entry is not None:
                await ops.audit_append(c, app, entry)
        return True

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._db.fetch(
            f"SELECT {D_DELIVERY_COLS}, {E_EVENT_COLS} FROM deliveries d JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id WHERE d.app=$1 AND d.event_id=$2 "
            'ORDER BY d.grp COLLATE "C"',
            app, event_id,
        )
        return [delivery_row(r, event_row(r[8:])) for r in rows]

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
                c, app, audit.replay_entry(row[1], row[2], dead_letter_id, actor)
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
        await self._db.execute(
            "UPDATE events SET published=true WHERE app=$1 AND id = ANY($2::text[])",
            app, list(event_ids),
        )

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
        async with self._db.tx() as c:
            return await ops.claim_tasks(c, app, worker_id, services, now, stale_before, limit)

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
        async with self._db.tx() as c:
            done, entry = await ops.finish_task(
                c, app, task_id, fence, outcome, attempts, result, error, error_type, next_at
            )
            if done:
                await self._db.notify(c, app, TASKS)
            if entry is not None:
                await ops.audit_append(c, app, entry)
        return done

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

    async def verify_audit(self, app: str) -> AuditReport:
        async with self._db.conn() as c:
            head = await ops.audit_head(c, app)

        async def fetch(after: int) -> list[AuditRecord]:
            return await self.audit_records(app, after_seq=after, limit=audit.PAGE)

        return await audit.verify_chain(fetch, head, subject=f"app {app!r}")

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
