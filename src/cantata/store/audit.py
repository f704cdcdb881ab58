"""The hash-chained audit log, independent of the backend (docs/security.md).

Each app has one chain. Record ``seq`` (1, 2, 3, … with no gap) has

    hash = sha256(prev_hash + canonical JSON of [seq, time, actor, action, target, data])

where ``prev_hash`` is the previous record's hash (:data:`GENESIS_HASH` for record 1)
and canonical JSON is compact, ASCII-only, with sorted keys (``data`` is itself the
canonical JSON text of a small object). Backends keep the chain head (last seq and
hash) in a per-app row written in the same transaction as the record, so records
removed from the end of the chain are noticed too.

With an audit key (``App(audit_key=...)``, kept outside the store) the chain is
keyed: ``hash = HMAC-SHA256(key, prev_hash + ...)``, so someone who can write the
store cannot recompute it after a change. A keyed chain may begin with plain
records written before the key was set; after its first keyed record every record
must be keyed. A key can be rotated: the records written before the switch verify
with the previous keys (:attr:`AuditKey.previous`), each key's records after the older
keys' ones, never before. An exported head (:func:`signed_head`) anchors the end of the
chain outside the store, so a tail deleted together with the head row is noticed too.

This module builds records (:func:`next_record`, :func:`tail`), says what each
store write records (:func:`checkpoint_entry` and friends) and verifies a chain
read page by page (:func:`verify_chain`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time as _time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from cantata.errors import ConfigurationError, StoreCorrupt
from cantata.model.records import (
    ENTRY_COMPLETED,
    ENTRY_FAILED,
    AuditRecord,
    AuditReport,
    RunWrite,
)

#: ``prev_hash`` of every app's first record.
GENESIS_HASH = hashlib.sha256(b"cantata audit log genesis").hexdigest()
SYSTEM = "system"
PAGE = 1000

Fetch = Callable[[int], Awaitable[list[AuditRecord]]]


_ENCODER = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
)  # what json.dumps(value, <these options>) builds anew on every call
# Its C encoder, made once (JSONEncoder.encode makes one per call, with a dict for
# circular checks: half the cost of a small record's text). Without that check it
# keeps no state between calls, so both threads share it; what it writes is the
# same text (a circular value, never built here, ends in RecursionError instead).


def _c_encoder() -> Callable[[Any, int], Sequence[str]] | None:
    """The C encoder with these options, or ``None`` (no C accelerator, or one whose
    arguments differ from CPython 3.11-3.13's: the pure path then, the same text)."""
    make: Callable[..., Any] | None = getattr(json.encoder, "c_make_encoder", None)
    if make is None:
        return None
    try:
        encode: Callable[[Any, int], Sequence[str]] = make(
            None, _ENCODER.default, json.encoder.encode_basestring_ascii, None, ":", ",",
            True, False, False,
        )
        ok = "".join(encode({"b": [1.5, None], "a": "\u00e9"}, 0)) == _ENCODER.encode(
            {"b": [1.5, None], "a": "\u00e9"})
    except (TypeError, ValueError):
        return None
    return encode if ok else None


_C_ENCODE = _c_encoder()


def canonical(value: Any) -> str:
    """Compact, ASCII-only JSON with sorted keys: one text per value."""
    if _C_ENCODE is None or isinstance(value, str):  # (a str is not a C encoder's case)
        return _ENCODER.encode(value)
    return "".join(_C_ENCODE(value, 0))


def tail(time: float, actor: str, action: str, target: str, data: str) -> str:
    """What follows ``[<seq>,`` in a record's canonical JSON (the part known before
    the record's place in the chain is; PostgreSQL completes it in SQL)."""
    return canonical([time, actor, action, target, data])[1:]


class AuditKey:
    """The secret that keys an app's audit chain (HMAC-SHA256).

    ``inner`` and ``outer`` are the key XOR-ed with HMAC's pads, so a backend can
    compute the HMAC in SQL with plain SHA-256:
    ``sha256(outer || sha256(inner || message))``.

    ``previous``: the keys the chain was keyed with before this one, newest first
    (a rotation). They only verify: records are written with this key, and a record
    keyed with a previous key must come before every record of a newer one.
    """

    __slots__ = ("_raw", "inner", "outer", "previous")

    def __init__(self, secret: str | bytes, previous: Sequence[str | bytes] = ()) -> None:
        raw = secret.encode() if isinstance(secret, str) else secret
        if not isinstance(raw, bytes) or len(raw) < 16:
            raise ConfigurationError(
                "the audit key must be at least 16 bytes of secret (str or bytes); make one "
                "with `python -c 'import secrets; print(secrets.token_hex(32))'`"
            )
        self._raw = raw
        block = (hashlib.sha256(raw).digest() if len(raw) > 64 else raw).ljust(64, b"\0")
        self.inner = bytes(b ^ 0x36 for b in block)
        self.outer = bytes(b ^ 0x5C for b in block)
        if isinstance(previous, str | bytes):
            raise ConfigurationError(
                "the previous audit keys must be a list of keys (newest first), not one "
                "str or bytes"
            )
        self.previous: tuple[AuditKey, ...] = tuple(AuditKey(p) for p in previous)
        raws = [raw, *(k._raw for k in self.previous)]
        if len(set(raws)) != len(raws):
            raise ConfigurationError(
                "an audit key is listed twice (as the key and a previous key, or twice as "
                "a previous key): list the key in use once, and each older key once"
            )

    def mac(self, text: str) -> str:
        """HMAC-SHA256 of ``text`` as lower-case hex."""
        return hmac.new(self._raw, text.encode("ascii"), hashlib.sha256).hexdigest()

    def oldest_first(self) -> list[AuditKey]:
        """The previous keys, oldest first, then this one: the order their records
        take in the chain."""
        return [*reversed(self.previous), self]

    def __repr__(self) -> str:
        return "AuditKey(***)" if not self.previous else (
            f"AuditKey(***, previous={len(self.previous)})")


#: The environment variables that give the audit key and the keys before it.
KEY_VAR = "CANTATA_AUDIT_KEY"
PREVIOUS_VAR = "CANTATA_AUDIT_PREVIOUS_KEYS"


def make_key(
    secret: str | bytes | None, previous: Sequence[str | bytes] | None,
    *, names: tuple[str, str] = ("audit_key", "audit_previous_keys"),
) -> AuditKey | None:
    """The audit key ``secret`` with its ``previous`` keys (``None`` for no key); the
    errors name where they were given (``names``: the key's, the previous keys').

    Raises:
        ConfigurationError: a key shorter than 16 bytes, one listed twice, or previous
            keys without a key.
    """
    if not secret:
        if previous:
            raise ConfigurationError(
                f"{names[1]} is given without {names[0]}: the previous keys only verify "
                f"the records written before the key in use; give that key in {names[0]}"
            )
        return None
    try:
        return AuditKey(secret, previous or ())
    except ConfigurationError as exc:
        try:
            AuditKey(secret)
        except ConfigurationError:
            raise ConfigurationError(f"{names[0]}: {exc}") from None
        raise ConfigurationError(f"{names[1]}: {exc}") from None


def key_from_env(environ: Mapping[str, str]) -> AuditKey | None:
    """``$CANTATA_AUDIT_KEY`` with ``$CANTATA_AUDIT_PREVIOUS_KEYS`` (comma-separated,
    newest first), or ``None`` when no key is set."""
    olds = [k.strip() for k in environ.get(PREVIOUS_VAR, "").split(",") if k.strip()]
    return make_key(environ.get(KEY_VAR), olds, names=(KEY_VAR, PREVIOUS_VAR))


def chain_hash(prev_hash: str, seq: int, rest: str, key: AuditKey | None = None) -> str:
    """``sha256(prev_hash + "[" + seq + "," + rest)`` as lower-case hex (HMAC-SHA256
    with ``key`` when the chain is keyed)."""
    text = f"{prev_hash}[{seq},{rest}"
    if key is not None:
        return key.mac(text)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def record_hash(rec: AuditRecord, key: AuditKey | None = None) -> str:
    """The hash ``rec`` must carry, recomputed from its content."""
    return chain_hash(rec.prev_hash, rec.seq, tail(rec.time, rec.actor, rec.action,
                                                   rec.target, rec.data), key)


def next_record(
    head: tuple[int, str] | None,
    time: float,
    actor: str,
    action: str,
    target: str,
    data: dict[str, Any],
    key: AuditKey | None = None,
) -> AuditRecord:
    """The record that follows ``head`` (``(seq, hash)``, ``None`` for an empty chain)."""
    seq, text, prev, h = next_link(head, time, actor, action, target, data, key)
    return AuditRecord(seq, time, actor, action, target, text, prev, h)


def next_link(
    head: tuple[int, str] | None,
    time: float,
    actor: str,
    action: str,
    target: str,
    data: dict[str, Any],
    key: AuditKey | None = None,
) -> tuple[int, str, str, str]:
    """What :func:`next_record` computes, as ``(seq, data, prev_hash, hash)``: for a
    store's append, which needs no record object (a frozen one costs ~1 µs to build)."""
    seq, prev = (head[0] + 1, head[1]) if head is not None else (1, GENESIS_HASH)
    text = canonical(data)
    return seq, text, prev, chain_hash(prev, seq, tail(time, actor, action, target, text), key)


def may_follow(rec: AuditRecord, key: AuditKey | None) -> bool:
    """Whether a record keyed with ``key`` (``None``: plain) may follow ``rec`` in a
    chain that :func:`verify_chain` accepts: ``rec`` is plain (a keyed record may
    follow it, a plain one too when ``key`` is ``None``), or keyed with ``key`` or one
    of its previous keys."""
    if record_hash(rec) == rec.hash:
        return True
    return key is not None and any(record_hash(rec, k) == rec.hash for k in key.oldest_first())


def worker_actor(owner: str | None) -> str:
    """The actor of a change made by the worker owning the row (``system`` if none)."""
    return SYSTEM if owner is None else f"worker:{owner}"


def forged_past_head(app: str, seq: int | None = None) -> StoreCorrupt:
    """The error of an append that finds its place in ``app``'s chain taken: a record
    lies past the chain head, added outside Cantata (``seq``: that place, if known)."""
    where = f"record #{seq}" if seq is not None else "a record"
    return StoreCorrupt(
        f"the audit log of app {app!r} was tampered with: {where} lies past its chain "
        "head, added outside Cantata, so no audited write can be appended; run `cantata "
        "audit verify` to see it, then restore the store from a backup (or delete the "
        "records past the head) before writing again"
    )


# -- what each store write records --------------------------------------------------

Entry = tuple[str, str, str, dict[str, Any]]  # actor, action, target, data


def run_created_entry(
    run_id: str, workflow: str, correlation_id: str, parent_run_id: str | None,
    actor: str = SYSTEM,
) -> Entry:
    """A new run's record: by ``actor``, the operator who started it (``system``: a
    start by Cantata itself, or by code that named no operator)."""
    data: dict[str, Any] = {"workflow": workflow, "correlation_id": correlation_id}
    if parent_run_id is not None:
        data["parent_run_id"] = parent_run_id
    return actor, "run.created", run_id, data


def published_entry(actor: str, event_id: str, event_type: str) -> Entry:
    """The record of an event an operator (``actor``) published: written by the append
    that stores it, in its transaction (an event stored before gets none)."""
    return actor, "event.published", event_id, {"type": event_type}


def publish_repeated_entry(actor: str, event_id: str, event_type: str) -> Entry:
    """The record of an operator's publish of an event id already stored with the same
    content: nothing was published."""
    return actor, "event.publish_repeated", event_id, {"type": event_type}


def token_entry(actor: str, name: str, role: str | None) -> Entry:
    """The record of API token ``name`` created with ``role``, or revoked (``None``)."""
    if role is None:
        return actor, "token.revoked", name, {}
    return actor, "token.created", name, {"role": role}


def checkpoint_entry(
    run_id: str, owner: str | None, old_status: str, write: RunWrite
) -> Entry | None:
    """The record of one checkpoint, or ``None`` when it is not a state change.

    A checkpoint that only starts attempts or marks entries running or waiting
    (the hot path of every step) writes no record.
    """
    data: dict[str, Any] = {}
    status_changed = write.status is not None and str(write.status) != old_status
    if status_changed:
        data["status"] = str(write.status)
    # (one pass over the entries, not a list comprehension each: every checkpoint)
    completed: list[str] | None = None
    failed: list[str] | None = None
    for e in write.entries:
        status = e.status
        if status == ENTRY_COMPLETED:
            if completed is None:
                completed = data["completed"] = []
            completed.append(e.key)
        elif status == ENTRY_FAILED:
            if failed is None:
                failed = []
            failed.append(e.key)
    if failed is not None:  # (after "completed", as the keys were written before)
        data["failed"] = failed
    if write.tasks:
        data["tasks"] = [t.key for t in write.tasks]
    if write.events:
        data["events"] = [e.id for e in write.events]
    if write.flagged:
        data["flagged"] = True
    if not data:
        return None
    action = "run.status" if status_changed else "run.checkpoint"
    return worker_actor(owner), action, run_id, data


def cancel_entry(run_id: str, actor: str, status: str, applied: bool) -> Entry:
    return actor, "run.cancel_requested", run_id, {"status": status, "applied": applied}


def delivery_entry(
    group: str,
    event_id: str,
    owner: str | None,
    outcome: str,
    attempts: int,
    *,
    error: str | None = None,
    dead_letter_id: str | None = None,
    emitted: Sequence[str] = (),
) -> Entry:
    data: dict[str, Any] = {"attempts": attempts}
    if outcome == "dead":
        data["error"] = error or "unknown error"
        data["dead_letter_id"] = dead_letter_id
    if emitted:
        data["events"] = list(emitted)
    return worker_actor(owner), f"delivery.{outcome}", f"{group}:{event_id}", data


def replay_entry(group: str, event_id: str, dead_letter_id: str, actor: str) -> Entry:
    return actor, "dead_letter.replayed", f"{group}:{event_id}", {
        "dead_letter_id": dead_letter_id
    }


def task_entry(
    task_id: str, owner: str | None, outcome: str, step: str, service: str, attempts: int,
    error: str | None,
) -> Entry:
    data: dict[str, Any] = {"step": step, "service": service, "attempts": attempts}
    if outcome in ("failed", "withdrawn"):
        data["error"] = error
    return worker_actor(owner), f"task.{outcome}", task_id, data


def schedule_put_entry(actor: str, name: str, spec: str, new: bool) -> Entry:
    """The record of a schedule created (``new``) or whose spec was replaced; ``spec``
    is the stored spec (JSON of :class:`~cantata.model.schedule.ScheduleSpec`)."""
    fields = json.loads(spec)
    when = fields.get("cron") or f"every {fields.get('every'):g}s"
    return actor, "schedule.created" if new else "schedule.replaced", name, {
        "workflow": fields.get("workflow"), "when": when}


def schedule_pause_entry(actor: str, name: str, paused: bool) -> Entry:
    return actor, "schedule.paused" if paused else "schedule.resumed", name, {}


def schedule_deleted_entry(actor: str, name: str) -> Entry:
    return actor, "schedule.deleted", name, {}


# -- verification ---------------------------------------------------------------------


async def verify_chain(
    fetch: Fetch,
    head: tuple[int, str] | None,
    *,
    subject: str = "the audit log",
    key: AuditKey | None = None,
) -> AuditReport:
    """Verify a chain read in pages: ``fetch(after_seq)`` returns the next records.

    ``head`` is the recorded chain head ``(seq, hash)`` (``None`` if there is none);
    records appended after it was read are not checked. Reports the first record
    that was changed (its content does not give its hash), rewritten with a
    recomputed hash (the next record links to another hash), inserted or removed
    (a gap in ``seq``, a first record that is not #1) or cut from the end (the
    chain stops before its head).

    With ``key`` the chain may begin with plain records, then records of each of its
    previous keys (oldest first), then records of ``key``: a record keyed with an
    older key than a record before it is reported.
    """
    end = head[0] if head is not None else None
    prev: AuditRecord | None = None
    count = 0  # records verified intact so far
    # The keys a record may be keyed with, oldest first (0: plain), and the newest one
    # a record so far was keyed with, from which seq.
    levels: list[AuditKey | None] = [None] if key is None else [None, *key.oldest_first()]
    level, level_from = 0, 0

    def level_of(rec: AuditRecord) -> int | None:
        """The key ``rec``'s hash matches (its place in ``levels``), ``None`` if none."""
        for i in range(len(levels) - 1, -1, -1):
            if record_hash(rec, levels[i]) == rec.hash:
                return i
        return None

    def bad(seq: int | None, reason: str) -> AuditReport:
        return AuditReport(False, count, seq, reason)

    def keyed_otherwise(rec: AuditRecord, page: list[AuditRecord]) -> bool:
        """Whether ``rec`` and the record after it (in this page) match no hash under
        the keys given yet link together: a chain, or its records from ``rec`` on,
        keyed with a key not given (or a key given for none), not one record changed
        (its successor would still verify)."""
        i = page.index(rec)
        nxt = page[i + 1] if i + 1 < len(page) else None
        return (nxt is not None and nxt.seq == rec.seq + 1 and nxt.prev_hash == rec.hash
                and level_of(nxt) is None)

    def unverifiable(rec: AuditRecord) -> AuditReport:
        """The report of a chain keyed, from ``rec`` on, with a key not given."""
        given = "without a key" if key is None else "with the audit key(s) given"
        both = f"records #{rec.seq} and #{rec.seq + 1} link together but neither matches " \
            f"its hash {given}"
        if count == 0:
            reason = (f"{both}: the chain was written with "
                      + ("an audit key" if key is None else "another key")
                      + f": set {KEY_VAR} to the key the app writes with (and, if the key "
                      f"was rotated, {PREVIOUS_VAR} to the keys it wrote with before)")
        else:
            reason = (f"{both}, while the {count} records before them do: from "
                      f"#{rec.seq} on the chain was written with another key (the key was "
                      f"rotated there: set {KEY_VAR} to the newer key and {PREVIOUS_VAR} "
                      "to the older ones) or rewritten by someone without the key")
        return AuditReport(False, count, rec.seq, reason, wrong_key=True)

    def out_of_order(rec: AuditRecord, found: int) -> AuditReport:
        """The report of ``rec``, keyed with an older key (``found``) than the records
        before it (from #``level_from``)."""
        if found == 0:
            return bad(rec.seq, f"record #{rec.seq} was changed: it is not keyed with the "
                       f"audit key, though the records before it are (from #{level_from}): "
                       "rewritten by someone without the key, or written by a process "
                       "without it")
        return bad(rec.seq, f"record #{rec.seq} is keyed with a previous audit key, after "
                   f"records keyed with a newer one (from #{level_from}): written by a "
                   "process still using the retired key (restart every writer with the new "
                   "key), or forged with the old key")

    after = 0
    while end is None or after < end:
        page = await fetch(after)
        if not page:
            break
        for rec in page:
            if end is not None and rec.seq > end:
                break
            expected_seq = 1 if prev is None else prev.seq + 1
            if rec.seq != expected_seq:
                if rec.seq > expected_seq:
                    missing = (f"#{expected_seq}" if rec.seq == expected_seq + 1
                               else f"#{expected_seq} to #{rec.seq - 1}")
                    return bad(expected_seq, f"record {missing} is missing (deleted); "
                               f"the chain continues at #{rec.seq}")
                return bad(rec.seq, f"record #{rec.seq} is out of order or duplicated")
            expected_prev = GENESIS_HASH if prev is None else prev.hash
            found = level_of(rec)
            if found is None or found < level:
                if rec.prev_hash != expected_prev:
                    return bad(rec.seq, f"record #{rec.seq} was changed: its link to the "
                               "previous record (prev_hash) is not that record's hash")
                if found is not None:
                    return out_of_order(rec, found)
                if keyed_otherwise(rec, page):
                    return unverifiable(rec)
                return bad(rec.seq, f"record #{rec.seq} was changed: its content does not "
                           "match its hash")
            if found > level:
                level, level_from = found, rec.seq
            if rec.prev_hash != expected_prev:
                if prev is None:
                    return bad(rec.seq, "record #1 does not start from the genesis hash")
                count -= 1  # the previous record, counted as intact, is the bad one
                return bad(prev.seq, f"record #{prev.seq} was rewritten: its hash is not "
                           f"the one record #{rec.seq} links to")
            prev = rec
            count += 1
        after = page[-1].seq
        if end is not None and after >= end:
            break
    if key is not None and prev is not None and level == 0:
        return bad(None, f"no record of {subject} is keyed with the audit key given (nor a "
                   "previous one): the chain was written without it, or rewritten by "
                   "someone without it")
    if head is None:
        if prev is not None:
            return bad(None, f"the chain head of {subject} is missing, but "
                       f"{count} records exist")
        return AuditReport(True, 0)
    if prev is None or prev.seq < head[0]:
        first = 1 if prev is None else prev.seq + 1
        return bad(first, f"records #{first} to #{head[0]} are missing (deleted from the "
                   f"end of the chain, whose head is #{head[0]})")
    if prev.hash != head[1]:
        count -= 1
        return bad(prev.seq, f"record #{prev.seq} was rewritten: its hash is not the "
                   "recorded chain head")
    return AuditReport(True, count)


# -- an exported, signed chain head ------------------------------------------------------


def signed_head(app: str, head: tuple[int, str] | None, key: AuditKey) -> dict[str, Any]:
    """The chain head of ``app`` as a JSON object signed with ``key``, to keep outside
    the store (``cantata audit head``)."""
    seq, last = head if head is not None else (0, GENESIS_HASH)
    body = {"app": app, "seq": seq, "hash": last, "exported_at": round(_time.time(), 3)}
    return {**body, "signature": key.mac(canonical(body))}


def check_signed_head(doc: Any, app: str, key: AuditKey) -> tuple[int, str]:
    """``(seq, hash)`` of an exported head after checking its signature and app.

    Raises:
        ConfigurationError: the document is malformed, for another app, or its
            signature does not verify with ``key``.
    """
    fields = ("app", "seq", "hash", "exported_at", "signature")
    if not isinstance(doc, dict) or any(f not in doc for f in fields):
        raise ConfigurationError(
            f"the head file is not an exported audit head (it needs {', '.join(fields)}): "
            "make one with `cantata audit head`"
        )
    body = {f: doc[f] for f in fields[:-1]}
    signature = doc["signature"]
    if not isinstance(signature, str) or not any(  # a head exported before a rotation too
        hmac.compare_digest(k.mac(canonical(body)), signature) for k in key.oldest_first()
    ):
        raise ConfigurationError(
            "the head file's signature does not verify with this audit key (nor a previous "
            f"one, {PREVIOUS_VAR}): it was changed, or exported with another key"
        )
    if doc["app"] != app:
        raise ConfigurationError(f"the head file is for app {doc['app']!r}, not {app!r}")
    if not isinstance(doc["seq"], int) or not isinstance(doc["hash"], str):
        raise ConfigurationError("the head file's seq must be an integer and hash a string")
    return doc["seq"], doc["hash"]


async def verify_against_head(
    fetch: Fetch, exported: tuple[int, str], *, subject: str
) -> AuditReport | None:
    """A failure report when the chain no longer holds the exported head's record
    (tail deleted, chain emptied or re-hashed since the export); ``None`` if it does."""
    seq, expected = exported
    if seq == 0:
        return None
    page = await fetch(seq - 1)
    rec = page[0] if page and page[0].seq == seq else None
    if rec is None:
        return AuditReport(False, 0, seq, f"record #{seq} of {subject}, the exported head, "
                           "is gone: the end of the chain was deleted after the export")
    if rec.hash != expected:
        return AuditReport(False, 0, seq, f"record #{seq} of {subject} no longer has the "
                           "exported head's hash: the chain was rewritten after the export")
    return None


#: How often :func:`past_head` reads the head again while appends keep moving it.
_PAST_HEAD_ROUNDS = 8


async def past_head(
    fetch: Fetch,
    recorded: tuple[int, str] | None,
    reread: Callable[[], Awaitable[tuple[int, str] | None]],
    *,
    subject: str,
    count: int,
) -> AuditReport | None:
    """A failure report when records lie past the chain head (``None`` if none do).

    Every append moves the head in the transaction that writes its record, so a
    record past the head was added outside Cantata (a forged record there would
    also make the next append fail). The head is read again after the records: a
    record appended meanwhile is then under it; only records still past the head
    count.
    """
    after = 0 if recorded is None else recorded[0]
    for _ in range(_PAST_HEAD_ROUNDS):
        page = await fetch(after)
        if not page:
            return None
        now = await reread()
        now_seq = 0 if now is None else now[0]
        beyond = [r for r in page if r.seq > now_seq]
        if beyond:
            seq = beyond[0].seq
            return AuditReport(
                False, count, seq,
                f"record #{seq} of {subject} lies past the chain's head (#{now_seq}): added "
                "outside Cantata (no append writes a record without moving the head)",
            )
        after = now_seq  # all appended since the first read: look past the new head
    return None  # appends outpace this check: what lies past the head is being written


async def verify_all(
    fetch: Fetch,
    recorded: tuple[int, str] | None,
    *,
    subject: str,
    key: AuditKey | None,
    exported: tuple[int, str] | None,
    unaudited: Callable[[], Awaitable[tuple[list[str], list[str]]]],
    reread: Callable[[], Awaitable[tuple[int, str] | None]] | None = None,
) -> AuditReport:
    """Everything ``cantata audit verify`` checks: the exported head (if given), the
    chain (keyed if ``key``), that no record lies past the chain's head (read again
    with ``reread``, if given) and that runs and their ``run.created`` records agree."""
    if exported is not None:
        report = await verify_against_head(fetch, exported, subject=subject)
        if report is not None:
            return report
    report = await verify_chain(fetch, recorded, subject=subject, key=key)
    if not report.ok:
        return report
    if reread is not None:
        beyond = await past_head(fetch, recorded, reread, subject=subject,
                                 count=report.records)
        if beyond is not None:
            return beyond
    missing, gone = await unaudited()
    if gone:
        return AuditReport(False, report.records, None, f"run(s) {', '.join(gone)} of "
                           f"{subject} were deleted: their run.created records remain")
    if missing:
        return AuditReport(False, report.records, None, f"run(s) {', '.join(missing)} of "
                           f"{subject} have no run.created audit record (inserted behind "
                           "the log's back)")
    return report
