"""An idempotent start's identity: its workflow and its arguments as canonical JSON.

``app.start(..., idempotency_key=k)`` twice with the same workflow and equal
arguments is the same run. Arguments are equal as JSON values with their object
keys sorted (``{"id": 42, "total": 5}`` and ``{"total": 5, "id": 42}`` are), not
as Python values (``true`` is not ``1``). The run records a hash of that canonical
text (``args_hash``); a store compares the hashes first and, when they differ,
the stored arguments themselves, so a run whose hash was made otherwise (before
hashes were canonical) still matches its retry.

A run that ``app.start_on`` starts for an event has a key of its own
(:func:`trigger_keys`): ``event:<event id>`` for the first workflow started by
that event, ``event:<workflow>:<event id>`` for each other one.

A key a caller gives (``app.start``, ``cantata start``, the console's API) is at
most :data:`MAX_GIVEN_KEY` characters (:func:`check_given_key`): the store indexes
it, and PostgreSQL cannot index text of more than 2,704 bytes.
"""

from __future__ import annotations

import hashlib

import orjson

from cantata.errors import IdempotencyConflict
from cantata.model.checks import check_key
from cantata.model.event import MAX_ATTRIBUTE
from cantata.model.records import RunRecord

#: The longest idempotency key a caller gives, in characters: an event attribute's
#: bound (500 characters of up to 4 bytes each fit the store's index).
MAX_GIVEN_KEY = MAX_ATTRIBUTE
KEY_ADVICE = (
    "the business key that makes this start unique (e.g. 'order-42'), or None "
    "for a new run each time"
)
CORRELATION_ADVICE = "the id of the business transaction to join, or None to begin a new one"


def check_given_key(key: object) -> None:
    """``key`` as a caller's ``idempotency_key``: ``None``, or a non-empty string of at
    most :data:`MAX_GIVEN_KEY` characters the store keeps as it is. (Keys Cantata makes,
    :func:`trigger_keys`, a child's or a schedule tick's, are not bounded here.)

    Raises:
        ConfigurationError: naming the key (cut), its length and what to pass.
    """
    check_key("idempotency_key", key, KEY_ADVICE, empty=False, longest=MAX_GIVEN_KEY)


def check_correlation_id(correlation_id: object) -> None:
    """``correlation_id`` as a new run takes it: ``None`` or ``""`` (the run begins a
    transaction of its own), or a string of at most :data:`MAX_ATTRIBUTE` characters
    (the events the run emits carry it) the store keeps as it is.

    Raises:
        ConfigurationError: naming the id (cut), its length and what to pass.
    """
    check_key("correlation_id", correlation_id, CORRELATION_ADVICE, longest=MAX_ATTRIBUTE)


def canonical_args(args_json: str) -> str:
    """``args_json`` with every object's keys sorted (as is, if it is not JSON orjson
    reads: then only the same text matches)."""
    try:
        return orjson.dumps(orjson.loads(args_json), option=orjson.OPT_SORT_KEYS).decode()
    except (orjson.JSONDecodeError, TypeError):
        return args_json


def args_hash(workflow: str, args_json: str) -> str:
    """The hash a new run records of its workflow and canonical arguments."""
    return hashlib.sha256(f"{workflow}\0{canonical_args(args_json)}".encode()).hexdigest()


def same_start(existing: RunRecord, run: RunRecord) -> bool:
    """True if ``run`` (new, with ``existing``'s idempotency key) asks for ``existing``:
    the same workflow, and equal arguments."""
    if existing.workflow != run.workflow:
        return False
    if existing.args_hash is not None and existing.args_hash == run.args_hash:
        return True
    return canonical_args(existing.args) == canonical_args(run.args)


def start_conflict(existing: RunRecord, run: RunRecord) -> IdempotencyConflict:
    """The refusal of ``run``, whose idempotency key ``existing`` took for another
    request (see :func:`same_start`)."""
    key = run.idempotency_key
    if existing.workflow != run.workflow:
        err = IdempotencyConflict(
            f"idempotency key {key!r} belongs to run {existing.run_id} of workflow "
            f"{existing.workflow}, not {run.workflow}: use a key of your own for each "
            f"request of {run.workflow}"
        )
        err.other_workflow = existing.workflow
        return err
    return IdempotencyConflict(
        f"idempotency key {key!r} was already used for run {existing.run_id} of "
        f"{existing.workflow} with different arguments; use a new key for a new request"
    )


def trigger_keys(workflow: str, event_id: str) -> tuple[str, str]:
    """The idempotency keys a run of ``workflow`` that event ``event_id`` starts may
    have, in the order they are tried.

    ``event:<id>`` first: what one trigger per type has always used, so a run stored
    before a second trigger was added (or before this scheme) is found again on a
    redelivery, and never started twice. When another workflow's run holds it (the
    event starts several workflows), ``event:<workflow>:<id>``, this workflow's own.
    """
    return f"event:{event_id}", f"event:{workflow}:{event_id}"


def trigger_event(run: RunRecord) -> str | None:
    """The id of the event that started ``run`` through ``app.start_on`` (``None``
    for a run started otherwise)."""
    cause, key = run.causation_id, run.idempotency_key
    if cause is None or key is None or run.parent_run_id is not None:
        return None
    return cause if key in trigger_keys(run.workflow, cause) else None
