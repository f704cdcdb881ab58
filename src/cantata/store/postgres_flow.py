"""The PostgreSQL store, flow control: queues, slots and schedules (see
:mod:`cantata.store.roles.flow`).

A queue claim locks the queue's row (``FOR UPDATE``) first and a slot request
takes a transaction-scoped advisory lock on its scope: claimers of one queue or
scope take turns, and each counts, under READ COMMITTED, what the previous one
committed. Claimers of different queues do not wait for each other.
"""

from __future__ import annotations

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
from cantata.model.records import RunRecord
from cantata.store import audit
from cantata.store.base import SCHEDULES, SLOTS
from cantata.store.postgres_batch import Batch, Refused
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_ops import (
    LIVE_SQL,
    RUN_COLS,
    SESSION_PLANS,
    audit_append,
    by_ctid,
    each_by_key,
    planned_now,
    run_row,
    unindexed,
)
from cantata.store.postgres_parking import UNPARK
from cantata.store.postgres_writes import create_runs_by, pin_version_sql

if TYPE_CHECKING:
    from cantata.store.postgres_pool import Conn, Row

# Waiting runs one claim looks at, best first (a claim admits at most ``limit``).
CANDIDATES = 500
_Q_COLS = "name, concurrency, per_worker, rate_limit, rate_per, priorities"
_R_COLS = ", ".join("r." + col.strip() for col in RUN_COLS.split(","))
# Rows waiting to begin (one whose run was cancelled meanwhile is dropped by the claim
# that meets it). Rows of queue_runs only: a join with runs, planned on a new store's
# empty tables, scanned every live run once per waiting row.
_WAITING = "FROM queue_runs q WHERE q.app=$1 AND q.queue=$2 AND q.began_at IS NULL"
# Of those, the rows whose run can still begin: pending, no cancel asked. The depth and
# the places count only these (a claim may not have met a cancelled row for hours). A
# scalar subquery on the run's primary key, one lookup per waiting row whatever the
# tables' statistics: its WHERE names only the key, so neither a join order nor another
# index of runs (runs_status_newest, runs_live) can be picked for it. (A join or EXISTS
# is planned, on a new store's tables, as a scan of every pending run per waiting row.)
# The status is unindexed for the lookups by key that test it in their WHERE (the
# claim's NOT EXISTS of runs pinned to other versions, the admission's UPDATE, the
# pruner's NOT EXISTS, the joins of the figures and the place in a queue): else
# runs_live, whose predicate it implies, can be read instead of the key, every parked
# run filtered out once per queue row (20,000 parked: 22-26 ms against 0.05-0.14).
PENDING = unindexed("r.status='pending'")
# The runs a claim admits, each by its key whatever the statistics, then updated by its
# ctid (postgres_ops.by_ctid): one another transaction updated meanwhile is left alone,
# and the claim looks at it again (admit_all).
_ADMITTED = by_ctid("runs", "x.app=$1", "run_id", "$3")
_RUNS_ASKED = each_by_key("runs", "r", "x.app=$1", "run_id", "$2")
_LIVE = unindexed(f"r.status IN {LIVE_SQL}")
_MAY_BEGIN = f"{PENDING} AND NOT r.cancel_requested"
# A run ``r`` with recorded history: a retried run's, or a fork's (a run queued by a
# start has none until it begins).
HAS_HISTORY = "EXISTS (SELECT 1 FROM history h WHERE h.app=r.app AND h.run_id=r.run_id)"
_CAN_BEGIN = f"(SELECT {_MAY_BEGIN} FROM runs r WHERE r.app=q.app AND r.run_id=q.run_id)"


