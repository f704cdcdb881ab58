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

A batch of ONE write (the latency case: a run waiting on its own checkpoint) calls
the lean functions instead, with scalar parameters (``cantata_checkpoint_rows``,
``cantata_create_one``; migrations 0017, 0037): the same rows, records and notices,
without the batch's arrays to unnest, join and materialize on the server. A new run
with its first checkpoint goes through ``cantata_create_rows`` (migrations 0019,
0037): the run inserted in its checkpointed state, both records spelled here. Their
history entries and attempts go as one text per row (a ``cantata_history_row`` or
``cantata_attempt_row`` literal, :func:`_record`), not one array per column.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from json.encoder import encode_basestring_ascii as _quoted
from math import isfinite
from typing import Any

import asyncpg
import orjson

from cantata.model.records import RunRecord, RunWrite
from cantata.store import audit
from cantata.store import postgres_writes as writes
from cantata.store.postgres_listen import runs_notice
from cantata.store.postgres_ops import columns, run_values
from cantata.store.postgres_pool import Conn

# The function's arrays (all but the audit keys and the genesis hash), in its order:
# the fields of the composite type cantata_write_args (migration 0013).
_ARGS = (
    "n_run_id text[]", "n_app text[]", "n_workflow text[]", "n_status text[]",
    "n_args text[]", "n_created_at float8[]", "n_updated_at float8[]",
    "n_correlation_id text[]", "n_causation_id text[]", "n_idempotency_key text[]",
    "n_args_hash text[]", "n_parent_run_id text[]", "n_deadline_at float8[]",
    "n_result text[]", "n_error text[]", "n_cancel_requested bool[]", "n_owner text[]",
    "n_fence int8[]", "n_flagged bool[]", "n_service text[]", "n_version text[]",
    "n_epoch int4[]", "n_time float8[]", "n_tail text[]", "n_action text[]",
    "n_data text[]", "n_notice text[]", "k_app text[]", "k_run_id text[]", "k_fence int8[]",
    "k_status text[]", "k_result text[]", "k_error text[]", "k_flagged bool[]",
    "k_release bool[]", "k_i int4[]", "k_now float8", "h_app text[]", "h_run_id text[]",
    "h_key text[]", "h_kind text[]", "h_name text[]", "h_status text[]", "h_seq int4[]",
    "h_result text[]", "h_error text[]", "h_error_type text[]", "h_attempts int4[]",
    "h_started_at float8[]", "h_ended_at float8[]", "h_wake_at float8[]", "h_detail text[]",
    "a_app text[]", "a_run_id text[]", "a_key text[]", "a_attempt int4[]",
    "a_started_at float8[]", "a_ended_at float8[]", "a_error_type text[]", "a_error text[]",
    "k_time float8[]", "k_time_json text[]", "k_same_action text[]", "k_same_data text[]",
    "k_same_rest text[]", "k_chg_action text[]", "k_chg_data text[]", "k_chg_rest text[]",
    "k_notice text[]",
)
_FIELDS = tuple(arg.split()[0] for arg in _ARGS)
_NEW = 27  # the first 27 are the new runs' (n_...), the others the checkpoints'
_OUT = "SELECT out_kind, out_i, out_owner, out_status, out_correlation_id FROM "
_KEYS = "key_app, key_inner, key_outer, genesis"


def _call(sent: range) -> str:
    """The call with the arrays of ``sent`` as parameters and the others empty (a
    parameter less for the driver to encode and the server to decode)."""
    args: list[str] = []
    for j, arg in enumerate(_ARGS):
        kind = arg.split()[1]
        if j in sent:
            args.append(f"${j - sent.start + 1}")
        else:
            args.append("NULL::float8" if kind == "float8" else f"'{{}}'::{kind}")
    n = len(sent)
    keys = ", ".join(f"${i}" for i in range(n + 1, n + 5))
    return f"{_OUT}cantata_write_runs({', '.join(args)}, {keys})"


