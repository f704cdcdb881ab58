"""The PostgreSQL store, the hot writes of events, deliveries and tasks, as
group-committed operations of :class:`~cantata.store.postgres_batch.BatchWriter`
(the run writes are in :mod:`cantata.store.postgres_writes`; the same rules hold:
each runs in a transaction shared with other operations and leaves its
notifications and audit records to the :class:`Batch` ``b``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from cantata.model import codec
from cantata.model.event import Event, matches
from cantata.model.records import (
    DELIVERY_PENDING,
    TASK_WITHDRAWN,
    Attempt,
    Delivery,
    TaskRecord,
)
from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store.base import EVENTS, TASKS, Settlement
from cantata.store.postgres_batch import Batch, Refused
from cantata.store.postgres_ops import (
    E_EVENT_COLS,
    EVENT_COLS,
    U_EVENT_COLS,
    event_row,
)
from cantata.store.postgres_pool import Conn, Row

# The events, and a pending delivery per matching group for each one inserted (not
# already stored), in one statement.
_APPEND = (
    f"WITH ins AS (INSERT INTO events (app, {EVENT_COLS}, stored_at) "
    f"SELECT $1::text, {U_EVENT_COLS}, $12::float8 FROM unnest("
    f"{', '.join(f'${i}::text[]' for i in range(2, 12))}) WITH ORDINALITY "
    f"AS u({EVENT_COLS}, ord) ORDER BY ord ON CONFLICT (app, id) DO NOTHING RETURNING id), "
    "fan AS (INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
    "SELECT $1::text, g, e, 'pending', $12::float8 FROM unnest($13::text[], $14::text[]) "
    "AS f(g, e) WHERE f.e IN (SELECT id FROM ins) ON CONFLICT DO NOTHING) "
    "SELECT id FROM ins"
)


async def append(
    c: Conn, b: Batch, app: str, events: Sequence[Event[Any]],
    stored: list[bool] | None = None,
) -> list[int]:
    """Store ``events`` (idempotent by id) and fan out their deliveries; per event, the
    number of groups it went to (0 for one stored before, or repeated in ``events``).
    ``stored``: told, per event, whether it was stored here."""
    if not events:
        return []
    subs = await b.subscriptions(c, app)
    groups: dict[str, list[str]] = {}
    for ev in events:
        if ev.id not in groups:
            groups[ev.id] = sorted({s[0] for s in subs if matches(s[1], ev.type)})
    fan = [(g, event_id) for event_id, gs in groups.items() for g in gs]
    values = [
        (ev.type, codec.dumps_event_data(ev.data, f"data of event {ev.type}"), ev.id, ev.source,
         ev.subject, ev.time, ev.correlation_id, ev.causation_id, ev.traceparent,
         ev.signature)
        for ev in events
    ]
    columns = [list(column) for column in zip(*values, strict=True)]
    inserted = {
        r[0] for r in await c.fetch(
            _APPEND, app, *columns, time.time(), [f[0] for f in fan], [f[1] for f in fan]
        )
    }
    b.notify(app, EVENTS)
    counts: list[int] = []
    for ev in events:
        if stored is not None:
            stored.append(ev.id in inserted)
        if ev.id in inserted:
            inserted.discard(ev.id)  # a repeated id in one call counts once
            counts.append(len(groups[ev.id]))
        else:
            counts.append(0)
    return counts


async def append_many(
    c: Conn, b: Batch, calls: list[tuple[str, Sequence[Event[Any]]]]
) -> list[list[int] | Refused]:
    """:meth:`PostgresStore.append_events` for many callers: one statement per app,
    counting an event id given twice for its first caller, as if applied in turn."""
    by_app: dict[str, list[int]] = {}
    for i, (app, _) in enumerate(calls):
        by_app.setdefault(app, []).append(i)
    out: list[list[int] | Refused] = [[] for _ in calls]
    for app, mine in by_app.items():
        counts = await append(c, b, app, [ev for i in mine for ev in calls[i][1]])
        start = 0
        for i in mine:
            out[i] = counts[start:start + len(calls[i][1])]
            start += len(calls[i][1])
    return out


AppendHeld = tuple[str, Sequence[Event[Any]], str, Sequence[tuple[str, str]]]


async def append_held_many(
    c: Conn, b: Batch, calls: list[AppendHeld]
) -> list[tuple[list[int], list[tuple[str, str]]] | Refused]:
    """:meth:`PostgresStore.append_held` for many callers, in turn: each call's events
    appended, then the deliveries of ``hold`` it created claimed for its worker."""
    out: list[tuple[list[int], list[tuple[str, str]]] | Refused] = []
    for app, events, hold_for, hold in calls:
        counts = await append(c, b, app, events)
        stored = {e.id for e, n in zip(events, counts, strict=True) if n}
        mine = [(g, e) for g, e in hold if e in stored]
        out.append((counts, await _take_holds(c, app, hold_for, mine, time.time())))
    return out


# An operator's append (or one whose caller asks which events it stored): app, events,
# the operator (``None``: nothing audited), and the worker to hold deliveries for with
# the (group, event id) pairs to hold (``None`` and none: an append alone).
Published = tuple[
    str, Sequence[Event[Any]], str | None, str | None, Sequence[tuple[str, str]]]


async def published_many(
    c: Conn, b: Batch, calls: list[Published]
) -> list[tuple[list[int], list[tuple[str, str]], list[bool]] | Refused]:
    """:meth:`PostgresStore.append_events` (and ``append_held``) with an ``actor`` or
    ``stored``, for many callers in turn: each call's events appended, each one it
    stored audited as ``event.published`` by its operator in this transaction (the
    batch's audit records, written at its end: if they fail, nothing of it commits),
    then the deliveries of its ``hold`` claimed; per call, the counts, the pairs held
    and per event whether it stored it. Never one statement (:func:`eligible` leaves
    it out): an operator's publish, or one of an id its caller chose, is rare, and
    what it says takes the transaction's path."""
    out: list[tuple[list[int], list[tuple[str, str]], list[bool]] | Refused] = []
    for app, events, actor, hold_for, hold in calls:
        stored: list[bool] = []
        counts = await append(c, b, app, events, stored)
        if actor is not None:
            for ev, new in zip(events, stored, strict=True):
                if new:
                    b.audit(app, audit.published_entry(actor, ev.id, ev.type))
        held: list[tuple[str, str]] = []
        if hold_for is not None and hold:
            fanned = {e.id for e, n in zip(events, counts, strict=True) if n}
            mine = [(g, e) for g, e in hold if e in fanned]
            held = await _take_holds(c, app, hold_for, mine, time.time())
        out.append((counts, held, stored))
    return out


async def _take_holds(
    c: Conn, app: str, worker_id: str, hold: Sequence[tuple[str, str]], now: float
) -> list[tuple[str, str]]:
    """Claim ``hold``'s deliveries for ``worker_id``: pending, nobody's, no attempt yet
    (the caller passes only deliveries its transaction created)."""
    if not hold:
        return []
    taken = await c.fetch(
        "UPDATE deliveries d SET owner=$1, fence=d.fence+1, attempts=1, updated_at=$2 "
        "FROM unnest($4::text[], $5::text[]) AS h(grp, event_id) WHERE d.app=$3 "
        "AND d.grp=h.grp AND d.event_id=h.event_id AND d.status='pending' "
        "AND d.owner IS NULL AND d.attempts=0 RETURNING d.grp, d.event_id",
        worker_id, now, app, [g for g, _ in hold], [e for _, e in hold],
    )
    return [(r[0], r[1]) for r in taken]


# $7 says which call a row answers.
_CLAIM_DELIVERIES = (
    f"WITH pick AS MATERIALIZED ("
    f" SELECT grp, event_id FROM deliveries d WHERE d.app=$1 AND d.status='pending'"
    f"  AND d.grp = ANY($2::text[]) AND d.next_at <= $3"
    f"  AND (d.owner IS NULL OR (d.owner<>$4 AND NOT EXISTS (SELECT 1 FROM workers w"
    f"   WHERE w.app=d.app AND w.worker_id=d.owner AND w.expires_at >= $5)))"
    f" ORDER BY d.next_at LIMIT $6 FOR UPDATE SKIP LOCKED"
    f"), upd AS ("
    f" UPDATE deliveries d SET owner=$4, fence=d.fence+1, attempts=d.attempts+1,"
    f"  updated_at=$3 FROM pick WHERE d.app=$1 AND d.grp=pick.grp"
    f"  AND d.event_id=pick.event_id"
    f" RETURNING d.grp, d.attempts, d.next_at, d.error, d.fence, d.event_id"
    f") SELECT $7::int4, upd.grp, upd.attempts, upd.next_at, upd.error, upd.fence, "
    f"{E_EVENT_COLS} FROM upd JOIN events e ON e.app=$1 AND e.id=upd.event_id "
    f"ORDER BY upd.next_at, e.seq"
)

Claim = tuple[str, str, Sequence[str], float, float, int]  # app, worker, groups, now, stale, limit


async def claim_deliveries_many(
    c: Conn, b: Batch, calls: list[Claim]
) -> list[list[Delivery] | Refused]:
    """:meth:`PostgresStore.claim_deliveries` for many callers, in one round trip."""
    rows = await c.fetchmany(_CLAIM_DELIVERIES, [
        (app, list(groups), now, worker_id, stale_before, limit, i)
        for i, (app, worker_id, groups, now, stale_before, limit) in enumerate(calls)
    ])
    out: list[list[Delivery] | Refused] = [[] for _ in calls]
    for r in rows:
        claimed = out[r[0]]
        assert isinstance(claimed, list)
        claimed.append(Delivery(
            r[1], event_row(r[6:]), DELIVERY_PENDING, r[2], r[3], r[4], calls[r[0]][3], r[5]
        ))
    return out


def _settle_sql(sets: str, params: int, unsettled: str) -> str:
    # The delivery, locked and changed unless it was settled for good; its owner from
    # before. The last parameter says which call the row answers.
    return (
        "WITH old AS MATERIALIZED (SELECT owner FROM deliveries WHERE app=$1 AND grp=$2 "
        f"AND event_id=$3 AND {unsettled} FOR UPDATE) "
        f"UPDATE deliveries d SET {sets} FROM old "
        f"WHERE d.app=$1 AND d.grp=$2 AND d.event_id=$3 RETURNING ${params}::int4, old.owner"
    )


# What each outcome may change (migration 0026): 'done' anything not done (a dead
# letter's delivery that another copy handled), 'retry' and 'dead' a pending delivery
# only (a dead one stays dead until replayed: no second dead letter, no reopening).
_SETTLE = {
    "done": _settle_sql(
        "status='done', attempts=$4, owner=NULL, error=NULL, updated_at=$5", 6,
        "status<>'done'",
    ),
    "retry": _settle_sql(
        "status='pending', attempts=$4, owner=NULL, error=$5, next_at=$6, updated_at=$7", 8,
        "status='pending'",
    ),
    "dead": _settle_sql(
        "status='dead', attempts=$4, owner=NULL, error=$5, updated_at=$6", 7,
        "status='pending'",
    ),
}

Settle = tuple[str, str, str, Settlement]  # app, group, event_id, settlement


def _settle_args(call: Settle, now: float, i: int) -> tuple[str, tuple[object, ...]]:
    app, group, event_id, s = call
    if s.outcome == "done":
        return "done", (app, group, event_id, s.attempts, now, i)
    if s.outcome == "retry":
        return "retry", (app, group, event_id, s.attempts, s.error, s.retry_at, now, i)
    return "dead", (app, group, event_id, s.attempts, s.error, now, i)


async def settle_many(c: Conn, b: Batch, calls: list[Settle]) -> list[bool | Refused]:
    """:meth:`PostgresStore.settle_delivery` for many callers.

    The updates of each outcome in one round trip (pipelined, one after another),
    then the events of every delivery settled ``done``, in one statement per app.
    """
    now = time.time()
    work = [_settle_args(call, now, i) for i, call in enumerate(calls)]
    rows: dict[int, Row] = {}
    for outcome, sql in _SETTLE.items():
        pipelined = [a for o, a in work if o == outcome]
        if pipelined:
            rows.update((r[0], r) for r in await c.fetchmany(sql, pipelined))
    out: list[bool | Refused] = []
    emitted: dict[str, list[Event[Any]]] = {}
    settled_done: dict[str, list[Settlement]] = {}  # whose events emitted has, in order
    holds: list[Settlement] = []  # with a hold: claimed after the append
    for i, (app, group, event_id, s) in enumerate(calls):
        row = rows.get(i)
        if row is None:  # no such delivery (create it, pending) or it is done
            await c.execute(
                "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                "VALUES ($1,$2,$3,'pending',$4) ON CONFLICT DO NOTHING",
                app, group, event_id, now,
            )
            outcome, args = work[i]
            row = await c.fetchrow(_SETTLE[outcome], *args)
        out.append(row is not None)
        if row is None:
            continue
        owner = row[1]
        b.notify(app, EVENTS)
        if s.outcome == "done":
            emitted.setdefault(app, []).extend(s.events)
            settled_done.setdefault(app, []).append(s)
            if s.hold_for is not None and s.hold:
                holds.append(s)
            b.audit(app, audit.delivery_entry(
                group, event_id, owner, "done", s.attempts, emitted=[e.id for e in s.events]
            ))
        elif s.outcome != "retry":
            dead_letter_id = s.dead_letter_id or codec.new_id()
            await c.execute(
                "INSERT INTO dead_letters (app, id, grp, event_id, error, attempts, failed_at) "
                "VALUES ($1,$2,$3,$4,$5,$6,$7)",
                app, dead_letter_id, group, event_id, s.error or "unknown error", s.attempts,
                now,
            )
            b.audit(app, audit.delivery_entry(
                group, event_id, owner, "dead", s.attempts, error=s.error,
                dead_letter_id=dead_letter_id,
            ))
    stored: set[str] = set()  # the ids this transaction stored
    for app, events in emitted.items():
        if events:
            new: list[bool] = []
            counts = await append(c, b, app, events, new)
            stored.update(e.id for e, n in zip(events, counts, strict=True) if n)
            start = 0  # each settlement's share of the counts, in order
            for s in settled_done[app]:
                s.addressed = counts[start:start + len(s.events)]
                s.stored = new[start:start + len(s.events)]
                start += len(s.events)
    for s in holds:  # claimed in this transaction by the worker that hands them off
        # only deliveries this transaction created: the delivery of an event stored
        # before may be in hand at another worker through a broker copy
        hold = [(g, e) for g, e in s.hold if e in stored]
        if not hold:
            s.held = []
            continue
        app = next(call[0] for call in calls if call[3] is s)
        assert s.hold_for is not None  # holds has only settlements with a worker
        s.held = await _take_holds(c, app, s.hold_for, hold, now)
    return out


# -- tasks ------------------------------------------------------------------------------


async def claim_tasks(
    c: Conn, b: Batch, app: str, worker_id: str, services: Sequence[str],
    now: float, stale_before: float, limit: int, steps: Sequence[str] | None = None,
) -> list[TaskRecord]:
    claimed, withdrawn = await ops.claim_tasks(
        c, app, worker_id, services, now, stale_before, limit, steps)
    if withdrawn:
        b.notify(app, TASKS)
    for t in withdrawn:
        b.audit(app, audit.task_entry(
            t.task_id, worker_id, "withdrawn", t.step, t.service, t.attempts, t.error))
    return claimed


def _finish_sql(sets: str) -> str:
    # The pending task, locked and changed if ``fence`` still owns it; what the
    # attempts and the audit record need from before.
    return (
        "WITH old AS (SELECT run_id, owner, step, service, attempts FROM tasks WHERE app=$1 "
        "AND task_id=$2 AND fence=$3 AND status='pending' FOR UPDATE) "
        f"UPDATE tasks t SET {sets} FROM old WHERE t.app=$1 AND t.task_id=$2 "
        "RETURNING old.run_id, old.owner, old.step, old.service, old.attempts"
    )


_FINISH = {
    "done": _finish_sql(
        "status='done', result=$4, error=NULL, error_type=NULL, owner=NULL, updated_at=$5"
    ),
    "failed": _finish_sql(
        "status='failed', error=$4, error_type=$5, owner=NULL, updated_at=$6"
    ),
    "retry": _finish_sql("owner=NULL, next_at=$4, error=$5, error_type=$6, updated_at=$7"),
}
# The same, the task's attempts set to the last parameter (finish_task's ``count``).
_FINISH_COUNTED = {
    "done": _finish_sql(
        "status='done', result=$4, error=NULL, error_type=NULL, owner=NULL, updated_at=$5, "
        "attempts=$6"
    ),
    "failed": _finish_sql(
        "status='failed', error=$4, error_type=$5, owner=NULL, updated_at=$6, attempts=$7"
    ),
    "retry": _finish_sql(
        "owner=NULL, next_at=$4, error=$5, error_type=$6, updated_at=$7, attempts=$8"
    ),
}


async def finish_task(
    c: Conn, b: Batch, app: str, task_id: str, fence: int, outcome: str,
    attempts: Sequence[Attempt], result: str | None, error: str | None,
    error_type: str | None, next_at: float, count: int | None = None,
) -> bool:
    """:meth:`PostgresStore.finish_task` (``outcome`` is checked by the caller)."""
    now = time.time()
    args: tuple[object, ...]
    if outcome == "done":
        args = (result, now)
    elif outcome == "failed":
        args = (error, error_type, now)
    else:
        args = (next_at, error, error_type, now)
    sql = _FINISH[outcome] if count is None else _FINISH_COUNTED[outcome]
    if count is not None:
        args = (*args, count)
    row = await c.fetchrow(sql, app, task_id, fence, *args)
    if row is None:
        return False
    run_id, owner, step, service, n = row
    if count is not None:
        n = count
    await ops.upsert_attempts(c, app, run_id, attempts)
    b.notify(app, TASKS)
    if outcome != "retry":
        b.audit(app, audit.task_entry(task_id, owner, outcome, step, service, n, error))
    return True


async def start_task_attempt(
    c: Conn, b: Batch, app: str, task_id: str, fence: int, attempts: Sequence[Attempt]
) -> bool:
    """:meth:`PostgresStore.start_task_attempt`: the task row locked while the attempts
    are written, so a claim with a newer fence cannot slip in between."""
    run_id = await c.fetchval(
        "SELECT run_id FROM tasks WHERE app=$1 AND task_id=$2 AND fence=$3 "
        "AND status='pending' FOR UPDATE",
        app, task_id, fence,
    )
    if run_id is None:
        return False
    await ops.upsert_attempts(c, app, run_id, attempts)
    return True


async def withdraw_tasks(
    c: Conn, b: Batch, app: str, run_id: str, stale_before: float, error: str,
    actor: str | None, task_ids: Sequence[str] | None,
) -> list[str]:
    """:meth:`PostgresStore.withdraw_tasks`: the tasks no live worker holds, locked
    (a claimer holding one's lock is skipped: it takes the task first)."""
    rows = await c.fetch(
        "WITH pick AS MATERIALIZED ("
        " SELECT task_id FROM tasks t WHERE t.app=$1 AND t.run_id=$2 AND t.status='pending'"
        "  AND ($3::text[] IS NULL OR t.task_id = ANY($3::text[]))"
        "  AND (t.owner IS NULL OR NOT EXISTS (SELECT 1 FROM workers w"
        "   WHERE w.app=t.app AND w.worker_id=t.owner AND w.expires_at >= $4))"
        "  FOR UPDATE SKIP LOCKED)"
        " UPDATE tasks t SET status='failed', error=$5, error_type=$6, owner=NULL,"
        " updated_at=$7 FROM pick WHERE t.app=$1 AND t.task_id=pick.task_id"
        " RETURNING t.task_id, t.step, t.service, t.attempts",
        app, run_id, None if task_ids is None else list(task_ids), stale_before, error,
        TASK_WITHDRAWN, time.time(),
    )
    if rows:
        b.notify(app, TASKS)
    for task_id, step, service, n in sorted(tuple(r) for r in rows):
        b.audit(app, audit.task_entry(task_id, actor, "withdrawn", step, service, n, error))
    return sorted(r[0] for r in rows)


# The events asked for, each by its key whatever the statistics, then updated by its
# ctid (postgres_ops.by_ctid). A row another transaction updated meanwhile is skipped:
# by a relay or a redrive of its own, or a copy of the same outside event stored at
# once elsewhere. An event left unmarked is published again (at least once), never lost.
_EVENTS_ASKED = ops.by_ctid("events", "x.app=$1", "id", "$2")


async def mark_published(c: Conn, b: Batch, app: str, event_ids: Sequence[str]) -> None:
    # In key order: the relays of two processes mark many of the same events (each
    # publishes what the other offered and has not marked yet), and two marks that
    # locked the rows in their own orders deadlocked (PostgreSQL ended one after its
    # 1 s deadlock_timeout; docs/performance.md, "The by-key writes without IN").
    await ops.planned_now(c, ops.GENERIC_PLANS, lambda: c.execute(
        f"UPDATE events t SET published=true FROM {_EVENTS_ASKED} WHERE t.ctid=found.at",
        app, sorted(set(event_ids)),
    ))


async def append_external(
    c: Conn, b: Batch, app: str, events: Sequence[Event[Any]]
) -> list[int]:
    """Store events that came from the broker, marked published and external."""
    counts = await append(c, b, app, events)
    await ops.planned_now(c, ops.GENERIC_PLANS, lambda: c.execute(
        f"UPDATE events t SET published=true, external=true FROM {_EVENTS_ASKED} "
        "WHERE t.ctid=found.at AND NOT t.published",
        app, [e.id for e in events],
    ))
    return counts


async def redrive_events(
    c: Conn, b: Batch, app: str, stored_before: float, limit: int
) -> list[Event[Any]]:
    """Hand published events some group still has pending back to the outbox."""
    rows = await c.fetch(
        "UPDATE events SET published=false WHERE app=$1 AND seq IN ("
        " SELECT seq FROM events WHERE app=$1 AND published AND NOT external"
        " AND stored_at < $2 AND id IN (SELECT event_id FROM deliveries"
        " WHERE app=$1 AND status='pending') ORDER BY seq LIMIT $3)"
        f" RETURNING seq, {EVENT_COLS}",
        app, stored_before, limit,
    )
    b.notify(app, EVENTS)
    return [ops.event_row(tuple(r)[1:]) for r in sorted(rows, key=lambda r: r[0])]


# -- one statement, without BEGIN or COMMIT (see postgres_onetrip) ----------------------

_SETTLE_PARAMS = 41
_SETTLE_CALL = (
    "SELECT * FROM "
    f"cantata_settle({', '.join(f'${i}' for i in range(1, _SETTLE_PARAMS + 1))})"
)


class NotHere(Exception):
    """A batch :func:`statement` cannot prepare (its events' data does not
    encode, say): the batch runs as a transaction, which names the one that fails."""


def _settle_record(
    call: Settle, dead_letter_id: str | None, now: float, now_json: str
) -> tuple[float | None, str | None, str | None, str | None, str | None]:
    """Time, its JSON, action, data and the tail after the actor of a settlement's
    audit record (``None`` each: no record)."""
    _, group, event_id, s = call
    if s.outcome == "done":
        entry = audit.delivery_entry(
            group, event_id, None, "done", s.attempts, emitted=[e.id for e in s.events]
        )
    elif s.outcome == "dead":
        entry = audit.delivery_entry(
            group, event_id, None, "dead", s.attempts, error=s.error,
            dead_letter_id=dead_letter_id,
        )
    else:
        return None, None, None, None, None
    _, action, target, data = entry
    text = audit.canonical(data)
    # canonical([time, actor, action, target, text])[1:] after the actor, as tail() spells it
    rest = audit.tail(now, "", action, target, text)[len(now_json) + 3:]
    return now, now_json, action, text, rest


Append = tuple[str, Sequence[Event[Any]]]  # app, events


def _event_row(i: int, ev: Event[Any]) -> tuple[Any, ...]:
    try:
        data = codec.dumps_event_data(ev.data, f"data of event {ev.type}")
    except Exception as exc:
        raise NotHere(str(exc)) from exc
    return (
        i, ev.type, data, ev.id, ev.source, ev.subject, ev.time, ev.correlation_id,
        ev.causation_id, ev.traceparent, ev.signature,
    )


async def statement(
    c: Conn, calls: Sequence[Settle], keys: Mapping[str, audit.AuditKey],
    claims: Sequence[Claim] = (), appends: Sequence[Append] = (),
    append_holds: Sequence[tuple[str, Sequence[tuple[str, str]]] | None] = (),
) -> tuple[list[bool], list[list[Delivery]], list[list[int]], list[list[tuple[str, str]]]]:
    """:func:`settle_many` and the audit append of its transaction, then
    :func:`append_many` for ``appends`` and :func:`claim_deliveries_many` for
    ``claims``, as one call of ``cantata_settle`` (migrations 0014, 0015): one round
    trip, one WAL flush. ``append_holds`` (if given, one per append: its worker and the
    deliveries to hold for it, or ``None``) makes those appends :func:`append_held_many`.
    Their results, in their order; the last, per append, the deliveries it held.

    Raises:
        NotHere: the batch must run as a transaction instead.
        asyncpg.PostgresError: the statement failed (nothing was written); SQLSTATE
            ``CN001`` when the batch must run as a transaction instead.
    """
    now = time.time()
    now_json = audit.canonical(now)
    srows: list[tuple[Any, ...]] = []
    erows: list[tuple[Any, ...]] = []
    hrows: list[tuple[Any, ...]] = []
    for i, call in enumerate(calls):
        app, group, event_id, s = call
        dead_letter_id = None
        if s.outcome == "dead":
            dead_letter_id = s.dead_letter_id or codec.new_id()
        srows.append((
            app, group, event_id, str(s.outcome), s.attempts, s.error, s.retry_at,
            dead_letter_id, *_settle_record(call, dead_letter_id, now, now_json),
        ))
        if s.outcome != "done":
            continue
        erows.extend(_event_row(i, ev) for ev in s.events)
        if s.hold_for is not None and s.hold:
            hrows.extend((i, s.hold_for, g, e) for g, e in s.hold)
    for k, (_, events) in enumerate(appends):  # after the settlements' indexes
        erows.extend(_event_row(len(calls) + k, ev) for ev in events)
        held_for = append_holds[k] if append_holds else None
        if held_for is not None and held_for[1]:
            hrows.extend((len(calls) + k, held_for[0], g, e) for g, e in held_for[1])
    cols = _columns(srows, 13)
    key_apps = sorted({call[0] for call in calls if call[0] in keys})
    rows = await c.fetch(
        _SETTLE_CALL,
        *cols[:8], now, *cols[8:],
        *_columns(erows, 11), *_columns(hrows, 4),
        key_apps, [keys[a].inner for a in key_apps], [keys[a].outer for a in key_apps],
        audit.GENESIS_HASH,
        *_columns([(a, w, now_c, stale, limit) for a, w, _, now_c, stale, limit in claims], 5),
        *_columns([(k, g) for k, claim in enumerate(claims) for g in claim[2]], 2),
        [app for app, _ in appends],
    )
    applied: set[int] = set()
    claimed: list[list[Delivery]] = [[] for _ in claims]
    held: dict[int, list[tuple[str, str]]] = {}
    fanned: dict[str, int] = {}  # events inserted: how many groups each went to
    for r in rows:
        kind = r[0]
        if kind == "s":
            applied.add(r[1])
        elif kind == "c":
            claimed[r[1]].append(Delivery(
                r[2], event_row(r[8:18]), DELIVERY_PENDING, r[4], r[5], r[6], claims[r[1]][3],
                r[7],
            ))
        elif kind == "h":
            held.setdefault(r[1], []).append((r[2], r[3]))
        else:
            fanned[r[3]] = r[4]
    for i, (_, _, _, s) in enumerate(calls):
        if i in applied and s.outcome == "done":
            s.addressed, s.stored = _fanned(fanned, s.events)
            if s.hold_for is not None and s.hold:
                s.held = held.get(i, [])
    counts: list[list[int]] = []
    for _, events in appends:  # an id given twice counts for its first caller
        counts.append([fanned.pop(ev.id, 0) for ev in events])
    holds = [held.get(len(calls) + k, []) for k in range(len(appends))]
    return [i in applied for i in range(len(calls))], claimed, counts, holds


def _fanned(fanned: dict[str, int], events: Sequence[Event[Any]]) -> tuple[list[int], list[bool]]:
    """Per event of ``events``, the groups it went to and whether it was stored, from
    ``fanned`` (the events a statement inserted: how many groups each went to), taking
    each id once: an id given twice counts for its first occurrence."""
    counts: list[int] = []
    stored: list[bool] = []
    for ev in events:
        n = fanned.pop(ev.id, None)
        counts.append(n or 0)
        stored.append(n is not None)
    return counts, stored


def _columns(rows: list[tuple[Any, ...]], n: int) -> list[list[Any]]:
    """``rows`` as ``n`` arrays, one per column."""
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[] for _ in range(n)]