# The waiters of a slot scope (flow_waiters, first come first served), with $1 app,
# $2 scope, $3 holder, $4 the asking worker, $5 ``stale`` (now), $6 ``forget``: whose
# worker is live (or asking), and the rows that wait no more (their worker's lease
# lapsed, or they have not asked since ``forget``), which the next request removes.
_WAITER_LIVE = ("(w.worker_id=$4 OR EXISTS (SELECT 1 FROM workers k WHERE k.app=w.app AND "
                "k.worker_id=w.worker_id AND k.expires_at>=$5))")
_WAITER_GONE = f"w.holder<>$3 AND (w.asked_at<$6 OR NOT {_WAITER_LIVE})"
_MY_PLACE = "(SELECT seq FROM flow_waiters WHERE app=$1 AND scope=$2 AND holder=$3)"
# What a slot request is decided on, in one statement (one count on the uncontended
# path, as before waiters): slots held; this holder's place, if it waits already; the
# live waiters ahead of it (that asked since $7); the rows to remove.
_SLOT_STATE = (
    "SELECT (SELECT count(*) FROM flow_slots WHERE app=$1 AND scope=$2), "
    f"{_MY_PLACE}, "
    "(SELECT count(*) FROM flow_waiters w WHERE w.app=$1 AND w.scope=$2 AND w.holder<>$3 "
    f"AND w.seq < coalesce({_MY_PLACE}, 9223372036854775807) AND w.asked_at>=$7 "
    f"AND {_WAITER_LIVE}), "
    f"(SELECT count(*) FROM flow_waiters w WHERE w.app=$1 AND w.scope=$2 AND {_WAITER_GONE})"
)


async def _mind_waiters(c: Conn, key: tuple[str, str, str, str, float, float], now: float,
                        granted: bool, waits: bool, gone: int) -> None:
    """After a slot request is decided: a granted holder leaves the waiters (if it was
    one), a denied one joins them at the back or keeps its place (its ask noted), and
    the rows that wait no more are removed (``key``: app, scope, holder, worker,
    stale, forget)."""
    if not granted:
        await c.execute(
            "INSERT INTO flow_waiters (app, scope, holder, worker_id, since, asked_at) "
            "VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (app, scope, holder) DO UPDATE "
            "SET worker_id=excluded.worker_id, asked_at=excluded.asked_at",
            *key[:4], now,
        )
    if gone or (granted and waits):
        leaving = f"w.holder=$3 OR ({_WAITER_GONE})" if granted else _WAITER_GONE
        await c.execute(
            f"DELETE FROM flow_waiters w WHERE w.app=$1 AND w.scope=$2 AND ({leaving})", *key
        )


def queue_spec(row: Row) -> QueueSpec:
    rate = None if row[3] is None else stored_rate(int(row[3]), float(row[4]))
    return QueueSpec(row[0], row[1], row[2], rate, bool(row[5]))


def _conflict(app: str, mine: QueueSpec, theirs: QueueSpec, by: str) -> QueueConflict:
    return QueueConflict(
        f"queue {mine.name!r} of app {app!r} is declared with other limits by live worker "
        f"{by} ({'; '.join(mine.differences(theirs))}, this process vs that one): "
        "declare it the same way in every process, or stop the old ones first"
    )


async def _create_queued(
    c: Conn, b: Batch, calls: list[tuple[RunRecord, QueueEntry, str]]
) -> list[tuple[RunRecord, bool] | Refused]:
    """New runs and their queue rows (each created by the actor given with it), for
    many callers in one transaction."""
    out = await create_runs_by(c, b, [(run, None, actor) for run, _, actor in calls])
    rows = [
        (run.app, run.run_id, e.queue, run.workflow, e.partition, e.priority,
         int(run.created_at * 1e6))
        for (run, e, _), res in zip(calls, out, strict=True)
        if not isinstance(res, Refused) and res[1]
    ]
    if rows:
        await c.executemany(
            "INSERT INTO queue_runs (app, run_id, queue, workflow, partition_key, priority, "
            "seq) VALUES ($1,$2,$3,$4,$5,$6,$7)", rows,
        )
        # Parked until admitted: claims do not look at them (store/roles/parking.py).
        await c.execute(
            "UPDATE runs r SET wake_at=$1 FROM unnest($2::text[], $3::text[]) AS q(app, run_id) "
            "WHERE r.app=q.app AND r.run_id=q.run_id",
            FOREVER, [r[0] for r in rows], [r[1] for r in rows],
        )
    return out


