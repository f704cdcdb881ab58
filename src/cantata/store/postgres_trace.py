"""The PostgreSQL store, reading back: the apps, one transaction's records (from one
snapshot) and stale work (see :class:`~cantata.store.roles.TraceStore`)."""

from __future__ import annotations

import time
from collections.abc import Sequence

from cantata.model.flow import SlotWait
from cantata.model.records import (
    Attempt,
    HistoryEntry,
)
from cantata.store.base import TraceRecords
from cantata.store.common import first_per_run, first_slot_waits, with_first_attempts
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_ops import (
    ATTEMPT_COLS,
    DELIVERY_COLS,
    EVENT_COLS,
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    TASK_COLS,
    dead_letter_row,
    delivery_row,
    event_row,
    run_row,
    task_row,
    unindexed,
)

# The slots a run's execution waits for: the rows of its holders ("run_id:key@fence",
# flow/limits.py) asked by the run's owner, each with the waiters before it.
_SLOT_WAITS = (
    "SELECT r.run_id, w.scope, w.since, (SELECT count(*) FROM flow_waiters a "
    "WHERE a.app=w.app AND a.scope=w.scope AND a.seq<w.seq) "
    "FROM runs r JOIN flow_waiters w ON w.app=r.app AND w.worker_id=r.owner "
    "AND starts_with(w.holder, r.run_id || ':') WHERE r.app=$1 AND r.run_id=ANY($2::text[])"
)

_LIVE_OLD = f"status IN {LIVE_SQL} AND updated_at < $2"

# The correlations with live work older than a time (:meth:`stale_correlations`; args:
# app, older_than, limit, now). The live runs in three parts, each by its index whatever
# the statistics (the other conditions through ``unindexed``), so that none reads the
# runs parked until later that wait for no event (docs/performance.md, "A million parked
# runs"): those not parked (runs_claimable), the parked ones that are due (runs_parked),
# the parked event waits (runs_waiting); and the runs waiting in a queue (parked until
# it admits them), by their key. The flagged runs by their partial index, runs_flagged
# (schema 33; before, a read of every run of the app).
STALE_CORRELATIONS = (
    "SELECT correlation_id, updated_at FROM runs WHERE app=$1 AND status IN "
    f"{LIVE_SQL} AND wake_at IS NULL AND updated_at < $2 "
    "UNION SELECT correlation_id, updated_at FROM runs WHERE app=$1 "
    f"AND wake_at <= $4 AND {unindexed(_LIVE_OLD)} "
    "UNION SELECT correlation_id, updated_at FROM runs WHERE app=$1 "
    f"AND waits_for IS NOT NULL AND {unindexed(f'wake_at > $4 AND {_LIVE_OLD}')} "
    "UNION SELECT r.correlation_id, r.updated_at FROM queue_runs q JOIN runs r "
    "ON r.app=q.app AND r.run_id=q.run_id WHERE q.app=$1 AND q.began_at IS NULL "
    f"AND {unindexed(f'r.status IN {LIVE_SQL} AND r.updated_at < $2')} "
    "UNION SELECT correlation_id, updated_at FROM runs WHERE app=$1 AND flagged "
    "UNION SELECT e.correlation_id, d.updated_at FROM deliveries d JOIN events e "
    "ON e.app=d.app AND e.id=d.event_id WHERE d.app=$1 AND d.status IN "
    "('pending','dead') AND d.updated_at < $2 "
    "UNION SELECT correlation_id, updated_at FROM tasks WHERE app=$1 "
    "AND status='pending' AND updated_at < $2 "
    "ORDER BY 2 LIMIT $3"
)

# The runs of one correlation id (args: app, correlation_id, limit).
TRACE_RUNS = (
    f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND correlation_id=$2 "
    'ORDER BY created_at, run_id COLLATE "C" LIMIT $3'
)