async def claim_statement(c: Conn, calls: list[Claim]) -> list[list[Delivery]]:
    """:func:`claim_deliveries_many` without BEGIN or COMMIT: the claims pipelined in one
    round trip, one implicit transaction (all of them or none)."""
    out = await claim_deliveries_many(c, Batch(), calls)
    return [o for o in out if not isinstance(o, Refused)]


# -- the lean path: a batch of one settlement or one append (migration 0020) -----------

# Whether a batch of one settlement or one append of events takes the lean function
# of migration 0020 (scalar parameters) instead of cantata_settle (False: for
# bench/pg_breakdown.py's A/B and the tests that compare the two).
LEAN = True
_SETTLE_ONE = f"SELECT * FROM cantata_settle_one({', '.join(f'${i}' for i in range(1, 31))})"
# Whether a lean batch of at most one event and at most one delivery of it to hold
# takes cantata_settle_hop (migration 0042: the same parameters as scalars, no arrays
# to decode or subscript) instead of cantata_settle_one (False: for the tests and
# bench/pg_breakdown.py's A/B).
HOP = True
_SETTLE_HOP = f"SELECT * FROM cantata_settle_hop({', '.join(f'${i}' for i in range(1, 31))})"
_NO_EVENT = (None,) * 10  # cantata_settle_hop's event columns: no event
_NO_SETTLEMENT = (None,) * 12  # an append's s_grp .. s_rest (s_now apart)


