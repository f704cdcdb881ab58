"""Records exchanged between the engine and the stores (pure data, no I/O)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cantata.model import codec
from cantata.model.event import Event
from cantata.model.status import RunStatus

LATEST = dt.datetime.max.replace(tzinfo=dt.UTC)
EARLIEST = dt.datetime.min.replace(tzinfo=dt.UTC)


def to_datetime(ts: float | None) -> dt.datetime | None:
    """POSIX time to an aware UTC datetime (``None`` stays ``None``).

    A time no date can hold (past year 9999, infinite, NaN) is the latest (or, below
    year 1, the earliest) datetime there is: durations are bounded where they are
    given (``model.checks.MAX_SECONDS``), but one stored value out of range must not
    break a trace, or a listing of the whole app.
    """
    if ts is None:
        return None
    return utc_datetime(ts)


def utc_datetime(ts: float) -> dt.datetime:
    """:func:`to_datetime` of a time that is never ``None``."""
    try:
        return dt.datetime.fromtimestamp(ts, dt.UTC)
    except (OverflowError, ValueError, OSError):
        return EARLIEST if ts < 0 else LATEST


def local_datetime(ts: float) -> dt.datetime:
    """POSIX time as a naive local datetime, for a person to read; out of range as
    in :func:`to_datetime` (in UTC then)."""
    try:
        return dt.datetime.fromtimestamp(ts)
    except (OverflowError, ValueError, OSError):
        return (EARLIEST if ts < 0 else LATEST).replace(tzinfo=None)


@dataclass(slots=True)
class RunRecord:
    """The stored state of one workflow run."""

    run_id: str
    app: str
    workflow: str
    status: RunStatus
    args: str  # JSON list
    created_at: float
    updated_at: float
    correlation_id: str
    causation_id: str | None = None
    idempotency_key: str | None = None
    args_hash: str | None = None
    parent_run_id: str | None = None
    deadline_at: float | None = None
    result: str | None = None  # JSON
    error: str | None = None  # "Type: message"
    cancel_requested: bool = False
    owner: str | None = None
    fence: int = 0
    flagged: bool = False
    service: str | None = None
    version: str | None = None  # code version it is pinned to (None: any worker)
    epoch: int = 0  # operator retries so far (the generation of its live history)


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A run as listed by ``app.list_runs`` and ``app.find_runs``.

    ``attributes`` holds the run's search attributes (``ctx.set_attributes``) in
    their indexed text form; ``list_runs`` leaves it empty.
    """

    run_id: str
    workflow: str
    status: RunStatus
    created_at: dt.datetime
    updated_at: dt.datetime
    error: str | None
    idempotency_key: str | None = None
    correlation_id: str | None = None
    version: str | None = None
    attributes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, run: RunRecord, attributes: Mapping[str, str] | None = None) -> RunInfo:
        created = to_datetime(run.created_at)
        updated = to_datetime(run.updated_at)
        assert created is not None and updated is not None
        return cls(run.run_id, run.workflow, run.status, created, updated, run.error,
                   run.idempotency_key, run.correlation_id, run.version,
                   dict(attributes or {}))


class EntryKind(StrEnum):
    """What a history entry records (the values are stored: old histories replay)."""

    STEP = "step"
    COMPENSATION = "compensation"
    SLEEP = "sleep"
    WAIT = "wait"
    VALUE = "value"  # ctx.now / ctx.random / ctx.uuid, the moment a cancel was delivered
    EMIT = "emit"
    CHILD = "child"
    ATTRS = "attrs"  # ctx.set_attributes
    PATCH = "patch"  # ctx.patched: the marker of a run that took the patched path
    SET_VALUE = "set_value"  # ctx.set_value


# The calls a run may be forked from (``app.fork``'s ``from_step``, the console's Fork
# list): the nodes of its workflow map. Compensations, and what a run records about
# itself (``ctx.now()`` and other values, attributes, patch markers, set values), are
# not steps: a fork from one would be a fork from the call after it.
FORKABLE_KINDS = frozenset({EntryKind.STEP, EntryKind.CHILD, EntryKind.WAIT,
                            EntryKind.SLEEP, EntryKind.EMIT})


class EntryStatus(StrEnum):
    """Where a history entry stands (stored values)."""

    RUNNING = "running"
    WAITING = "waiting"
    COMPLETED = "completed"
    FAILED = "failed"


