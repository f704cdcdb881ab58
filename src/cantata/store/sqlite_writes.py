"""The SQLite store's hot writes, grouped: every checkpoint (or run creation) of a
group-committed transaction in a few statements.

The writer thread (:class:`~cantata.store.sqlite_thread.ConnectionThread`) runs the
checkpoints queued for one transaction as one call of :func:`commit_runs`: one
``SELECT`` checks every fence, then one ``executemany`` per table writes the history
entries, attempts and run rows of all those whose fence held, and the audit records
go in with one more. Per checkpoint that is a few rows bound, not six statements
prepared and stepped from Python. A checkpoint whose fence is stale is refused
(:class:`~cantata.errors.LeaseLost` in its place in the result) before anything is
written for it. The result is that of applying the calls one after another.

Checkpoints that append events or create tasks take the store's single path.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from cantata.errors import LeaseLost
from cantata.model.records import RunRecord, RunWrite
from cantata.store import audit
from cantata.store.sqlite_ops import HISTORY_COLS, RUN_COLS
from cantata.store.sqlite_thread import TxConnection

Checkpoint = tuple[str, str, int, RunWrite]  # app, run_id, fence, write
NewRun = tuple[RunRecord, RunWrite]  # a run without idempotency key, and its first write

_FENCES = (
    "SELECT run_id, fence, owner, status, correlation_id FROM runs "
    "WHERE app=? AND run_id IN (SELECT value FROM json_each(?))"
)
_HISTORY = (
    f"INSERT INTO history (app, run_id, {HISTORY_COLS}) "
    f"VALUES (?,?,{','.join('?' * 13)}) ON CONFLICT DO UPDATE SET "
    "status=excluded.status, result=excluded.result, error=excluded.error, "
    "error_type=excluded.error_type, attempts=excluded.attempts, "
    "started_at=excluded.started_at, ended_at=excluded.ended_at, "
    "wake_at=excluded.wake_at, detail=excluded.detail"
)
_ATTEMPTS = (
    "INSERT INTO attempts VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
    "ended_at=excluded.ended_at, error_type=excluded.error_type, error=excluded.error"
)
_RUN = (
    "UPDATE runs SET updated_at=?, status=coalesce(?, status), result=coalesce(?, result), "
    "error=coalesce(?, error), flagged=coalesce(?, flagged), "
    "owner=CASE WHEN ? THEN NULL ELSE owner END WHERE app=? AND run_id=?"
)
_INSERT_RUN = f"INSERT INTO runs ({RUN_COLS}) VALUES ({','.join('?' * 22)})"
_AUDIT = (
    "INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, hash) "
    "VALUES (?,?,?,?,?,?,?,?,?)"
)


def simple(w: RunWrite | None) -> bool:
    """Whether a checkpoint can go in a group (no events to append, no tasks)."""
    return w is None or (not w.events and not w.tasks)


def lease_lost(run_id: str, fence: int) -> LeaseLost:
    return LeaseLost(
        f"run {run_id} was taken over by another worker (fence {fence} is stale); "
        "this worker stops executing it"
    )


Applied = tuple[str, str, RunWrite, str | None, str]  # app, run_id, write, owner, old status


def _apply_all(c: sqlite3.Connection, applied: list[Applied]) -> None:
    """Write checkpoints whose fence was checked (each run at most once)."""
    history = [
        (
            app,
            run_id,
            e.key,
            e.kind,
            e.name,
            e.status,
            e.seq,
            e.result,
            e.error,
            e.error_type,
            e.attempts,
            e.started_at,
            e.ended_at,
            e.wake_at,
            e.detail,
        )
        for app, run_id, w, _, _ in applied
        for e in w.entries
    ]
    if history:
        c.executemany(_HISTORY, history)
    attempts = [
        (app, run_id, a.key, a.attempt, a.started_at, a.ended_at, a.error_type, a.error)
        for app, run_id, w, _, _ in applied
        for a in w.attempts
    ]
    if attempts:
        c.executemany(_ATTEMPTS, attempts)
    now = time.time()
    c.executemany(
        _RUN,
        [
            (
                now,
                None if w.status is None else str(w.status),
                w.result,
                w.error,
                None if w.flagged is None else int(w.flagged),
                w.release,
                app,
                run_id,
            )
            for app, run_id, w, _, _ in applied
        ],
    )
    _audit(
        c,
        [
            (app, entry)
            for app, run_id, w, owner, old in applied
            if (entry := audit.checkpoint_entry(run_id, owner, old, w)) is not None
        ],
    )


def _audit(c: sqlite3.Connection, entries: Sequence[tuple[str, audit.Entry]]) -> None:
    """Append records to their apps' chains (heads advanced in the transaction's state,
    written once before COMMIT, see :class:`TxConnection`)."""
    if not entries:
        return
    assert isinstance(c, TxConnection)
    heads = c.audit_heads
    rows: list[tuple[Any, ...]] = []
    for app, (actor, action, target, data) in entries:
        cached = heads.get(app)
        if cached is not None:
            head: tuple[int, str] | None = (cached[0], cached[2])
        else:
            row = c.execute("SELECT seq, hash FROM audit_head WHERE app=?", (app,)).fetchone()
            head = None if row is None else (row[0], row[1])
        rec = audit.next_record(
            head, time.time(), actor, action, target, data, c.audit_keys.get(app)
        )
        rows.append(
            (
                app,
                rec.seq,
                rec.time,
                rec.actor,
                rec.action,
                rec.target,
                rec.data,
                rec.prev_hash,
                rec.hash,
            )
        )
        heads[app] = (rec.seq, rec.prev_hash, rec.hash)
    c.executemany(_AUDIT, rows)


def commit_runs(c: sqlite3.Connection, calls: list[Checkpoint]) -> list[LeaseLost | None]:
    """:meth:`SQLiteStore.commit_run` for many checkpoints (none with events or tasks)."""
    if len({(app, run_id) for app, run_id, _, _ in calls}) != len(calls):
        # a run twice: one after another, each seeing the one before
        return [commit_runs(c, [call])[0] for call in calls]
    by_app: dict[str, list[str]] = {}
    for app, run_id, _, _ in calls:
        by_app.setdefault(app, []).append(run_id)
    found: dict[tuple[str, str], tuple[Any, ...]] = {}
    for app, run_ids in by_app.items():
        for row in c.execute(_FENCES, (app, json.dumps(run_ids))):
            found[(app, row[0])] = row
    out: list[LeaseLost | None] = []
    applied: list[Applied] = []
    for app, run_id, fence, w in calls:
        row = found.get((app, run_id))
        if row is None or row[1] != fence:
            out.append(lease_lost(run_id, fence))
            continue
        out.append(None)
        applied.append((app, run_id, w, row[2], row[3]))
    if applied:
        _apply_all(c, applied)
    return out


def create_runs(c: sqlite3.Connection, calls: list[NewRun]) -> list[tuple[RunRecord, bool]]:
    """:meth:`SQLiteStore.create_run` for many runs without idempotency keys, each with
    its first checkpoint (none with events or tasks)."""
    c.executemany(
        _INSERT_RUN,
        [
            (
                run.app,
                run.run_id,
                run.workflow,
                str(run.status),
                run.args,
                run.result,
                run.error,
                run.idempotency_key,
                run.args_hash,
                run.correlation_id,
                run.causation_id,
                run.parent_run_id,
                run.service,
                run.created_at,
                run.updated_at,
                run.deadline_at,
                int(run.cancel_requested),
                run.owner,
                run.fence,
                int(run.flagged),
                run.version,
                run.epoch,
            )
            for run, _ in calls
        ],
    )
    _audit(
        c,
        [
            (
                run.app,
                audit.run_created_entry(
                    run.run_id, run.workflow, run.correlation_id, run.parent_run_id
                ),
            )
            for run, _ in calls
        ],
    )
    _apply_all(c, [(run.app, run.run_id, w, run.owner, str(run.status)) for run, w in calls])
    return [(run, True) for run, _ in calls]
