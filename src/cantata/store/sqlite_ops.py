"""The SQLite store, part two: rows, settling deliveries, tasks, the audit log and
observability queries.

Plain functions of a :class:`sqlite3.Connection`, run by
:class:`~cantata.store.sqlite.SQLiteStore` in its connection thread (writes inside
its group-committed transaction, where the one writer makes the audit chain safe).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from cantata.errors import DeadLetterNotFound
from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import (
    DELIVERY_DONE,
    TASK_PENDING,
    Attempt,
    AuditRecord,
    DeadLetter,
    Delivery,
    HistoryEntry,
    RunRecord,
    TaskRecord,
    to_datetime,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.base import Settlement, TraceRecords
from cantata.store.common import first_per_run
from cantata.store.sqlite_thread import TxConnection

LIVE_SQL = "('pending', 'running', 'compensating')"
# A run waiting in a queue begins through claim_queued_runs, not claim_runs (unless
# it is to be cancelled: then any worker may take it and end it).
WAITING_IN_QUEUE = (
    "(r.cancel_requested=1 OR NOT EXISTS (SELECT 1 FROM queue_runs q WHERE q.app=r.app "
    "AND q.run_id=r.run_id AND q.began_at IS NULL))"
)

RUN_COLS = (
    "app, run_id, workflow, status, args, result, error, idempotency_key, args_hash, "
    "correlation_id, causation_id, parent_run_id, service, created_at, updated_at, "
    "deadline_at, cancel_requested, owner, fence, flagged, version, epoch"
)
HISTORY_COLS = (
    "key, kind, name, status, seq, result, error, error_type, attempts, started_at, "
    "ended_at, wake_at, detail"
)
EVENT_COLS = (
    "id, type, source, subject, time, data, correlation_id, causation_id, traceparent, signature"
)
E_EVENT_COLS = ", ".join("e." + col.strip() for col in EVENT_COLS.split(","))
# In TaskRecord field order (rows unpack into it).
TASK_COLS = (
    "task_id, run_id, key, step, service, args, status, attempts, next_at, owner, fence, "
    "result, error, error_type, created_at, updated_at, correlation_id"
)
AUDIT_COLS = "seq, time, actor, action, target, data, prev_hash, hash"

Row = sqlite3.Row | tuple[Any, ...]


# -- rows ------------------------------------------------------------------------------


def run_row(row: Row) -> RunRecord:
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
        version=row[20],
        epoch=row[21],
    )


def entry_row(row: Row) -> HistoryEntry:
    return HistoryEntry(*row)


def event_row(row: Row) -> Event[Any]:
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


def dead_letter_row(row: Row) -> DeadLetter:
    """``row`` is (id, grp, event_id, error, attempts, failed_at, *EVENT_COLS)."""
    failed = to_datetime(row[5])
    assert failed is not None
    return DeadLetter(
        id=row[0], group=row[1], event=event_row(row[6:]), error=row[3], attempts=row[4],
        failed_at=failed,
    )


def task_row(row: Row) -> TaskRecord:
    return TaskRecord(*row)


def apps(c: sqlite3.Connection) -> list[str]:
    """App names in runs, events, declarations, workers and audit heads.

    The big tables are read with a skip scan (one index probe per app).
    """
    rows = c.execute(
        "WITH RECURSIVE r(app) AS (SELECT min(app) FROM runs UNION ALL "
        " SELECT (SELECT min(app) FROM runs WHERE app > r.app) FROM r WHERE r.app IS NOT NULL),"
        " e(app) AS (SELECT min(app) FROM events UNION ALL "
        " SELECT (SELECT min(app) FROM events WHERE app > e.app) FROM e WHERE e.app IS NOT NULL)"
        " SELECT app FROM r UNION SELECT app FROM e UNION SELECT app FROM declarations "
        " UNION SELECT app FROM workers UNION SELECT app FROM audit_head"
    ).fetchall()
    return sorted(r[0] for r in rows if r[0] is not None)


def upsert_attempts(
    c: sqlite3.Connection, app: str, run_id: str, attempts: Sequence[Attempt]
) -> None:
    if attempts:
        c.executemany(
            "INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
            "ended_at=excluded.ended_at, error_type=excluded.error_type, error=excluded.error",
            [
                (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, a.error_type, a.error)
                for a in attempts
            ],
        )


# -- deliveries and dead letters ---------------------------------------------------------


def settle_delivery(
    c: sqlite3.Connection,
    app: str,
    group: str,
    event_id: str,
    s: Settlement,
    append: Callable[[sqlite3.Connection, str, Sequence[Event[Any]]], list[int]],
) -> bool:
    """:meth:`SQLiteStore.settle_delivery`; ``append`` appends emitted events."""
    now = time.time()
    row = c.execute(
        "SELECT status, owner FROM deliveries WHERE app=? AND grp=? AND event_id=?",
        (app, group, event_id),
    ).fetchone()
    owner = None if row is None else row[1]
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
            append(c, app, s.events)
        audit_append(c, app, audit.delivery_entry(
            group, event_id, owner, "done", s.attempts, emitted=[e.id for e in s.events]
        ))
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
        dead_letter_id = s.dead_letter_id or codec.new_id()
        c.execute(
            "INSERT INTO dead_letters VALUES (?,?,?,?,?,?,?)",
            (app, dead_letter_id, group, event_id, s.error or "unknown error",
             s.attempts, now),
        )
        audit_append(c, app, audit.delivery_entry(
            group, event_id, owner, "dead", s.attempts, error=s.error,
            dead_letter_id=dead_letter_id,
        ))
    return True


def replay_dead_letter(
    c: sqlite3.Connection, app: str, dead_letter_id: str, now: float, actor: str
) -> DeadLetter:
    """:meth:`SQLiteStore.replay_dead_letter`."""
    row = c.execute(
        f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
        f"{E_EVENT_COLS} "
        "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
        "WHERE d.app=? AND d.id=?",
        (app, dead_letter_id),
    ).fetchone()
    if row is None:
        raise DeadLetterNotFound(
            f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
            "`cantata dlq list`"
        )
    dl = dead_letter_row(row)
    c.execute("DELETE FROM dead_letters WHERE app=? AND id=?", (app, dead_letter_id))
    c.execute(
        "UPDATE deliveries SET status='pending', attempts=0, next_at=?, owner=NULL, "
        "error=NULL, updated_at=? WHERE app=? AND grp=? AND event_id=?",
        (now, now, app, dl.group, dl.event.id),
    )
    audit_append(
        c, app, audit.replay_entry(dl.group, dl.event.id, dead_letter_id, actor)
    )
    return dl


# -- the audit log ----------------------------------------------------------------------


def audit_append(c: sqlite3.Connection, app: str, entry: audit.Entry) -> None:
    """Append one record to ``app``'s chain (the caller's transaction is the only writer).

    On a :class:`TxConnection` the chain head advances in the transaction's state and
    its row is written once before COMMIT; on a plain connection, here.
    """
    actor, action, target, data = entry
    heads = c.audit_heads if isinstance(c, TxConnection) else None
    cached = None if heads is None else heads.get(app)
    if cached is not None:
        head: tuple[int, str] | None = (cached[0], cached[2])
    else:
        row = c.execute("SELECT seq, hash FROM audit_head WHERE app=?", (app,)).fetchone()
        head = None if row is None else (row[0], row[1])
    keys = c.audit_keys if isinstance(c, TxConnection) else {}
    rec = audit.next_record(head, time.time(), actor, action, target, data, keys.get(app))
    c.execute(
        f"INSERT INTO audit (app, {AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
        (app, rec.seq, rec.time, rec.actor, rec.action, rec.target, rec.data, rec.prev_hash,
         rec.hash),
    )
    if heads is not None:
        heads[app] = (rec.seq, rec.prev_hash, rec.hash)
        return
    c.execute(
        "INSERT INTO audit_head VALUES (?,?,?,?) ON CONFLICT (app) DO UPDATE SET "
        "seq=excluded.seq, prev_hash=excluded.prev_hash, hash=excluded.hash",
        (app, rec.seq, rec.prev_hash, rec.hash),
    )


def unaudited_runs(
    c: sqlite3.Connection, app: str, strict: bool
) -> tuple[list[str], list[str]]:
    """Runs with no ``run.created`` record, and such records whose run row is gone.

    Runs older than the log's first record predate the audit log (an upgraded store),
    unless ``strict`` (a keyed chain): then an empty log with runs is reported too.
    """
    created = "SELECT target FROM audit WHERE app=? AND action='run.created'"
    missing = c.execute(
        f"SELECT run_id FROM runs WHERE app=? AND run_id NOT IN ({created}) AND created_at >= "
        "coalesce((SELECT min(time) FROM audit WHERE app=?), ?) LIMIT 5",
        (app, app, app, float("-inf") if strict else float("inf")),
    ).fetchall()
    gone = c.execute(
        f"{created} AND target NOT IN (SELECT run_id FROM runs WHERE app=?) LIMIT 5",
        (app, app),
    ).fetchall()
    return [r[0] for r in missing], [r[0] for r in gone]


def audit_head(c: sqlite3.Connection, app: str) -> tuple[int, str] | None:
    row = c.execute("SELECT seq, hash FROM audit_head WHERE app=?", (app,)).fetchone()
    return None if row is None else (row[0], row[1])


def audit_records(
    c: sqlite3.Connection, app: str, after_seq: int, limit: int
) -> list[AuditRecord]:
    rows = c.execute(
        f"SELECT {AUDIT_COLS} FROM audit WHERE app=? AND seq>? ORDER BY seq LIMIT ?",
        (app, after_seq, limit),
    ).fetchall()
    return [AuditRecord(*r) for r in rows]


# -- tasks ------------------------------------------------------------------------------


def insert_tasks(
    c: sqlite3.Connection, app: str, correlation_id: str, tasks: Sequence[TaskRecord]
) -> None:
    now = time.time()
    c.executemany(
        f"INSERT INTO tasks (app, {TASK_COLS}) VALUES ({','.join('?' * 18)}) "
        "ON CONFLICT (app, task_id) DO NOTHING",
        [
            (app, t.task_id, t.run_id, t.key, t.step, t.service, t.args, t.status, t.attempts,
             t.next_at, t.owner, t.fence, t.result, t.error, t.error_type,
             t.created_at or now, t.updated_at or now, t.correlation_id or correlation_id)
            for t in tasks
        ],
    )


def claim_tasks(
    c: sqlite3.Connection,
    app: str,
    worker_id: str,
    services: Sequence[str],
    now: float,
    stale_before: float,
    limit: int,
) -> list[TaskRecord]:
    marks = ",".join("?" * len(services))
    rows = c.execute(
        f"UPDATE tasks SET owner=?, fence=fence+1, attempts=attempts+1, updated_at=? "
        f"WHERE app=? AND task_id IN ("
        f" SELECT t.task_id FROM tasks t INDEXED BY tasks_due LEFT JOIN workers w"
        f"  ON w.app=t.app AND w.worker_id=t.owner"
        f" WHERE t.app=? AND t.status='pending' AND t.service IN ({marks}) AND t.next_at<=?"
        f"  AND (t.owner IS NULL OR (t.owner<>? AND"
        f"   (w.worker_id IS NULL OR w.heartbeat_at < ?)))"
        f" ORDER BY t.next_at, t.created_at LIMIT ?) RETURNING {TASK_COLS}",
        (worker_id, now, app, app, *services, now, worker_id, stale_before, limit),
    ).fetchall()
    return sorted((task_row(r) for r in rows), key=lambda t: (t.next_at, t.created_at))


def finish_task(
    c: sqlite3.Connection,
    app: str,
    task_id: str,
    fence: int,
    outcome: str,
    attempts: Sequence[Attempt],
    result: str | None,
    error: str | None,
    error_type: str | None,
    next_at: float,
) -> bool:
    row = c.execute(
        "SELECT run_id, fence, status, owner, step, service, attempts FROM tasks "
        "WHERE app=? AND task_id=?",
        (app, task_id),
    ).fetchone()
    if row is None or row[1] != fence or row[2] != TASK_PENDING:
        return False
    run_id, _, _, owner, step, service, n = row
    upsert_attempts(c, app, run_id, attempts)
    now = time.time()
    key = (app, task_id)
    if outcome == "done":
        c.execute(
            "UPDATE tasks SET status='done', result=?, error=NULL, error_type=NULL, owner=NULL, "
            "updated_at=? WHERE app=? AND task_id=?",
            (result, now, *key),
        )
    elif outcome == "failed":
        c.execute(
            "UPDATE tasks SET status='failed', error=?, error_type=?, owner=NULL, updated_at=? "
            "WHERE app=? AND task_id=?",
            (error, error_type, now, *key),
        )
    else:
        c.execute(
            "UPDATE tasks SET owner=NULL, next_at=?, error=?, error_type=?, updated_at=? "
            "WHERE app=? AND task_id=?",
            (next_at, error, error_type, now, *key),
        )
        return True
    audit_append(c, app, audit.task_entry(task_id, owner, outcome, step, service, n, error))
    return True


# -- observability ----------------------------------------------------------------------


def trace_records(
    c: sqlite3.Connection, app: str, correlation_id: str, limit: int
) -> TraceRecords:
    """:meth:`~cantata.store.roles.TraceStore.trace_records`: one query per part (the
    runs' ids and the events' ids go in as one JSON array each)."""
    runs = [
        run_row(r)
        for r in c.execute(
            f"SELECT {RUN_COLS} FROM runs WHERE app=? AND correlation_id=? "
            "ORDER BY created_at, run_id LIMIT ?",
            (app, correlation_id, limit),
        )
    ]
    ids = [r.run_id for r in runs]
    of_runs = "run_id IN (SELECT value FROM json_each(?))"
    run_ids = codec.dumps(ids, "run ids")
    entries = first_per_run(
        ((r[0], entry_row(r[1:])) for r in c.execute(
            f"SELECT run_id, {HISTORY_COLS} FROM history WHERE app=? AND {of_runs} "
            "ORDER BY seq",
            (app, run_ids),
        )),
        ids, limit,
    )
    attempts = first_per_run(
        ((r[0], Attempt(*r[1:])) for r in c.execute(
            "SELECT run_id, key, attempt, started_at, ended_at, error_type, error FROM "
            f"attempts WHERE app=? AND {of_runs} ORDER BY started_at, attempt, key",
            (app, run_ids),
        )),
        ids, limit,
    )
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
            "FROM deliveries INDEXED BY deliveries_event WHERE app=? "
            "AND event_id IN (SELECT value FROM json_each(?)) "
            "ORDER BY updated_at, grp, event_id",
            (app, event_ids),
        )
    ]
    dls: list[DeadLetter] = []
    for r in c.execute(
        "SELECT id, grp, event_id, error, attempts, failed_at FROM dead_letters "
        "WHERE app=? AND event_id IN (SELECT value FROM json_each(?)) ORDER BY failed_at, id",
        (app, event_ids),
    ):
        failed = to_datetime(r[5])
        assert failed is not None
        dls.append(DeadLetter(r[0], r[1], by_id[r[2]], r[3], r[4], failed))
    return TraceRecords(runs, entries, attempts, events, deliveries, dls, tasks)


def stale_correlations(
    c: sqlite3.Connection, app: str, older_than: float, limit: int
) -> list[str]:
    rows = c.execute(
        f"SELECT correlation_id, updated_at FROM runs WHERE app=? AND status IN "
        f"{LIVE_SQL} AND updated_at < ? "
        "UNION SELECT correlation_id, updated_at FROM runs WHERE app=? AND flagged=1 "
        "UNION SELECT e.correlation_id, d.updated_at FROM deliveries d JOIN events e "
        "ON e.app=d.app AND e.id=d.event_id WHERE d.app=? AND d.status IN "
        "('pending','dead') AND d.updated_at < ? "
        "UNION SELECT correlation_id, updated_at FROM tasks WHERE app=? "
        "AND status='pending' AND updated_at < ? "
        "ORDER BY 2 LIMIT ?",
        (app, older_than, app, app, older_than, app, older_than, limit * 4),
    ).fetchall()
    seen: dict[str, None] = {}
    for r in rows:
        if r[0] is not None:
            seen.setdefault(r[0])
    return list(seen)[:limit]
