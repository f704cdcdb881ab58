"""The PostgreSQL store, part three: the hot writes, as group-committed operations.

Each function here is an operation of :class:`~cantata.store.postgres_batch.BatchWriter`:
it runs inside a transaction shared with other operations, on connection ``c``,
and leaves its notifications and audit records to the :class:`Batch` ``b``. An
operation that declines (a stale fence, an idempotency key used with other
arguments) raises :class:`Refused` before its first write. Rows that decide
whether an operation applies are locked and checked in the statement that
changes them (a ``FOR UPDATE`` CTE that also returns the values from before the
change, for the audit record), so an operation takes few round trips.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cantata.errors import LeaseLost
from cantata.model.flow import takeovers
from cantata.model.idempotency import same_start, start_conflict
from cantata.model.records import (
    RunRecord,
    RunWrite,
)
from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store.base import RUNS, TASKS
from cantata.store.common import cancelled_in_queue, in_progress_per_worker
from cantata.store.postgres_batch import Batch, Refused
from cantata.store.postgres_event_writes import append
from cantata.store.postgres_ops import (
    HISTORY_COLS,
    LIVE_SQL,
    RUN_COLS,
    columns,
    run_row,
    run_values,
    unindexed,
)
from cantata.store.postgres_parking import wake_parents
from cantata.store.postgres_pool import Conn, Row

# -- runs -------------------------------------------------------------------------------

_CREATE_RUN = (
    f"INSERT INTO runs ({RUN_COLS}) VALUES ({', '.join(f'${i}' for i in range(1, 23))})"
    " ON CONFLICT (app, idempotency_key) WHERE idempotency_key IS NOT NULL "
    "DO NOTHING RETURNING run_id"
)


NewRun = tuple[RunRecord, RunWrite | None]  # a run, and its first checkpoint
# A run an operator started: its first checkpoint (or None) and the operator.
OperatorRun = tuple[RunRecord, RunWrite | None, str]


async def create_runs(
    c: Conn, b: Batch, calls: list[NewRun]
) -> list[tuple[RunRecord, bool] | Refused]:
    """:meth:`PostgresStore.create_run` for many runs: one pipelined INSERT for all, the
    first checkpoints of those inserted as one :func:`commit_runs`, and a lookup only
    for a run whose idempotency key was taken."""
    return await create_runs_by(c, b, [(run, first, audit.SYSTEM) for run, first in calls])


async def create_runs_by(
    c: Conn, b: Batch, calls: list[OperatorRun]
) -> list[tuple[RunRecord, bool] | Refused]:
    """:func:`create_runs`, each new run's ``run.created`` by the actor given with it.

    Never one statement (:mod:`~cantata.store.postgres_onetrip`, whose functions record
    every creation as ``system``'s): operators' starts are few, runs Cantata starts are
    not."""
    rows = await c.fetchmany(_CREATE_RUN, [run_values(run) for run, _, _ in calls])
    inserted = {r[0] for r in rows}
    firsts: list[Checkpoint] = []
    out: list[tuple[RunRecord, bool] | Refused] = []
    for run, first, actor in calls:
        if run.run_id in inserted:
            if run.owner is None:  # claimable by any worker (see wakes_runs)
                b.notify(run.app, RUNS)
            b.audit(run.app, audit.run_created_entry(
                run.run_id, run.workflow, run.correlation_id, run.parent_run_id, actor
            ))
            if first is not None:
                firsts.append((run.app, run.run_id, run.fence, first))
            out.append((run, True))
            continue
        out.append(await existing_run(c, run))
    if firsts:
        refused = await commit_runs(c, b, firsts)
        assert not any(refused)  # inserted just now, with these fences
    return out


async def existing_run(c: Conn, run: RunRecord) -> tuple[RunRecord, bool] | Refused:
    """The run that took ``run``'s idempotency key first, or a refusal when it was
    started with other arguments."""
    row = await c.fetchrow(
        f"SELECT {RUN_COLS} FROM runs WHERE app=$1 AND idempotency_key=$2",
        run.app, run.idempotency_key,
    )
    assert row is not None
    existing = run_row(row)
    if not same_start(existing, run):
        return Refused(start_conflict(existing, run))
    return existing, False


def pin_version_sql(version: str, keep: str) -> str:
    """A claim's ``SET`` of a run ``r``'s version: runs of the workflows of parameter
    ``keep`` (``Store.claim_runs``'s ``keep_versions_of``: a saga's run,
    docs/operating.md) pinned to a version keep it; the others are pinned to parameter
    ``version``, when it is not null."""
    return (f"version=coalesce(CASE WHEN r.workflow = ANY({keep}::text[]) THEN r.version "
            f"END, {version}::text, r.version)")


async def claim_runs(
    c: Conn, b: Batch, app: str, worker_id: str, workflows: Sequence[str],
    stale_before: float, limit: int, versions: Sequence[str] | None = None,
    run_ids: Sequence[str] | None = None, now: float | None = None,
    pin_version: str | None = None, unchanged: Sequence[float] | None = None,
    keep_versions_of: Sequence[str] = (),
) -> list[RunRecord]:
    # MATERIALIZED: the pick runs once (a rescanned LIMIT ... SKIP LOCKED subquery
    # yields more rows). The owner's liveness is a correlated subquery, not a join,
    # so that when a locked row was claimed meanwhile, the READ COMMITTED re-check
    # sees the new owner's heartbeat. Parked runs (wake_at set) are picked apart, by
    # the runs_parked index up to ``now``, only when due: its (app, wake_at) are the
    # only conditions of ``due`` that an index can take (postgres_ops.unindexed), so
    # no plan, with or without fresh statistics, reads the parked runs not yet due.
    #
    # The pick reads each workflow's runs by runs_claimable in created_at order (a
    # LATERAL per workflow: with ``workflow = ANY(...)`` no index gives that order), so
    # it stops at the LIMIT whatever the statistics. Analyzed, with many parked runs
    # beside many ended ones, PostgreSQL took the live and the not-parked shares as
    # independent, expected thousands of claimable runs and read every run of the app
    # through runs_newest in created_at order (docs/performance.md, the operator's
    # reads). Each workflow's part locks at most LIMIT rows; the oldest LIMIT of them
    # are claimed, the others are let go at the statement's end.
    rows = await c.fetch(
        f"WITH pick AS MATERIALIZED ("
        f" SELECT p.run_id FROM unnest($2::text[]) w(name) CROSS JOIN LATERAL ("
        f" SELECT c.run_id, c.created_at FROM runs c WHERE c.app=$1"
        f"  AND c.status IN {LIVE_SQL} AND c.wake_at IS NULL"
        f"  AND c.workflow = w.name AND (c.owner IS NULL OR (c.owner<>$3 AND"
        f"  NOT EXISTS (SELECT 1 FROM workers w WHERE w.app=c.app"
        f"   AND w.worker_id=c.owner AND w.expires_at >= $4)))"
        # (and whatever its version, a run cancelled while it waited in its queue)
        f"  AND ($6::text[] IS NULL OR c.version IS NULL OR c.version = ANY($6::text[])"
        f"   OR {cancelled_in_queue('c')})"
        f"  AND ($7::text[] IS NULL OR c.run_id = ANY($7::text[]))"
        f"  AND ($10::float8[] IS NULL OR (c.run_id, c.updated_at) IN"
        f"   (SELECT * FROM unnest($7::text[], $10::float8[])))"
        # a run waiting in a queue begins through claim_queued_runs (or is cancelled)
        f"  AND (c.cancel_requested OR NOT EXISTS (SELECT 1 FROM queue_runs q"
        f"   WHERE q.app=c.app AND q.run_id=c.run_id AND q.began_at IS NULL))"
        # one in progress in a per_worker queue is taken over within the limit, apart
        # (take_over_in_queues)
        f"  AND NOT {in_progress_per_worker('c')}"
        f" ORDER BY c.created_at LIMIT $5 FOR UPDATE SKIP LOCKED) p"
        f" ORDER BY p.created_at LIMIT $5),"
        f" due AS MATERIALIZED ("
        f" SELECT run_id FROM runs c WHERE $8::float8 IS NOT NULL AND c.app=$1"
        f"  AND c.wake_at IS NOT NULL AND c.wake_at <= $8::float8 AND c.owner IS NULL"
        f"  AND {unindexed(f'c.status IN {LIVE_SQL}')}"
        f"  AND {unindexed('c.workflow = ANY($2::text[])')}"
        f"  AND ($6::text[] IS NULL OR c.version IS NULL OR c.version = ANY($6::text[]))"
        f"  AND ($7::text[] IS NULL OR c.run_id = ANY($7::text[]))"
        f"  AND ($10::float8[] IS NULL OR (c.run_id, c.updated_at) IN"
        f"   (SELECT * FROM unnest($7::text[], $10::float8[])))"
        f" ORDER BY c.wake_at LIMIT greatest($5 - (SELECT count(*) FROM pick), 0)"
        f" FOR UPDATE SKIP LOCKED)"
        f" UPDATE runs r SET owner=$3, fence=r.fence+1, wake_at=NULL, waits_for=NULL,"
        f" wait_match=NULL, {pin_version_sql('$9', '$11')}"
        f" FROM (SELECT run_id FROM pick UNION ALL SELECT run_id FROM due) p"
        f" WHERE r.app=$1 AND r.run_id=p.run_id"
        f" RETURNING {', '.join('r.' + col.strip() for col in RUN_COLS.split(','))}",
        app, list(workflows), worker_id, stale_before, limit,
        None if versions is None else list(versions), None if run_ids is None else list(run_ids),
        now, pin_version, None if unchanged is None else list(unchanged),
        list(keep_versions_of),
    )
    return [run_row(r) for r in rows]


_R_COLS = ", ".join("r." + col.strip() for col in RUN_COLS.split(","))


async def take_over_in_queues(
    c: Conn, app: str, worker_id: str, workflows: Sequence[str], stale_before: float,
    limit: int, versions: Sequence[str] | None, run_ids: Sequence[str] | None,
    pin_version: str | None, unchanged: Sequence[float] | None,
    keep_versions_of: Sequence[str] = (),
) -> list[RunRecord]:
    """The part of :func:`claim_runs` that takes over runs in progress in queues with a
    ``per_worker`` limit (the claim's pick leaves them out), within each queue's room on
    this worker (model.flow.takeovers), in the caller's transaction: the rows of those
    queues are locked (``FOR UPDATE``, in name order) before this worker's runs in them
    are counted, as a queue claim locks its queue's row, so the two take turns and
    never count past the limit."""
    # Runs of the claim's filters in progress in such a queue, whose owner is gone.
    gone = ("FROM queue_runs q JOIN queues u ON u.app=q.app AND u.name=q.queue JOIN runs c "
            "ON c.app=q.app AND c.run_id=q.run_id WHERE q.app=$1 AND u.per_worker IS NOT NULL "
            f"AND q.began_at IS NOT NULL AND NOT q.done AND c.status IN {LIVE_SQL} "
            "AND c.wake_at IS NULL AND c.workflow = ANY($2::text[]) AND (c.owner IS NULL OR "
            "(c.owner<>$3 AND NOT EXISTS (SELECT 1 FROM workers w WHERE w.app=c.app AND "
            "w.worker_id=c.owner AND w.expires_at >= $4))) AND ($5::text[] IS NULL OR "
            "c.version IS NULL OR c.version = ANY($5::text[])) AND ($6::text[] IS NULL OR "
            "c.run_id = ANY($6::text[])) AND ($7::float8[] IS NULL OR (c.run_id, c.updated_at) "
            "IN (SELECT * FROM unnest($6::text[], $7::float8[])))")
    args = (app, list(workflows), worker_id, stale_before,
            None if versions is None else list(versions),
            None if run_ids is None else list(run_ids),
            None if unchanged is None else list(unchanged))
    queues = [r[0] for r in await c.fetch(f"SELECT DISTINCT q.queue {gone}", *args)]
    if not queues:
        return []
    per_worker = {r[0]: r[1] for r in await c.fetch(
        'SELECT name, per_worker FROM queues WHERE app=$1 AND name = ANY($2::text[]) '
        'ORDER BY name COLLATE "C" FOR UPDATE', app, queues,
    )}
    mine = {r[0]: r[1] for r in await c.fetch(
        "SELECT q.queue, count(*) FROM queue_runs q JOIN runs r ON r.app=q.app AND "
        "r.run_id=q.run_id WHERE q.app=$1 AND q.queue = ANY($2::text[]) AND q.began_at IS "
        f"NOT NULL AND NOT q.done AND r.owner=$3 AND r.status IN {LIVE_SQL} GROUP BY q.queue",
        app, queues, worker_id,
    )}
    room = {q: n - mine.get(q, 0) for q, n in per_worker.items() if n is not None}
    candidates = [(r[0], r[1]) for r in await c.fetch(
        f"SELECT c.run_id, q.queue {gone} ORDER BY q.began_at, c.run_id COLLATE \"C\" "
        "FOR UPDATE OF c SKIP LOCKED", *args,
    )]
    chosen = takeovers(candidates, room, limit)
    if not chosen:
        return []
    rows = await c.fetch(
        "UPDATE runs r SET owner=$3, fence=r.fence+1, wake_at=NULL, waits_for=NULL, "
        f"wait_match=NULL, {pin_version_sql('$4', '$5')} WHERE r.app=$1 AND "
        f"r.run_id = ANY($2::text[]) RETURNING {_R_COLS}",
        app, chosen, worker_id, pin_version, list(keep_versions_of),
    )
    return [run_row(r) for r in rows]


# A checkpoint's fence check, row lock and update of the run, in one statement: the
# FOR UPDATE CTE re-checks the fence on the newest version of a row claimed
# meanwhile, and hands the owner and status from before the update to the audit
# record; $10 says which call the row answers.
_COMMIT_RUN = (
    "WITH old AS MATERIALIZED (SELECT owner, status FROM runs WHERE app=$1 AND run_id=$2 "
    "AND fence=$3 FOR UPDATE) "
    "UPDATE runs r SET updated_at=$4, status=coalesce($5, r.status), "
    "result=coalesce($6, r.result), error=coalesce($7, r.error), "
    "flagged=coalesce($8, r.flagged), owner=CASE WHEN $9 THEN NULL ELSE r.owner END "
    "FROM old WHERE r.app=$1 AND r.run_id=$2 "
    "RETURNING $10::int4, old.owner, old.status, r.correlation_id"
)
_UPSERT_HISTORY = (
    f"INSERT INTO history (app, run_id, {HISTORY_COLS}) VALUES "
    f"({', '.join(f'${i}' for i in range(1, 16))}) "
    "ON CONFLICT (app, run_id, key) DO UPDATE SET "
    "status=excluded.status, result=excluded.result, error=excluded.error, "
    "error_type=excluded.error_type, attempts=excluded.attempts, "
    "started_at=excluded.started_at, ended_at=excluded.ended_at, "
    "wake_at=excluded.wake_at, detail=excluded.detail"
)

# Every checkpoint of a batch in one statement (one round trip), when each names a
# different run: the calls as arrays, unnested; the runs whose fence holds locked in
# key order (so writers lock runs in one order) with their new values (joining the
# calls again in ``upd`` was a nested loop over all of them per run), updated, and
# only theirs history entries and attempts upserted. History and attempts come
# merged per key (see _merged), since one statement cannot change a row twice.
_COMMIT_ALL = (
    "WITH c AS (SELECT * FROM unnest($1::text[], $2::text[], $3::int8[], $4::text[], "
    "$5::text[], $6::text[], $7::bool[], $8::bool[], $9::int4[]) "
    "AS c(app, run_id, fence, status, result, error, flagged, release, i)), "
    "old AS MATERIALIZED (SELECT r.app, r.run_id, r.owner, r.status, c.i, "
    "c.status AS new_status, c.result AS new_result, c.error AS new_error, "
    "c.flagged AS new_flagged, c.release AS new_release FROM runs r "
    "JOIN c ON r.app=c.app AND r.run_id=c.run_id AND r.fence=c.fence "
    "ORDER BY r.app, r.run_id FOR UPDATE OF r), "
    "upd AS (UPDATE runs r SET updated_at=$10, status=coalesce(old.new_status, r.status), "
    "result=coalesce(old.new_result, r.result), error=coalesce(old.new_error, r.error), "
    "flagged=coalesce(old.new_flagged, r.flagged), "
    "owner=CASE WHEN old.new_release THEN NULL ELSE r.owner END "
    "FROM old WHERE r.app=old.app AND r.run_id=old.run_id "
    "RETURNING old.i, old.owner, old.status, r.correlation_id), "
    f"h AS (INSERT INTO history (app, run_id, {HISTORY_COLS}) SELECT u.* FROM unnest("
    "$11::text[], $12::text[], $13::text[], $14::text[], $15::text[], $16::text[], "
    "$17::int4[], $18::text[], $19::text[], $20::text[], $21::int4[], $22::float8[], "
    "$23::float8[], $24::float8[], $25::text[]) AS u(app, run_id, key, kind, name, status, "
    "seq, result, error, error_type, attempts, started_at, ended_at, wake_at, detail) "
    "WHERE (u.app, u.run_id) IN (SELECT app, run_id FROM old) "
    "ON CONFLICT (app, run_id, key) DO UPDATE SET "
    "status=excluded.status, result=excluded.result, error=excluded.error, "
    "error_type=excluded.error_type, attempts=excluded.attempts, "
    "started_at=excluded.started_at, ended_at=excluded.ended_at, "
    "wake_at=excluded.wake_at, detail=excluded.detail), "
    "a AS (INSERT INTO attempts (app, run_id, key, attempt, started_at, ended_at, "
    "error_type, error) SELECT u.* FROM unnest($26::text[], $27::text[], $28::text[], "
    "$29::int4[], $30::float8[], $31::float8[], $32::text[], $33::text[]) "
    "AS u(app, run_id, key, attempt, started_at, ended_at, error_type, error) "
    "WHERE (u.app, u.run_id) IN (SELECT app, run_id FROM old) "
    "ON CONFLICT (app, run_id, key, attempt) DO UPDATE SET ended_at=excluded.ended_at, "
    f"error_type=excluded.error_type, error=excluded.error {ops.KEEP_EXCUSED}) "
    "SELECT * FROM upd"
)


def merged(
    rows: list[tuple[Any, ...]], width: int, kept: frozenset[int], key: int
) -> list[list[Any]]:
    """``rows`` as ``width`` columns, one row per key (its first ``key`` values): as if
    upserted one after another, the first row of a key gives the ``kept`` columns
    (those an upsert never changes) and the last one the others."""
    if len({row[:key] for row in rows}) == len(rows):  # no key twice: nothing to merge
        return columns(rows, width)
    by_key: dict[tuple[Any, ...], tuple[Any, ...]] = {}
    for row in rows:
        k = row[:key]
        first = by_key.get(k)
        by_key[k] = row if first is None else tuple(
            first[j] if j in kept else row[j] for j in range(width)
        )
    return columns(list(by_key.values()), width)



# Columns an upsert keeps as first written: history's key, kind, name and seq;
# attempts' key and started_at.
HISTORY_KEPT = frozenset({0, 1, 2, 3, 4, 6})
ATTEMPT_KEPT = frozenset({0, 1, 2, 3, 4})


Checkpoint = tuple[str, str, int, RunWrite]  # app, run_id, fence, write


def wakes_runs(w: RunWrite) -> bool:
    """Whether a checkpoint is news on the ``runs`` channel: the run ended or was let
    go (what ``result()`` waiters, parent runs and claimers wait for). The checkpoints
    in between are not: a NOTIFY costs its COMMIT about half a millisecond."""
    return w.release or (w.status is not None and w.status.is_final)


async def commit_runs(c: Conn, b: Batch, calls: list[Checkpoint]) -> list[Refused | None]:
    """:meth:`PostgresStore.commit_run` for many checkpoints: one round trip (three
    when a run comes twice), and more only for events and tasks.

    First the runs (in key order, so writers lock runs in one order), then their
    history, then their attempts, only of the runs whose fence held. The result is
    that of applying the checkpoints one after another.
    """
    now = time.time()
    order = sorted(range(len(calls)), key=lambda i: (calls[i][0], calls[i][1]))
    if len({(app, run_id) for app, run_id, _, _ in calls}) == len(calls):
        applied = await _commit_all(c, calls, now)
    else:
        applied = await _commit_in_turn(c, calls, order, now)
    out: list[Refused | None] = [None] * len(calls)
    woken: dict[str, list[str]] = {}
    for i in order:
        app, run_id, fence, w = calls[i]
        row = applied.get(i)
        if row is None:
            out[i] = lease_lost(run_id, fence)
            continue
        if w.events:
            await append(c, b, app, w.events)
        if w.tasks:
            await ops.insert_tasks(c, app, row[3], w.tasks)
        if w.wake is not None:
            woken.setdefault(app, []).append(w.wake)
        if wakes_runs(w):
            b.notify(app, RUNS)
        if w.tasks:
            b.notify(app, TASKS)
        b.audit(app, audit.checkpoint_entry(run_id, row[1], row[2], w))
    for app, parents in woken.items():
        await wake_parents(c, app, parents)
    return out


def lease_lost(run_id: str, fence: int) -> Refused:
    """The refusal of a checkpoint whose fence no longer holds."""
    return Refused(LeaseLost(
        f"run {run_id} was taken over by another worker (fence {fence} is stale); "
        "this worker stops executing it"
    ))


def run_args(i: int, call: Checkpoint) -> tuple[Any, ...]:
    app, run_id, fence, w = call
    return (app, run_id, fence, None if w.status is None else str(w.status), w.result,
            w.error, w.flagged, w.release, i)


def history_rows(calls: list[Checkpoint]) -> list[tuple[Any, ...]]:
    return [
        (app, run_id, e.key, e.kind, e.name, e.status, e.seq, e.result, e.error, e.error_type,
         e.attempts, e.started_at, e.ended_at, e.wake_at, e.detail)
        for app, run_id, _, w in calls
        for e in w.entries
    ]


def attempt_rows(calls: list[Checkpoint]) -> list[tuple[Any, ...]]:
    return [
        (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, a.error_type, a.error)
        for app, run_id, _, w in calls
        for a in w.attempts
    ]


async def _commit_all(c: Conn, calls: list[Checkpoint], now: float) -> dict[int, Row]:
    """The checkpoints of different runs, in one statement (:data:`_COMMIT_ALL`)."""
    rows = await c.fetch(
        _COMMIT_ALL, *columns([run_args(i, call) for i, call in enumerate(calls)], 9), now,
        *merged(history_rows(calls), 15, HISTORY_KEPT, key=3),
        *merged(attempt_rows(calls), 8, ATTEMPT_KEPT, key=4),
    )
    return {r[0]: r for r in rows}


async def _commit_in_turn(
    c: Conn, calls: list[Checkpoint], order: list[int], now: float
) -> dict[int, Row]:
    """Checkpoints among which a run comes twice: each statement once per checkpoint
    (or entry, or attempt), pipelined, in call order."""
    rows = await c.fetchmany(_COMMIT_RUN, [
        (*row[:3], now, *row[3:]) for i in order for row in (run_args(i, calls[i]),)
    ])
    applied: dict[int, Row] = {r[0]: r for r in rows}
    done = [calls[i] for i in order if i in applied]
    if history := history_rows(done):
        await c.executemany(_UPSERT_HISTORY, history)
    if attempts := attempt_rows(done):
        await c.executemany(ops.UPSERT_ATTEMPTS, attempts)
    return applied


# -- events and deliveries --------------------------------------------------------------