_ALL, _CREATES, _CHECKPOINTS = range(len(_ARGS)), range(_NEW), range(_NEW, len(_ARGS))
_CALLS = {sent: _call(sent) for sent in (_ALL, _CREATES, _CHECKPOINTS)}
_CALL = _CALLS[_ALL]
# The same call with each array as one text parameter, split on the server
# (``string_to_array``): the driver encodes 69 texts instead of every element of 69
# arrays, and the server splits them in a fraction of what parsing the same values as
# JSON (migration 0013's document, json_populate_record) cost it. Text arrays are
# joined with _SEP, their NULLs spelled ``None``; the other arrays are orjson's lists
# without their brackets (``null``: NULL), read by each element type's input function.
_SEP = "\x1f"  # ASCII unit separator
_NULL = "None"  # a NULL of a text array, as its text (str(None))
_NULL_AMID = _SEP + _NULL + _SEP
_KINDS = tuple(arg.split()[1] for arg in _ARGS)


def _split(j: int, kind: str) -> str:
    if kind == "float8":  # (k_now, a scalar)
        return f"${j}::float8"
    if kind == "text[]":
        return f"string_to_array(${j}::text, E'\\x1f', '{_NULL}')"
    return f"string_to_array(${j}::text, ',', 'null')::{kind}"


_CALL_TEXT = (
    "SELECT w.out_kind, w.out_i, w.out_owner, w.out_status, w.out_correlation_id FROM "
    f"cantata_write_runs({', '.join(_split(j + 1, kind) for j, kind in enumerate(_KINDS))}, "
    f"{', '.join(f'${j}' for j in range(len(_ARGS) + 1, len(_ARGS) + 5))}) w"
)
# Batches of this many shares or more go as texts (the threshold the JSON document had:
# it cost the server ~0.1 ms more than the arrays, which a batch of one, a run waiting on
# its own write, would feel, while the driver saves ~15 us per share of a big batch).
TEXT_FROM = 8
# Whether a batch of one checkpoint or one run creation takes the lean functions of
# migration 0017 (scalar parameters) instead of cantata_write_runs.
LEAN = True
_FLOATS = tuple(j for j, kind in enumerate(_KINDS) if kind.startswith("float8"))
_TEXTS = tuple(kind == "text[]" for kind in _KINDS)


def _texts(arrays: list[Any]) -> list[Any] | None:
    """The arrays as :data:`_CALL_TEXT`'s parameters, or ``None`` when texts cannot
    carry them exactly (they go as arrays then).

    A text array cannot hold the separator, the text ``None`` (its NULL) or be the one
    empty text (``''`` splits into no element). orjson writes a number as its shortest
    round-trip text (float8 reads back the same double) but NaN and infinities as
    ``null``: a float column whose finite values do not sum to a finite number (those,
    or an overflow) cannot go either, nor an int over 64 bits (orjson refuses it).
    """
    try:
        for j in _FLOATS:
            col = arrays[j]
            if not isfinite(sum(filter(None, col)) if isinstance(col, list) else col):
                return None
        out: list[Any] = []
        for col, text in zip(arrays, _TEXTS, strict=True):
            if not isinstance(col, list):
                out.append(col)
            elif not col:
                out.append("")
            elif not text:
                out.append(orjson.dumps(col)[1:-1].decode())
            elif (joined := _joined(col)) is not None:
                out.append(joined)
            else:
                return None
        return out
    # orjson.JSONEncodeError (a TypeError): an int over 64 bits
    except (TypeError, OverflowError):
        return None


def _joined(col: list[str | None]) -> str | None:
    """A text array (not empty) as one text, or ``None`` when it cannot be."""
    try:
        joined = _SEP.join(col)  # type: ignore[arg-type]
    except TypeError:  # NULLs among them
        nulls = col.count(None)
        if nulls == len(col):
            return _SEP.join([_NULL] * nulls)
        if _NULL in col:
            return None
        joined = _SEP.join(map(str, col))
    else:  # (a whole element ``None``: at either end, or between two separators)
        if _NULL in joined and (
            joined == _NULL or joined.startswith(_NULL + _SEP)
            or joined.endswith(_SEP + _NULL) or _NULL_AMID in joined
        ):
            return None
    if joined.count(_SEP) != len(col) - 1 or (joined == "" and len(col) == 1):
        return None
    return joined


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


def _created(now: float, run: RunRecord) -> tuple[Any, ...]:
    """A new run's record (time, tail, action, data) and notice."""
    actor, action, target, data = audit.run_created_entry(
        run.run_id, run.workflow, run.correlation_id, run.parent_run_id
    )
    text = audit.canonical(data)
    return (
        now,
        audit.tail(now, actor, action, target, text),
        action,
        text,
        runs_notice(run.app, ended=False) if run.owner is None else None,
    )


