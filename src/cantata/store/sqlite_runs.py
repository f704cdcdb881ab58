"""The SQLite store, runs: creating, claiming, checkpointing and cancelling them,
their history, attempts and step heartbeats (see :class:`~cantata.store.roles.RunStore`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any, cast

from cantata.errors import (
    LeaseLost,
)
from cantata.model.flow import takeovers
from cantata.model.idempotency import same_start, start_conflict
from cantata.model.records import (
    Attempt,
    HistoryEntry,
    RunRecord,
    RunWrite,
    StepHeartbeat,
)
from cantata.model.status import LIVE_STATUSES, RunStatus
from cantata.store import audit
from cantata.store import sqlite_ops as ops
from cantata.store.base import (
    CANCEL,
    CLAIMS,
    EVENTS,
    RUNS,
    TASKS,
)
from cantata.store.common import (
    FIRST_ATTEMPT_ROWS,
    cancelled_in_queue,
    in_progress_per_worker,
    with_first_attempts,
)
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import (
    ATTEMPT_COLS,
    HISTORY_COLS,
    LIVE,
    LIVE_R,
    RUN_COLS,
    WAITING_IN_QUEUE,
    entry_row,
    run_row,
)
from cantata.store.sqlite_parking import UNPARK, wake_parent
from cantata.store.sqlite_thread import TxConnection

_UPSERT_HISTORY = (
    f"INSERT INTO history (app, run_id, {HISTORY_COLS}) "
    f"VALUES (?,?,{','.join('?' * 13)}) ON CONFLICT DO UPDATE SET "
    "status=excluded.status, result=excluded.result, error=excluded.error, "
    "error_type=excluded.error_type, attempts=excluded.attempts, "
    "started_at=excluded.started_at, ended_at=excluded.ended_at, "
    "wake_at=excluded.wake_at, detail=excluded.detail"
)
# The oldest live run: the smallest created_at of each live status, each the first
# entry of its (app, status) range of the index runs_status_newest (app, status,
# created_at): one list of the three statuses would read every live run's entry.
_OLDEST_LIVE = (
    "SELECT min(m) FROM ("
    + " UNION ALL ".join(
        f"SELECT min(created_at) AS m FROM runs WHERE app=? AND status='{status}'"
        for status in sorted(LIVE_STATUSES)
    )
    + ")"
)
_INSERT_RUN = f"INSERT INTO runs ({RUN_COLS}) VALUES ({','.join('?' * 22)})"
# Positions in :data:`RUN_COLS` (and :func:`ops.run_values`) of what a checkpoint sets.
_RUN_COL_NAMES = [col.strip() for col in RUN_COLS.split(",")]
_STATUS, _RESULT, _ERROR, _UPDATED_AT, _OWNER, _FLAGGED = (
    _RUN_COL_NAMES.index(col)
    for col in ("status", "result", "error", "updated_at", "owner", "flagged")
)


# A checkpoint that changes nothing of the run's row but updated_at (_FENCED follows).
_TOUCH_RUN = "UPDATE runs SET updated_at=?"
# The fence, and (TxConnection.was) the owner, status and correlation id the row had.
_FENCED = " WHERE app=? AND run_id=? AND fence=? AND cantata_was(owner, status, correlation_id)"
_TOUCH_FENCED = _TOUCH_RUN + _FENCED  # (made once: every step's checkpoint)


def _dml(c: sqlite3.Connection) -> sqlite3.Connection | sqlite3.Cursor:
    """Where a write that returns no rows runs: the connection's write cursor
    (:attr:`TxConnection.dml`: no cursor made for it), or the connection."""
    return c.dml if isinstance(c, TxConnection) else c


def _touch_only(write: RunWrite) -> bool:
    return (write.status is None and write.result is None and write.error is None
            and write.flagged is None and not write.release and write.wake is None)


_RUNS_ONLY = (RUNS,)
_NONE: tuple[str, ...] = ()
_IN_CHUNK = 500  # ids bound in one IN (...) list


def _wakes_runs(write: RunWrite) -> bool:
    """Whether a checkpoint is news on the ``runs`` channel: the run ended or was let
    go (what ``result()`` waiters, parent runs, queues and claimers wait for), as
    PostgreSQL's notices say (``postgres_writes.wakes_runs``). The checkpoints in
    between (every step's) are not: telling the listeners cost each one ~15 Python
    calls, and woke the claim loop for a claim that found nothing."""
    return write.release or (write.status is not None and write.status.is_final)


def _channels(write: RunWrite, runs: bool) -> tuple[str, ...]:
    """What a committed checkpoint changed, for the store's listeners (``runs``:
    whether it is news on the ``runs`` channel)."""
    if not (write.events or write.tasks):
        return _RUNS_ONLY if runs else _NONE  # the usual checkpoints
    channels = [RUNS] if runs else []
    if write.events:
        channels += (EVENTS, CLAIMS)
    if write.tasks:
        channels.append(TASKS)
    return tuple(channels)

def _run_sets(write: RunWrite) -> tuple[str, list[Any]]:
    """The SET list of a checkpoint's change to the run's row, and its parameters."""
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
    return ", ".join(sets), params


def _lost(run_id: str, fence: int) -> LeaseLost:
    return LeaseLost(
        f"run {run_id} was taken over by another worker (fence {fence} is stale); "
        "this worker stops executing it"
    )


def _take_over_in_queues(
    c: sqlite3.Connection, app: str, worker_id: str, marks: str, workflows: Sequence[str],
    stale_before: float, extra: str, more: list[Any], limit: int, pin_version: str | None,
    keep: list[str],
) -> list[RunRecord]:
    """The part of a claim of runs that takes over runs in progress in queues with a
    ``per_worker`` limit (``claim_runs`` leaves them out): within each queue's room on
    this worker (model.flow.takeovers), in the claim's write transaction, which a queue
    claim of this worker's would wait for (so the two never count past the limit)."""
    queues = c.execute(
        "SELECT name, per_worker FROM queues WHERE app=? AND per_worker IS NOT NULL", (app,)
    ).fetchall()
    room: dict[str, int] = {}
    candidates: list[tuple[str, str]] = []
    for name, per_worker in queues:
        # The queue's rows in progress by their partial index (the run of each by its key).
        active = ("FROM queue_runs q INDEXED BY queue_runs_active JOIN runs r ON r.app=q.app "
                  "AND r.run_id=q.run_id WHERE q.app=? AND q.queue=? AND q.began_at IS NOT NULL "
                  f"AND q.done=0 AND {LIVE_R}")
        gone = c.execute(
            f"SELECT r.run_id {active} AND r.wake_at IS NULL AND r.workflow IN ({marks}) AND "
            "(r.owner IS NULL OR (r.owner<>? AND NOT EXISTS (SELECT 1 FROM workers w WHERE "
            f"w.app=r.app AND w.worker_id=r.owner AND w.expires_at >= ?))){extra} "
            "ORDER BY q.began_at, q.run_id",
            (app, name, *workflows, worker_id, stale_before, *more),
        ).fetchall()
        if not gone:
            continue
        mine = c.execute(f"SELECT count(*) {active} AND r.owner=?",
                         (app, name, worker_id)).fetchone()[0]
        room[name] = per_worker - mine
        candidates += [(r[0], name) for r in gone]
    chosen = takeovers(candidates, room, limit)
    return [run_row(c.execute(
        f"UPDATE runs SET owner=?, fence=fence+1, {ops.pin_version_sql(keep)}, {UNPARK} "
        f"WHERE app=? AND run_id=? RETURNING {RUN_COLS}",
        (worker_id, *keep, pin_version, app, run_id),
    ).fetchone()) for run_id in chosen]


