"""SQLite store: one file in WAL mode, safe for several processes; ``memory://`` too.

Opening and migrating is in :mod:`cantata.store.sqlite_open`; rows, settling
deliveries, tasks, the audit log and trace queries in :mod:`cantata.store.sqlite_ops`;
the connection thread with group commit in :mod:`cantata.store.sqlite_thread`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any

from cantata.errors import (
    IdempotencyConflict,
    LeaseLost,
    StoreUnavailable,
)
from cantata.model import codec
from cantata.model.access import RunQuery, TokenRecord
from cantata.model.event import Event, like_pattern, matches
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
    StepHeartbeat,
    TaskRecord,
    WorkerInfo,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store import sqlite_console as console
from cantata.store import sqlite_operate as operate
from cantata.store import sqlite_ops as ops
from cantata.store.base import (
    CANCEL,
    EVENTS,
    RUNS,
    TASKS,
    ChangeListener,
    Settlement,
    TraceRecords,
)
from cantata.store.faults import sqlite_fault
from cantata.store.sqlite_flow import SQLiteFlow
from cantata.store.sqlite_open import connect
from cantata.store.sqlite_ops import (
    E_EVENT_COLS,
    EVENT_COLS,
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    TASK_COLS,
    WAITING_IN_QUEUE,
    dead_letter_row,
    entry_row,
    event_row,
    run_row,
)
from cantata.store.sqlite_parking import UNPARK, SQLiteParking, wake_parent
from cantata.store.sqlite_thread import ConnectionThread, TxConnection
from cantata.store.tx import T, TxBody

TASK_OUTCOMES = ("done", "failed", "retry")


def _channels(write: RunWrite | None) -> tuple[str, ...]:
    """What a committed checkpoint changed, for the store's listeners."""
    channels = [RUNS]
    if write is not None and write.events:
        channels.append(EVENTS)
    if write is not None and write.tasks:
        channels.append(TASKS)
    return tuple(channels)