def _checkpointed(run_id: str, w: RunWrite, app: str) -> tuple[Any, ...]:
    """A checkpoint's record, both variants (action, data, rest), and its notice."""
    changed = _record_variant(run_id, w, "") if w.status is not None else (None,) * 3
    same = _record_variant(run_id, w, "" if w.status is None else str(w.status))
    return (*same, *changed, _notice(app, w))


def _notice(app: str, w: RunWrite) -> str | None:
    """A checkpoint's ``runs`` notice (``None``: none), ``ended`` for a run's end: the
    one-statement path takes no write that wakes a parked run (:func:`_simple`), so a
    run's end makes no run claimable."""
    if not writes.wakes_runs(w):
        return None
    return runs_notice(app, ended=w.status is not None and w.status.is_final)


# -- the lean path: one checkpoint, or one run creation with its first (migration 0017)

_K = 22  # cantata_checkpoint_rows' parameters
_N = 30  # cantata_create_one's


def _params(first: int, n: int) -> str:
    return ", ".join(f"${i}" for i in range(first, first + n))


_CHECKPOINT_ONE = f"SELECT cantata_checkpoint_rows({_params(1, _K)})"
_CREATE_ONE = f"SELECT cantata_create_one({_params(1, _N)})"
# The creation first, then its first checkpoint (only if the run was inserted), in
# that order (the checkpoint's record follows the run.created one in the chain).
_CREATE_AND_FIRST = (
    f"SELECT c.created, k.applied FROM cantata_create_one({_params(1, _N)}) c(created), "
    f"LATERAL (SELECT CASE WHEN c.created THEN cantata_checkpoint_rows("
    f"{_params(_N + 1, _K)}) END OFFSET 0) k(applied)"
)


# A new run and its first checkpoint through cantata_create_rows (migrations 0019,
# 0037): the run inserted in its checkpointed state, not inserted and then locked and
# updated.
_CREATE_FIRST = f"SELECT cantata_create_rows({_params(1, 37)})"
# Whether the lean path folds a new run's first checkpoint into its creation (False:
# cantata_create_one then cantata_checkpoint_rows, for bench/pg_breakdown.py's A/B).
FOLD_FIRST = True


def _create_first_args(
    now: float, run: RunRecord, w: RunWrite, keys: Mapping[str, audit.AuditKey]
) -> tuple[Any, ...]:
    """cantata_create_rows' parameters: ``run`` with ``w`` applied as the checkpoint
    statement would (each value ``w`` leaves ``None`` kept, the owner let go on
    release, ``updated_at`` now), its run.created record, ``w``'s history entries and
    attempts, and ``w``'s record as the new row would give it (the fence holds; the
    owner and status before it are ``run``'s)."""
    values = list(run_values(run))
    values[6] = now  # updated_at
    if w.status is not None:
        values[3] = str(w.status)
    if w.result is not None:
        values[13] = w.result
    if w.error is not None:
        values[14] = w.error
    if w.flagged is not None:
        values[18] = w.flagged
    if w.release:
        values[16] = None  # owner
    call = (run.app, run.run_id, run.fence, w)
    entry = audit.checkpoint_entry(run.run_id, run.owner, str(run.status), w)
    if entry is None:
        record: tuple[Any, ...] = (None, None, None, None)
    else:
        actor, action, target, data = entry
        text = audit.canonical(data)
        record = (actor, action, text, audit.tail(now, actor, action, target, text))
    key = keys.get(run.app)
    return (
        *values, *_created(now, run), *_rows(call), *record,
        _notice(run.app, w),
        None if key is None else key.inner, None if key is None else key.outer,
        audit.GENESIS_HASH,
    )


def _rows(call: writes.Checkpoint) -> tuple[list[str], list[str]]:
    """A checkpoint's history entries and attempts as the lean functions take them:
    one text per row, a ``cantata_history_row`` or ``cantata_attempt_row`` literal
    (migration 0037), one row per key (merged as :func:`postgres_writes.merged`
    merges them)."""
    history = merged_rows(writes.history_rows([call]), 15, writes.HISTORY_KEPT, 3)
    attempts = merged_rows(writes.attempt_rows([call]), 8, writes.ATTEMPT_KEPT, 4)
    return [_record(row) for row in history], [_record(row) for row in attempts]