# The names the stores and older modules use.
STEP = EntryKind.STEP
COMPENSATION = EntryKind.COMPENSATION
SLEEP = EntryKind.SLEEP
WAIT = EntryKind.WAIT
VALUE = EntryKind.VALUE
EMIT = EntryKind.EMIT
CHILD = EntryKind.CHILD
ATTRS = EntryKind.ATTRS
PATCH = EntryKind.PATCH
ENTRY_RUNNING = EntryStatus.RUNNING
ENTRY_WAITING = EntryStatus.WAITING
ENTRY_COMPLETED = EntryStatus.COMPLETED
ENTRY_FAILED = EntryStatus.FAILED


@dataclass(slots=True)
class HistoryEntry:
    """One durable call in a run's history, keyed by ``name#occurrence``."""

    key: str
    kind: EntryKind
    name: str
    status: EntryStatus
    seq: int = 0  # position in history (assigned by the engine, 1-based)
    result: str | None = None  # JSON
    error: str | None = None  # "Type: message"
    error_type: str | None = None
    attempts: int = 0
    started_at: float | None = None
    ended_at: float | None = None
    wake_at: float | None = None  # sleep end / wait timeout, kept across crashes
    detail: str | None = None  # JSON: wait pattern and match, compensated step, child run...

    def __post_init__(self) -> None:  # a store reads the stored strings back
        if type(self.kind) is not EntryKind:
            self.kind = EntryKind(self.kind)
        if type(self.status) is not EntryStatus:
            self.status = EntryStatus(self.status)


#: The key of a step entry's detail saying the workflow's own code cancelled the step's
#: branch while it ran (engine/branches.py records it; traces and the console show it).
BRANCH_CANCELLED = "cancelled"


def branch_cancelled(entry: HistoryEntry) -> bool:
    """Whether history says the workflow's code cancelled ``entry``'s branch while the
    step ran (the step ended as it did, then the branch got the cancel)."""
    detail = entry.detail
    if detail is None or BRANCH_CANCELLED not in detail:
        return False
    info = codec.loads(detail)
    return isinstance(info, dict) and info.get(BRANCH_CANCELLED) is True


def mark_branch_cancelled(detail: str | None) -> str:
    """A step entry's ``detail`` with the mark :func:`branch_cancelled` reads added."""
    info = codec.loads(detail) if detail else {}
    return codec.dumps({**info, BRANCH_CANCELLED: True})


@dataclass(slots=True)
class Attempt:
    """One attempt of a step (or compensation)."""

    key: str
    attempt: int
    started_at: float
    ended_at: float | None = None
    error_type: str | None = None
    error: str | None = None


