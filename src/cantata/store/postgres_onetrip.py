"""Run creations and checkpoints in one round trip: a single-statement transaction.

A batch of the group-committed writer that holds only run creations and
checkpoints (the whole hot path of a saga) is written by one call of the
server-side function ``cantata_write_runs`` (migration 0011), sent without BEGIN
or COMMIT: PostgreSQL runs a lone statement as its own transaction, so the batch
costs one round trip and one WAL flush instead of four (BEGIN, the writes, the
audit append, COMMIT). The function does what :func:`postgres_writes.create_runs`
and :func:`postgres_writes.commit_runs` followed by the audit append do in a
transaction; durability is the same (``synchronous_commit`` as the server has it).

What SQL cannot know in advance is computed here: each audit record's canonical
text, with both variants of a checkpoint's record (its status changed or not,
decided in SQL from the row as locked). Checkpoints that append events or create
tasks or wake a parked run, or two checkpoints of one run, take the transactional
path.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quoted
from typing import Any

import asyncpg

from cantata.model.records import RunRecord, RunWrite
from cantata.store import audit
from cantata.store import postgres_writes as writes
from cantata.store.base import RUNS
from cantata.store.postgres_ops import columns, run_values
from cantata.store.postgres_pool import Conn

_PARAMS = 73
_CALL = (
    "SELECT out_kind, out_i, out_owner, out_status, out_correlation_id FROM "
    f"cantata_write_runs({', '.join(f'${i}' for i in range(1, _PARAMS + 1))})"
)
# The function's arrays (all but the audit keys and the genesis hash), in its order:
# the fields of the composite type cantata_write_args (migration 0013).
_FIELDS = (
    "n_run_id", "n_app", "n_workflow", "n_status", "n_args", "n_created_at",
    "n_updated_at", "n_correlation_id", "n_causation_id", "n_idempotency_key",
    "n_args_hash", "n_parent_run_id", "n_deadline_at", "n_result", "n_error",
    "n_cancel_requested", "n_owner", "n_fence", "n_flagged", "n_service", "n_version",
    "n_epoch", "n_time", "n_tail", "n_action", "n_data", "n_notice",
    "k_app", "k_run_id", "k_fence", "k_status", "k_result", "k_error", "k_flagged",
    "k_release", "k_i", "k_now",
    "h_app", "h_run_id", "h_key", "h_kind", "h_name", "h_status", "h_seq", "h_result",
    "h_error", "h_error_type", "h_attempts", "h_started_at", "h_ended_at", "h_wake_at",
    "h_detail",
    "a_app", "a_run_id", "a_key", "a_attempt", "a_started_at", "a_ended_at",
    "a_error_type", "a_error",
    "k_time", "k_time_json", "k_same_action", "k_same_data", "k_same_rest",
    "k_chg_action", "k_chg_data", "k_chg_rest", "k_notice",
)
assert len(_FIELDS) == _PARAMS - 4
# The same call with those arrays as one JSON document (see migration 0013): the
# driver encodes one text instead of every element of 69 arrays.
_CALL_JSON = (
    "SELECT w.out_kind, w.out_i, w.out_owner, w.out_status, w.out_correlation_id FROM "
    "json_populate_record(NULL::cantata_write_args, $1::json) a, LATERAL "
    f"cantata_write_runs({', '.join(f'a.{f}' for f in _FIELDS)}, "
    "$2::text[], $3::bytea[], $4::bytea[], $5::text) w"
)
# Batches of this many shares or more go as JSON: the server spends about 0.1 ms more
# reading the document than the arrays, which a batch of one (a run waiting on its
# own write) would feel, while the driver saves ~15 us per share of a big batch.
JSON_FROM = 8
_dumps = json.JSONEncoder(allow_nan=False, separators=(",", ":")).encode
# Raised by the function for a record it cannot spell as Python does: run the batch
# as a transaction instead.
NOT_HERE = "CN001"


def _simple(w: RunWrite | None) -> bool:
    # A checkpoint that wakes a parked parent (RunWrite.wake) takes the transactional
    # path, which wakes it in the same transaction (store/roles/parking.py).
    return w is None or (not w.events and not w.tasks and w.wake is None)


def eligible(shares: Sequence[tuple[Any, Any]]) -> bool:
    """Whether a batch's operations (``(many, arg)`` each) can go as one statement."""
    seen: set[tuple[str, str]] = set()
    for many, arg in shares:
        if many is writes.create_runs:
            run, first = arg
            key = (run.app, run.run_id)
            if not _simple(first):
                return False
        elif many is writes.commit_runs:
            app, run_id, _, w = arg
            key = (app, run_id)
            if not _simple(w):
                return False
        else:
            return False
        if key in seen:
            return False
        seen.add(key)
    return True