def merged_rows(
    rows: list[tuple[Any, ...]], width: int, kept: frozenset[int], key: int
) -> list[tuple[Any, ...]]:
    """``rows`` without their app and run id, one per key (see ``merged``)."""
    if len({row[:key] for row in rows}) == len(rows):  # (the usual case: no key twice)
        return [row[2:] for row in rows]
    return list(zip(*writes.merged(rows, width, kept, key)[2:], strict=True))


def _record(row: tuple[Any, ...]) -> str:
    """``row`` as the text record_in reads back exactly: a NULL is nothing, a text is
    quoted (its quotes and backslashes escaped by a backslash), a number is Python's
    shortest exact spelling (``inf``, ``-inf`` and ``nan`` included, which float8in
    reads). (One comprehension, no call per field: ~7 us a saga's checkpoint.)"""
    return "(" + ",".join([
        "" if v is None
        else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' if isinstance(v, str)
        else repr(float(v)) if isinstance(v, float) else str(int(v))
        for v in row
    ]) + ")"


def lean(shares: Sequence[tuple[Any, Any]]) -> bool:
    """Whether an :func:`eligible` batch takes the lean path: one share, a checkpoint or
    a run creation (with its first checkpoint or none)."""
    return len(shares) == 1


def _checkpoint_args(
    now: float, call: writes.Checkpoint, keys: Mapping[str, audit.AuditKey]
) -> tuple[Any, ...]:
    app, run_id, _, w = call
    key = keys.get(app)
    return (
        *writes.run_args(0, call)[:8], now, *_rows(call),
        audit.canonical(now), *_checkpointed(run_id, w, app),
        None if key is None else key.inner, None if key is None else key.outer,
        audit.GENESIS_HASH,
    )


async def _write_lean(
    c: Conn, many: Any, arg: Any, keys: Mapping[str, audit.AuditKey]
) -> list[Any]:
    """:func:`write` for a batch :func:`lean` takes: one call with scalar parameters."""
    now = time.time()
    if many is writes.commit_runs:
        rows = await c.fetch(_CHECKPOINT_ONE, *_checkpoint_args(now, arg, keys))
        _, run_id, fence, _ = arg
        return [None if rows[0][-1] else writes.lease_lost(run_id, fence)]
    run, first = arg
    if first is not None and FOLD_FIRST:
        rows = await c.fetch(_CREATE_FIRST, *_create_first_args(now, run, first, keys))
        return [(run, True) if rows[0][-1] else await writes.existing_run(c, run)]
    key = keys.get(run.app)
    created = (
        *run_values(run), *_created(now, run),
        None if key is None else key.inner, None if key is None else key.outer,
        audit.GENESIS_HASH,
    )
    if first is None:
        rows = await c.fetch(_CREATE_ONE, *created)
        inserted = rows[0][-1]
    else:
        call = (run.app, run.run_id, run.fence, first)
        rows = await c.fetch(_CREATE_AND_FIRST, *created, *_checkpoint_args(now, call, keys))
        inserted = rows[0][-2]
    return [(run, True) if inserted else await writes.existing_run(c, run)]


async def write(
    c: Conn, shares: Sequence[tuple[Any, Any]], keys: Mapping[str, audit.AuditKey]
) -> list[Any]:
    """Apply ``shares`` (see :func:`eligible`) in one statement; one result (or
    :class:`~cantata.store.postgres_batch.Refused`) per share, as the transactional path would give.

    Raises:
        asyncpg.PostgresError: the statement failed (nothing was written); SQLSTATE
            :data:`NOT_HERE` when the batch must run as a transaction instead.
    """
    if LEAN and lean(shares):
        return await _write_lean(c, *shares[0], keys)
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
    new_audit = [_created(now, run) for _, run in creates]
    now_json = audit.canonical(now)
    rec_audit = [(now, now_json, *_checkpointed(run_id, w, app)) for app, run_id, _, w in calls]
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
    texts = _texts(arrays) if len(shares) >= TEXT_FROM else None
    if texts is None:
        sent = _CHECKPOINTS if not creates else _CREATES if not calls else _ALL
        rows = await c.fetch(_CALLS[sent], *arrays[sent.start:sent.stop], *key_args)
    else:
        rows = await c.fetch(_CALL_TEXT, *texts, *key_args)
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
