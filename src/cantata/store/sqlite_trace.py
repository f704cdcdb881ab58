"""The SQLite store, reading back: the apps, one transaction's records and stale work
(see :class:`~cantata.store.roles.TraceStore`)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from cantata.model import codec
from cantata.model.flow import SlotWait
from cantata.model.records import (
    Attempt,
    DeadLetter,
    Delivery,
    to_datetime,
)
from cantata.store.base import TraceRecords
from cantata.store.common import first_per_run, first_slot_waits, with_first_attempts
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import (
    ATTEMPT_COLS,
    EVENT_COLS,
    HISTORY_COLS,
    LIVE,
    LIVE_R,
    RUN_COLS,
    TASK_COLS,
    entry_row,
    event_row,
    run_row,
    task_row,
)

# The slots a run's execution waits for: the rows of its holders (their text between
# "run_id:" and "run_id;") asked by the run's owner, each with the waiters before it.
_SLOT_WAITS = (
    "SELECT r.run_id, w.scope, w.since, (SELECT count(*) FROM flow_waiters a "
    "WHERE a.app=w.app AND a.scope=w.scope AND a.seq<w.seq) "
    "FROM runs r JOIN flow_waiters w ON w.app=r.app AND w.worker_id=r.owner "
    "WHERE r.app=? AND r.run_id=? AND w.holder>=? AND w.holder<?"
)

# The correlations with live work older than a time (:meth:`stale_correlations`; args:
# app, older_than, now, limit). The live runs in three parts, each by its index, so that
# none reads the runs parked until later that wait for no event (docs/performance.md,
# "A million parked runs"): those not parked, the parked ones that are due, the parked
# event waits; and the runs waiting in a queue (parked until it admits them). The
# flagged runs by their partial index (schema 26), not a read of every run.
STALE_CORRELATIONS = (
    "SELECT correlation_id, updated_at FROM runs INDEXED BY runs_claimable "
    f"WHERE app=:app AND {LIVE} AND wake_at IS NULL AND updated_at < :older "
    "UNION SELECT correlation_id, updated_at FROM runs INDEXED BY runs_parked "
    f"WHERE app=:app AND wake_at IS NOT NULL AND wake_at <= :now AND {LIVE} "
    "AND updated_at < :older "
    "UNION SELECT correlation_id, updated_at FROM runs INDEXED BY runs_waiting "
    f"WHERE app=:app AND waits_for IS NOT NULL AND wake_at > :now AND {LIVE} "
    "AND updated_at < :older "
    # (CROSS JOIN: the queue's waiting runs first, then each run by its key)
    "UNION SELECT r.correlation_id, r.updated_at FROM queue_runs q CROSS JOIN runs r "
    "ON r.app=q.app AND r.run_id=q.run_id WHERE q.app=:app AND q.began_at IS NULL "
    f"AND {LIVE_R} AND r.updated_at < :older "
    "UNION SELECT correlation_id, updated_at FROM runs INDEXED BY runs_flagged "
    "WHERE app=:app AND flagged=1 "
    "UNION SELECT e.correlation_id, d.updated_at FROM deliveries d JOIN events e "
    "ON e.app=d.app AND e.id=d.event_id WHERE d.app=:app AND d.status IN "
    "('pending','dead') AND d.updated_at < :older "
    "UNION SELECT correlation_id, updated_at FROM tasks WHERE app=:app "
    "AND status='pending' AND updated_at < :older "
    "ORDER BY 2 LIMIT :limit"
)

# The runs of one correlation id (args: app, correlation_id, limit), by its index (not
# runs_newest in order, filtering out every other run of the app: a million parked).
TRACE_RUNS = (
    f"SELECT {RUN_COLS} FROM runs INDEXED BY runs_correlation "
    "WHERE app=? AND correlation_id=? ORDER BY created_at, run_id LIMIT ?"
)


class SQLiteTrace(SQLiteCore):
    """The trace-reading role of :class:`~cantata.store.sqlite.SQLiteStore`."""

    async def apps(self) -> list[str]:
        """App names in runs, events, declarations, workers and audit chains' heads (either
        layout: :func:`cantata.store.sqlite_ops.audit_head`).

        The big tables are read with a skip scan (one index probe per app).
        """

        def op(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                "WITH RECURSIVE r(app) AS (SELECT min(app) FROM runs UNION ALL "
                " SELECT (SELECT min(app) FROM runs WHERE app > r.app) FROM r"
                " WHERE r.app IS NOT NULL),"
                " e(app) AS (SELECT min(app) FROM events UNION ALL "
                " SELECT (SELECT min(app) FROM events WHERE app > e.app) FROM e"
                " WHERE e.app IS NOT NULL),"
                # (the audit heads of either layout: `audit_head`'s rows, and the head rows
                # of `audit`, keyed app || char(1), that SQLite schema 32 writes)
                " a(app) AS (SELECT min(app) FROM audit UNION ALL "
                " SELECT (SELECT min(app) FROM audit WHERE app > a.app) FROM a"
                " WHERE a.app IS NOT NULL)"
                " SELECT app FROM r UNION SELECT app FROM e UNION SELECT app FROM declarations "
                " UNION SELECT app FROM workers UNION SELECT app FROM audit_head"
                " UNION SELECT substr(app, 1, length(app) - 1) FROM a"
                " WHERE substr(app, -1) = char(1)"
                " AND EXISTS (SELECT 1 FROM audit x WHERE x.app = a.app AND x.seq = 0)"
            ).fetchall()
            return sorted(r[0] for r in rows if r[0] is not None)

        return await self._t.read(op)

    async def slot_waits(self, app: str, run_ids: Sequence[str]) -> dict[str, SlotWait]:
        if not run_ids:
            return {}

        def op(c: sqlite3.Connection) -> dict[str, SlotWait]:
            rows: list[tuple[str, str, float, int]] = []
            for run_id in run_ids:  # a holder is "run_id:key@fence" (flow/limits.py)
                rows += c.execute(_SLOT_WAITS, (app, run_id, run_id + ":", run_id + ";"))
            return first_slot_waits(rows)

        return await self._t.read(op)

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        """:meth:`~cantata.store.roles.TraceStore.trace_records`: one query per part (the
        runs' ids and the events' ids go in as one JSON array each).
        """

        def op(c: sqlite3.Connection) -> TraceRecords:
            runs = [
                run_row(r)
                for r in c.execute(
                    TRACE_RUNS,
                    (app, correlation_id, limit),
                )
            ]
            ids = [r.run_id for r in runs]
            of_runs = "run_id IN (SELECT value FROM json_each(?))"
            run_ids = codec.dumps(ids, "run ids")
            entries = first_per_run(
                (
                    (r[0], entry_row(r[1:]))
                    for r in c.execute(
                        f"SELECT run_id, {HISTORY_COLS} FROM history WHERE app=? AND {of_runs} "
                        "ORDER BY seq",
                        (app, run_ids),
                    )
                ),
                ids,
                limit,
            )
            attempts = first_per_run(
                (
                    (r[0], Attempt(*r[1:]))
                    for r in c.execute(
                        f"SELECT run_id, {ATTEMPT_COLS} FROM attempts WHERE app=? "
                        f"AND {of_runs} ORDER BY started_at, attempt, key",
                        (app, run_ids),
                    )
                ),
                ids,
                limit,
            )
            # A step's first attempt its history row alone holds (no attempts row), as
            # the other readers of attempts see it; the first `limit` again.
            attempts = {
                run_id: with_first_attempts(entries[run_id], found)[:limit]
                for run_id, found in attempts.items()
            }
            tasks = [
                task_row(r)
                for r in c.execute(
                    f"SELECT {TASK_COLS} FROM tasks WHERE app=? AND {of_runs} "
                    "ORDER BY created_at, task_id LIMIT ?",
                    (app, run_ids, limit),
                )
            ]
            ev_rows = c.execute(
                f"SELECT {EVENT_COLS}, stored_at FROM events WHERE app=? AND correlation_id=? "
                "ORDER BY seq LIMIT ?",
                (app, correlation_id, limit),
            ).fetchall()
            events = [(event_row(r[:10]), r[10]) for r in ev_rows]
            by_id = {e.id: e for e, _ in events}
            event_ids = codec.dumps(list(by_id), "event ids")
            deliveries = [
                Delivery(r[0], by_id[r[1]], r[2], r[3], r[4], r[5], r[6], r[7])
                for r in c.execute(
                    "SELECT grp, event_id, status, attempts, next_at, error, updated_at, fence "
                    "FROM deliveries WHERE app=? "
                    "AND event_id IN (SELECT value FROM json_each(?)) "
                    "ORDER BY updated_at, grp, event_id",
                    (app, event_ids),
                )
            ]
            dls: list[DeadLetter] = []
            for r in c.execute(
                "SELECT id, grp, event_id, error, attempts, failed_at FROM dead_letters "
                "WHERE app=? AND event_id IN (SELECT value FROM json_each(?)) ORDER BY "
                "failed_at, id",
                (app, event_ids),
            ):
                failed = to_datetime(r[5])
                assert failed is not None
                dls.append(DeadLetter(r[0], r[1], by_id[r[2]], r[3], r[4], failed))
            replayed: list[tuple[DeadLetter, float]] = []
            for r in c.execute(
                "SELECT id, grp, event_id, error, attempts, failed_at, replayed_at "
                "FROM replayed_dead_letters WHERE app=? "
                "AND event_id IN (SELECT value FROM json_each(?)) ORDER BY failed_at, id",
                (app, event_ids),
            ):
                failed = to_datetime(r[5])
                assert failed is not None
                replayed.append((DeadLetter(r[0], r[1], by_id[r[2]], r[3], r[4], failed), r[6]))
            return TraceRecords(
                runs, entries, attempts, events, deliveries, dls, tasks, replayed
            )

        return await self._t.read(op)

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int, now: float | None = None
    ) -> list[str]:
        at = time.time() if now is None else now

        def op(c: sqlite3.Connection) -> list[str]:
            rows = c.execute(
                STALE_CORRELATIONS,
                {"app": app, "older": older_than, "now": at, "limit": limit * 4},
            ).fetchall()
            seen: dict[str, None] = {}
            for r in rows:
                if r[0] is not None:
                    seen.setdefault(r[0])
            return list(seen)[:limit]

        return await self._t.read(op)