def heads_sql(order: str, not_theirs: str, most: int) -> str:
    """The best waiting runs (``order``) of each partition key in an array, at most a
    given number per key (a LATERAL read per key, by migration 0036's index), then
    best first, at most ``most`` in all. Parameters: $1 app, $2 queue, $3 workflows,
    ($4, $5 the versions of ``not_theirs``,) then the keys and the number per key."""
    n = 6 if not_theirs else 4
    return (
        f"SELECT h.run_id, h.partition_key FROM unnest(${n}::text[]) k(p) "
        f"CROSS JOIN LATERAL (SELECT q.run_id, q.partition_key, q.priority, q.seq "
        # The key as a range of one value and the order by the key first: the order of
        # the index by key, which only that index gives. (With the key as an equality,
        # the key is a constant to the planner, and it may read the queue's order,
        # queue_runs_waiting_seq, filtering out every other key's run before this one's.)
        f"{_WAITING} AND q.partition_key >= k.p AND q.partition_key <= k.p AND "
        f"q.workflow = ANY($3::text[]){not_theirs} ORDER BY q.partition_key, {order} "
        f"LIMIT ${n + 1}) h "
        f"ORDER BY {order.replace('q.', 'h.')} LIMIT {most}"
    )


async def partition_keys(
    c: Conn, app: str, queue: str, after: str | None, most: int
) -> list[str]:
    """The partition keys of ``queue``'s waiting rows, in order, after ``after`` (``None``:
    from the first), at most ``most``: a skip scan (a recursive query), one probe of the
    index by key (migration 0036) per key, however many rows each key has waiting."""
    nxt = ("SELECT x.partition_key FROM queue_runs x WHERE x.app=$1 AND x.queue=$2 AND "
           "x.began_at IS NULL AND x.partition_key")
    first = f"{nxt} > $4" if after is not None else f"{nxt} >= ''"
    rows = await c.fetch(
        f"WITH RECURSIVE k(p, n) AS (SELECT ({first} ORDER BY x.partition_key LIMIT 1), 1 "
        f"UNION ALL SELECT ({nxt} > k.p ORDER BY x.partition_key LIMIT 1), k.n + 1 FROM k "
        "WHERE k.p IS NOT NULL AND k.n < $3) SELECT p FROM k WHERE p IS NOT NULL",
        app, queue, most, *([after] if after is not None else []),
    )
    return [r[0] for r in rows]


