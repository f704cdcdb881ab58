"""What every backend shares: listeners, audit keys, audit verification, argument checks.

A backend subclasses :class:`StoreBase` and implements the SQL of each role; the
rules that do not depend on the database are written here once (see
docs/architecture.md, "Seams").
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from cantata.errors import StoreUnavailable, StoreUpgraded
from cantata.model.checks import check_seconds
from cantata.model.flow import SlotWait
from cantata.model.records import (
    TASK_WITHDRAWN,
    Attempt,
    AuditRecord,
    AuditReport,
    HistoryEntry,
    first_attempt,
)
from cantata.store import audit
from cantata.store.roles import TASK_OUTCOMES, ChangeListener
from cantata.store.roles.lifecycle import SCHEMA_CHECK_EVERY

log = logging.getLogger("cantata.store")

R = TypeVar("R")

# How a store opened with ``create=False`` that is not there says what to do (a typo in a
# store URL must not make a new, empty store: docs/deploy.md, "Storage faults").
NEW_STORE_HINT = (
    "check the store URL: --store, else the store the app names in its code "
    "(App(store=...)), else $CANTATA_STORE; a worker (cantata worker, App(...)) or "
    "cantata demo creates a new store"
)


# The error of a task of an ended run that a claim withdraws (TaskStore.claim_tasks): its
# two parts go either side of the run id.
ENDED_RUN_ERROR = (
    f"{TASK_WITHDRAWN}: run ",
    " ended before this step finished (its worker stopped or died, or it waited for "
    "a retry); it is not run again",
)



def cancelled_in_queue(run: str) -> str:
    """SQL (SQLite and PostgreSQL alike), true of the run aliased ``run`` when it was
    cancelled while it waited in its queue, never begun (its row waits still, or a queue
    claim that met it dropped it: begun at 0): a claim of runs (``RunStore.claim_runs``)
    takes it whatever its version, to end it cancelled (it has run no code of its
    version and has nothing to undo, docs/flow-control.md#queues)."""
    return (f"({run}.cancel_requested AND {run}.status='pending' AND EXISTS (SELECT 1 FROM "
            f"queue_runs q WHERE q.app={run}.app AND q.run_id={run}.run_id "
            "AND coalesce(q.began_at, 0) = 0))")


def in_progress_per_worker(run: str) -> str:
    """SQL (SQLite and PostgreSQL alike), true of the run aliased ``run`` when it is in
    progress in a queue with a ``per_worker`` limit (begun, its row not done): a claim of
    runs (``RunStore.claim_runs``) takes such a run over from a gone owner only within
    that limit, counted with the runs of the queue the claiming worker has in progress
    (``model.flow.takeovers``), not with the others it claims."""
    return (f"EXISTS (SELECT 1 FROM queue_runs q JOIN queues u ON u.app=q.app AND "
            f"u.name=q.queue WHERE q.app={run}.app AND q.run_id={run}.run_id AND "
            "q.began_at > 0 AND NOT q.done "
            "AND u.per_worker IS NOT NULL)")


def earlier_begin_key(run_id: str, epoch: int) -> str:
    """The key a retried run's queue row is kept under once the run waits again
    (``OperateStore.retry_run``): the begin of its epoch ``epoch`` still counts in the
    queue's rate window and figures until it is pruned, as an ended run's row. (Run ids
    hold no ``@``; a task of a retried step is named the same way, ``run:key@epoch``.)"""
    return f"{run_id}@{epoch}"

def check_task_outcome(outcome: str) -> None:
    """Refuse an outcome :meth:`~cantata.store.roles.TaskStore.finish_task` does not know.

    Raises:
        ValueError: ``outcome`` is none of ``done``, ``failed``, ``retry``.
    """
    if outcome not in TASK_OUTCOMES:
        raise ValueError(f"task outcome {outcome!r} is none of {', '.join(TASK_OUTCOMES)}")


def worker_lease(lease: object) -> float:
    """A heartbeat's ``lease`` (:meth:`~cantata.store.roles.WorkerStore.heartbeat`)
    as seconds: its worker's expiry is its heartbeat plus this.

    Raises:
        ConfigurationError: not a number of seconds > 0 (NaN or infinity would make
            the worker live, or dead, for good).
    """
    seconds = check_seconds("the lease of a worker's heartbeat", lease, none=False)
    assert seconds is not None  # none=False
    return seconds


def newer_schema(where: str, found: int, known: int) -> StoreUpgraded:
    """The refusal to open a store whose schema a newer Cantata made."""
    return StoreUpgraded(
        f"{where} has schema version {found}, newer than this Cantata ({known}); "
        "upgrade cantata"
    )


def upgraded_under(where: str, found: int, known: int) -> StoreUpgraded:
    """What a running worker's heartbeat says once a newer Cantata migrated its store."""
    return StoreUpgraded(
        f"{where} was upgraded by a newer Cantata while this worker ran on it: it has "
        f"schema version {found}, newer than this Cantata ({known}); this worker claims "
        "nothing more, lets what it runs finish and stops: restart it with the new release "
        "(upgrade cantata)"
    )


class StoreBase:
    """Listeners, audit keys and the audit verification of a backend."""

    url: str
    #: The schema version this code knows (set by a backend that records one).
    schema_version: int | None = None
    _schema_beats = 0  # heartbeats since the schema version was last read
    _schema_said = False  # StoreUpgraded was raised: heartbeats no longer look
    hears_others = False  # (in-process listeners only: see StoreLifecycle.hears_others)
    #: Whether listeners hear ``runnable`` whenever a run may have become claimable
    #: (see store.roles.lifecycle.RUNNABLE): then the claim loops wake at that, not at
    #: every ``runs``. ``False`` here (and for a store without the attribute).
    says_runnable = False

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []
        self._audit_keys: dict[str, audit.AuditKey] = {}
        #: Apps on this store that no process of an older Cantata can still write to, so
        #: that this release may leave out rows only those processes read (the first
        #: attempts' rows, SQLite's separate audit head: docs/performance.md, round
        #: twenty-six). Opened by the engine's gate; read by the writers. Empty: write
        #: everything an older release expects.
        self.lean_apps: set[str] = set()

    # -- listeners ------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """In-process listeners only (see ``StoreLifecycle.listening``)."""
        return False

    def add_listener(self, listener: ChangeListener) -> None:
        self._listeners.append(listener)

    def _emit(self, channel: str) -> None:
        """Call every listener with ``channel``; a failing listener is logged, not raised
        (the write it hears about has committed already)."""
        for listener in list(self._listeners):
            try:
                listener(channel)
            except Exception:
                log.exception("store change listener %r failed", listener)

    def _notify(self, channels: Iterable[str]) -> None:
        for channel in channels:
            self._emit(channel)

    def adopt_timing(self, *, lease: float) -> None:
        """Nothing to warn about here (see :meth:`StoreLifecycle.adopt_timing`)."""

    # -- a newer schema under a running worker ------------------------------------------

    async def _recorded_schema(self) -> int | None:
        """The schema version the store records now (``None``: not known)."""
        return None

    def _schema_where(self) -> str:
        """The store, as the messages about its schema name it."""
        return f"store {self.url}"

    async def _upgraded(self) -> StoreUpgraded | None:
        """The error to raise when the store's schema is newer than this code's."""
        try:
            found = await self._recorded_schema()
        except Exception:
            return None  # unreadable now: the heartbeat's own outcome tells
        known = self.schema_version
        if found is None or known is None or found <= known:
            return None
        self._schema_said = True
        return upgraded_under(self._schema_where(), found, known)

    async def _beat(self, write: Callable[[], Awaitable[R]]) -> R:
        """A heartbeat's ``write``, with a look at the schema version every
        :data:`SCHEMA_CHECK_EVERY` heartbeats (before the write) and after a write that
        failed other than by an outage: raises :class:`StoreUpgraded` once, without
        writing, when a newer Cantata migrated the store (see
        :meth:`WorkerStore.heartbeat`); the heartbeats after it are written without a
        look (the worker drains meanwhile)."""
        if not self._schema_said:
            self._schema_beats += 1
            if self._schema_beats >= SCHEMA_CHECK_EVERY:
                self._schema_beats = 0
                newer = await self._upgraded()
                if newer is not None:
                    raise newer
        try:
            return await write()
        except (StoreUnavailable, OSError, TimeoutError):
            raise  # an outage: the version cannot be read either
        except Exception:
            newer = None if self._schema_said else await self._upgraded()
            if newer is None:
                raise
            raise newer from None

    # -- audit ----------------------------------------------------------------------

    def set_audit_key(self, app: str, key: audit.AuditKey | None) -> None:
        if key is None:
            self._audit_keys.pop(app, None)
        else:
            self._audit_keys[app] = key

    @abstractmethod
    async def audit_head(self, app: str) -> tuple[int, str] | None: ...

    @abstractmethod
    async def audit_records(
        self, app: str, *, after_seq: int = 0, limit: int = 1000
    ) -> list[AuditRecord]: ...

    @abstractmethod
    async def _unaudited_runs(self, app: str) -> tuple[list[str], list[str]]:
        """Runs without a ``run.created`` record, and such records whose run is gone
        (see :func:`cantata.store.audit.verify_all`)."""

    async def audit_head_seq(self, app: str) -> int:
        head = await self.audit_head(app)
        return 0 if head is None else head[0]

    async def verify_audit(
        self,
        app: str,
        *,
        key: audit.AuditKey | None = None,
        head: tuple[int, str] | None = None,
    ) -> AuditReport:
        recorded = await self.audit_head(app)

        async def fetch(after: int) -> list[AuditRecord]:
            return await self.audit_records(app, after_seq=after, limit=audit.PAGE)

        return await audit.verify_all(
            fetch,
            recorded,
            subject=f"app {app!r}",
            key=key,
            exported=head,
            unaudited=lambda: self._unaudited_runs(app),
            reread=lambda: self.audit_head(app),
        )


def first_per_run(
    rows: Iterable[tuple[str, R]], run_ids: Iterable[str], limit: int
) -> dict[str, list[R]]:
    """``run id -> its first `limit` items`` of ``(run_id, item)`` rows already in order
    (every run present, with no items if it has none): the per-run cap of
    :meth:`~cantata.store.roles.TraceStore.trace_records`, written once for both backends."""
    out: dict[str, list[R]] = {run_id: [] for run_id in run_ids}
    for run_id, item in rows:
        kept = out[run_id]
        if len(kept) < limit:
            kept.append(item)
    return out


def first_slot_waits(rows: Iterable[tuple[str, str, float, int]]) -> dict[str, SlotWait]:
    """``run id -> its SlotWait`` of ``(run_id, scope, since, ahead)`` rows, the wait a
    run began first where it has several (parallel branches): the reduction of
    :meth:`~cantata.store.roles.TraceStore.slot_waits`, written once for both backends."""
    out: dict[str, SlotWait] = {}
    for run_id, scope, since, ahead in rows:
        known = out.get(run_id)
        if known is None or since < known.since:
            out[run_id] = SlotWait(scope, float(since), int(ahead))
    return out


# -- a step's first attempt, read from its history entry ---------------------------------

#: The history rows that may hold a first attempt (:func:`first_attempt` decides), as a
#: condition both backends' reads add (columns of ``history``, unqualified).
FIRST_ATTEMPT_ROWS = "attempts=1 AND status IN ('running', 'completed')"


def attempt_order(a: Attempt) -> tuple[float, int, str]:
    """The order of a run's attempts (:meth:`~cantata.store.roles.RunStore.load_attempts`):
    start, then number, then key."""
    return (a.started_at, a.attempt, a.key)


def with_first_attempts(entries: Iterable[HistoryEntry], attempts: list[Attempt]) -> list[Attempt]:
    """``attempts`` (one run's rows, in :func:`attempt_order`) with the first attempt of
    each entry of ``entries`` (the same run's history) that has none there, read from
    the entry (:func:`first_attempt`), in that order: what the run's ``attempts`` rows
    would be had each attempt been written. Written once for every reader of attempts
    on both backends (a run's steps, the trace, the copies a retry superseded, a
    resumed run's engine). ``attempts`` itself when nothing is missing."""
    keys = {a.key for a in attempts}
    extra = [a for e in entries if e.key not in keys and (a := first_attempt(e)) is not None]
    if not extra:
        return attempts
    return sorted([*attempts, *extra], key=attempt_order)


def superseded_with_first_attempts(
    entries: Iterable[tuple[int, HistoryEntry]], attempts: list[tuple[int, Attempt]]
) -> list[tuple[int, Attempt]]:
    """:func:`with_first_attempts` of the entries and attempts a run's retries
    superseded, epoch by epoch (``(epoch, item)`` pairs; ``attempts`` by epoch, then in
    :func:`attempt_order`): :meth:`~cantata.store.roles.OperateStore.superseded_attempts`."""
    by_epoch: dict[int, list[HistoryEntry]] = {}
    for epoch, entry in entries:
        by_epoch.setdefault(epoch, []).append(entry)
    if not by_epoch:
        return attempts
    rows: dict[int, list[Attempt]] = {epoch: [] for epoch in by_epoch}
    for epoch, a in attempts:
        rows.setdefault(epoch, []).append(a)
    return [(epoch, a) for epoch in sorted(rows)
            for a in with_first_attempts(by_epoch.get(epoch, ()), rows[epoch])]