class PostgresTrace(PostgresCore):
    """The trace-reading role of :class:`~cantata.store.postgres.PostgresStore`."""

    async def apps(self) -> list[str]:
        """App names in runs, events, declarations, workers and audit heads.

        The big tables are read with a skip scan (one index probe per app).
        """
        async with self._db.conn() as c:
            rows = await c.fetch(
                "WITH RECURSIVE r(app) AS (SELECT min(app) FROM runs UNION ALL "
                " SELECT (SELECT min(app) FROM runs WHERE app > r.app) FROM r"
                " WHERE r.app IS NOT NULL),"
                " e(app) AS (SELECT min(app) FROM events UNION ALL "
                " SELECT (SELECT min(app) FROM events WHERE app > e.app) FROM e"
                " WHERE e.app IS NOT NULL)"
                " SELECT app FROM r UNION SELECT app FROM e UNION SELECT app FROM declarations "
                " UNION SELECT app FROM workers UNION SELECT app FROM audit_head"
            )
            return sorted(r[0] for r in rows if r[0] is not None)

    async def slot_waits(self, app: str, run_ids: Sequence[str]) -> dict[str, SlotWait]:
        if not run_ids:
            return {}
        rows = await self._db.fetch(_SLOT_WAITS, app, list(run_ids))
        return first_slot_waits((r[0], r[1], r[2], r[3]) for r in rows)

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        """One query per part, in one read-only repeatable-read snapshot."""
        async with self._db.conn() as c, c.transaction(isolation="repeatable_read", readonly=True):
            runs = [
                run_row(r)
                for r in await c.fetch(
                    TRACE_RUNS,
                    app,
                    correlation_id,
                    limit,
                )
            ]
            ids = [r.run_id for r in runs]
            entries = first_per_run(
                (
                    (r[0], HistoryEntry(*r[1:]))
                    for r in await c.fetch(
                        f"SELECT run_id, {HISTORY_COLS} FROM history WHERE app=$1 "
                        "AND run_id = ANY($2::text[]) ORDER BY seq",
                        app,
                        ids,
                    )
                ),
                ids,
                limit,
            )
            attempts = first_per_run(
                (
                    (r[0], Attempt(*r[1:]))
                    for r in await c.fetch(
                        f"SELECT run_id, {ATTEMPT_COLS} FROM attempts WHERE app=$1 "
                        'AND run_id = ANY($2::text[]) ORDER BY started_at, attempt, key COLLATE '
                        '"C"',
                        app,
                        ids,
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
                for r in await c.fetch(
                    f"SELECT {TASK_COLS} FROM tasks WHERE app=$1 AND run_id = ANY($2::text[]) "
                    'ORDER BY created_at, task_id COLLATE "C" LIMIT $3',
                    app,
                    ids,
                    limit,
                )
            ]
            events = [
                (event_row(r), r[10])
                for r in await c.fetch(
                    f"SELECT {EVENT_COLS}, stored_at FROM events WHERE app=$1 "
                    "AND correlation_id=$2 ORDER BY seq LIMIT $3",
                    app,
                    correlation_id,
                    limit,
                )
            ]
            by_id = {e.id: e for e, _ in events}
            deliveries = [
                delivery_row(r, by_id[r[1]])
                for r in await c.fetch(
                    f"SELECT {DELIVERY_COLS} FROM deliveries WHERE app=$1 "
                    "AND event_id = ANY($2::text[]) "
                    'ORDER BY updated_at, grp COLLATE "C", event_id COLLATE "C"',
                    app,
                    list(by_id),
                )
            ]
            dead = [
                dead_letter_row(r, by_id[r[2]])
                for r in await c.fetch(
                    "SELECT id, grp, event_id, error, attempts, failed_at FROM dead_letters "
                    'WHERE app=$1 AND event_id = ANY($2::text[]) ORDER BY failed_at, id COLLATE '
                    '"C"',
                    app,
                    list(by_id),
                )
            ]
            replayed = [
                (dead_letter_row(r, by_id[r[2]]), r[6])
                for r in await c.fetch(
                    "SELECT id, grp, event_id, error, attempts, failed_at, replayed_at "
                    "FROM replayed_dead_letters WHERE app=$1 AND event_id = ANY($2::text[]) "
                    'ORDER BY failed_at, id COLLATE "C"',
                    app,
                    list(by_id),
                )
            ]
            return TraceRecords(
                runs, entries, attempts, events, deliveries, dead, tasks, replayed
            )

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int, now: float | None = None
    ) -> list[str]:
        at = time.time() if now is None else now
        async with self._db.conn() as c:
            rows = await c.fetch(
                STALE_CORRELATIONS,
                app,
                older_than,
                limit * 4,
                at,
            )
            seen: dict[str, None] = {}
            for r in rows:
                if r[0] is not None:
                    seen.setdefault(r[0])
            return list(seen)[:limit]