class SQLiteStore(SQLiteFlow, SQLiteParking):
    """A :class:`~cantata.store.base.Store` on one SQLite file (or in memory).

    Args:
        path: file path, or ``":memory:"`` for a private in-memory database.
        synchronous: SQLite ``synchronous`` setting; ``FULL`` (the default) fsyncs
            every commit, so a committed checkpoint survives power loss.
        create: make the file if it does not exist (``False``: opening a missing file
            is an error, as for the CLI's query commands).
    """

    def __init__(
        self, path: str, *, synchronous: str = "FULL", url: str | None = None,
        create: bool = True,
    ) -> None:
        self.path = path
        self.create = create
        self.url = url or f"sqlite:///{path}"
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise StoreUnavailable(
                f"synchronous={synchronous!r} is not a SQLite synchronous mode: use FULL, "
                "NORMAL, OFF or EXTRA"
            )
        self._listeners: list[ChangeListener] = []
        self._thread: ConnectionThread | None = None
        self._subs_cache: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        self._audit_keys: dict[str, audit.AuditKey] = {}
        self._tx_lane: Any = None  # transactional steps' connection (sqlite_tx)

    # -- lifecycle -------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (creating it if allowed), switch to WAL and migrate; a file
        that cannot be written is opened read-only (writes then raise StoreReadOnly)."""
        if self._thread is not None:
            return
        def keyed_connect() -> TxConnection:
            conn = connect(self.path, self.url, self.synchronous, create=self.create)
            conn.audit_keys = self._audit_keys
            return conn

        thread = ConnectionThread(
            keyed_connect, self._notify, name=f"cantata-sqlite:{self.path}",
            translate=lambda exc: sqlite_fault(exc, self.path),
        )
        thread.start()
        self._thread = thread

    async def close(self) -> None:
        """Commit what is queued and close the connection."""
        if self._tx_lane is not None:
            self._tx_lane.close()
            self._tx_lane = None
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _notify(self, channels: set[str]) -> None:
        for channel in channels:
            for listener in self._listeners:
                listener(channel)

    @property
    def _t(self) -> ConnectionThread:
        if self._thread is None:
            raise StoreUnavailable(f"store {self.url} is not open: use `async with app:` first")
        return self._thread

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

    # -- runs -------------------------------------------------------------------------

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None
    ) -> tuple[RunRecord, bool]:
        return await self._t.write(lambda c: self._create(c, run, first), *_channels(first))

    def _create(
        self, c: sqlite3.Connection, run: RunRecord, first: RunWrite | None
    ) -> tuple[RunRecord, bool]:
        """:meth:`create_run` in the caller's transaction (queued runs use it too)."""
        if run.idempotency_key is not None:
            row = c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND idempotency_key=?",
                (run.app, run.idempotency_key),
            ).fetchone()
            if row is not None:
                existing = run_row(row)
                if existing.args_hash != run.args_hash or existing.workflow != run.workflow:
                    raise IdempotencyConflict(
                        f"idempotency key {run.idempotency_key!r} was already used for run "
                        f"{existing.run_id} of {existing.workflow} with different "
                        "arguments; use a new key for a new request"
                    )
                return existing, False
        c.execute(
            f"INSERT INTO runs ({RUN_COLS}) VALUES ({','.join('?' * 22)})",
            (
                run.app, run.run_id, run.workflow, str(run.status), run.args, run.result,
                run.error, run.idempotency_key, run.args_hash, run.correlation_id,
                run.causation_id, run.parent_run_id, run.service, run.created_at,
                run.updated_at, run.deadline_at, int(run.cancel_requested), run.owner,
                run.fence, int(run.flagged), run.version, run.epoch,
            ),
        )
        ops.audit_append(c, run.app, audit.run_created_entry(
            run.run_id, run.workflow, run.correlation_id, run.parent_run_id
        ))
        if first is not None:
            self._apply(c, run.app, run.run_id, first, run.owner, str(run.status),
                        run.correlation_id)
        return run, True

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        row = await self._t.read(
            lambda c: c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND run_id=?", (app, run_id)
            ).fetchone()
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
        sql = f"SELECT {RUN_COLS} FROM runs WHERE app=?"
        params: list[Any] = [app]
        if status is not None:
            sql += " AND status=?"
            params.append(str(status))
        if workflow is not None:
            sql += " AND workflow=?"
            params.append(workflow)
        sql += " ORDER BY created_at DESC, run_id LIMIT ?"
        params.append(limit)
        rows = await self._t.read(lambda c: c.execute(sql, params).fetchall())
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
        marks = ",".join("?" * len(workflows))
        extra, more = "", []
        if versions is not None:
            extra += f" AND (r.version IS NULL OR r.version IN ({','.join('?' * len(versions))}))"
            more += list(versions)
        if run_ids is not None:
            extra += f" AND r.run_id IN ({','.join('?' * len(run_ids))})"
            more += list(run_ids)
        # Runs that are not parked (runs_claimable), and parked runs that are due
        # (runs_parked, an index range up to ``now``): no scan of parked runs.
        due = ""
        due_params: list[Any] = []
        if now is not None:
            due = (
                f" UNION ALL SELECT rid FROM (SELECT r.rowid AS rid FROM runs r"
                f" INDEXED BY runs_parked"
                f" WHERE r.app=? AND r.wake_at IS NOT NULL AND r.wake_at<=?"
                f"  AND r.status IN {LIVE_SQL} AND r.workflow IN ({marks}) AND r.owner IS NULL"
                f"{extra} ORDER BY r.wake_at LIMIT ?)"
            )
            due_params = [app, now, *workflows, *more, limit]

        def op(c: sqlite3.Connection) -> list[RunRecord]:
            rows = c.execute(
                # By rowid alone: with ``app=?`` here the planner scanned the app's runs.
                f"UPDATE runs SET owner=?, fence=fence+1, {UNPARK} WHERE rowid IN ("
                f" SELECT rid FROM (SELECT r.rowid AS rid FROM runs r INDEXED BY runs_claimable"
                f"  LEFT JOIN workers w ON w.app=r.app AND w.worker_id=r.owner"
                f"  WHERE r.app=? AND r.status IN {LIVE_SQL} AND r.wake_at IS NULL"
                f"  AND r.workflow IN ({marks})"
                f"  AND (r.owner IS NULL OR (r.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.heartbeat_at < ?))) AND {WAITING_IN_QUEUE}{extra}"
                f"  ORDER BY r.created_at LIMIT ?){due} LIMIT ?) RETURNING {RUN_COLS}",
                (worker_id, app, *workflows, worker_id, stale_before, *more, limit,
                 *due_params, limit),
            ).fetchall()
            return [run_row(r) for r in rows]

        return await self._t.write(op)

    async def owned_runs(self, app: str, worker_id: str) -> dict[str, int]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT run_id, fence FROM runs WHERE app=? AND owner=? "
                f"AND status IN {LIVE_SQL}",
                (app, worker_id),
            ).fetchall()
        )
        return {r[0]: r[1] for r in rows}

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        def op(c: sqlite3.Connection) -> None:
            row = c.execute(
                "SELECT fence, owner, status, correlation_id FROM runs WHERE app=? AND run_id=?",
                (app, run_id),
            ).fetchone()
            if row is None or row[0] != fence:
                raise LeaseLost(
                    f"run {run_id} was taken over by another worker (fence {fence} is stale); "
                    "this worker stops executing it"
                )
            self._apply(c, app, run_id, write, row[1], row[2], row[3])

        await self._t.write(op, *_channels(write))

    def _apply(
        self,
        c: sqlite3.Connection,
        app: str,
        run_id: str,
        write: RunWrite,
        owner: str | None,
        old_status: str,
        correlation_id: str,
    ) -> None:
        """One checkpoint of a run whose fence was checked, in the caller's transaction."""
        if write.entries:
            c.executemany(
                f"INSERT INTO history (app, run_id, {HISTORY_COLS}) "
                f"VALUES (?,?,{','.join('?' * 13)}) ON CONFLICT DO UPDATE SET "
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
        ops.upsert_attempts(c, app, run_id, write.attempts)
        if write.events:
            self._append(c, app, write.events)
        if write.tasks:
            ops.insert_tasks(c, app, correlation_id, write.tasks)
        sets = ["updated_at=?"]
        params: list[Any] = [time.time()]
        if write.status is not None:
            sets.append("status=?")
            params.append(str(write.status))
        if write.result is not None:
            sets.append("result=?")
            params.append(write.result)
        if write.error is not None:
            sets.append("error=?")
            params.append(write.error)
        if write.flagged is not None:
            sets.append("flagged=?")
            params.append(int(write.flagged))
        if write.release:
            sets.append("owner=NULL")
        c.execute(
            f"UPDATE runs SET {', '.join(sets)} WHERE app=? AND run_id=?",
            (*params, app, run_id),
        )
        if write.wake is not None:
            wake_parent(c, app, write.wake)
        entry = audit.checkpoint_entry(run_id, owner, old_status, write)
        if entry is not None:
            ops.audit_append(c, app, entry)

    async def request_cancel(
        self, app: str, run_id: str, *, actor: str = audit.SYSTEM
    ) -> RunRecord | None:
        def op(c: sqlite3.Connection) -> RunRecord | None:
            applied = c.execute(
                f"UPDATE runs SET cancel_requested=1, updated_at=?, {UNPARK} WHERE app=? "
                f"AND run_id=? AND status IN {LIVE_SQL}",
                (time.time(), app, run_id),
            ).rowcount
            row = c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND run_id=?", (app, run_id)
            ).fetchone()
            if row is None:
                return None
            run = run_row(row)
            ops.audit_append(
                c, app, audit.cancel_entry(run_id, actor, str(run.status), applied > 0)
            )
            return run

        return await self._t.write(op, CANCEL)

    async def cancelled_runs(self, app: str, run_ids: Sequence[str]) -> list[str]:
        ids = list(run_ids)
        out: list[str] = []
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            rows = await self._t.read(
                lambda c, chunk=chunk: c.execute(  # type: ignore[misc]
                    f"SELECT run_id FROM runs WHERE app=? AND cancel_requested=1 AND run_id IN "
                    f"({','.join('?' * len(chunk))})",
                    (app, *chunk),
                ).fetchall()
            )
            out.extend(r[0] for r in rows)
        return out

    async def load_history(self, app: str, run_id: str) -> list[HistoryEntry]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {HISTORY_COLS} FROM history WHERE app=? AND run_id=? ORDER BY seq",
                (app, run_id),
            ).fetchall()
        )
        return [entry_row(r) for r in rows]

    async def load_attempts(self, app: str, run_id: str) -> list[Attempt]:
        rows = await self._t.read(
            lambda c: c.execute(
                "SELECT key, attempt, started_at, ended_at, error_type, error FROM attempts "
                "WHERE app=? AND run_id=? ORDER BY started_at, attempt",
                (app, run_id),
            ).fetchall()
        )
        return [Attempt(*r) for r in rows]

    async def excuse_attempts(self, app: str, run_id: str, attempts: Sequence[Attempt]) -> int:
        def op(c: sqlite3.Connection) -> int:
            return sum(
                c.execute(ops.EXCUSE_ATTEMPT, (a.ended_at, a.error_type, a.error, app, run_id,
                                               a.key, a.attempt, a.started_at)).rowcount
                for a in attempts
            )

        return await self._t.write(op) if attempts else 0

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND parent_run_id=? ORDER BY created_at",
                (app, parent_run_id),
            ).fetchall()
        )
        return [run_row(r) for r in rows]

    async def record_step_heartbeat(self, app: str, run_id: str, beat: StepHeartbeat) -> None:
        await self._t.write(
            lambda c: c.execute(
                "INSERT INTO step_heartbeats VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "attempt=excluded.attempt, at=excluded.at, details=excluded.details "
                "WHERE excluded.attempt >= step_heartbeats.attempt",
                (app, run_id, beat.key, beat.attempt, beat.at, beat.details),
            )
        )

    async def last_step_heartbeat(
        self, app: str, run_id: str, key: str
    ) -> StepHeartbeat | None:
        row = await self._t.read(
            lambda c: c.execute(
                "SELECT key, attempt, at, details FROM step_heartbeats WHERE app=? AND run_id=? "
                "AND key=?",
                (app, run_id, key),
            ).fetchone()
        )
        return None if row is None else StepHeartbeat(*row)

    async def run_transaction(
        self, app: str, run_id: str, fence: int, body: TxBody[T]
    ) -> T:
        """See :class:`~cantata.store.base.TransactionalStore`."""
        from cantata.store.sqlite_tx import run_transaction

        return await run_transaction(self, app, run_id, fence, body)

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
        return await self._t.read(lambda c: operate.find_runs(
            c, app, idempotency_key, attributes, workflow, status, limit
        ))

    async def run_attributes(
        self, app: str, run_ids: Sequence[str]
    ) -> dict[str, dict[str, str]]:
        return await self._t.read(lambda c: operate.run_attributes(c, app, run_ids))

    async def attribute_names(self, app: str) -> list[str]:
        return await self._t.read(lambda c: operate.attribute_names(c, app))

    async def runs_by_prefix(self, app: str, prefix: str, *, limit: int) -> list[RunRecord]:
        return await self._t.read(lambda c: operate.runs_by_prefix(c, app, prefix, limit))

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
        return await self._t.read(lambda c: operate.foreign_runs(
            c, app, worker_id, workflows, versions or [""], stale_before, limit, now
        ))

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
        return await self._t.write(lambda c: operate.retry_run(
            c, app, run_id, include_compensated, version, actor, now
        ), RUNS)

    async def fork_run(
        self, app: str, source_run_id: str, run: RunRecord, *, before_key: str, actor: str
    ) -> RunRecord:
        return await self._t.write(lambda c: operate.fork_run(
            c, app, source_run_id, run, before_key, actor
        ), RUNS)

    async def superseded_history(
        self, app: str, run_id: str
    ) -> list[tuple[int, HistoryEntry]]:
        return await self._t.read(lambda c: operate.superseded_history(c, app, run_id))

    async def discard_dead_letter(
        self, app: str, dead_letter_id: str, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        return await self._t.write(
            lambda c: operate.discard_dead_letter(c, app, dead_letter_id, actor)
        )

    # -- events and deliveries --------------------------------------------------------

    def _subscriptions(self, c: sqlite3.Connection, app: str) -> list[tuple[str, str]]:
        row = c.execute("SELECT value FROM cantata_meta WHERE key=?", (f"decl:{app}",)).fetchone()
        version = row[0] if row else ""
        cached = self._subs_cache.get(app)
        if cached is not None and cached[0] == version:
            return cached[1]
        subs = c.execute(
            "SELECT name, pattern FROM declarations WHERE app=? AND kind IN ('handler','trigger')",
            (app,),
        ).fetchall()
        result = [(r[0], r[1]) for r in subs]
        self._subs_cache[app] = (version, result)
        return result

    def _append(self, c: sqlite3.Connection, app: str, events: Sequence[Event[Any]]) -> list[int]:
        subs = self._subscriptions(c, app)
        now = time.time()
        counts: list[int] = []
        for ev in events:
            cur = c.execute(
                f"INSERT INTO events (app, {EVENT_COLS}, stored_at) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    app, ev.id, ev.type, ev.source, ev.subject, ev.time,
                    codec.dumps(ev.data, f"data of event {ev.type}"), ev.correlation_id,
                    ev.causation_id, ev.traceparent, ev.signature, now,
                ),
            )
            if cur.rowcount == 0:
                counts.append(0)
                continue
            groups = sorted({g for g, p in subs if matches(p, ev.type)})
            if groups:
                c.executemany(
                    "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                    "VALUES (?,?,?,'pending',?) ON CONFLICT DO NOTHING",
                    [(app, g, ev.id, now) for g in groups],
                )
            counts.append(len(groups))
        return counts

    async def append_events(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        return await self._t.write(lambda c: self._append(c, app, events), EVENTS)

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        row = await self._t.read(
            lambda c: c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND id=?", (app, event_id)
            ).fetchone()
        )
        return None if row is None else event_row(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int
    ) -> list[Event[Any]]:
        skip = list(exclude)
        wildcard = "*" in event_type
        sql = (
            f"SELECT {EVENT_COLS} FROM events WHERE app=? AND "
            + ("type LIKE ? ESCAPE '\\'" if wildcard else "type=?")
            + " AND stored_at>=?"
            + (f" AND id NOT IN ({','.join('?' * len(skip))})" if skip else "")
            + " ORDER BY seq LIMIT ?"
        )
        wanted = like_pattern(event_type) if wildcard else event_type
        rows = await self._t.read(
            lambda c: c.execute(sql, (app, wanted, since, *skip, limit)).fetchall()
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
        marks = ",".join("?" * len(groups))

        def op(c: sqlite3.Connection) -> list[Delivery]:
            claimed = c.execute(
                f"UPDATE deliveries SET owner=?, fence=fence+1, attempts=attempts+1, "
                f"updated_at=? WHERE (app, grp, event_id) IN ("
                f" SELECT d.app, d.grp, d.event_id FROM deliveries d INDEXED BY deliveries_due"
                f"  LEFT JOIN workers w"
                f"  ON w.app=d.app AND w.worker_id=d.owner"
                f" WHERE d.app=? AND d.status='pending' AND d.grp IN ({marks}) AND d.next_at<=?"
                f"  AND (d.owner IS NULL OR (d.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.heartbeat_at < ?)))"
                f" ORDER BY d.next_at LIMIT ?)"
                f" RETURNING grp, event_id, attempts, next_at, error, fence",
                (worker_id, now, app, *groups, now, worker_id, stale_before, limit),
            ).fetchall()
            out = []
            for grp, event_id, attempts, next_at, error, fence in claimed:
                row = c.execute(
                    f"SELECT {EVENT_COLS} FROM events WHERE app=? AND id=?", (app, event_id)
                ).fetchone()
                if row is None:
                    continue
                out.append(
                    Delivery(grp, event_row(row), DELIVERY_PENDING, attempts, next_at, error, now,
                             fence)
                )
            return out

        return await self._t.write(op)

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        return await self._t.write(
            lambda c: ops.settle_delivery(c, app, group, event_id, settlement, self._append),
            EVENTS,
        )

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT d.grp, d.status, d.attempts, d.next_at, d.error, d.updated_at, "
                f"d.fence, {E_EVENT_COLS} FROM deliveries d INDEXED BY deliveries_event "
                "JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND d.event_id=? ORDER BY d.grp",
                (app, event_id),
            ).fetchall()
        )
        if not rows:
            return []
        event = event_row(rows[0][7:])
        return [Delivery(r[0], event, r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def delivery_states(
        self, app: str, group: str, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        ids = list(dict.fromkeys(event_ids))

        def op(c: sqlite3.Connection) -> dict[str, tuple[str, int]]:
            out: dict[str, tuple[str, int]] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for event_id, status, attempts in c.execute(
                    "SELECT event_id, status, attempts FROM deliveries WHERE app=? AND grp=? "
                    f"AND event_id IN ({','.join('?' * len(chunk))})",
                    (app, group, *chunk),
                ):
                    out[event_id] = (status, attempts)
            return out

        return await self._t.read(op) if ids else {}

    async def dead_letters(self, app: str, *, limit: int = 100) -> list[DeadLetter]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
                f"{E_EVENT_COLS} "
                "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? ORDER BY d.failed_at LIMIT ?",
                (app, limit),
            ).fetchall()
        )
        return [dead_letter_row(r) for r in rows]

    async def replay_dead_letter(
        self, app: str, dead_letter_id: str, now: float, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        return await self._t.write(
            lambda c: ops.replay_dead_letter(c, app, dead_letter_id, now, actor), EVENTS
        )

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND published=0 ORDER BY seq "
                "LIMIT ?",
                (app, limit),
            ).fetchall()
        )
        return [event_row(r) for r in rows]

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        ids = list(event_ids)
        if not ids:
            return
        await self._t.write(
            lambda c: c.executemany(
                "UPDATE events SET published=1 WHERE app=? AND id=?", [(app, i) for i in ids]
            )
        )

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        def write(c: sqlite3.Connection) -> list[int]:
            counts = self._append(c, app, events)
            c.executemany(
                "UPDATE events SET published=1, external=1 WHERE app=? AND id=? AND published=0",
                [(app, e.id) for e in events],
            )
            return counts

        return await self._t.write(write, EVENTS)

    async def redrive_events(
        self, app: str, *, stored_before: float, limit: int
    ) -> list[Event[Any]]:
        def write(c: sqlite3.Connection) -> list[Event[Any]]:
            rows = c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND published=1 AND external=0"
                " AND stored_at < ? AND id IN (SELECT event_id FROM deliveries"
                " WHERE app=? AND status='pending') ORDER BY seq LIMIT ?",
                (app, stored_before, app, limit),
            ).fetchall()
            events = [event_row(r) for r in rows]
            c.executemany("UPDATE events SET published=0 WHERE app=? AND id=?",
                          [(app, e.id) for e in events])
            return events

        return await self._t.write(write, EVENTS)

    async def identity(self) -> str:
        row = await self._t.read(
            lambda c: c.execute("SELECT id FROM store_identity").fetchone()
        )
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
        if outcome not in TASK_OUTCOMES:
            raise ValueError(f"task outcome {outcome!r} is none of {', '.join(TASK_OUTCOMES)}")
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

    def set_audit_key(self, app: str, key: audit.AuditKey | None) -> None:
        if key is None:
            self._audit_keys.pop(app, None)
        else:
            self._audit_keys[app] = key

    async def audit_head(self, app: str) -> tuple[int, str] | None:
        return await self._t.read(lambda c: ops.audit_head(c, app))

    async def verify_audit(
        self, app: str, *, key: audit.AuditKey | None = None,
        head: tuple[int, str] | None = None,
    ) -> AuditReport:
        recorded = await self.audit_head(app)

        async def fetch(after: int) -> list[AuditRecord]:
            return await self.audit_records(app, after_seq=after, limit=audit.PAGE)

        return await audit.verify_all(
            fetch, recorded, subject=f"app {app!r}", key=key, exported=head,
            unaudited=lambda: self._t.read(lambda c: ops.unaudited_runs(c, app, key is not None)),
        )

    # -- apps and observability ---------------------------------------------------------

    async def apps(self) -> list[str]:
        return await self._t.read(ops.apps)

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        return await self._t.read(lambda c: ops.trace_records(c, app, correlation_id, limit))

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int
    ) -> list[str]:
        return await self._t.read(lambda c: ops.stale_correlations(c, app, older_than, limit))

    # -- the console ----------------------------------------------------------------------

    async def query_runs(self, app: str, query: RunQuery) -> list[RunRecord]:
        return await self._t.read(lambda c: console.query_runs(c, app, query))

    async def count_runs(self, app: str) -> dict[str, int]:
        return await self._t.read(lambda c: console.count_runs(c, app))

    async def record_action(
        self, app: str, actor: str, action: str, target: str, data: dict[str, Any]
    ) -> None:
        await self._t.write(lambda c: console.record_action(c, app, actor, action, target, data))

    async def audit_head_seq(self, app: str) -> int:
        head = await self._t.read(lambda c: ops.audit_head(c, app))
        return 0 if head is None else head[0]

    async def create_token(self, token: TokenRecord) -> None:
        await self._t.write(lambda c: console.create_token(c, token))

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        return await self._t.read(lambda c: console.token_by_hash(c, token_hash))

    async def tokens(self) -> list[TokenRecord]:
        return await self._t.read(console.tokens)

    async def revoke_token(self, name: str, now: float) -> bool:
        return await self._t.write(lambda c: console.revoke_token(c, name, now))