class TaskStatus(StrEnum):
    """Where a remote step call stands (one row per call; stored values)."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


TASK_PENDING = TaskStatus.PENDING
TASK_DONE = TaskStatus.DONE
TASK_FAILED = TaskStatus.FAILED
#: The error type of a task withdrawn before any worker took it: its run ended, or
#: began unwinding (a cancel, a deadline), first (TaskStore.withdraw_tasks).
TASK_WITHDRAWN = "Withdrawn"
#: The service of a task whose step no service had declared when it was made (an
#: ``app.remote_step(wait_for_service=True)`` stub without ``service=``): a worker
#: whose service declares the step claims it, and the task takes that service.
UNADDRESSED = ""


class LostAttempt(StrEnum):
    """The error type recorded on an attempt that did not end by itself."""

    # The worker running it stopped (crash or kill): counts as an attempt.
    WORKER_LOST = "WorkerLost"
    # A live worker cut it short itself (a graceful stop past its grace): recorded,
    # not counted; the next attempt takes its number (docs/leases.md).
    INTERRUPTED = "Interrupted"


@dataclass(slots=True)
class TaskRecord:
    """A step call addressed to the workers of another service (see docs/guide.md).

    Created by the calling run's checkpoint, claimed and finished by a worker of
    ``service``; fenced like deliveries so a worker that lost it cannot finish it.
    """

    task_id: str  # f"{run_id}:{key}", unique per app
    run_id: str
    key: str  # the step's place in the run's history, e.g. "inventory.reserve#1"
    step: str  # qualified step name, e.g. "inventory.reserve"
    service: str  # the service whose workers execute it (UNADDRESSED: not known yet)
    args: str  # JSON list
    status: TaskStatus = TASK_PENDING
    attempts: int = 0
    next_at: float = 0.0
    owner: str | None = None
    fence: int = 0
    result: str | None = None  # JSON
    error: str | None = None  # "Type: message"
    error_type: str | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    correlation_id: str | None = None

    def __post_init__(self) -> None:  # a store reads the stored string back
        if type(self.status) is not TaskStatus:
            self.status = TaskStatus(self.status)


@dataclass(slots=True)
class RunWrite:
    """Everything one checkpoint of a run changes, committed in one transaction.

    ``status`` / ``result`` / ``error`` change the run; ``entries`` and ``attempts``
    are upserted by key; ``events`` are appended to the event log (and outbox);
    ``tasks`` are created (once per ``task_id``) for workers of other services.
    """

    entries: list[HistoryEntry] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)
    events: list[Event[Any]] = field(default_factory=list)
    tasks: list[TaskRecord] = field(default_factory=list)  # remote step calls to create
    status: RunStatus | None = None
    result: str | None = None
    error: str | None = None
    flagged: bool | None = None
    release: bool = False  # give up ownership (final status, or graceful stop)
    wake: str | None = None  # a run to wake if parked (the parent of a run that ends)


#: The statuses of an entry whose first attempt its ``history`` row holds alone when
#: the step has no ``attempts`` row: begun (in progress) or completed by it.
FIRST_ATTEMPT_STATUSES = (EntryStatus.RUNNING, EntryStatus.COMPLETED)


def first_attempt(entry: HistoryEntry) -> Attempt | None:
    """The attempt ``entry``'s history row says alone, if it may: its step's only
    attempt, begun at the entry's ``started_at`` and, once the entry completed, ended at
    its ``ended_at``, without an error. ``None`` for any other entry (another kind of
    call has no attempts; a failed attempt, a second one, an attempt cut short are
    always written to ``attempts``). Whether the step's row of it is missing is the
    caller's: see ``store.common.with_first_attempts``."""
    if (entry.attempts != 1 or entry.started_at is None or entry.error_type is not None
            or entry.status not in FIRST_ATTEMPT_STATUSES):
        return None
    ended = entry.ended_at if entry.status == EntryStatus.COMPLETED else None
    return Attempt(entry.key, 1, entry.started_at, ended)


@dataclass(frozen=True, slots=True)
class Declaration:
    """Something an app declares when it opens: a workflow, a handler group or a trigger."""

    kind: str  # "workflow" | "step" | "handler" | "trigger"
    name: str  # workflow/step name, or handler group
    pattern: str = ""  # event pattern for handlers and triggers
    service: str | None = None
    detail: str | None = None  # JSON: emitted types, handler function, ...


@dataclass(frozen=True, slots=True)
class GroupStats:
    """One handler group or trigger of an app, as ``cantata groups`` lists it.

    ``kind``: ``handler`` or ``trigger`` (a ``start_on`` trigger's group is
    ``start:<workflow>``); ``None`` for a group no longer declared that still has pending
    deliveries or dead letters (retired, with deliveries a live worker held then).
    ``patterns``: the event type patterns it is declared for. ``pending``: its pending
    deliveries, of which ``in_progress`` are held by a live worker now;
    ``oldest_pending_at``: when the event of the oldest one was stored (``None``: none
    pending). ``dead_letters``: its dead letters (``cantata dlq``).
    """

    group: str
    kind: str | None
    patterns: tuple[str, ...]
    pending: int = 0
    in_progress: int = 0
    oldest_pending_at: float | None = None
    dead_letters: int = 0


@dataclass(frozen=True, slots=True)
class GroupRetired:
    """What retiring a group did (``Store.retire_group``).

    ``declarations``: the rows removed (none: it was not declared). ``ended``: its
    pending deliveries settled as retired; ``held``: those left pending because a live
    worker held them (it handles them); ``dead_letters``: its dead letters, kept.
    """

    group: str
    declarations: tuple[Declaration, ...]
    ended: int
    held: int
    dead_letters: int

    @property
    def changed(self) -> bool:
        """Whether the retire removed or ended anything (a second retire does not)."""
        return bool(self.declarations or self.ended)


#: The start of the ``error`` of a delivery a retire ended (``status`` ``done``, its
#: handler never ran for it): ``cantata:retired by <actor>: ...``. The trace shows such a
#: delivery's handler as ``retired`` (docs/operating.md, "Retiring a group").
RETIRED_MARK = "cantata:retired"