def lean(shares: Sequence[tuple[Any, Any]]) -> bool:
    """Whether an :func:`eligible` batch takes the lean path: one share, a settlement
    or an append (claims alone are pipelined, not a call)."""
    return len(shares) == 1 and shares[0][0] is not claim_deliveries_many


async def _write_lean(
    c: Conn, many: Any, arg: Any, keys: Mapping[str, audit.AuditKey]
) -> list[Any]:
    """:func:`write` for a batch :func:`lean` takes: one call of ``cantata_settle_hop``
    (at most one event, at most one delivery of it to hold: :data:`HOP`) or of
    ``cantata_settle_one``, with the results :func:`statement` gives that batch."""
    now = time.time()
    events: Sequence[Event[Any]]
    hold_for: str | None
    hold: Sequence[tuple[str, str]]
    if many is settle_many:
        app, group, event_id, s = arg
        dead_letter_id = None
        if s.outcome == "dead":
            dead_letter_id = s.dead_letter_id or codec.new_id()
        done = s.outcome == "done"
        events = s.events if done else []
        with_hold = done and s.hold_for is not None and bool(s.hold)
        hold_for, hold = (s.hold_for, s.hold) if with_hold else (None, [])
        record = _settle_record(arg, dead_letter_id, now, audit.canonical(now))
        head: tuple[Any, ...] = (
            app, group, event_id, str(s.outcome), s.attempts, s.error, s.retry_at,
            dead_letter_id, now, *record,
        )
    else:
        app, events = arg[0], arg[1]
        hold_for, hold = (arg[2], arg[3]) if many is append_held_many else (None, [])
        head = (app, *_NO_SETTLEMENT[:7], now, *_NO_SETTLEMENT[7:])
    key = keys.get(app)
    pads = (None if key is None else key.inner, None if key is None else key.outer)
    if HOP and len(events) <= 1 and (not hold or (
            len(hold) == 1 and len(events) == 1 and hold[0][1] == events[0].id)):
        rows = await c.fetch(
            _SETTLE_HOP, *head, *(_event_row(0, events[0])[1:] if events else _NO_EVENT),
            hold_for if hold else None, *(hold[0] if hold else (None, None)), *pads,
            audit.GENESIS_HASH,
        )
    else:
        rows = await c.fetch(
            _SETTLE_ONE, *head, *_columns([_event_row(0, ev)[1:] for ev in events], 10),
            hold_for if hold else None, [g for g, _ in hold], [e for _, e in hold], *pads,
            audit.GENESIS_HASH,
        )
    settled = False
    fanned: dict[str, int] = {}  # events inserted: how many groups each went to
    held: list[tuple[str, str]] = []
    for r in rows:
        if r[0] == "s":
            settled = True
        elif r[0] == "e":
            fanned[r[2]] = r[3]
        else:
            held.append((r[1], r[2]))
    counts, stored = _fanned(fanned, events)  # an id given twice counts once
    if many is settle_many:
        if settled and s.outcome == "done":
            s.addressed, s.stored = counts, stored
            if with_hold:
                s.held = held
        return [settled]
    return [counts if many is append_many else (counts, held)]