class SQLiteRuns(SQLiteCore):
    """The runs role of :class:`~cantata.store.sqlite.SQLiteStore`."""

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None, *, actor: str = audit.SYSTEM
    ) -> tuple[RunRecord, bool]:
        # A new run is news on ``runs`` when no worker owns it (claimable) or its
        # first checkpoint ends it or lets it go; one this worker runs at once is not.
        channels = (_RUNS_ONLY if first is None else
                    _channels(first, run.owner is None or _wakes_runs(first)))
        return await (self._thread or self._t).write(
            lambda c: self._create(c, run, first, actor), *channels)

    def _create(
        self, c: sqlite3.Connection, run: RunRecord, first: RunWrite | None,
        actor: str = audit.SYSTEM,
    ) -> tuple[RunRecord, bool]:
        """:meth:`create_run` in the caller's transaction (queued runs use it too)."""
        if run.idempotency_key is not None:
            row = c.execute(
                f"SELECT {RUN_COLS} FROM runs WHERE app=? AND idempotency_key=?",
                (run.app, run.idempotency_key),
            ).fetchone()
            if row is not None:
                existing = run_row(row)
                if not same_start(existing, run):
                    raise start_conflict(existing, run)
                return existing, False
        if first is None:
            c.execute(_INSERT_RUN, ops.run_values(run))
        else:
            # The first checkpoint's changes to the run's row go into its INSERT (the
            # row as _run_sets would leave it): one statement, and the indexes on
            # status are written once instead of inserted and then moved.
            values = list(ops.run_values(run))
            values[_UPDATED_AT] = time.time()
            if first.status is not None:
                values[_STATUS] = str(first.status)
            if first.result is not None:
                values[_RESULT] = first.result
            if first.error is not None:
                values[_ERROR] = first.error
            if first.flagged is not None:
                values[_FLAGGED] = int(first.flagged)
            if first.release:
                values[_OWNER] = None
            _dml(c).execute(_INSERT_RUN, values)
        ops.audit_append(c, run.app, audit.run_created_entry(
            run.run_id, run.workflow, run.correlation_id, run.parent_run_id, actor
        ))
        if first is not None:
            self._apply(c, run.app, run.run_id, first, run.owner, str(run.status),
                        run.correlation_id)
        return run, True

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        row = await self._t.lookup(
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
        sql += " ORDER BY created_at DESC, run_id DESC LIMIT ?"
        params.append(limit)
        rows = await self._t.read(lambda c: c.execute(sql, params).fetchall())
        return [run_row(r) for r in rows]

    async def oldest_live_run(self, app: str) -> float | None:
        row = await self._t.read(lambda c: c.execute(_OLDEST_LIVE, [app] * 3).fetchone())
        return None if row is None or row[0] is None else float(row[0])

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
        pin_version: str | None = None,
        unchanged: Sequence[float] | None = None,
        keep_versions_of: Sequence[str] = (),
    ) -> list[RunRecord]:
        if not workflows or (run_ids is not None and not run_ids):
            return []
        marks = ",".join("?" * len(workflows))
        keep = list(keep_versions_of)
        extra, more = "", list[Any]()
        if versions is not None:
            # (and whatever its version, a run cancelled while it waited in its queue)
            extra += (f" AND (r.version IS NULL OR r.version IN ({','.join('?' * len(versions))})"
                      f" OR {cancelled_in_queue('r')})")
            more += list(versions)
        if run_ids is not None and unchanged is not None:
            # (each run as it was when the caller read it)
            pairs = ",".join(["(?,?)"] * len(run_ids))
            extra += f" AND (r.run_id, r.updated_at) IN (VALUES {pairs})"
            more += [v for pair in zip(run_ids, unchanged, strict=True) for v in pair]
        elif run_ids is not None:
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
                f"  AND {LIVE_R} AND r.workflow IN ({marks}) AND r.owner IS NULL"
                f"{extra} ORDER BY r.wake_at LIMIT ?)"
            )
            due_params = [app, now, *workflows, *more, limit]

        def op(c: sqlite3.Connection) -> list[RunRecord]:
            rows = c.execute(
                # By rowid alone: with ``app=?`` here the planner scanned the app's runs.
                f"UPDATE runs SET owner=?, fence=fence+1, {ops.pin_version_sql(keep)}, "
                f"{UNPARK} WHERE rowid IN ("
                f" SELECT rid FROM (SELECT r.rowid AS rid FROM runs r INDEXED BY runs_claimable"
                f"  LEFT JOIN workers w ON w.app=r.app AND w.worker_id=r.owner"
                f"  WHERE r.app=? AND {LIVE_R} AND r.wake_at IS NULL"
                f"  AND r.workflow IN ({marks})"
                f"  AND (r.owner IS NULL OR (r.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.expires_at < ?))) AND {WAITING_IN_QUEUE}{extra}"
                f"  AND NOT {in_progress_per_worker('r')}"
                f"  ORDER BY r.created_at LIMIT ?){due} LIMIT ?) RETURNING {RUN_COLS}",
                (worker_id, *keep, pin_version, app, *workflows, worker_id, stale_before,
                 *more, limit,
                 *due_params, limit),
            ).fetchall()
            claimed = [run_row(r) for r in rows]
            if len(claimed) < limit:
                claimed += _take_over_in_queues(
                    c, app, worker_id, marks, workflows, stale_before, extra, more,
                    limit - len(claimed), pin_version, keep,
                )
            return claimed

        return await self._t.write(op)

    async def owned_runs(self, app: str, worker_id: str) -> dict[str, int]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT run_id, fence FROM runs WHERE app=? AND owner=? "
                f"AND {LIVE}",
                (app, worker_id),
            ).fetchall()
        )
        return {r[0]: r[1] for r in rows}

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        def op(c: sqlite3.Connection) -> None:
            # (every connection of the store's thread is a TxConnection: sqlite_open)
            if not self._commit_fenced(cast(TxConnection, c), app, run_id, fence, write):
                raise _lost(run_id, fence)

        # (the open thread read without the ``_t`` property's call, and a step's
        # checkpoint's channels, none, without _channels' and _wakes_runs' calls:
        # every checkpoint)
        if (write.events or write.tasks or write.release or write.status is not None):
            await (self._thread or self._t).write(op, *_channels(write, _wakes_runs(write)))
        else:
            await (self._thread or self._t).write(op)

    def _commit_fenced(
        self, c: TxConnection, app: str, run_id: str, fence: int, write: RunWrite
    ) -> bool:
        """One checkpoint if the run's fence is still ``fence`` (else False), in the
        caller's transaction.

        One statement checks the fence, changes the row and hands back what the audit
        record needs, as the row had it: TxConnection.was (a RETURNING clause would
        give the new row, and costs SQLite twice the UPDATE)."""
        if _touch_only(write):  # a step's checkpoint (the usual one)
            ran = c.dml.execute(_TOUCH_FENCED, (time.time(), app, run_id, fence))
        else:
            sets, params = _run_sets(write)
            ran = c.dml.execute(f"UPDATE runs SET {sets}{_FENCED}", (*params, app, run_id, fence))
        if ran.rowcount != 1:
            return False
        owner, status, correlation_id = c.was
        self._apply(c, app, run_id, write, owner, status, correlation_id)
        return True

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
        """One checkpoint of a run whose fence was checked and whose row was updated
        already (:meth:`_commit_fenced`, or its INSERT), in the caller's transaction."""
        if write.entries:
            # Enum members bound as plain str (exact types bind without sqlite3's
            # adapter lookup, which costs more than the rest of the row).
            # (_dml's test, inline: every checkpoint)
            (c.dml if isinstance(c, TxConnection) else c).executemany(
                _UPSERT_HISTORY,
                [
                    (app, run_id, e.key, str(e.kind), e.name, str(e.status), e.seq, e.result,
                     e.error, None if e.error_type is None else str(e.error_type),  # (ops.text)
                     e.attempts, e.started_at, e.ended_at, e.wake_at, e.detail)
                    for e in write.entries
                ],
            )
            ops.index_attributes(c, app, run_id, write.entries)
        if write.attempts:  # (none, the usual with the attempts gate open: no call)
            ops.upsert_attempts(c, app, run_id, write.attempts)
        if write.events:
            self._append(c, app, write.events)
        if write.tasks:
            ops.insert_tasks(c, app, correlation_id, write.tasks)
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
                f"AND run_id=? AND {LIVE}",
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
        for i in range(0, len(ids), _IN_CHUNK):
            chunk = ids[i : i + _IN_CHUNK]
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
        def read(c: sqlite3.Connection) -> list[Attempt]:
            rows = c.execute(
                f"SELECT {ATTEMPT_COLS} FROM attempts "
                "WHERE app=? AND run_id=? ORDER BY started_at, attempt",
                (app, run_id),
            ).fetchall()
            firsts = c.execute(
                f"SELECT {HISTORY_COLS} FROM history WHERE app=? AND run_id=? "
                f"AND {FIRST_ATTEMPT_ROWS}",
                (app, run_id),
            ).fetchall()
            return with_first_attempts(map(entry_row, firsts), [Attempt(*r) for r in rows])

        return await self._t.read(read)

    async def load_histories(
        self, app: str, run_ids: Sequence[str]
    ) -> dict[str, tuple[list[HistoryEntry], list[Attempt]]]:
        ids = list(dict.fromkeys(run_ids))
        out: dict[str, tuple[list[HistoryEntry], list[Attempt]]] = {r: ([], []) for r in ids}
        if not ids:
            return out

        def read(c: sqlite3.Connection) -> None:
            for i in range(0, len(ids), _IN_CHUNK):
                chunk = ids[i : i + _IN_CHUNK]
                marks = ",".join("?" * len(chunk))
                for r in c.execute(
                    f"SELECT run_id, {HISTORY_COLS} FROM history WHERE app=? AND run_id IN "
                    f"({marks}) ORDER BY run_id, seq", (app, *chunk),
                ):
                    out[r[0]][0].append(entry_row(r[1:]))
                for r in c.execute(
                    f"SELECT run_id, {ATTEMPT_COLS} FROM attempts WHERE app=? "
                    f"AND run_id IN ({marks}) "
                    "ORDER BY run_id, started_at, attempt", (app, *chunk),
                ):
                    out[r[0]][1].append(Attempt(*r[1:]))
            for run_id, (entries, attempts) in out.items():
                out[run_id] = (entries, with_first_attempts(entries, attempts))

        await self._t.read(read)
        return out

    async def excuse_attempts(self, app: str, run_id: str, attempts: Sequence[Attempt]) -> int:
        def op(c: sqlite3.Connection) -> int:
            n = 0
            for a in attempts:
                marks = (a.ended_at, a.error_type, a.error, app, run_id, a.key)
                one = c.execute(ops.EXCUSE_ATTEMPT, (*marks, a.attempt, a.started_at)).rowcount
                if a.attempt == 1 and not one:  # (a lean writer's first attempt: no row)
                    one = c.execute(ops.EXCUSE_FIRST_ATTEMPT, (*marks, a.started_at)).rowcount
                n += one
            return n

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
                "INSERT INTO step_heartbeats (app, run_id, key, attempt, at, details) "
                "VALUES (?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
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
