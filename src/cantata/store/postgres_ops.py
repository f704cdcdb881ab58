"""The PostgreSQL store's shared SQL: columns and rows, attempts, tasks and the audit log.

Functions of a pooled connection (``c``), called by
:class:`~cantata.store.postgres.PostgresStore` inside its transactions.

Audit appends are serialized per app by the app's ``audit_head`` row: one
``INSERT … ON CONFLICT DO UPDATE`` both locks that row and advances it (the new
seq and hash are computed in SQL from the locked head, over the rest of the record
that Python already put in canonical form), and the audit record is inserted from
its ``RETURNING``, in one statement. It must be the last statement of its
transaction, so the row stays locked only for that statement and the COMMIT
(group-committed transactions append all their records at their end, see
:mod:`cantata.store.postgres_batch`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import (
    TASK_WITHDRAWN,
    UNADDRESSED,
    Attempt,
    AuditRecord,
    DeadLetter,
    Delivery,
    RunRecord,
    TaskRecord,
    to_datetime,
)
from cantata.model.status import FINAL_STATUSES, RunStatus
from cantata.store import audit
from cantata.store.common import ENDED_RUN_ERROR
from cantata.store.postgres_pool import Conn, Row

LIVE_SQL = "('pending', 'running', 'compensating')"

T = TypeVar("T")


def unindexed(cond: str) -> str:
    """``cond`` as a filter that no index can serve, for a statement that must read
    ``runs`` by one index whatever the table's statistics.

    Planned without statistics (a table that grew from empty and was not analyzed
    since), PostgreSQL prices every condition by default selectivities: two
    equalities (``app``, ``workflow``: 0.005 each) look far more selective than an
    equality and a range (``app``, ``wake_at <= now``: 0.005 and 0.33), and a
    partial index whose predicate a condition implies (``runs_live``, by ``status IN
    ...``) counts as smaller still. So a read of the due parked runs went through
    ``runs_live`` or ``runs_workflow_newest`` and filtered out every parked run
    (docs/performance.md, "A million parked runs"). Wrapped in ``coalesce(..., false)``
    (the same in a WHERE: NULL and false both drop the row) a condition matches no
    index column and implies no index predicate, and is priced as an opaque filter
    (half the rows), so an ordered read of the index left stops at its LIMIT."""
    return f"coalesce({cond}, false)"


def each_by_key(
    table: str, alias: str, where: str, key: str, ids: str, cols: str = "*"
) -> str:
    """A ``FROM`` item: the rows of ``table`` (as ``alias``; ``x`` in ``where``, its
    columns ``cols``) whose ``key`` is one of the text array ``ids`` (each at most once),
    each looked up on its own by the table's key whatever the statistics.

    Written as ``AND key = ANY(ids)`` beside ``app=$1``, a statement planned without
    statistics (a table never analyzed: a new store's, until autovacuum's ANALYZE) read
    the app's whole key range and filtered it: ``app=$1`` priced at the default
    selectivity looks like a few rows, fewer than one descent per id. The ``LIMIT`` keeps
    each id's read a lookup of its own, never merged into one scan (docs/performance.md,
    "Queued runs and deliveries, planned without statistics")."""
    return (f"unnest({ids}::text[]) AS k(id) CROSS JOIN LATERAL (SELECT {cols} FROM {table} "
            f"x WHERE {where} AND x.{key}=k.id LIMIT 1) {alias}")


def by_ctid(table: str, where: str, key: str, ids: str) -> str:
    """``FROM`` items for an ``UPDATE`` of the rows of ``table`` whose ``key`` is one of
    the text array ``ids``: each row found by its key as :func:`each_by_key` finds it
    (``where`` on ``x``), its ``ctid`` as ``found.at``; the ``UPDATE`` takes the row
    whose ``ctid = found.at`` (a TID scan per id).

    ``key IN (SELECT ... each_by_key)``, the shape before, let a plan made while the table
    held a few hundred rows read the app's rows and look every id up again for each:
    0.2-1.1 s a call of 20 ids on 250-500 events even planned at each run, and for hours
    from a cached plan (docs/performance.md, "Plans made on a tiny table"). Run it
    through :func:`planned_now`: a plan made for a tiny table may hash the table's rows
    instead of one TID scan per id.

    A row that another transaction updated after this statement's snapshot has another
    ``ctid`` by then and is left alone (where ``key IN`` re-checked its new version): the
    caller must take a row it asked for and did not get as possibly skipped, not as
    refused."""
    return each_by_key(table, "found", where, key, ids, cols="x.ctid AS at")


# The plan cache mode a transaction of the batch writer runs in (postgres_batch._BEGIN),
# and the one of any other transaction (the session's own).
GENERIC_PLANS, SESSION_PLANS = "force_generic_plan", "DEFAULT"
# What makes the statements after it in the transaction planned at each run
CUSTOM_PLANS = "SET LOCAL plan_cache_mode = force_custom_plan"


async def planned_now(
    c: Conn, restore: str, statement: Callable[[], Awaitable[T]]
) -> T:
    """Run ``statement`` (one using :func:`by_ctid`) on ``c``, inside a transaction,
    planned for its tables as they are now, then set the plan cache mode back to
    ``restore`` (:data:`GENERIC_PLANS`, :data:`SESSION_PLANS`).

    A prepared statement's generic plan is made once (at once in the batch writer, after
    five runs elsewhere) and kept until the table is analyzed: where autovacuum is off,
    for ever. Made while a new store's table held a few rows, the plan of the shape before
    :func:`by_ctid` scanned the app's rows and, for each, looked every id up again by a
    scan of the app's rows: a relay's ``mark_published`` of 500 ids ran for hours on
    8,000 events, a CPU each (docs/performance.md, "Plans made on a tiny table").
    Planned at each run, a :func:`by_ctid` write is a TID scan per id."""
    await c.execute(CUSTOM_PLANS)
    out = await statement()
    await c.execute(f"SET LOCAL plan_cache_mode = {restore}")
    return out


# Column lists in the field order of the records they make (rows unpack into them).
RUN_COLS = (
    "run_id, app, workflow, status, args, created_at, updated_at, correlation_id, "
    "causation_id, idempotency_key, args_hash, parent_run_id, deadline_at, result, error, "
    "cancel_requested, owner, fence, flagged, service, version, epoch"
)


def run_values(run: RunRecord) -> tuple[Any, ...]:
    """``run``'s columns in :data:`RUN_COLS` order, for an INSERT."""
    return (
        run.run_id, run.app, run.workflow, str(run.status), run.args, run.created_at,
        run.updated_at, run.correlation_id, run.causation_id, run.idempotency_key,
        run.args_hash, run.parent_run_id, run.deadline_at, run.result, run.error,
        run.cancel_requested, run.owner, run.fence, run.flagged, run.service, run.version,
        run.epoch,
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
TASK_COLS = (
    "task_id, run_id, key, step, service, args, status, attempts, next_at, owner, fence, "
    "result, error, error_type, created_at, updated_at, correlation_id"
)
T_TASK_COLS = ", ".join("t." + col.strip() for col in TASK_COLS.split(","))
AUDIT_COLS = "seq, time, actor, action, target, data, prev_hash, hash"


def run_row(row: Row) -> RunRecord:
    return RunRecord(row[0], row[1], row[2], RunStatus(row[3]), *row[4:22])


def event_row(row: Row) -> Event[Any]:
    return Event(row[0], codec.loads_event_data(row[1]), *row[2:10])


def dead_letter_row(row: Row, event: Event[Any]) -> DeadLetter:
    """``row`` is (id, grp, event_id, error, attempts, failed_at)."""
    failed = to_datetime(row[5])
    assert failed is not None
    return DeadLetter(row[0], row[1], event, row[3], row[4], failed)


def delivery_row(row: Row, event: Event[Any]) -> Delivery:
    """``row`` is DELIVERY_COLS."""
    return Delivery(row[0], event, row[2], row[3], row[4], row[5], row[6], row[7])


def task_row(row: Row) -> TaskRecord:
    return TaskRecord(*row)


# An attempt its worker excused (paused, not dead: see cantata.engine.pauses) stays
# excused when the new owner's write marking it WorkerLost arrives after the excuse.
KEEP_EXCUSED = (
    "WHERE NOT (COALESCE(attempts.error_type, '') = 'Paused' "
    "AND COALESCE(excluded.error_type, '') = 'WorkerLost' "
    "AND attempts.started_at = excluded.started_at)"
)
EXCUSE_ATTEMPTS = (
    "UPDATE attempts a SET ended_at=u.ended_at, error_type=u.error_type, error=u.error "
    "FROM unnest($3::text[], $4::int4[], $5::float8[], $6::float8[], $7::text[], "
    "$8::text[]) AS u(key, attempt, started_at, ended_at, error_type, error) "
    "WHERE a.app=$1 AND a.run_id=$2 AND a.key=u.key AND a.attempt=u.attempt "
    "AND a.started_at=u.started_at AND (a.ended_at IS NULL OR a.error_type = 'WorkerLost')"
)
# The rows of first attempts a lean writer left out (their history entry says them
# alone: model.records.first_attempt), made for their excuse while the entry still says
# it (one attempt, in progress, begun at the excused attempt's start) and the step has
# no row. Before EXCUSE_ATTEMPTS, which then excuses a row another writer made meanwhile.
EXCUSE_FIRST_ATTEMPTS = (
    f"INSERT INTO attempts (app, run_id, {ATTEMPT_COLS}) "
    "SELECT $1, $2, u.key, 1, h.started_at, u.ended_at, u.error_type, u.error "
    "FROM unnest($3::text[], $4::int4[], $5::float8[], $6::float8[], $7::text[], "
    "$8::text[]) AS u(key, attempt, started_at, ended_at, error_type, error) "
    "JOIN history h ON h.app=$1 AND h.run_id=$2 AND h.key=u.key "
    "WHERE u.attempt=1 AND h.attempts=1 AND h.status='running' "
    "AND h.started_at=u.started_at AND NOT EXISTS (SELECT 1 FROM attempts a "
    "WHERE a.app=$1 AND a.run_id=$2 AND a.key=u.key) ON CONFLICT DO NOTHING"
)
UPSERT_ATTEMPTS = (
    f"INSERT INTO attempts (app, run_id, {ATTEMPT_COLS}) VALUES "
    "($1,$2,$3,$4,$5,$6,$7,$8) ON CONFLICT (app, run_id, key, attempt) DO UPDATE "
    "SET ended_at=excluded.ended_at, error_type=excluded.error_type, error=excluded.error "
    + KEEP_EXCUSED
)


async def upsert_attempts(c: Conn, app: str, run_id: str, attempts: Sequence[Attempt]) -> None:
    if attempts:
        await c.executemany(UPSERT_ATTEMPTS, [
            (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, a.error_type, a.error)
            for a in attempts
        ])


# -- the audit log ----------------------------------------------------------------------

_APPEND_SQL = (
    "WITH h AS ("
    " INSERT INTO audit_head AS h (app, seq, prev_hash, hash)"
    " VALUES ($1, 1, $2::text, encode(sha256(convert_to($2::text || '[1,' || $3::text,"
    "  'UTF8')), 'hex'))"
    " ON CONFLICT (app) DO UPDATE SET seq = h.seq + 1, prev_hash = h.hash,"
    "  hash = encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ',' || $3::text,"
    "  'UTF8')), 'hex')"
    " RETURNING seq, prev_hash, hash)"
    f" INSERT INTO audit (app, {AUDIT_COLS})"
    " SELECT $1, h.seq, $4, $5, $6, $7, $8, h.prev_hash, h.hash FROM h"
)


# A keyed chain: HMAC-SHA256 as sha256(outer || sha256(inner || message)), the key's
# pads ($9, $10) passed with the statement and never stored.
_KEYED_APPEND_SQL = _APPEND_SQL.replace(
    "encode(sha256(convert_to($2::text || '[1,' || $3::text,  'UTF8')), 'hex')",
    "encode(sha256($10::bytea || sha256($9::bytea || convert_to($2::text || '[1,' || "
    "$3::text, 'UTF8'))), 'hex')",
).replace(
    "encode(sha256(convert_to(h.hash || '[' || (h.seq + 1)::text || ',' || $3::text,"
    "  'UTF8')), 'hex')",
    "encode(sha256($10::bytea || sha256($9::bytea || convert_to(h.hash || '[' || "
    "(h.seq + 1)::text || ',' || $3::text, 'UTF8'))), 'hex')",
)
assert _KEYED_APPEND_SQL.count("$10") == 2


async def audit_append(
    c: Conn, app: str, entry: audit.Entry, key: audit.AuditKey | None = None
) -> None:
    """Append one record to ``app``'s chain: call it last in the transaction."""
    await audit_append_many(c, [(app, entry)], {app: key} if key is not None else None)


async def audit_append_many(
    c: Conn,
    entries: Sequence[tuple[str, audit.Entry]],
    keys: Mapping[str, audit.AuditKey] | None = None,
) -> None:
    """Append records to their apps' chains, in one round trip each way: call it last.

    Apps in name order, so that every writer locks the chain heads it needs in
    the same order; each app's records in the order given.

    Raises:
        StoreCorrupt: a record lies past an app's chain head (added outside Cantata).
    """
    try:
        await write_audit(c, entries, keys)
    except asyncpg.UniqueViolationError as exc:
        place = forged_place(exc)
        if place is None:
            raise
        app, seq = place
        raise audit.forged_past_head(app or sorted({a for a, _ in entries})[0], seq) from exc


async def write_audit(
    c: Conn,
    entries: Sequence[tuple[str, audit.Entry]],
    keys: Mapping[str, audit.AuditKey] | None = None,
) -> None:
    """:func:`audit_append_many` with the driver's errors as they are."""
    plain: list[tuple[Any, ...]] = []
    keyed: list[tuple[Any, ...]] = []
    for app, (actor, action, target, data) in sorted(entries, key=lambda e: e[0]):
        now = time.time()
        text = audit.canonical(data)
        row = (app, audit.GENESIS_HASH, audit.tail(now, actor, action, target, text),
               now, actor, action, target, text)
        key = keys.get(app) if keys else None
        if key is None:
            plain.append(row)
        else:
            keyed.append((*row, key.inner, key.outer))
    if plain:
        await c.executemany(_APPEND_SQL, plain)
    if keyed:
        await c.executemany(_KEYED_APPEND_SQL, keyed)


def forged_place(exc: BaseException) -> tuple[str | None, int | None] | None:
    """``(app, seq)`` when ``exc`` says an appended record's place, ``seq`` of ``app``'s
    chain, was taken (a record lies past the head: ``None`` for what the error does
    not say); ``None`` when ``exc`` is another error."""
    if not isinstance(exc, asyncpg.UniqueViolationError) or exc.constraint_name != "audit_pkey":
        return None
    found = re.search(r"\)=\((.*), (\d+)\) already exists", exc.detail or "")
    return (found.group(1), int(found.group(2))) if found else (None, None)


async def unaudited_runs(c: Conn, app: str) -> tuple[list[str], list[str]]:
    """Runs with no ``run.created`` record, and such records whose run row is gone.

    Only the runs of a schema written before the audit log existed are excused: those
    older than the time ``audit_legacy`` holds for the app (migration 0029).
    """
    created = "SELECT target FROM audit WHERE app=$1 AND action='run.created'"
    missing = await c.fetch(
        f"SELECT run_id FROM runs WHERE app=$1 AND run_id NOT IN ({created}) AND created_at >= "
        "coalesce((SELECT before FROM audit_legacy WHERE app=$1), '-Infinity') LIMIT 5",
        app,
    )
    gone = await c.fetch(
        f"{created} AND target NOT IN (SELECT run_id FROM runs WHERE app=$1) LIMIT 5", app
    )
    return [r[0] for r in missing], [r[0] for r in gone]


async def audit_head(c: Conn, app: str) -> tuple[int, str] | None:
    row = await c.fetchrow("SELECT seq, hash FROM audit_head WHERE app=$1", app)
    return None if row is None else (row[0], row[1])


async def audit_records(c: Conn, app: str, after_seq: int, limit: int) -> list[AuditRecord]:
    rows = await c.fetch(
        f"SELECT {AUDIT_COLS} FROM audit WHERE app=$1 AND seq>$2 ORDER BY seq LIMIT $3",
        app, after_seq, limit,
    )
    return [AuditRecord(*r) for r in rows]


# -- tasks ------------------------------------------------------------------------------


async def insert_tasks(
    c: Conn, app: str, correlation_id: str, tasks: Sequence[TaskRecord]
) -> None:
    now = time.time()
    await c.executemany(
        f"INSERT INTO tasks (app, {TASK_COLS}) VALUES "
        f"({', '.join(f'${i}' for i in range(1, 19))}) ON CONFLICT (app, task_id) DO NOTHING",
        [
            (app, t.task_id, t.run_id, t.key, t.step, t.service, t.args, t.status, t.attempts,
             t.next_at, t.owner, t.fence, t.result, t.error, t.error_type,
             t.created_at or now, t.updated_at or now, t.correlation_id or correlation_id)
            for t in tasks
        ],
    )


# A task of a run in one of these statuses is never claimed, but withdrawn
# (TaskStore.claim_tasks).
ENDED = sorted(str(s) for s in FINAL_STATUSES)


async def claim_tasks(
    c: Conn,
    app: str,
    worker_id: str,
    services: Sequence[str],
    now: float,
    stale_before: float,
    limit: int,
    steps: Sequence[str] | None = None,
) -> tuple[list[TaskRecord], list[TaskRecord]]:
    """(the tasks claimed, those of ended runs withdrawn instead): see
    :meth:`~cantata.store.roles.TaskStore.claim_tasks`."""
    # As claim_deliveries: a MATERIALIZED pick with SKIP LOCKED, liveness as a
    # correlated subquery so the READ COMMITTED re-check sees a new owner. ``$7``:
    # the step names the claimer's code has (NULL: any); with them, tasks addressed to
    # no service yet too, which get the service that declared their step. A picked
    # task of an ended run is withdrawn, not taken.
    rows = await c.fetch(
        f"WITH pick AS MATERIALIZED ("
        f" SELECT task_id, EXISTS (SELECT 1 FROM runs r WHERE r.app=t.app"
        f"  AND r.run_id=t.run_id AND r.status = ANY($8::text[])) AS over"
        f" FROM tasks t WHERE t.app=$1 AND t.status='pending'"
        f"  AND t.service = ANY($2::text[]) AND t.next_at <= $3"
        f"  AND ($7::text[] IS NULL OR t.step = ANY($7::text[]))"
        f"  AND (t.owner IS NULL OR (t.owner<>$4 AND NOT EXISTS (SELECT 1 FROM workers w"
        f"   WHERE w.app=t.app AND w.worker_id=t.owner AND w.expires_at >= $5)))"
        f" ORDER BY t.next_at, t.created_at LIMIT $6 FOR UPDATE SKIP LOCKED),"
        f" gone AS (UPDATE tasks t SET status='failed', error=$9::text || t.run_id || $10::text,"
        f"  error_type=$11, owner=NULL, updated_at=$12"
        f"  FROM pick WHERE t.app=$1 AND t.task_id=pick.task_id AND pick.over"
        f"  RETURNING {T_TASK_COLS}),"
        f" took AS (UPDATE tasks t SET owner=$4, fence=t.fence+1, attempts=t.attempts+1,"
        f"  updated_at=$3,"
        f"  service=CASE WHEN t.service<>'' THEN t.service ELSE COALESCE((SELECT d.service"
        f"   FROM declarations d WHERE d.app=t.app AND d.kind='step' AND d.name=t.step"
        f"   AND d.pattern=''), '') END"
        f"  FROM pick WHERE t.app=$1 AND t.task_id=pick.task_id AND NOT pick.over"
        f"  RETURNING {T_TASK_COLS})"
        f" SELECT *, false FROM took UNION ALL SELECT *, true FROM gone",
        app, [*services, UNADDRESSED] if steps is not None else list(services), now, worker_id,
        stale_before, limit, None if steps is None else list(steps), ENDED,
        *ENDED_RUN_ERROR, TASK_WITHDRAWN, time.time(),
    )
    claimed = sorted((task_row(r[:-1]) for r in rows if not r[-1]),
                     key=lambda t: (t.next_at, t.created_at))
    return claimed, sorted((task_row(r[:-1]) for r in rows if r[-1]), key=lambda t: t.task_id)


# -- observability ----------------------------------------------------------------------

def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as ``width`` column lists (the arrays a statement unnests)."""
    if not rows:
        return [[] for _ in range(width)]
    cols = [list(col) for col in zip(*rows, strict=True)]  # strict: rows of one length
    assert len(cols) == width
    return cols