def retired_error(actor: str) -> str:
    """The ``error`` a retire writes on each delivery it ends."""
    return (f"{RETIRED_MARK} by {actor}: the group was retired (cantata groups retire); "
            "its handler did not handle this event")


def is_retired(status: str, error: str | None) -> bool:
    """Whether a delivery was ended by a retire of its group, not handled."""
    return status == "done" and error is not None and error.startswith(RETIRED_MARK)


class DeliveryStatus(StrEnum):
    """Where one event's delivery to one group stands (stored values)."""

    PENDING = "pending"
    DONE = "done"
    DEAD = "dead"


DELIVERY_PENDING = DeliveryStatus.PENDING
DELIVERY_DONE = DeliveryStatus.DONE
DELIVERY_DEAD = DeliveryStatus.DEAD


class DeliveryOutcome(StrEnum):
    """What became of one handling of a delivery (``Hook.handled``)."""

    DONE = "done"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(slots=True)
class Delivery:
    """One event addressed to one group."""

    group: str
    event: Event[Any]
    status: DeliveryStatus = DELIVERY_PENDING
    attempts: int = 0
    next_at: float = 0.0
    error: str | None = None
    updated_at: float = 0.0
    fence: int = 0

    def __post_init__(self) -> None:  # a store reads the stored string back
        if type(self.status) is not DeliveryStatus:
            self.status = DeliveryStatus(self.status)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A (group, event) that failed for good, as listed by ``app.dead_letters()``."""

    id: str
    group: str
    event: Event[Any]
    error: str
    attempts: int
    failed_at: dt.datetime


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    """A worker process, its last heartbeat and its own lease.

    It is live while :attr:`expires_at` (its last heartbeat + its lease) is at or after
    the current time: each worker is judged by the lease it heartbeats with, never by
    the lease of the worker looking at it (docs/leases.md).
    """

    worker_id: str
    heartbeat_at: float
    started_at: float
    info: str | None = None
    lease: float = field(kw_only=True)

    @property
    def expires_at(self) -> float:
        """When the worker may be taken for dead if it does not heartbeat again."""
        return self.heartbeat_at + self.lease


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One link of an app's hash-chained audit log (docs/security.md).

    ``hash`` is ``sha256(prev_hash + canonical JSON of [seq, time, actor, action,
    target, data])`` (see :mod:`cantata.store.audit`); ``seq`` is contiguous per app.
    """

    seq: int
    time: float
    actor: str  # "system", "worker:<id>", or the operator passed in
    action: str  # e.g. "run.created", "run.status", "delivery.dead"
    target: str  # run id, task id, or "group:event_id"
    data: str  # JSON object (canonical text)
    prev_hash: str
    hash: str


@dataclass(frozen=True, slots=True)
class AuditReport:
    """The outcome of verifying an app's audit log.

    ``first_bad_seq`` names the first record that was changed, deleted or wrongly
    linked (``None`` when the log is intact, or when only the chain head is gone).
    ``wrong_key``: the chain could not be verified rather than found changed: from
    ``first_bad_seq`` on, its records link together but none matches its hash under
    the key given (or without one): they were keyed with another key.
    """

    ok: bool
    records: int
    first_bad_seq: int | None = None
    reason: str | None = None
    wrong_key: bool = False


@dataclass(frozen=True, slots=True)
class StepHeartbeat:
    """The newest heartbeat of a step (``cantata.heartbeat``), kept for its next attempt."""

    key: str  # the step's place in history, e.g. "transfer#1"
    attempt: int
    at: float
    details: str | None  # JSON


# (key, seq, kind, status) of one history row: all the rules of retry and fork need.
Row = tuple[str, int, str, str]


def superseded_keys(rows: Sequence[Row]) -> list[str]:
    """The entries a retry supersedes: the first failed one (not a compensation) and
    every entry after it — the compensations the failure ran among them. With no failed
    entry (the workflow's own code failed), the compensations after its last call: the
    whole history replays. Compensations the workflow ran itself before that point
    (``ctx.compensate``) stay done."""
    failed = [seq for _, seq, kind, status in rows
              if status == ENTRY_FAILED and kind != COMPENSATION]
    calls = [seq for _, seq, kind, _ in rows if kind != COMPENSATION]
    cut = min(failed) if failed else (max(calls) + 1 if calls else 0)
    return [key for key, seq, _, _ in rows if seq >= cut]