class PostgresFlow(PostgresCore):
    """Flow-control operations of :class:`~cantata.store.postgres.PostgresStore`."""

    # -- queues ---------------------------------------------------------------------

    async def declare_queue(
        self, app: str, spec: QueueSpec, *, worker_id: str, stale_before: float
    ) -> None:
        rate = spec.rate
        async with self._db.tx() as c:
            await c.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"queue:{app}")
            row = await c.fetchrow(
                f"SELECT {_Q_COLS}, declared_by FROM queues WHERE app=$1 AND name=$2",
                app, spec.name,
            )
            if row is not None:
                theirs, by = queue_spec(row), row[6]
                if theirs == spec:
                    return
                if by != worker_id and await c.fetchval(
                    "SELECT 1 FROM workers WHERE app=$1 AND worker_id=$2 AND expires_at>=$3",
                    app, by, stale_before,
                ):
                    raise _conflict(app, spec, theirs, by)
            await c.execute(
                "INSERT INTO queues (app, name, concurrency, per_worker, rate_limit, rate_per, "
                "priorities, declared_by) VALUES ($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (app, name) "
                "DO UPDATE SET concurrency=excluded.concurrency, per_worker=excluded.per_worker,"
                " rate_limit=excluded.rate_limit, rate_per=excluded.rate_per, "
                "priorities=excluded.priorities, declared_by=excluded.declared_by",
                app, spec.name, spec.concurrency, spec.per_worker,
                rate.limit if rate else None, rate.per if rate else None, spec.priorities,
                worker_id,
            )

    async def queues(self, app: str) -> list[QueueSpec]:
        rows = await self._db.fetch(
            f'SELECT {_Q_COLS} FROM queues WHERE app=$1 ORDER BY name COLLATE "C"', app
        )
        return [queue_spec(r) for r in rows]

    async def create_queued_run(
        self, run: RunRecord, entry: QueueEntry, *, actor: str = audit.SYSTEM
    ) -> tuple[RunRecord, bool]:
        # Group-committed with the other new runs (see postgres_writes.create_runs).
        return await self._w.run_many(_create_queued, (run, entry, actor))

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
        # Runs pinned to a version this worker must leave to its own workers.
        skip = list(exclude_versions)
        only = None if only_versions is None else list(only_versions)
        # (while they can begin: the row of one cancelled or ended meanwhile is met, and
        # dropped)
        theirs = ("SELECT 1 FROM runs r WHERE r.app=q.app AND r.run_id=q.run_id AND "
                  f"{_MAY_BEGIN}")
        not_theirs, params = "", list[Any]()
        if skip or only is not None:
            not_theirs = (f" AND NOT EXISTS ({theirs} AND (r.version = ANY($4::text[]) "
                          "OR ($5::text[] IS NOT NULL AND r.version IS NOT NULL "
                          "AND r.version <> ALL($5))))")
            params += [skip, only]
        # A run with history of another version begins only once its history was
        # checked to replay on this code, as it was then (docs/operating.md, versions):
        # decided as each run begins (a candidate's page costs no look at its run).
        unchecked, unchecked_params = "", list[Any]()
        if replay_checked is not None:
            unchecked = (
                " AND NOT (r.version IS NOT NULL AND r.version IS DISTINCT FROM $4::text "
                f"AND {HAS_HISTORY} AND (r.run_id, r.updated_at) NOT IN "
                "(SELECT * FROM unnest($6::text[], $7::float8[])))")
            unchecked_params = [list(replay_checked), list(replay_checked.values())]
        async with self._db.tx() as c:
            row = await c.fetchrow(
                f"SELECT {_Q_COLS} FROM queues WHERE app=$1 AND name=$2 FOR UPDATE", app, queue
            )
            if row is None:
                return QueueClaim()
            spec = queue_spec(row)
            await c.execute(
                "UPDATE queue_runs q SET done=true FROM runs r WHERE q.app=$1 AND q.queue=$2 "
                "AND q.began_at IS NOT NULL AND NOT q.done AND r.app=q.app "
                f"AND r.run_id=q.run_id AND r.status NOT IN {LIVE_SQL}", app, queue,
            )
            running = {r[0]: r[1] for r in await c.fetch(
                "SELECT partition_key, count(*) FROM queue_runs WHERE app=$1 AND queue=$2 "
                "AND began_at IS NOT NULL AND NOT done GROUP BY partition_key", app, queue,
            )}
            mine = 0 if spec.per_worker is None else await c.fetchval(
                "SELECT count(*) FROM queue_runs q JOIN runs r ON r.app=q.app AND "
                "r.run_id=q.run_id WHERE q.app=$1 AND q.queue=$2 AND q.began_at IS NOT NULL "
                "AND NOT q.done AND r.owner=$3", app, queue, worker_id,
            )
            if spec.per_worker is not None:
                # The runs in progress whose owner is gone (its lease lapsed, or it let
                # them go), that this worker would take over (claim_runs): their room
                # comes first, so that new runs do not take every slot that frees and
                # leave them stranded (docs/flow-control.md).
                mine += await c.fetchval(
                    "SELECT count(*) FROM queue_runs q JOIN runs r ON r.app=q.app AND "
                    "r.run_id=q.run_id WHERE q.app=$1 AND q.queue=$2 AND q.began_at IS NOT "
                    f"NULL AND NOT q.done AND {_LIVE} AND r.wake_at IS NULL AND "
                    "r.workflow = ANY($3::text[]) AND ($4::text IS NULL OR r.version IS NULL "
                    "OR r.version = $4) AND (r.owner IS NULL OR (r.owner<>$5 AND EXISTS "
                    "(SELECT 1 FROM workers w WHERE w.app=r.app AND w.worker_id=r.owner AND "
                    "w.expires_at < $6)))",
                    app, queue, workflows, pin_version, worker_id, now,
                )
            begins: dict[str, list[float]] = {}
            if spec.rate is not None:
                for r in await c.fetch(
                    "SELECT partition_key, began_at FROM queue_runs WHERE app=$1 AND queue=$2 "
                    "AND began_at > $3 ORDER BY began_at", app, queue, now - spec.rate.window,
                ):
                    begins.setdefault(r[0], []).append(r[1])
            order = ("q.priority, q.seq, q.run_id COLLATE \"C\"" if spec.priorities
                     else "q.seq, q.run_id COLLATE \"C\"")
            by_id: dict[str, RunRecord] = {}
            order_of: list[str] = []

            async def admit_all(plan: Admissions) -> None:
                while admit := plan.next():
                    rows = await planned_now(c, SESSION_PLANS, lambda: c.fetch(
                        "UPDATE runs r SET owner=$2, fence=r.fence+1, "
                        f"{pin_version_sql('$4', '$5')}, {UNPARK} FROM {_ADMITTED} "
                        f"WHERE r.ctid=found.at AND {PENDING} "
                        f"AND NOT r.cancel_requested AND r.owner IS NULL{unchecked} "
                        f"RETURNING {_R_COLS}",
                        app, worker_id, admit, pin_version, list(keep_versions_of),
                        *unchecked_params,
                    ))
                    began = [r[0] for r in rows]
                    tried = admit
                    if len(began) < len(admit):
                        began_ids = set(began)
                        # One that may still begin keeps its place (not begun, not
                        # dropped): not checked yet, or updated by another transaction
                        # meanwhile (left alone by the ctid, _ADMITTED).
                        held = {r[0] for r in await c.fetch(
                            f"SELECT r.run_id FROM {_RUNS_ASKED} WHERE {_MAY_BEGIN} "
                            "AND r.owner IS NULL",
                            app, [i for i in admit if i not in began_ids],
                        )}
                        tried = [i for i in admit if i not in held]
                    # A run cancelled while it waited (ended by claim_runs) never begins:
                    # its row is dropped, and the plan goes on past it
                    # (model.flow.Admissions).
                    await c.execute(
                        # ($2 typed: next to an integer 0, PostgreSQL would make it one)
                        "UPDATE queue_runs SET began_at = CASE WHEN run_id = ANY($3::text[]) "
                        "THEN $2::double precision ELSE 0.0 END, "
                        "done = NOT (run_id = ANY($3::text[])) "
                        "WHERE app=$1 AND run_id = ANY($4::text[])", app, now, began, tried,
                    )
                    by_id.update((r[0], run_row(r)) for r in rows)
                    order_of.extend(admit)
                    plan.began(admit, began)

            pages = ClaimPages(spec, PartitionCursor.of(self), app, queue, CANDIDATES)
            candidates = await c.fetch(
                f"SELECT q.run_id, q.partition_key {_WAITING} AND q.workflow = "
                f"ANY($3::text[]){not_theirs} ORDER BY {order} LIMIT {CANDIDATES}",
                app, queue, workflows, *params,
            )
            plan = Admissions(
                spec, [(r[0], r[1]) for r in candidates], running, mine, begins, now, limit
            )
            await admit_all(plan)
            full = pages.heads(plan, len(candidates))
            if full is not None:
                # Every run the page left is held back by its own partition: the heads of
                # the partitions with room, past them (model.flow.ClaimPages).
                after, cap = pages.keys(full)
                keys = await partition_keys(c, app, queue, after, cap)
                again = pages.wraps(after, cap, keys)
                keys = pages.visited(
                    full, after, cap, keys,
                    await partition_keys(c, app, queue, None, again) if again else None,
                )
                heads = await c.fetch(
                    heads_sql(order, not_theirs, CANDIDATES),
                    app, queue, workflows, *params, keys, pages.per_key(plan),
                ) if keys else []
                more = Admissions(spec, [(r[0], r[1]) for r in heads], plan.running,
                                  plan.mine, plan.begins, now, plan.limit)
                await admit_all(more)
                pages.took(more, 0)
        runs = [by_id[i] for i in order_of if i in by_id]
        return QueueClaim(runs, pages.retry_at, pages.waiting)

    async def queue_stats(self, app: str, *, now: float) -> list[QueueStats]:
        out = []
        async with self._db.conn() as c:
            for row in await c.fetch(
                f'SELECT {_Q_COLS} FROM queues WHERE app=$1 ORDER BY name COLLATE "C"', app
            ):
                spec = queue_spec(row)
                waiting = await c.fetchrow(
                    f"SELECT count(*), min(q.seq)::float8 / 1e6 {_WAITING} AND {_CAN_BEGIN}",
                    app, spec.name,
                )
                assert waiting is not None
                active = await c.fetch(
                    "SELECT q.partition_key, count(*) FROM queue_runs q JOIN runs r ON "
                    "r.app=q.app AND r.run_id=q.run_id WHERE q.app=$1 AND q.queue=$2 AND "
                    f"q.began_at IS NOT NULL AND NOT q.done AND {_LIVE} "
                    "GROUP BY q.partition_key", app, spec.name,
                )
                began = await c.fetch(
                    "SELECT partition_key, count(*) FROM queue_runs WHERE app=$1 AND queue=$2 "
                    "AND began_at > $3 GROUP BY partition_key",
                    app, spec.name, now - spec.stats_window,
                )
                out.append(queue_stats(spec, waiting[0], waiting[1],
                                       [(r[0], r[1]) for r in active],
                                       [(r[0], r[1]) for r in began]))
        return out

    async def queue_position(self, app: str, run_id: str) -> QueuePosition | None:
        async with self._db.conn() as c:
            row = await c.fetchrow(
                "SELECT q.queue, q.partition_key, q.priority, q.seq, coalesce(u.priorities, "
                "false) FROM queue_runs q JOIN runs r ON r.app=q.app AND r.run_id=q.run_id "
                "LEFT JOIN queues u ON u.app=q.app AND u.name=q.queue "
                f"WHERE q.app=$1 AND q.run_id=$2 AND q.began_at IS NULL AND {PENDING}",
                app, run_id,
            )
            if row is None:
                return None
            queue, part, prio, seq, priorities = row
            older = '(q.seq < $5 OR (q.seq = $5 AND q.run_id COLLATE "C" < $6))'
            before = (f"(q.priority < $4 OR (q.priority = $4 AND {older}))" if priorities
                      else f"{older} AND $4::bigint IS NOT NULL")
            ahead = await c.fetchval(
                f"SELECT count(*) {_WAITING} AND q.partition_key=$3 AND {before} AND {_CAN_BEGIN}",
                app, queue, part, prio, seq, run_id,
            )
        return QueuePosition(queue, ahead, part, seq / 1e6)

    async def run_queue(self, app: str, run_id: str) -> QueueEntry | None:
        row = await self._db.fetchrow(
            "SELECT queue, partition_key, priority FROM queue_runs WHERE app=$1 AND run_id=$2",
            app, run_id,
        )
        return None if row is None else QueueEntry(row[0], row[1], int(row[2]))

    async def prune_queue_runs(
        self, app: str, queue: str, *, before: float, limit: int
    ) -> int:
        # SKIP LOCKED: a row a claim of the queue holds (closing it) is left for the next
        # pass, so the pruner never waits for a claim, and holding nothing else while it
        # locks, never deadlocks with one.
        async with self._db.conn() as c:
            gone = await c.fetchval(
                "WITH pick AS (SELECT q.app, q.run_id FROM queue_runs q WHERE q.app=$1 "
                "AND q.queue=$2 AND q.began_at IS NOT NULL AND q.began_at < $3 "
                "AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.app=q.app AND "
                f"r.run_id=q.run_id AND {_LIVE}) ORDER BY q.began_at "
                "LIMIT $4 FOR UPDATE OF q SKIP LOCKED), "
                "gone AS (DELETE FROM queue_runs d USING pick p WHERE d.app=p.app "
                "AND d.run_id=p.run_id RETURNING 1) SELECT count(*) FROM gone",
                app, queue, before, limit,
            )
        return int(gone)

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
        async with self._db.tx() as c:
            await c.execute("SELECT pg_advisory_xact_lock(hashtext($1))", f"slot:{app}:{scope}")
            await c.execute(
                "DELETE FROM flow_slots s WHERE s.app=$1 AND s.scope=$2 AND s.worker_id<>$4 "
                "AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.app=s.app AND "
                "w.worker_id=s.worker_id AND w.expires_at>=$3)",
                app, scope, stale_before, worker_id,
            )
            if rate is not None:
                await c.execute("DELETE FROM flow_begins WHERE app=$1 AND scope=$2 AND at <= $3",
                                app, scope, now - rate.window)
            owner = await c.fetchval(
                "SELECT worker_id FROM flow_slots WHERE app=$1 AND scope=$2 AND holder=$3",
                app, scope, holder,
            )
            # The holder's slot, if any: kept if this worker holds it; one another live
            # worker holds (stale ones were freed above) is never taken over.
            taken = owner is not None and owner != worker_id
            if owner is not None and not taken:
                if rate is None or await c.fetchval(
                    "UPDATE flow_begins SET at=greatest(at, $4) WHERE app=$1 AND scope=$2 AND "
                    "holder=$3 AND at=(SELECT max(at) FROM flow_begins WHERE app=$1 AND "
                    "scope=$2 AND holder=$3) RETURNING 1", app, scope, holder, begin,
                ):
                    return SlotGrant(True)
                # Its begin left the window: it asks again as a new holder (counted).
                await c.execute("DELETE FROM flow_slots WHERE app=$1 AND scope=$2 AND "
                                "holder=$3", app, scope, holder)
            key = (app, scope, holder, worker_id, stale_before,
                   waiters_forgotten_before(forget_before))
            state = await c.fetchrow(_SLOT_STATE, *key,
                                     waiters_live_since(forget_before, lapsed_before))
            assert state is not None
            held, place, ahead, gone = state
            begins: list[float] = []
            if rate is not None:
                begins = [r[0] for r in await c.fetch(
                    "SELECT at FROM flow_begins WHERE app=$1 AND scope=$2 ORDER BY at",
                    app, scope,
                )]
            grant = (SlotGrant(False, None, ahead) if taken
                     else plan_slot(held, begins, concurrency, rate, ahead))
            if grant.granted:
                await c.execute("INSERT INTO flow_slots (app, scope, holder, worker_id, "
                                "acquired_at) VALUES ($1,$2,$3,$4,$5)",
                                app, scope, holder, worker_id, now)
                if rate is not None:
                    await c.execute("INSERT INTO flow_begins (app, scope, at, holder) "
                                    "VALUES ($1,$2,$3,$4)",
                                    app, scope, begin, holder)
            if place is not None or gone or not grant.granted:
                await _mind_waiters(c, key, now, grant.granted, place is not None, gone)
            return grant

    async def release_slot(self, app: str, scope: str, holder: str, worker_id: str) -> None:
        async with self._db.tx() as c:
            await c.execute("DELETE FROM flow_slots WHERE app=$1 AND scope=$2 AND holder=$3 "
                            "AND worker_id=$4", app, scope, holder, worker_id)
            await self._db.notify(c, app, SLOTS)

    async def withdraw_slot_request(
        self, app: str, scope: str, holder: str, worker_id: str
    ) -> None:
        async with self._db.tx() as c:
            if await c.fetchval(
                "DELETE FROM flow_waiters WHERE app=$1 AND scope=$2 AND holder=$3 "
                "AND worker_id=$4 RETURNING 1", app, scope, holder, worker_id,
            ):
                await self._db.notify(c, app, SLOTS)

    async def slots_held(self, app: str, scope: str) -> int:
        row = await self._db.fetchrow(
            "SELECT count(*) FROM flow_slots WHERE app=$1 AND scope=$2", app, scope
        )
        assert row is not None
        return int(row[0])

    # -- schedules --------------------------------------------------------------------------

    async def put_schedule(
        self, app: str, row: ScheduleRow, *, actor: str | None = None, replace: bool = True
    ) -> bool:
        async with self._db.tx() as c:
            new = bool(await c.fetchval(
                "INSERT INTO schedules (app, name, spec, source, paused, state, version) "
                "VALUES ($1,$2,$3,$4,$5,$6,1) ON CONFLICT (app, name) "
                "DO NOTHING RETURNING 1", app, row.name, row.spec, row.source, row.paused,
                row.state,
            ))
            if not new and not replace:
                return False  # (the name is taken: nothing written, nobody told)
            if not new:
                await c.execute("UPDATE schedules SET spec=$3, source=$4, version=version+1 "
                                "WHERE app=$1 AND name=$2", app, row.name, row.spec, row.source)
            if actor is not None:
                await audit_append(c, app, audit.schedule_put_entry(
                    actor, row.name, row.spec, new), self._audit_keys.get(app))
            await self._db.notify(c, app, SCHEDULES)
            return new

    async def schedules(self, app: str) -> list[ScheduleRow]:
        rows = await self._db.fetch(
            "SELECT name, spec, source, paused, state, version FROM schedules WHERE app=$1 "
            'ORDER BY name COLLATE "C"', app,
        )
        return [ScheduleRow(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows]

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
        sql = ("UPDATE schedules SET state=coalesce($4, state), paused=coalesce($5, paused), "
               "version=version+1 WHERE app=$1 AND name=$2 AND version=$3 RETURNING 1")
        if paused is None:  # a scheduler's own bookkeeping: not audited, tells nobody
            return await self._db.fetchrow(sql, app, name, version, state, paused) is not None
        async with self._db.tx() as c:
            row = await c.fetchrow(sql, app, name, version, state, paused)
            if row is not None:
                if actor is not None:
                    await audit_append(c, app, audit.schedule_pause_entry(actor, name, paused),
                                       self._audit_keys.get(app))
                await self._db.notify(c, app, SCHEDULES)
            return row is not None

    async def delete_schedule(self, app: str, name: str, *, actor: str | None = None) -> bool:
        async with self._db.tx() as c:
            row = await c.fetchrow(
                "DELETE FROM schedules WHERE app=$1 AND name=$2 RETURNING 1", app, name
            )
            if row is not None:
                if actor is not None:
                    await audit_append(c, app, audit.schedule_deleted_entry(actor, name),
                                       self._audit_keys.get(app))
                await self._db.notify(c, app, SCHEDULES)
            return row is not None

