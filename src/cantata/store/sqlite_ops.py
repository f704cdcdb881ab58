"""The SQLite store's shared SQL: columns and rows, and the writes more than one role
makes (attempts, tasks of a checkpoint, settling deliveries, the audit log).

Plain functions of a :class:`sqlite3.Connection`, run by
:class:`~cantata.store.sqlite.SQLiteStore` in its connection thread (writes inside
its group-committed transaction, where the one writer makes the audit chain safe).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import (
    ATTRS,
    Attempt,
    AuditRecord,
    DeadLetter,
    HistoryEntry,
    RunRecord,
    TaskRecord,
    to_datetime,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.sqlite_thread import HEAD_MARK, UPSERT_HEAD, UPSERT_HEAD_ROW, TxConnection

LIVE_SQL = "('pending', 'running', 'compensating')"


def live(column: str) -> str:
    """``column`` (a run's status) is live, as OR-ed equalities, the form the partial
    indexes ``runs_live`` and ``runs_claimable`` are declared with (migration 0016): a
    query must say it the same way for the planner to use them. (An IN list of more
    than two values costs SQLite a temporary table each time it is evaluated, and a
    partial index's WHERE is evaluated on every write of a run's status.)"""
    return f"({column}='pending' OR {column}='running' OR {column}='compensating')"


LIVE = live("status")
LIVE_R = live("r.status")
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


def run_values(run: RunRecord) -> tuple[Any, ...]:
    """``run``'s columns in :data:`RUN_COLS` order, for an INSERT."""
    return (
        run.app, run.run_id, run.workflow, str(run.status), run.args, run.result,
        run.error, run.idempotency_key, run.args_hash, run.correlation_id,
        run.causation_id, run.parent_run_id, run.service, run.created_at,
        run.updated_at, run.deadline_at, int(run.cancel_requested), run.owner,
        run.fence, int(run.flagged), run.version, run.epoch,
    )


HISTORY_COLS = (
    "key, kind, name, status, seq, result, error, error_type, attempts, started_at, "
    "ended_at, wake_at, detail"
)
ATTEMPT_COLS = "key, attempt, started_at, ended_at, error_type, error"
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
        data=codec.loads_event_data(row[5]),
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


# An attempt its worker excused (paused, not dead: see cantata.engine.pauses) stays
# excused when the new owner's write marking it WorkerLost arrives after the excuse.
KEEP_EXCUSED = (
    "WHERE NOT (COALESCE(attempts.error_type, '') = 'Paused' "
    "AND COALESCE(excluded.error_type, '') = 'WorkerLost' "
    "AND attempts.started_at = excluded.started_at)"
)
# The row of a first attempt a lean writer left out (its history entry says it alone:
# model.records.first_attempt), made for its excuse: while the entry still says it (one
# attempt, in progress, begun at the excused attempt's start) and the step has no row.
EXCUSE_FIRST_ATTEMPT = (
    "INSERT INTO attempts (app, run_id, key, attempt, started_at, ended_at, error_type, "
    "error) SELECT h.app, h.run_id, h.key, 1, h.started_at, ?, ?, ? FROM history h "
    "WHERE h.app=? AND h.run_id=? AND h.key=? AND h.attempts=1 AND h.status='running' "
    "AND h.started_at=? AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.app=h.app "
    "AND a.run_id=h.run_id AND a.key=h.key) ON CONFLICT DO NOTHING"
)
EXCUSE_ATTEMPT = (
    "UPDATE attempts SET ended_at=?, error_type=?, error=? WHERE app=? AND run_id=? "
    "AND key=? AND attempt=? AND started_at=? "
    "AND (ended_at IS NULL OR error_type = 'WorkerLost')"
)


def text(value: str | None) -> str | None:
    """``value`` as an exact ``str`` (an enum member bound as it is goes through
    sqlite3's adapter lookup: slow), or ``None``."""
    return None if value is None else str(value)


# A history entry of ctx.set_attributes (kind 'attrs', its detail a JSON object): its
# names and values into run_attributes, a later value of a name replacing the earlier.
_SET_ATTRIBUTE = "ON CONFLICT (app, run_id, name) DO UPDATE SET value=excluded.value"
_INDEX_ATTRIBUTES = (
    "INSERT INTO run_attributes (app, run_id, name, value) "
    f"SELECT ?1, ?2, j.key, CAST(j.value AS TEXT) FROM json_each(?3) j WHERE true {_SET_ATTRIBUTE}"
)
_REINDEX_ATTRIBUTES = (
    "INSERT INTO run_attributes (app, run_id, name, value) "
    "SELECT h.app, h.run_id, j.key, CAST(j.value AS TEXT) FROM history h, "
    "json_each(h.detail) j WHERE h.app=? AND h.run_id=? AND h.kind=? "
    f"AND h.detail IS NOT NULL ORDER BY h.seq {_SET_ATTRIBUTE}"
)


def index_attributes(
    c: sqlite3.Connection, app: str, run_id: str, entries: Sequence[HistoryEntry]
) -> None:
    """Index the attributes that ``entries`` (written to ``run_id``'s history in this
    transaction, in this order) set: a checkpoint's part (a fork or a retry indexes its
    run again from the history: :func:`reindex_attributes`). No trigger does it any more
    (migration 0020)."""
    details = [(app, run_id, e.detail) for e in entries
               if e.kind == ATTRS and e.detail is not None]
    if details:
        c.executemany(_INDEX_ATTRIBUTES, details)


def reindex_attributes(c: sqlite3.Connection, app: str, run_id: str) -> None:
    """``run_id``'s attributes again from its history, in its order (a later value wins)."""
    c.execute("DELETE FROM run_attributes WHERE app=? AND run_id=?", (app, run_id))
    c.execute(_REINDEX_ATTRIBUTES, (app, run_id, ATTRS))


_UPSERT_ATTEMPTS = (
    "INSERT INTO attempts (app, run_id, key, attempt, started_at, ended_at, error_type, "
    "error) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
    "ended_at=excluded.ended_at, error_type=excluded.error_type, "
    f"error=excluded.error {KEEP_EXCUSED}"
)


def upsert_attempts(
    c: sqlite3.Connection, app: str, run_id: str, attempts: Sequence[Attempt]
) -> None:
    if attempts:
        (c.dml if isinstance(c, TxConnection) else c).executemany(
            _UPSERT_ATTEMPTS,
            [
                (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, text(a.error_type),
                 a.error)
                for a in attempts
            ],
        )


# -- deliveries and dead letters ---------------------------------------------------------


# A delivery just fanned out in this transaction, claimed by the worker that will hand
# it off (Settlement.hold): as claim_deliveries would, its first attempt counted.
HOLD_SQL = (
    "UPDATE deliveries SET owner=?, fence=fence+1, attempts=1, updated_at=? WHERE app=? "
    "AND grp=? AND event_id=? AND status='pending' AND owner IS NULL AND attempts=0"
)


# -- the audit log ----------------------------------------------------------------------


_INSERT_AUDIT = f"INSERT INTO audit (app, {AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)"


def audit_append(c: sqlite3.Connection, app: str, entry: audit.Entry) -> None:
    """Append one record to ``app``'s chain (the caller's transaction is the only writer).

    On a :class:`TxConnection` the chain head advances in the transaction's state and
    its rows are written once before COMMIT (:meth:`TxConnection.before_commit`); on a
    plain connection, here. The first append of an app in a write transaction takes the
    head this connection committed last when no other connection has committed since
    (:meth:`TxConnection.committed_head`), else reads it (:func:`audit_head`).
    """
    actor, action, target, data = entry
    tx = c if isinstance(c, TxConnection) else None
    heads = None if tx is None else tx.audit_heads
    cached = None if heads is None else heads.get(app)
    if cached is None and tx is not None:  # (the first append of the app in this tx)
        cached = tx.committed_head(app)
    if cached is not None:
        head: tuple[int, str] | None = (cached[0], cached[2])
    else:
        head = audit_head(c, app)
    keys = {} if tx is None else tx.audit_keys
    now = time.time()
    seq, text, prev_hash, hash_ = audit.next_link(
        head, now, actor, action, target, data, keys.get(app)
    )
    try:
        (c if tx is None else tx.dml).execute(
            _INSERT_AUDIT, (app, seq, now, actor, action, target, text, prev_hash, hash_))
    except sqlite3.IntegrityError as exc:  # (app, seq) taken: a record past the head
        raise audit.forged_past_head(app, seq) from exc
    if heads is not None:
        heads[app] = (seq, prev_hash, hash_)
        return
    # (a plain connection knows no gate: both heads, as TxConnection.before_commit with
    # the app's gate closed)
    c.execute(UPSERT_HEAD_ROW, (app + HEAD_MARK, seq, prev_hash, hash_))
    c.execute(UPSERT_HEAD, (app, seq, prev_hash, hash_))


def unaudited_runs(c: sqlite3.Connection, app: str) -> tuple[list[str], list[str]]:
    """Runs with no ``run.created`` record, and such records whose run row is gone.

    Only the runs of a store written before the audit log existed are excused: those
    older than the time ``audit_legacy`` holds for the app (migration 0022).
    """
    created = "SELECT target FROM audit WHERE app=? AND action='run.created'"
    missing = c.execute(
        f"SELECT run_id FROM runs WHERE app=? AND run_id NOT IN ({created}) AND created_at >= "
        "coalesce((SELECT before FROM audit_legacy WHERE app=?), ?) LIMIT 5",
        (app, app, app, float("-inf")),
    ).fetchall()
    gone = c.execute(
        f"{created} AND target NOT IN (SELECT run_id FROM runs WHERE app=?) LIMIT 5",
        (app, app),
    ).fetchall()
    return [r[0] for r in missing], [r[0] for r in gone]


# The head of an app's chain, read from either layout (docs/performance.md, "Round
# twenty-five (saga, SQLite): the audit head read from either layout" and "Round
# twenty-six (audit head)"): the `audit_head` row that releases before SQLite schema 32
# read and move alone (this one moves it too while the app's gate is closed), and the
# `audit` row keyed (app || char(1), 0) that this release moves in every audited commit,
# right after the app's last record (its seq as text in `data`, its `prev_hash` and
# `hash`). Either may be missing or behind. Two index probes in one statement, compared
# here (a UNION ALL ordered by seq cost twice as much: a temp b-tree).
_SELECT_HEADS = (
    "SELECT h.seq, h.hash, r.seq, r.hash FROM (SELECT 1) LEFT JOIN audit_head h ON h.app=?1 "
    "LEFT JOIN (SELECT CAST(data AS INTEGER) AS seq, hash FROM audit WHERE app=?2 AND seq=0) r"
)


def audit_head(c: sqlite3.Connection, app: str) -> tuple[int, str] | None:
    """``(seq, hash)`` of ``app``'s chain head (``None``: empty): ``audit_head``'s row or
    the head row in ``audit``, whichever is further along (on a tie, ``audit_head``'s).
    Every reader of the head reads it here: the append (which then moves the head row,
    and ``audit_head`` too while the app's gate is closed), ``verify`` and its look for
    records past the head, ``cantata audit head``, the console's feed and Audit page."""
    seq, hash_, row_seq, row_hash = c.execute(_SELECT_HEADS, (app, app + HEAD_MARK)).fetchone()
    if row_seq is not None and (seq is None or row_seq > seq):
        return row_seq, row_hash
    return None if seq is None else (seq, hash_)


def audit_records(
    c: sqlite3.Connection, app: str, after_seq: int, limit: int
) -> list[AuditRecord]:
    """``app``'s records after ``after_seq``, in order. ``WHERE app=?`` leaves the head
    row out: its key is ``app + HEAD_MARK``."""
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
            (app, t.task_id, t.run_id, t.key, t.step, t.service, t.args, str(t.status),
             t.attempts,
             t.next_at, t.owner, t.fence, t.result, t.error, t.error_type,
             t.created_at or now, t.updated_at or now, t.correlation_id or correlation_id)
            for t in tasks
        ],
    )


# -- observability ----------------------------------------------------------------------




def pin_version_sql(keep: list[str]) -> str:
    """A claim's ``SET`` of a run's version (its parameters: ``keep``, then the version
    to pin to): runs of the workflows in ``keep`` pinned to a version keep it, the
    others are pinned to the version given, when one is (``Store.claim_runs``'s
    ``keep_versions_of``: a saga's run, docs/operating.md)."""
    return (f"version=coalesce(CASE WHEN workflow IN ({','.join('?' * len(keep))}) "
            "THEN version END, ?, version)")
