"""SQLite store: one file in WAL mode, safe for several processes; ``memory://`` too."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Any

from cantata.errors import (
    DeadLetterNotFound,
    IdempotencyConflict,
    LeaseLost,
    StoreCorrupt,
    StoreUnavailable,
)
from cantata.model import codec
from cantata.model.event import Event, matches
from cantata.model.records import (
    DELIVERY_DONE,
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
from cantata.store.sqlite_thread import ConnectionThread

SCHEMA_VERSION = 1
STORE_MARK = "cantata-store"
BUSY_TIMEOUT_MS = 30_000
_LIVE_SQL = "('pending', 'running', 'compensating')"

RUN_COLS = (
    "app, run_id, workflow, status, args, result, error, idempotency_key, args_hash, "
    "correlation_id, causation_id, parent_run_id, service, created_at, updated_at, "
    "deadline_at, cancel_requested, owner, fence, flagged"
)
HISTORY_COLS = (
    "key, kind, name, status, seq, result, error, error_type, attempts, started_at, "
    "ended_at, wake_at, detail"
)
EVENT_COLS = (
    "id, type, source, subject, time, data, correlation_id, causation_id, traceparent, signature"
)


def _run(row: sqlite3.Row | tuple[Any, ...]) -> RunRecord:
    return RunRecord(
        app=row[0],
        run_id=row[1],
        workflow=row[2],
        status=RunStatus(row[3]),
        args=row[4],
        result=row[5],
        error=row[6],
        idempotency_key=row[7],
        args_hash=row[8],
        correlation_id=row[9],
        causation_id=row[10],
        parent_run_id=row[11],
        service=row[12],
        created_at=row[13],
        updated_at=row[14],
        deadline_at=row[15],
        cancel_requested=bool(row[16]),
        owner=row[17],
        fence=row[18],
        flagged=bool(row[19]),
    )


def _entry(row: tuple[Any, ...]) -> HistoryEntry:
    return HistoryEntry(*row)


def _event(row: tuple[Any, ...]) -> Event[Any]:
    return Event(
        id=row[0],
        type=row[1],
        source=row[2],
        subject=row[3],
        time=row[4],
        data=codec.loads(row[5]),
        correlation_id=row[6],
        causation_id=row[7],
        traceparent=row[8],
        signature=row[9],
    )


def _dead_letter(row: tuple[Any, ...]) -> DeadLetter:
    failed = to_datetime(row[5])
    assert failed is not None
    return DeadLetter(
        id=row[0], group=row[1], event=_event(row[6:]), error=row[3], attempts=row[4],
        failed_at=failed,
    )


class SQLiteStore:
    """A :class:`~cantata.store.base.Store` on one SQLite file (or in memory).

    Args:
        path: file path, or ``":memory:"`` for a private in-memory database.
        synchronous: SQLite ``synchronous`` setting; ``FULL`` (the default) fsyncs
            every commit, so a committed checkpoint survives power loss.
    """

    def __init__(self, path: str, *, synchronous: str = "FULL", url: str | None = None) -> None:
        self.path = path
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

    # -- lifecycle -------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False,
                timeout=BUSY_TIMEOUT_MS / 1000,
            )
        except sqlite3.Error as exc:
            raise StoreUnavailable(
                f"cannot open SQLite store {self.url}: {exc}; check that the folder exists and "
                "is writable"
            ) from None
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if self.path != ":memory:":
                # Refuse another application's file before WAL (a persistent change) touches it.
                self._retry_locked(lambda: self._refuse_foreign(conn))
                self._retry_locked(lambda: conn.execute("PRAGMA journal_mode = WAL"))
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute("PRAGMA foreign_keys = OFF")
            self._retry_locked(lambda: self._migrate(conn))
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreCorrupt(
                f"{self.url} is not a usable SQLite database ({exc}); point CANTATA_STORE at "
                "another file, or move this one aside if it is damaged"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _retry_locked(fn: Callable[[], Any]) -> Any:
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _refuse_foreign(self, conn: sqlite3.Connection) -> set[str]:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if "cantata_meta" not in tables and tables - {"sqlite_sequence"}:
            raise StoreCorrupt(
                f"{self.url} is a SQLite database of another application (tables: "
                f"{', '.join(sorted(tables)[:5])}); give Cantata its own file"
            )
        return tables

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = self._refuse_foreign(conn)
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
                raise StoreCorrupt(f"{self.url} is not a Cantata store (its marker is missing)")
            version = int(
                conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'")
                .fetchone()[0]
            )
            if version > SCHEMA_VERSION:
                raise StoreCorrupt(
                    f"{self.url} has schema version {version}, newer than this Cantata "
                    f"({SCHEMA_VERSION}); upgrade cantata"
                )
            folder = resources.files("cantata.store").joinpath("migrations/sqlite")
            for n in range(version + 1, SCHEMA_VERSION + 1):
                script = next(f for f in folder.iterdir() if f.name.startswith(f"{n:04d}_"))
                for statement in script.read_text().split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "UPDATE cantata_meta SET value=? WHERE key='schema_version'", (str(n),)
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    async def open(self) -> None:
        """Open the file (creating it), switch to WAL and migrate."""
        if self._thread is not None:
            return
        thread = ConnectionThread(self._connect, self._notify, name=f"cantata-sqlite:{self.path}")
        thread.start()
        self._thread = thread

    async def close(self) -> None:
        """Commit what is queued and close the connection."""
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
            c.execute(
                "UPDATE deliveries SET owner=NULL WHERE app=? AND owner=? AND status='pending'",
                (app, worker_id),
            )

        await self._t.write(op, RUNS, EVENTS)

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

    async def create_run(self, run: RunRecord) -> tuple[RunRecord, bool]:
        def op(c: sqlite3.Connection) -> tuple[RunRecord, bool]:
            if run.idempotency_key is not None:
                row = c.execute(
                    f"SELECT {RUN_COLS} FROM runs WHERE app=? AND idempotency_key=?",
                    (run.app, run.idempotency_key),
                ).fetchone()
                if row is not None:
                    existing = _run(row)
                    if existing.args_hash != run.args_hash or existing.workflow != run.workflow:
                        raise IdempotencyConflict(
                            f"idempotency key {run.idempotency_key!r} was already used for run "
                            f"{existing.run_id} of {existing.workflow} with different "
                            "arguments; use a new key for a new request"
                        )
                    return existing, False
            c.execute(
                f"INSERT INTO runs ({RUN_COLS}) VALUES ({','.join('?' * 20)})",
                (
                    run.app, run.run_id, run.workflow, str(run.status), run.args, run.result,
                    run.error, run.idempotency_key, run.args_hash, run.correlation_id,
                    run.causation_id, run.parent_run_id, run.service, run.created_at,
                    run.updated_at, run.deadline_at, int(run.cancel_requested), run.owner,
                    run.fence, int(run.flagged),
                ),
            )
            return run, True

        return await self._t.write(op, RUNS)

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        row = await self._t.read(
            lambda c: c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND run_id=?", (app, run_id)
            ).fetchone()
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
        marks = ",".join("?" * len(workflows))

        def op(c: sqlite3.Connection) -> list[RunRecord]:
            rows = c.execute(
                f"UPDATE runs SET owner=?, fence=fence+1 WHERE app=? AND rowid IN ("
                f" SELECT r.rowid FROM runs r LEFT JOIN workers w"
                f"  ON w.app=r.app AND w.worker_id=r.owner"
                f" WHERE r.app=? AND r.status IN {_LIVE_SQL} AND r.workflow IN ({marks})"
                f"  AND (r.owner IS NULL OR (r.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.heartbeat_at < ?)))"
                f" ORDER BY r.created_at LIMIT ?) RETURNING {RUN_COLS}",
                (worker_id, app, app, *workflows, worker_id, stale_before, limit),
            ).fetchall()
            return [_run(r) for r in rows]

        return await self._t.write(op)

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        def op(c: sqlite3.Connection) -> None:
            row = c.execute(
                "SELECT fence FROM runs WHERE app=? AND run_id=?", (app, run_id)
            ).fetchone()
            if row is None or row[0] != fence:
                raise LeaseLost(
                    f"run {run_id} was taken over by another worker (fence {fence} is stale); "
                    "this worker stops executing it"
                )
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
            if write.attempts:
                c.executemany(
                    "INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                    "ended_at=excluded.ended_at, error_type=excluded.error_type, "
                    "error=excluded.error",
                    [
                        (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, a.error_type,
                         a.error)
                        for a in write.attempts
                    ],
                )
            if write.events:
                self._append(c, app, write.events)
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

        channels = (RUNS, EVENTS) if write.events else (RUNS,)
        await self._t.write(op, *channels)

    async def request_cancel(self, app: str, run_id: str) -> RunRecord | None:
        def op(c: sqlite3.Connection) -> RunRecord | None:
            c.execute(
                f"UPDATE runs SET cancel_requested=1, updated_at=? WHERE app=? AND run_id=? "
                f"AND status IN {_LIVE_SQL}",
                (time.time(), app, run_id),
            )
            row = c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND run_id=?", (app, run_id)
            ).fetchone()
            return None if row is None else _run(row)

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
        return [_entry(r) for r in rows]

    async def load_attempts(self, app: str, run_id: str) -> list[Attempt]:
        rows = await self._t.read(
            lambda c: c.execute(
                "SELECT key, attempt, started_at, ended_at, error_type, error FROM attempts "
                "WHERE app=? AND run_id=? ORDER BY started_at, attempt",
                (app, run_id),
            ).fetchall()
        )
        return [Attempt(*r) for r in rows]

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND parent_run_id=? ORDER BY created_at",
                (app, parent_run_id),
            ).fetchall()
        )
        return [_run(r) for r in rows]

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
        return None if row is None else _event(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int
    ) -> list[Event[Any]]:
        skip = list(exclude)
        sql = (
            f"SELECT {EVENT_COLS} FROM events WHERE app=? AND type=? AND stored_at>=?"
            + (f" AND id NOT IN ({','.join('?' * len(skip))})" if skip else "")
            + " ORDER BY seq LIMIT ?"
        )
        rows = await self._t.read(
            lambda c: c.execute(sql, (app, event_type, since, *skip, limit)).fetchall()
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
        marks = ",".join("?" * len(groups))

        def op(c: sqlite3.Connection) -> list[Delivery]:
            claimed = c.execute(
                f"UPDATE deliveries SET owner=?, fence=fence+1, attempts=attempts+1, "
                f"updated_at=? WHERE (app, grp, event_id) IN ("
                f" SELECT d.app, d.grp, d.event_id FROM deliveries d LEFT JOIN workers w"
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
                    Delivery(grp, _event(row), DELIVERY_PENDING, attempts, next_at, error, now,
                             fence)
                )
            return out

        return await self._t.write(op)

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        s = settlement

        def op(c: sqlite3.Connection) -> bool:
            now = time.time()
            row = c.execute(
                "SELECT status FROM deliveries WHERE app=? AND grp=? AND event_id=?",
                (app, group, event_id),
            ).fetchone()
            if row is not None and row[0] == DELIVERY_DONE:
                return False
            if row is None:
                c.execute(
                    "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                    "VALUES (?,?,?,'pending',?)",
                    (app, group, event_id, now),
                )
            if s.outcome == "done":
                c.execute(
                    "UPDATE deliveries SET status='done', attempts=?, owner=NULL, error=NULL, "
                    "updated_at=? WHERE app=? AND grp=? AND event_id=?",
                    (s.attempts, now, app, group, event_id),
                )
                if s.events:
                    self._append(c, app, s.events)
            elif s.outcome == "retry":
                c.execute(
                    "UPDATE deliveries SET status='pending', attempts=?, owner=NULL, error=?, "
                    "next_at=?, updated_at=? WHERE app=? AND grp=? AND event_id=?",
                    (s.attempts, s.error, s.retry_at, now, app, group, event_id),
                )
            else:
                c.execute(
                    "UPDATE deliveries SET status='dead', attempts=?, owner=NULL, error=?, "
                    "updated_at=? WHERE app=? AND grp=? AND event_id=?",
                    (s.attempts, s.error, now, app, group, event_id),
                )
                c.execute(
                    "INSERT INTO dead_letters VALUES (?,?,?,?,?,?,?)",
                    (app, s.dead_letter_id or codec.new_id(), group, event_id,
                     s.error or "unknown error", s.attempts, now),
                )
            return True

        return await self._t.write(op, EVENTS)

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._t.read(
            lambda c: c.execute(
                "SELECT grp, status, attempts, next_at, error, updated_at, fence FROM deliveries "
                "WHERE app=? AND event_id=? ORDER BY grp",
                (app, event_id),
            ).fetchall()
        )
        if not rows:
            return []
        event = await self.get_event(app, event_id)
        assert event is not None
        return [Delivery(r[0], event, r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def dead_letters(self, app: str, *, limit: int = 100) -> list[DeadLetter]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
                f"{', '.join('e.' + col.strip() for col in EVENT_COLS.split(','))} "
                "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? ORDER BY d.failed_at LIMIT ?",
                (app, limit),
            ).fetchall()
        )
        return [_dead_letter(r) for r in rows]

    async def replay_dead_letter(self, app: str, dead_letter_id: str, now: float) -> DeadLetter:
        def op(c: sqlite3.Connection) -> DeadLetter:
            row = c.execute(
                f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
                f"{', '.join('e.' + col.strip() for col in EVENT_COLS.split(','))} "
                "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND d.id=?",
                (app, dead_letter_id),
            ).fetchone()
            if row is None:
                raise DeadLetterNotFound(
                    f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
                    "`cantata dlq list`"
                )
            dl = _dead_letter(row)
            c.execute("DELETE FROM dead_letters WHERE app=? AND id=?", (app, dead_letter_id))
            c.execute(
                "UPDATE deliveries SET status='pending', attempts=0, next_at=?, owner=NULL, "
                "error=NULL, updated_at=? WHERE app=? AND grp=? AND event_id=?",
                (now, now, app, dl.group, dl.event.id),
            )
            return dl

        return await self._t.write(op, EVENTS)

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND published=0 ORDER BY seq "
                "LIMIT ?",
                (app, limit),
            ).fetchall()
        )
        return [_event(r) for r in rows]

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        ids = list(event_ids)
        if not ids:
            return
        await self._t.write(
            lambda c: c.executemany(
                "UPDATE events SET published=1 WHERE app=? AND id=?", [(app, i) for i in ids]
            )
        )

    # -- observability ------------------------------------------------------------------

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        def op(c: sqlite3.Connection) -> TraceRecords:
            runs = [
                _run(r)
                for r in c.execute(
                    f"SELECT {RUN_COLS} FROM runs WHERE app=? AND correlation_id=? "
                    "ORDER BY created_at LIMIT ?",
                    (app, correlation_id, limit),
                )
            ]
            entries: dict[str, list[HistoryEntry]] = {}
            attempts: dict[str, list[Attempt]] = {}
            for run in runs:
                entries[run.run_id] = [
                    _entry(r)
                    for r in c.execute(
                        f"SELECT {HISTORY_COLS} FROM history WHERE app=? AND run_id=? "
                        "ORDER BY seq LIMIT ?",
                        (app, run.run_id, limit),
                    )
                ]
                attempts[run.run_id] = [
                    Attempt(*r)
                    for r in c.execute(
                        "SELECT key, attempt, started_at, ended_at, error_type, error FROM "
                        "attempts WHERE app=? AND run_id=? ORDER BY started_at LIMIT ?",
                        (app, run.run_id, limit),
                    )
                ]
            ev_rows = c.execute(
                f"SELECT {EVENT_COLS}, stored_at FROM events WHERE app=? AND correlation_id=? "
                "ORDER BY seq LIMIT ?",
                (app, correlation_id, limit),
            ).fetchall()
            events = [(_event(r[:10]), r[10]) for r in ev_rows]
            by_id = {e.id: e for e, _ in events}
            deliveries = []
            dls: list[DeadLetter] = []
            if by_id:
                marks = ",".join("?" * len(by_id))
                for r in c.execute(
                    "SELECT grp, event_id, status, attempts, next_at, error, updated_at, fence "
                    f"FROM deliveries WHERE app=? AND event_id IN ({marks}) ORDER BY updated_at",
                    (app, *by_id),
                ):
                    deliveries.append(
                        Delivery(r[0], by_id[r[1]], r[2], r[3], r[4], r[5], r[6], r[7])
                    )
                for r in c.execute(
                    "SELECT id, grp, event_id, error, attempts, failed_at FROM dead_letters "
                    f"WHERE app=? AND event_id IN ({marks}) ORDER BY failed_at",
                    (app, *by_id),
                ):
                    failed = to_datetime(r[5])
                    assert failed is not None
                    dls.append(DeadLetter(r[0], r[1], by_id[r[2]], r[3], r[4], failed))
            return TraceRecords(runs, entries, attempts, events, deliveries, dls)

        return await self._t.read(op)

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int
    ) -> list[str]:
        def op(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                f"SELECT correlation_id, updated_at FROM runs WHERE app=? AND status IN "
                f"{_LIVE_SQL} AND updated_at < ? "
                "UNION SELECT correlation_id, updated_at FROM runs WHERE app=? AND flagged=1 "
                "UNION SELECT e.correlation_id, d.updated_at FROM deliveries d JOIN events e "
                "ON e.app=d.app AND e.id=d.event_id WHERE d.app=? AND d.status IN "
                "('pending','dead') AND d.updated_at < ? "
                "ORDER BY 2 LIMIT ?",
                (app, older_than, app, app, older_than, limit * 4),
            ).fetchall()
            seen: dict[str, None] = {}
            for r in rows:
                if r[0] is not None:
                    seen.setdefault(r[0])
            return list(seen)[:limit]

        return await self._t.read(op)