def eligible(shares: Sequence[tuple[Any, Any]]) -> bool:
    """Whether ``shares`` (``(many, arg)`` each) are settlements and claims of
    deliveries and appends of events only: :func:`write` sends them as one statement."""
    return bool(shares) and all(many in _ONE for many, _ in shares)


async def write(
    c: Conn, shares: Sequence[tuple[Any, Any]], keys: Mapping[str, audit.AuditKey]
) -> list[Any]:
    """Apply ``shares`` (see :func:`eligible`) in one statement; one result per share.

    Claims alone are pipelined (one implicit transaction); a batch of one settlement
    or append is one call of ``cantata_settle_one`` (migration 0020, see :func:`lean`);
    anything else is one call of ``cantata_settle``.
    """
    if LEAN and lean(shares):
        return await _write_lean(c, *shares[0], keys)
    settles = [arg for many, arg in shares if many is settle_many]
    claims = [arg for many, arg in shares if many is claim_deliveries_many]
    appends: list[Append] = []
    append_holds: list[tuple[str, Sequence[tuple[str, str]]] | None] = []
    for many, arg in shares:
        if many is append_many:
            appends.append(arg)
            append_holds.append(None)
        elif many is append_held_many:
            appends.append((arg[0], arg[1]))
            append_holds.append((arg[2], arg[3]))
    if settles or appends:
        settled, claimed, counts, holds = await statement(
            c, settles, keys, claims, appends, append_holds
        )
    else:
        settled, claimed, counts, holds = [], await claim_statement(c, claims), [], []
    appended = iter(zip(counts, holds, strict=True))
    outs: dict[Any, Any] = {settle_many: iter(settled), claim_deliveries_many: iter(claimed)}
    out: list[Any] = []
    for many, _ in shares:
        if many is append_many:
            out.append(next(appended)[0])
        elif many is append_held_many:
            out.append(next(appended))
        else:
            out.append(next(outs[many]))
    return out


_ONE = (settle_many, claim_deliveries_many, append_many, append_held_many)