def _record_variant(
    run_id: str, w: RunWrite, old_status: str
) -> tuple[str | None, str | None, str | None]:
    """Action, data and the tail after the actor of a checkpoint's record, as if the
    run's status before it was ``old_status`` (all ``None``: no record)."""
    entry = audit.checkpoint_entry(run_id, None, old_status, w)
    if entry is None:
        return None, None, None
    _, action, target, data = entry
    text = audit.canonical(data)
    # canonical([action, target, text])[1:], the strings quoted as canonical() does
    return action, text, f",{_quoted(action)},{_quoted(target)},{_quoted(text)}]"


async def write(
    c: Conn, shares: Sequence[tuple[Any, Any]], keys: Mapping[str, audit.AuditKey]
) -> list[Any]:
    """Apply ``shares`` (see :func:`eligible`) in one statement; one result (or
    :class:`~cantata.store.postgres_batch.Refused`) per share, as the transactional path would give.

    Raises:
        asyncpg.PostgresError: the statement failed (nothing was written); SQLSTATE
            :data:`NOT_HERE` when the batch must run as a transaction instead.
    """
    now = time.time()
    creates: list[tuple[int, RunRecord]] = []
    checkpoints: list[tuple[int, writes.Checkpoint]] = []
    for n, (many, arg) in enumerate(shares):
        if many is writes.create_runs:
            run, first = arg
            creates.append((n, run))
            if first is not None:
                checkpoints.append((-1, (run.app, run.run_id, run.fence, first)))
        else:
            checkpoints.append((n, arg))
    calls = [call for _, call in checkpoints]

    new_cols = columns([run_values(run) for _, run in creates], 22)
    new_audit: list[tuple[Any, ...]] = []
    for _, run in creates:
        actor, action, target, data = audit.run_created_entry(
            run.run_id, run.workflow, run.correlation_id, run.parent_run_id
        )
        text = audit.canonical(data)
        new_audit.append(
            (
                now,
                audit.tail(now, actor, action, target, text),
                action,
                text,
                f"{run.app}:{RUNS}" if run.owner is None else None,
            )
        )
    rec_audit: list[tuple[Any, ...]] = []
    now_json = audit.canonical(now)
    for app, run_id, _, w in calls:
        changed = _record_variant(run_id, w, "") if w.status is not None else (None,) * 3
        same = _record_variant(run_id, w, "" if w.status is None else str(w.status))
        rec_audit.append(
            (
                now,
                now_json,
                same[0],
                same[1],
                same[2],
                *changed,
                f"{app}:{RUNS}" if writes.wakes_runs(w) else None,
            )
        )
    key_apps = sorted({run.app for _, run in creates} | {call[0] for call in calls})
    key_apps = [app for app in key_apps if app in keys]

    arrays = [
        *new_cols,
        *columns(new_audit, 5),
        *columns([writes.run_args(i, call) for i, call in enumerate(calls)], 9),
        now,
        *writes.merged(writes.history_rows(calls), 15, writes.HISTORY_KEPT, key=3),
        *writes.merged(writes.attempt_rows(calls), 8, writes.ATTEMPT_KEPT, key=4),
        *columns(rec_audit, 9),
    ]
    key_args = (
        key_apps, [keys[a].inner for a in key_apps], [keys[a].outer for a in key_apps],
        audit.GENESIS_HASH,
    )
    doc = None
    if len(shares) >= JSON_FROM:
        try:
            doc = _dumps(dict(zip(_FIELDS, arrays, strict=True)))
        except (TypeError, ValueError):  # a value JSON cannot carry (NaN, say): as arrays
            doc = None
    if doc is None:
        rows = await c.fetch(_CALL, *arrays, *key_args)
    else:
        rows = await c.fetch(_CALL_JSON, doc, *key_args)
    inserted = {r[1] for r in rows if r[0] == "n"}
    applied = {r[1] for r in rows if r[0] == "k"}
    out: list[Any] = [None] * len(shares)
    for j, (n, run) in enumerate(creates):
        out[n] = (run, True) if j in inserted else await writes.existing_run(c, run)
    for j, (n, (_, run_id, fence, _)) in enumerate(checkpoints):
        if n >= 0:
            out[n] = None if j in applied else writes.lease_lost(run_id, fence)
    return out


def falls_back(exc: BaseException) -> bool:
    """Whether ``exc`` from :func:`write` asks for the transactional path."""
    return isinstance(exc, asyncpg.PostgresError) and exc.sqlstate == NOT_HERE


__all__ = ["eligible", "falls_back", "write"]
