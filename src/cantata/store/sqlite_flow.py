"""The SQLite store, flow control: queues, slots and schedules
(see :mod:`cantata.store.roles.flow`).

Every claim runs in the connection thread's write transaction (``BEGIN IMMEDIATE``),
which SQLite serializes across processes: counting and admitting happen under one
lock, so two claimers never exceed a limit.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from cantata.errors import QueueConflict
from cantata.model.flow import (
    Admissions,
    ClaimPages,
    PartitionCursor,
    QueueClaim,
    QueueEntry,
    QueuePosition,
    QueueSpec,
    QueueStats,
    Rate,
    ScheduleRow,
    SlotGrant,
    plan_slot,
    queue_stats,
    stored_rate,
    waiters_forgotten_before,
    waiters_live_since,
)
from cantata.model.parking import FOREVER
from cantata.model.records import RunRecord, RunWrite
from cantata.store import audit
from cantata.store.base import RUNS, SCHEDULES, SLOTS
from cantata.store.common import earlier_begin_key
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import (
    LIVE_R,
    LIVE_SQL,
    RUN_COLS,
    audit_append,
    pin_version_sql,
    run_row,
)
from cantata.store.sqlite_parking import UNPARK

if TYPE_CHECKING:
    pass

# Waiting runs one claim looks at, best first (a claim admits at most ``limit``).
CANDIDATES = 500
_Q_COLS = "name, concurrency, per_worker, rate_limit, rate_per, priorities"
# Rows waiting to begin (one whose run was cancelled meanwhile is dropped by the claim
# that meets it, see claim_queued_runs). Of those, the rows whose run can still begin:
# pending, no cancel asked. The depth and the places count only these (a claim may not
# have met a cancelled row for hours). The waiting rows are read through their partial
# index (without statistics SQLite picks the primary key, every row the app's queues
# ever had), and the run of each by its primary key, one lookup per waiting row (the
# subquery's WHERE names only the key), last, after the cheaper filters.
_WAITING_INDEXED = (
    "FROM queue_runs q INDEXED BY queue_runs_waiting WHERE q.app=? AND q.queue=? "
    "AND q.began_at IS NULL"
)
_MAY_BEGIN = "r.status='pending' AND r.cancel_requested=0"
# A run ``r`` with recorded history: a retried run's, or a fork's (a run queued by a
# start has none until it begins).
HAS_HISTORY = "EXISTS (SELECT 1 FROM history h WHERE h.app=r.app AND h.run_id=r.run_id)"
_CAN_BEGIN = f"(SELECT {_MAY_BEGIN} FROM runs r WHERE r.app=q.app AND r.run_id=q.run_id)"


# The waiters of a slot scope (flow_waiters, first come first served): whose worker is
# live (or asking), and the rows that wait no more (their worker's lease lapsed, or
# they have not asked since ``forget``), which the next request removes.
_WAITER_LIVE = ("(worker_id=:worker OR worker_id IN (SELECT worker_id FROM workers "
                "WHERE app=:app AND expires_at>=:stale))")
_WAITER_GONE = f"holder<>:holder AND (asked_at<:forget OR NOT {_WAITER_LIVE})"
_MY_PLACE = "(SELECT seq FROM flow_waiters WHERE app=:app AND scope=:scope AND holder=:holder)"
# What a slot request is decided on, in one statement (one count on the uncontended
# path, as before waiters): slots held; this holder's place, if it waits already; the
# live waiters ahead of it (that asked since ``lapsed``); the rows to remove.
_SLOT_STATE = (
    "SELECT (SELECT count(*) FROM flow_slots WHERE app=:app AND scope=:scope), "
    f"{_MY_PLACE}, "
    "(SELECT count(*) FROM flow_waiters WHERE app=:app AND scope=:scope AND holder<>:holder "
    f"AND seq < coalesce({_MY_PLACE}, 9223372036854775807) AND asked_at>=:lapsed "
    f"AND {_WAITER_LIVE}), "
    f"(SELECT count(*) FROM flow_waiters WHERE app=:app AND scope=:scope AND {_WAITER_GONE})"
)


def _mind_waiters(c: sqlite3.Connection, args: dict[str, object], granted: bool,
                  waits: bool, gone: int) -> None:
    """After a slot request is decided: a granted holder leaves the waiters (if it was
    one), a denied one joins them at the back or keeps its place (its ask noted), and
    the rows that wait no more are removed."""
    if not granted:
        c.execute(
            "INSERT INTO flow_waiters (app, scope, holder, worker_id, since, asked_at) "
            "VALUES (:app, :scope, :holder, :worker, :now, :now) ON CONFLICT (app, scope, "
            "holder) DO UPDATE SET worker_id=excluded.worker_id, asked_at=excluded.asked_at",
            args,
        )
    if gone or (granted and waits):
        leaving = f"holder=:holder OR ({_WAITER_GONE})" if granted else _WAITER_GONE
        c.execute(f"DELETE FROM flow_waiters WHERE app=:app AND scope=:scope AND ({leaving})",
                  args)


def queue_spec(row: tuple[object, ...]) -> QueueSpec:
    name, conc, per_worker, rate_limit, rate_per, prio = row
    rate = None if rate_limit is None else stored_rate(int(rate_limit), float(rate_per))  # type: ignore[call-overload, arg-type]
    return QueueSpec(str(name), conc, per_worker, rate, bool(prio))  # type: ignore[arg-type]


def _spec_params(spec: QueueSpec) -> tuple[object, ...]:
    rate = spec.rate
    return (spec.concurrency, spec.per_worker, rate.limit if rate else None,
            rate.per if rate else None, int(spec.priorities))


def _conflict(app: str, mine: QueueSpec, theirs: QueueSpec, by: str) -> QueueConflict:
    return QueueConflict(
        f"queue {mine.name!r} of app {app!r} is declared with other limits by live worker "
        f"{by} ({'; '.join(mine.differences(theirs))}, this process vs that one): "
        "declare it the same way in every process, or stop the old ones first"
    )


# The rows in progress (begun, not done) of a queue, by their partial index: without
# statistics SQLite reads them by the primary key, every row the app's queues ever had.
_ACTIVE_INDEXED = (
    "FROM queue_runs q INDEXED BY queue_runs_active JOIN runs r ON r.app=q.app AND "
    "r.run_id=q.run_id WHERE q.app=? AND q.queue=? AND q.began_at IS NOT NULL AND q.done=0"
)


def _close_ended(c: sqlite3.Connection, app: str, queue: str) -> None:
    """Mark done the begun rows whose run has ended (their slot is free)."""
    c.execute(
        "UPDATE queue_runs SET done=1 WHERE app=? AND queue=? AND began_at IS NOT NULL "
        f"AND done=0 AND run_id IN (SELECT q.run_id {_ACTIVE_INDEXED} "
        f"AND r.status NOT IN {LIVE_SQL})",
        (app, queue, app, queue),
    )


def heads_sql(priorities: bool, marks: str, not_theirs: str, most: int) -> str:
    """The best waiting runs of each partition key in a JSON array, at most a given
    number per key (read by migration 0028's index of the queue's order), then best
    first, at most ``most`` in all. Parameters: the keys (JSON), app, app, queue, the
    workflows (``marks``), the versions of ``not_theirs``, the number per key."""
    order, by_key = (("q.priority, q.seq, q.run_id", "queue_runs_waiting_key_priority")
                     if priorities else ("q.seq, q.run_id", "queue_runs_waiting_key"))
    return (
        f"SELECT o.run_id, o.partition_key FROM json_each(?) k JOIN queue_runs o "
        f"ON o.app=? AND o.run_id IN (SELECT q.run_id FROM queue_runs q INDEXED BY "
        f"{by_key} WHERE q.app=? AND q.queue=? AND q.began_at IS NULL AND "
        f"q.partition_key=k.value AND q.workflow IN ({marks}){not_theirs} "
        f"ORDER BY {order} LIMIT ?) ORDER BY {order.replace('q.', 'o.')} LIMIT {most}"
    )


def partition_keys(
    c: sqlite3.Connection, app: str, queue: str, after: str | None, most: int
) -> list[str]:
    """The partition keys of ``queue``'s waiting rows, in order, after ``after`` (``None``:
    from the first), at most ``most``: a skip scan, one seek of the index by key
    (migration 0028) per key, however many rows each key has waiting."""
    nxt = ("SELECT min(x.partition_key) FROM queue_runs x INDEXED BY queue_runs_waiting_key "
           "WHERE x.app=:app AND x.queue=:queue AND x.began_at IS NULL AND x.partition_key")
    first = f"{nxt} > :after" if after is not None else f"{nxt} >= ''"
    return [r[0] for r in c.execute(
        f"WITH RECURSIVE k(p) AS (SELECT ({first}) UNION ALL SELECT ({nxt} > k.p) FROM k "
        "WHERE k.p IS NOT NULL LIMIT :most) SELECT p FROM k WHERE p IS NOT NULL",
        {"app": app, "queue": queue, "after": after, "most": most},
    )]


def enqueue(
    c: sqlite3.Connection, app: str, run_id: str, workflow: str, entry: QueueEntry, at: float
) -> None:
    """Put a pending run in ``entry``'s queue, last of those waiting since ``at``, parked
    until the queue admits it: claims do not look at it (store/roles/parking.py)."""
    c.execute(
        "INSERT INTO queue_runs (app, run_id, queue, workflow, partition_key, priority, seq) "
        "VALUES (?,?,?,?,?,?,?)",
        (app, run_id, entry.queue, workflow, entry.partition, entry.priority, int(at * 1e6)),
    )
    c.execute("UPDATE runs SET wake_at=? WHERE app=? AND run_id=?", (FOREVER, app, run_id))


def requeue(
    c: sqlite3.Connection, app: str, run: RunRecord, entry: QueueEntry, at: float
) -> None:
    """Put a retried run in ``entry``'s queue again, last of those waiting since ``at``.
    The begin of the epoch that failed keeps counting in the queue's rate window and
    figures: its row stays, done, under :func:`earlier_begin_key` (pruned as an ended
    run's row); a row that never began goes."""
    c.execute("UPDATE queue_runs SET run_id=?, done=1 WHERE app=? AND run_id=? AND began_at>0",
              (earlier_begin_key(run.run_id, run.epoch), app, run.run_id))
    c.execute("DELETE FROM queue_runs WHERE app=? AND run_id=?", (app, run.run_id))
    enqueue(c, app, run.run_id, run.workflow, entry, at)


class _Kept(Exception):
    """``put_schedule(replace=False)`` met the name: its transaction writes nothing and
    announces nothing (an error leaves the channels unsaid)."""


class SQLiteFlow(SQLiteCore):
    """Flow-control operations of :class:`~cantata.store.sqlite.SQLiteStore`."""

    def _create(
        self, c: sqlite3.Connection, run: RunRecord, first: RunWrite | None,
        actor: str = audit.SYSTEM,
    ) -> tuple[RunRecord, bool]:  # provided by SQLiteStore
        raise NotImplementedError

    # -- queues ---------------------------------------------------------------------

    async def declare_queue(
        self, app: str, spec: QueueSpec, *, worker_id: str, stale_before: float
    ) -> None:
        def op(c: sqlite3.Connection) -> None:
            row = c.execute(
                f"SELECT {_Q_COLS}, declared_by FROM queues WHERE app=? AND name=?",
                (app, spec.name),
            ).fetchone()
            if row is not None:
                theirs, by = queue_spec(row[:6]), row[6]
                if theirs == spec:
                    return
                alive = by != worker_id and c.execute(
                    "SELECT 1 FROM workers WHERE app=? AND worker_id=? AND expires_at>=?",
                    (app, by, stale_before),
                ).fetchone()
                if alive:
                    raise _conflict(app, spec, theirs, by)
            c.execute(
                "INSERT INTO queues (app, name, concurrency, per_worker, rate_limit, rate_per, "
                "priorities, declared_by) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                "concurrency=excluded.concurrency, per_worker=excluded.per_worker, "
                "rate_limit=excluded.rate_limit, rate_per=excluded.rate_per, "
                "priorities=excluded.priorities, declared_by=excluded.declared_by",
                (app, spec.name, *_spec_params(spec), worker_id),
            )

        await self._t.write(op)

    async def queues(self, app: str) -> list[QueueSpec]:
        rows = await self._t.read(lambda c: c.execute(
            f"SELECT {_Q_COLS} FROM queues WHERE app=? ORDER BY name", (app,)
        ).fetchall())
        return [queue_spec(r) for r in rows]

    async def create_queued_run(
        self, run: RunRecord, entry: QueueEntry, *, actor: str = audit.SYSTEM
    ) -> tuple[RunRecord, bool]:
        def op(c: sqlite3.Connection) -> tuple[RunRecord, bool]:
            stored, created = self._create(c, run, None, actor)
            if created:
                enqueue(c, run.app, run.run_id, run.workflow, entry, run.created_at)
            return stored, created

        return await self._t.write(op, RUNS)

    async def claim_queued_runs(
        self,
        app: str,
        worker_id: str,
        queue: str,
        workflows: list[str],
        *,
        now: float,
        limit: int,
        exclude_versions: Sequence[str] = (),
        only_versions: Sequence[str] | None = None,
        pin_version: str | None = None,
        replay_checked: Mapping[str, float] | None = None,
        keep_versions_of: Sequence[str] = (),
    ) -> QueueClaim:
        if not workflows:
            return QueueClaim()
        marks = ",".join("?" * len(workflows))
        keep = list(keep_versions_of)
        pin = pin_version_sql(keep)
        # Runs pinned to a version this worker must leave to its own workers, while they
        # can begin (the row of one cancelled or ended meanwhile is met, and dropped).
        skip: list[Any] = list(exclude_versions)
        theirs = f"SELECT 1 FROM runs r WHERE r.app=q.app AND r.run_id=q.run_id AND {_MAY_BEGIN}"
        not_theirs = ("" if not skip else
                      f" AND NOT EXISTS ({theirs} AND r.version IN ({','.join('?' * len(skip))}))")
        if only_versions is not None:
            skip += list(only_versions)
            outside = (f" AND r.version NOT IN ({','.join('?' * len(only_versions))})"
                       if only_versions else "")  # (none listed: every version is outside)
            not_theirs += f" AND NOT EXISTS ({theirs} AND r.version IS NOT NULL{outside})"
        # A run with history of another version begins only once its history was
        # checked to replay on this code, as it was then (docs/operating.md, versions):
        # decided as each run begins (a candidate's page costs no look at its run).
        unchecked, unchecked_params = "", list[Any]()
        if replay_checked is not None:
            checked = ("" if not replay_checked else " AND (run_id, updated_at) NOT IN "
                       f"(VALUES {','.join(['(?,?)'] * len(replay_checked))})")
            unchecked = (" AND NOT (version IS NOT NULL AND version IS NOT ? AND EXISTS "
                         "(SELECT 1 FROM history h WHERE h.app=runs.app AND "
                         f"h.run_id=runs.run_id){checked})")
            unchecked_params = [pin_version,
                                *(v for pair in replay_checked.items() for v in pair)]

        def op(c: sqlite3.Connection) -> QueueClaim:
            row = c.execute(
                f"SELECT {_Q_COLS} FROM queues WHERE app=? AND name=?", (app, queue)
            ).fetchone()
            if row is None:
                return QueueClaim()
            spec = queue_spec(row)
            _close_ended(c, app, queue)
            running = dict(c.execute(
                "SELECT partition_key, count(*) FROM queue_runs WHERE app=? AND queue=? "
                "AND began_at IS NOT NULL AND done=0 GROUP BY partition_key", (app, queue),
            ).fetchall())
            mine = 0 if spec.per_worker is None else c.execute(
                f"SELECT count(*) {_ACTIVE_INDEXED} AND r.owner=?", (app, queue, worker_id),
            ).fetchone()[0]
            if spec.per_worker is not None:
                # The runs in progress whose owner is gone (its lease lapsed, or it let
                # them go), that this worker would take over (claim_runs): their room
                # comes first, so that new runs do not take every slot that frees and
                # leave them stranded (docs/flow-control.md).
                mine += c.execute(
                    f"SELECT count(*) {_ACTIVE_INDEXED} AND {LIVE_R} AND r.wake_at IS NULL "
                    f"AND r.workflow IN ({marks}) AND (? IS NULL OR r.version IS NULL OR "
                    "r.version=?) AND (r.owner IS NULL OR (r.owner<>? AND EXISTS (SELECT 1 "
                    "FROM workers w WHERE w.app=r.app AND w.worker_id=r.owner AND "
                    "w.expires_at < ?)))",
                    (app, queue, *workflows, pin_version, pin_version, worker_id, now),
                ).fetchone()[0]
            begins: dict[str, list[float]] = {}
            if spec.rate is not None:
                for part, at in c.execute(
                    "SELECT partition_key, began_at FROM queue_runs WHERE app=? AND queue=? "
                    "AND began_at > ? ORDER BY began_at", (app, queue, now - spec.rate.window),
                ):
                    begins.setdefault(part, []).append(at)
            # The waiting rows in the order of the index read (migration 0025: without
            # statistics, SQLite read the primary key, every row the queues ever had).
            order, index = (("q.priority, q.seq, q.run_id", "queue_runs_waiting")
                            if spec.priorities else ("q.seq, q.run_id", "queue_runs_waiting_seq"))
            runs: list[RunRecord] = []

            def admit_all(plan: Admissions) -> None:
                while admit := plan.next():
                    began = []
                    for run_id in admit:
                        got = c.execute(
                            f"UPDATE runs SET owner=?, fence=fence+1, {pin}, {UNPARK} "
                            "WHERE app=? AND run_id=? AND status='pending' "
                            f"AND cancel_requested=0 AND owner IS NULL{unchecked} "
                            f"RETURNING {RUN_COLS}",
                            (worker_id, *keep, pin_version, app, run_id, *unchecked_params),
                        ).fetchone()
                        if not got and unchecked and c.execute(
                            "SELECT 1 FROM runs WHERE app=? AND run_id=? AND status='pending' "
                            "AND cancel_requested=0 AND owner IS NULL", (app, run_id),
                        ).fetchone():
                            continue  # not checked yet: it keeps its place (not begun)
                        # A run cancelled while it waited (ended by claim_runs) never
                        # begins: its row is dropped, and the plan goes on past it
                        # (Admissions).
                        c.execute(
                            "UPDATE queue_runs SET began_at=?, done=? WHERE app=? AND run_id=?",
                            (now, 0, app, run_id) if got else (0.0, 1, app, run_id),
                        )
                        if got:
                            runs.append(run_row(got))
                            began.append(run_id)
                    plan.began(admit, began)

            pages = ClaimPages(spec, PartitionCursor.of(self), app, queue, CANDIDATES)
            candidates = c.execute(
                f"SELECT q.run_id, q.partition_key FROM queue_runs q INDEXED BY {index} "
                f"WHERE q.app=? AND q.queue=? AND q.began_at IS NULL AND q.workflow IN "
                f"({marks}){not_theirs} ORDER BY {order} LIMIT {CANDIDATES}",
                (app, queue, *workflows, *skip),
            ).fetchall()
            plan = Admissions(
                spec, [(r[0], r[1]) for r in candidates], running, mine, begins, now, limit
            )
            admit_all(plan)
            full = pages.heads(plan, len(candidates))
            if full is None:
                return QueueClaim(runs, pages.retry_at, waiting=pages.waiting)
            # Every run the page left is held back by its own partition: the heads of the
            # partitions with room, past them (model.flow.ClaimPages).
            after, cap = pages.keys(full)
            keys = partition_keys(c, app, queue, after, cap)
            again = pages.wraps(after, cap, keys)
            keys = pages.visited(full, after, cap, keys,
                                 partition_keys(c, app, queue, None, again) if again else None)
            heads = c.execute(
                heads_sql(spec.priorities, marks, not_theirs, CANDIDATES),
                (json.dumps(keys), app, app, queue, *workflows, *skip, pages.per_key(plan)),
            ).fetchall() if keys else []
            more = Admissions(spec, [(r[0], r[1]) for r in heads], plan.running, plan.mine,
                              plan.begins, now, plan.limit)
            admit_all(more)
            pages.took(more, 0)
            return QueueClaim(runs, pages.retry_at, waiting=pages.waiting)

        return await self._t.write(op)

    async def queue_stats(self, app: str, *, now: float) -> list[QueueStats]:
        def op(c: sqlite3.Connection) -> list[QueueStats]:
            out = []
            for row in c.execute(
                f"SELECT {_Q_COLS} FROM queues WHERE app=? ORDER BY name", (app,)
            ).fetchall():
                spec = queue_spec(row)
                waiting, oldest = c.execute(
                    f"SELECT count(*), min(q.seq) / 1e6 {_WAITING_INDEXED} AND {_CAN_BEGIN}",
                    (app, spec.name),
                ).fetchone()
                active = c.execute(
                    "SELECT q.partition_key, count(*) FROM queue_runs q JOIN runs r ON "
                    "r.app=q.app AND r.run_id=q.run_id WHERE q.app=? AND q.queue=? AND "
                    f"q.began_at IS NOT NULL AND q.done=0 AND {LIVE_R} GROUP BY q.partition_key",
                    (app, spec.name),
                ).fetchall()
                began = c.execute(
                    "SELECT partition_key, count(*) FROM queue_runs WHERE app=? AND queue=? "
                    "AND began_at > ? GROUP BY partition_key",
                    (app, spec.name, now - spec.stats_window),
                ).fetchall()
                out.append(queue_stats(spec, waiting, oldest, active, began))
            return out

        return await self._t.read(op)

    async def queue_position(self, app: str, run_id: str) -> QueuePosition | None:
        def op(c: sqlite3.Connection) -> QueuePosition | None:
            row = c.execute(
                "SELECT q.queue, q.partition_key, q.priority, q.seq, coalesce(u.priorities, 0) "
                "FROM queue_runs q JOIN runs r ON r.app=q.app AND r.run_id=q.run_id "
                "LEFT JOIN queues u ON u.app=q.app AND u.name=q.queue "
                "WHERE q.app=? AND q.run_id=? AND q.began_at IS NULL AND r.status='pending'",
                (app, run_id),
            ).fetchone()
            if row is None:
                return None
            queue, part, prio, seq, priorities = row
            older = "(q.seq < ? OR (q.seq = ? AND q.run_id < ?))"
            before: tuple[str, tuple[object, ...]] = (
                (f"(q.priority < ? OR (q.priority = ? AND {older}))",
                 (prio, prio, seq, seq, run_id))
                if priorities else (older, (seq, seq, run_id))
            )
            ahead = c.execute(
                f"SELECT count(*) {_WAITING_INDEXED} AND q.partition_key=? AND {before[0]} "
                f"AND {_CAN_BEGIN}",
                (app, queue, part, *before[1]),
            ).fetchone()[0]
            return QueuePosition(queue, ahead, part, seq / 1e6)

        return await self._t.read(op)

    async def run_queue(self, app: str, run_id: str) -> QueueEntry | None:
        row = await self._t.read(lambda c: c.execute(
            "SELECT queue, partition_key, priority FROM queue_runs WHERE app=? AND run_id=?",
            (app, run_id),
        ).fetchone())
        return None if row is None else QueueEntry(row[0], row[1], int(row[2]))

    async def prune_queue_runs(
        self, app: str, queue: str, *, before: float, limit: int
    ) -> int:
        def op(c: sqlite3.Connection) -> int:
            # The begun rows by their partial index, oldest first (the run of each by its
            # primary key): only the runs still in progress, bounded by the queue's
            # concurrency, are read again at every pass.
            return int(c.execute(
                "DELETE FROM queue_runs WHERE app=? AND run_id IN (SELECT q.run_id FROM "
                "queue_runs q INDEXED BY queue_runs_began WHERE q.app=? AND q.queue=? "
                "AND q.began_at IS NOT NULL AND q.began_at < ? AND NOT EXISTS (SELECT 1 "
                f"FROM runs r WHERE r.app=q.app AND r.run_id=q.run_id AND {LIVE_R}) "
                "ORDER BY q.began_at LIMIT ?)",
                (app, app, queue, before, limit),
            ).rowcount)

        return await self._t.write(op)

    # -- slots --------------------------------------------------------------------------

    async def acquire_slot(
        self,
        app: str,
        scope: str,
        holder: str,
        worker_id: str,
        *,
        concurrency: int | None,
        rate: Rate | None,
        now: float,
        stale_before: float,
        lapsed_before: float | None = None,
        forget_before: float | None = None,
        begin_at: float | None = None,
    ) -> SlotGrant:
        begin = now if begin_at is None else begin_at

        def op(c: sqlite3.Connection) -> SlotGrant:
            c.execute(
                "DELETE FROM flow_slots WHERE app=? AND scope=? AND worker_id<>? AND worker_id "
                "NOT IN (SELECT worker_id FROM workers WHERE app=? AND expires_at>=?)",
                (app, scope, worker_id, app, stale_before),
            )
            if rate is not None:
                c.execute("DELETE FROM flow_begins WHERE app=? AND scope=? AND at <= ?",
                          (app, scope, now - rate.window))
            row = c.execute(
                "SELECT worker_id FROM flow_slots WHERE app=? AND scope=? AND holder=?",
                (app, scope, holder),
            ).fetchone()
            # The holder's slot, if any: kept if this worker holds it; one another live
            # worker holds (stale ones were freed above) is never taken over.
            taken = row is not None and row[0] != worker_id
            if row is not None and not taken:
                if rate is None or c.execute(
                    "UPDATE flow_begins SET at=max(at, ?) WHERE app=? AND scope=? AND "
                    "holder=? AND at=(SELECT max(at) FROM flow_begins WHERE app=? AND "
                    "scope=? AND holder=?)", (begin, app, scope, holder, app, scope, holder),
                ).rowcount:
                    return SlotGrant(True)
                # Its begin left the window: it asks again as a new holder (counted).
                c.execute("DELETE FROM flow_slots WHERE app=? AND scope=? AND holder=?",
                          (app, scope, holder))
            args = {"app": app, "scope": scope, "holder": holder, "worker": worker_id,
                    "now": now, "stale": stale_before,
                    "forget": waiters_forgotten_before(forget_before),
                    "lapsed": waiters_live_since(forget_before, lapsed_before)}
            held, place, ahead, gone = c.execute(_SLOT_STATE, args).fetchone()
            begins: list[float] = []
            if rate is not None:
                begins = [r[0] for r in c.execute(
                    "SELECT at FROM flow_begins WHERE app=? AND scope=? ORDER BY at",
                    (app, scope),
                )]
            grant = (SlotGrant(False, None, ahead) if taken
                     else plan_slot(held, begins, concurrency, rate, ahead))
            if grant.granted:
                c.execute("INSERT INTO flow_slots (app, scope, holder, worker_id, acquired_at) "
                          "VALUES (?,?,?,?,?)",
                          (app, scope, holder, worker_id, now))
                if rate is not None:
                    c.execute("INSERT INTO flow_begins (app, scope, at, holder) VALUES (?,?,?,?)",
                              (app, scope, begin, holder))
            if place is not None or gone or not grant.granted:
                _mind_waiters(c, args, grant.granted, place is not None, gone)
            return grant

        return await self._t.write(op)

    async def release_slot(self, app: str, scope: str, holder: str, worker_id: str) -> None:
        await self._t.write(lambda c: c.execute(
            "DELETE FROM flow_slots WHERE app=? AND scope=? AND holder=? AND worker_id=?",
            (app, scope, holder, worker_id),
        ), SLOTS)

    async def withdraw_slot_request(
        self, app: str, scope: str, holder: str, worker_id: str
    ) -> None:
        await self._t.write(lambda c: c.execute(
            "DELETE FROM flow_waiters WHERE app=? AND scope=? AND holder=? AND worker_id=?",
            (app, scope, holder, worker_id),
        ), SLOTS)

    async def slots_held(self, app: str, scope: str) -> int:
        row = await self._t.read(lambda c: c.execute(
            "SELECT count(*) FROM flow_slots WHERE app=? AND scope=?", (app, scope)
        ).fetchone())
        return int(row[0])

    # -- schedules --------------------------------------------------------------------------

    async def put_schedule(
        self, app: str, row: ScheduleRow, *, actor: str | None = None, replace: bool = True
    ) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            new = c.execute(
                "INSERT INTO schedules (app, name, spec, source, paused, state, version) "
                "VALUES (?,?,?,?,?,?,1) ON CONFLICT DO NOTHING",
                (app, row.name, row.spec, row.source, int(row.paused), row.state),
            ).rowcount > 0
            if not new and not replace:
                raise _Kept
            if not new:
                c.execute("UPDATE schedules SET spec=?, source=?, version=version+1 "
                          "WHERE app=? AND name=?", (row.spec, row.source, app, row.name))
            if actor is not None:
                audit_append(c, app, audit.schedule_put_entry(actor, row.name, row.spec, new))
            return new

        try:
            return await self._t.write(op, SCHEDULES)
        except _Kept:  # (nothing written: nobody is told)
            return False

    async def schedules(self, app: str) -> list[ScheduleRow]:
        rows = await self._t.read(lambda c: c.execute(
            "SELECT name, spec, source, paused, state, version FROM schedules WHERE app=? "
            "ORDER BY name", (app,),
        ).fetchall())
        return [ScheduleRow(r[0], r[1], r[2], bool(r[3]), r[4], r[5]) for r in rows]

    async def update_schedule(
        self,
        app: str,
        name: str,
        version: int,
        *,
        state: str | None = None,
        paused: bool | None = None,
        actor: str | None = None,
    ) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            applied = c.execute(
                "UPDATE schedules SET state=coalesce(?, state), paused=coalesce(?, paused), "
                "version=version+1 WHERE app=? AND name=? AND version=?",
                (state, None if paused is None else int(paused), app, name, version),
            ).rowcount > 0
            if applied and actor is not None and paused is not None:
                audit_append(c, app, audit.schedule_pause_entry(actor, name, paused))
            return applied

        # (a scheduler's own bookkeeping of its ticks, state only, tells nobody)
        return await self._t.write(op, *(() if paused is None else (SCHEDULES,)))

    async def delete_schedule(self, app: str, name: str, *, actor: str | None = None) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            gone = c.execute(
                "DELETE FROM schedules WHERE app=? AND name=?", (app, name)
            ).rowcount > 0
            if gone and actor is not None:
                audit_append(c, app, audit.schedule_deleted_entry(actor, name))
            return gone

        return await self._t.write(op, SCHEDULES)

