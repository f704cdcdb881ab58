"""PostgreSQL store (asyncpg): many worker processes on many hosts share one database.

Tables live in their own schema (``cantata`` unless the URL says ``?schema=name``),
so a database that other applications use is fine. Work is claimed with
``FOR UPDATE SKIP LOCKED``; every write that other processes should react to sends
``NOTIFY cantata_changes, '<app>:<channel>'`` in its transaction, and one dedicated
listening connection (see :mod:`cantata.store.postgres_pool`) turns those
notifications, from any process including this one, into calls of the listeners.
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
    DeadLetter,
    Declaration,
    Delivery,
    HistoryEntry,
    RunRecord,
    RunWrite,
    WorkerInfo,
    to_datetime,
)
from cantata.model.status import RunStatus
from cantata.store.base import CANCEL, EVENTS, RUNS, ChangeListener, Settlement, TraceRecords
from cantata.store.postgres_pool import Conn, PgPool, Row

log = logging.getLogger("cantata.store")

_LIVE_SQL = "('pending', 'running', 'compensating')"

# Column lists in the field order of the records they make (rows unpack into them).
RUN_COLS = (
    "run_id, app, workflow, status, args, created_at, updated_at, correlation_id, "
    "causation_id, idempotency_key, args_hash, parent_run_id, deadline_at, result, error, "
    "cancel_requested, owner, fence, flagged, service"
)
HISTORY_COLS = (
    "key, kind, name, status, seq, result, error, error_type, attempts, started_at, "
    "ended_at, wake_at, detail"
)
EVENT_COLS = (
    "type, data, id, source, subject, time, correlation_id, causation_id, traceparent, signature"
)
E_EVENT_COLS = ", ".join("e." + col.strip() for col in EVENT_COLS.split(","))
U_EVENT_COLS = ", ".join("u." + col.strip() for col in EVENT_COLS.split(","))
ATTEMPT_COLS = "key, attempt, started_at, ended_at, error_type, error"
DELIVERY_COLS = "grp, event_id, status, attempts, next_at, error, updated_at, fence"
D_DELIVERY_COLS = ", ".join("d." + col.strip() for col in DELIVERY_COLS.split(","))


def _run(row: Row) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], RunStatus(row[3]), *row[4:20])


def _event(row: Row) -> Event[Any]:
    return Event(row[0], codec.loads(row[1]), *row[2:10])


def _dead_letter(row: Row, event: Event[Any]) -> DeadLetter:
    """``row`` is (id, grp, event_id, error, attempts, failed_at)."""
    failed = to_datetime(row[5])
    assert failed is not None
    return DeadLetter(row[0], row[1], event, row[3], row[4], failed)


def _delivery(row: Row, event: Event[Any]) -> Delivery:
    """``row`` is DELIVERY_COLS."""
    return Delivery(row[0], event, row[2], row[3], row[4], row[5], row[6], row[7])


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
            await c.execute(
                "UPDATE deliveries SET owner=NULL WHERE app=$1 AND owner=$2 AND status='pending'",
                app, worker_id,
            )
            await self._db.notify(c, app, RUNS, EVENTS)

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
                return run, True
            row = await c.fetchrow(
                f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND idempotency_key=$2",
                run.app, run.idempotency_key,
            )
        assert row is not None
        existing = _run(row)
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
        return None if row is None else _run(row)

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
        return [_run(r) for r in rows]

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
                f" SELECT run_id FROM runs c WHERE c.app=$1 AND c.status IN {_LIVE_SQL}"
                f"  AND c.workflow = ANY($2::text[]) AND (c.owner IS NULL OR (c.owner<>$3 AND"
                f"  NOT EXISTS (SELECT 1 FROM workers w WHERE w.app=c.app"
                f"   AND w.worker_id=c.owner AND w.heartbeat_at >= $4)))"
                f" ORDER BY c.created_at LIMIT $5 FOR UPDATE SKIP LOCKED)"
                f" UPDATE runs r SET owner=$3, fence=r.fence+1 FROM pick"
                f" WHERE r.app=$1 AND r.run_id=pick.run_id"
                f" RETURNING {', '.join('r.' + col.strip() for col in RUN_COLS.split(','))}",
                app, list(workflows), worker_id, stale_before, limit,
            )
        return [_run(r) for r in rows]

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        async with self._db.tx() as c:
            current = await c.fetchval(
                "SELECT fence FROM runs WHERE app=$1 AND run_id=$2 FOR UPDATE", app, run_id
            )
            if current is None or current != fence:
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
            if write.attempts:
                await c.executemany(
                    f"INSERT INTO attempts (app, run_id, {ATTEMPT_COLS}) VALUES "
                    "($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (app, run_id, key, attempt) DO UPDATE "
                    "SET ended_at=excluded.ended_at, error_type=excluded.error_type, "
                    "error=excluded.error",
                    [
                        (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, a.error_type,
                         a.error)
                        for a in write.attempts
                    ],
                )
            if write.events:
                await self._append(c, app, write.events)
            await c.execute(
                "UPDATE runs SET updated_at=$3, status=coalesce($4, status), "
                "result=coalesce($5, result), error=coalesce($6, error), "
                "flagged=coalesce($7, flagged), owner=CASE WHEN $8 THEN NULL ELSE owner END "
                "WHERE app=$1 AND run_id=$2",
                app, run_id, time.time(), None if write.status is None else str(write.status),
                write.result, write.error, write.flagged, write.release,
            )
            await self._db.notify(c, app, *((RUNS, EVENTS) if write.events else (RUNS,)))

    async def request_cancel(self, app: str, run_id: str) -> RunRecord | None:
        async with self._db.tx() as c:
            await c.execute(
                f"UPDATE runs SET cancel_requested=true, updated_at=$3 WHERE app=$1 "
                f"AND run_id=$2 AND status IN {_LIVE_SQL}",
                app, run_id, time.time(),
            )
            row = await c.fetchrow(
                f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND run_id=$2", app, run_id
            )
            await self._db.notify(c, app, CANCEL)
        return None if row is None else _run(row)

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
        return [_run(r) for r in rows]

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
        return None if row is None else _event(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int
    ) -> list[Event[Any]]:
        rows = await self._db.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND type=$2 AND stored_at>=$3 "
            "AND NOT (id = ANY($4::text[])) ORDER BY seq LIMIT $5",
            app, event_type, since, list(exclude), limit,
        )
        return [_event(r) for r in rows]

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
            Delivery(r[0], _event(r[5:]), DELIVERY_PENDING, r[1], r[2], r[3], now, r[4])
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
            lock = f"SELECT status FROM deliveries {where} FOR UPDATE"
            status = await c.fetchval(lock, *key)
            if status is None:
                await c.execute(
                    "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                    "VALUES ($1,$2,$3,'pending',$4) ON CONFLICT DO NOTHING",
                    *key, now,
                )
                status = await c.fetchval(lock, *key)
            if status == "done":
                return False
            if s.outcome == "done":
                await c.execute(
                    f"UPDATE deliveries SET status='done', attempts=$4, owner=NULL, error=NULL, "
                    f"updated_at=$5 {where}",
                    *key, s.attempts, now,
                )
                if s.events:
                    await self._append(c, app, s.events)
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
                await c.execute(
                    "INSERT INTO dead_letters VALUES ($1,$2,$3,$4,$5,$6,$7)",
                    app, s.dead_letter_id or codec.new_id(), group, event_id,
                    s.error or "unknown error", s.attempts, now,
                )
            await self._db.notify(c, app, EVENTS)
        return True

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._db.fetch(
            f"SELECT {D_DELIVERY_COLS}, {E_EVENT_COLS} FROM deliveries d JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id WHERE d.app=$1 AND d.event_id=$2 "
            'ORDER BY d.grp COLLATE "C"',
            app, event_id,
        )
        return [_delivery(r, _event(r[8:])) for r in rows]

    async def dead_letters(self, app: str, *, limit: int = 100) -> list[DeadLetter]:
        rows = await self._db.fetch(
            f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
            f"{E_EVENT_COLS} FROM dead_letters d JOIN events e ON e.app=d.app "
            "AND e.id=d.event_id WHERE d.app=$1 ORDER BY d.failed_at LIMIT $2",
            app, limit,
        )
        return [_dead_letter(r, _event(r[6:])) for r in rows]

    async def replay_dead_letter(self, app: str, dead_letter_id: str, now: float) -> DeadLetter:
        async with self._db.tx() as c:
            row = await c.fetchrow(
                "DELETE FROM dead_letters WHERE app=$1 AND id=$2 "
                "RETURNING id, grp, event_id, error, attempts, failed_at",
                app, dead_letter_id,
            )
            event_row = None if row is None else await c.fetchrow(
                f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, row[2]
            )
            if row is None or event_row is None:
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
        return _dead_letter(row, _event(event_row))

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._db.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND NOT published ORDER BY seq "
            "LIMIT $2",
            app, limit,
        )
        return [_event(r) for r in rows]

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        await self._db.execute(
            "UPDATE events SET published=true WHERE app=$1 AND id = ANY($2::text[])",
            app, list(event_ids),
        )

    # -- observability ------------------------------------------------------------------

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        async with self._db.conn() as c, c.transaction(isolation="repeatable_read", readonly=True):
            runs = [
                _run(r) for r in await c.fetch(
                    f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND correlation_id=$2 "
                    "ORDER BY created_at LIMIT $3",
                    app, correlation_id, limit,
                )
            ]
            ids = [r.run_id for r in runs]
            entries: dict[str, list[HistoryEntry]] = {i: [] for i in ids}
            attempts: dict[str, list[Attempt]] = {i: [] for i in ids}
            for r in await c.fetch(
                f"SELECT run_id, {HISTORY_COLS} FROM history WHERE app=$1 "
                "AND run_id = ANY($2::text[]) ORDER BY seq",
                app, ids,
            ):
                if len(entries[r[0]]) < limit:
                    entries[r[0]].append(HistoryEntry(*r[1:]))
            for r in await c.fetch(
                f"SELECT run_id, {ATTEMPT_COLS} FROM attempts WHERE app=$1 "
                "AND run_id = ANY($2::text[]) ORDER BY started_at, attempt",
                app, ids,
            ):
                if len(attempts[r[0]]) < limit:
                    attempts[r[0]].append(Attempt(*r[1:]))
            events = [
                (_event(r), r[10]) for r in await c.fetch(
                    f"SELECT {EVENT_COLS}, stored_at FROM events WHERE app=$1 "
                    "AND correlation_id=$2 ORDER BY seq LIMIT $3",
                    app, correlation_id, limit,
                )
            ]
            by_id = {e.id: e for e, _ in events}
            deliveries = [
                _delivery(r, by_id[r[1]]) for r in await c.fetch(
                    f"SELECT {DELIVERY_COLS} FROM deliveries WHERE app=$1 "
                    "AND event_id = ANY($2::text[]) ORDER BY updated_at",
                    app, list(by_id),
                )
            ]
            dead = [
                _dead_letter(r, by_id[r[2]]) for r in await c.fetch(
                    "SELECT id, grp, event_id, error, attempts, failed_at FROM dead_letters "
                    "WHERE app=$1 AND event_id = ANY($2::text[]) ORDER BY failed_at",
                    app, list(by_id),
                )
            ]
        return TraceRecords(runs, entries, attempts, events, deliveries, dead)

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int
    ) -> list[str]:
        rows = await self._db.fetch(
            f"SELECT correlation_id, updated_at FROM runs WHERE app=$1 AND status IN "
            f"{_LIVE_SQL} AND updated_at < $2 "
            "UNION SELECT correlation_id, updated_at FROM runs WHERE app=$1 AND flagged "
            "UNION SELECT e.correlation_id, d.updated_at FROM deliveries d JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id WHERE d.app=$1 AND d.status IN "
            "('pending','dead') AND d.updated_at < $2 "
            "ORDER BY 2 LIMIT $3",
            app, older_than, limit * 4,
        )
        seen: dict[str, None] = {}
        for r in rows:
            if r[0] is not None:
                seen.setdefault(r[0])
        return list(seen)[:limit]
