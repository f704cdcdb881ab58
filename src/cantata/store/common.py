"""What every backend shares: listeners, audit keys, audit verification, argument checks.

A backend subclasses :class:`StoreBase` and implements the SQL of each role; the
rules that do not depend on the database are written here once (see
docs/architecture.md, "Seams").
"""

from __future__ import annotations

import logging
from abc import abstractmethod
from collections.abc import Iterable
from typing import TypeVar

from cantata.model.checks import check_seconds
from cantata.model.records import TASK_WITHDRAWN, AuditRecord, AuditReport
from cantata.store import audit
from cantata.store.roles import TASK_OUTCOMES, ChangeListener

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


class StoreBase:
    """Listeners, audit keys and the audit verification of a backend."""

    url: str
    hears_others = False  # (in-process listeners only: see StoreLifecycle.hears_others)

    def __init__(self) -> None:
        self._listeners: list[ChangeListener] = []
        self._audit_keys: dict[str, audit.AuditKey] = {}

    # -- listeners ------------------------------------------------------------------

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
