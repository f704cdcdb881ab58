"""Reading a transaction back: what ``app.trace`` and stall detection read."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cantata.model.event import Event
from cantata.model.flow import SlotWait
from cantata.model.records import (
    Attempt,
    DeadLetter,
    Delivery,
    HistoryEntry,
    RunRecord,
    TaskRecord,
)

#: The order of each part of :class:`TraceRecords` (text compares by code point, as
#: SQLite's BINARY and PostgreSQL's ``COLLATE "C"`` do).
TRACE_ORDER = {
    "runs": ("created_at", "run_id"),
    "entries": ("seq",),
    "attempts": ("started_at", "attempt", "key"),
    "tasks": ("created_at", "task_id"),
    "events": ("seq",),  # the log's order
    "deliveries": ("updated_at", "group", "event_id"),
    "dead_letters": ("failed_at", "id"),
    "replayed_dead_letters": ("failed_at", "id"),
}


@dataclass(frozen=True, slots=True)
class TraceRecords:
    """Everything the store knows about one correlation id (for ``app.trace``)."""

    runs: list[RunRecord]
    entries: dict[str, list[HistoryEntry]]  # run_id -> history
    attempts: dict[str, list[Attempt]]  # run_id -> attempts
    events: list[tuple[Event[Any], float]]  # (event, stored_at)
    deliveries: list[Delivery]
    dead_letters: list[DeadLetter]
    tasks: list[TaskRecord] = field(default_factory=list)  # remote step calls of the runs
    # dead letters replayed since (off the queue), each with the time of its replay
    replayed_dead_letters: list[tuple[DeadLetter, float]] = field(default_factory=list)


class TraceStore(Protocol):
    """Runs, events and deliveries of one correlation id, and where work is stuck."""

    async def apps(self) -> list[str]:
        """The names of the apps that have anything in this store, sorted."""

    async def slot_waits(self, app: str, run_ids: Sequence[str]) -> dict[str, SlotWait]:
        """``run id -> SlotWait`` for those of ``run_ids`` whose execution (under the
        run's current owner) waits for a slot of a limited step: the wait it began
        first, if it waits for several. Runs that wait for none are left out."""

    async def trace_records(self, app: str, correlation_id: str, *, limit: int) -> TraceRecords:
        """Runs, history, tasks, events, deliveries and dead letters of one transaction.

        One rule for every backend (:data:`TRACE_ORDER` names the sort keys; ties are
        broken by the later keys, so the result is the same on every backend):

        - ``runs``: the ``limit`` oldest runs of ``correlation_id``;
        - ``entries`` and ``attempts``: for each of those runs, its first ``limit``
          history entries and its first ``limit`` attempts (a step's first attempt
          read from its entry where no row holds it, as ``RunStore.load_attempts``
          reads it: from the first ``limit`` entries);
        - ``tasks``: the first ``limit`` tasks over all those runs together;
        - ``events``: the first ``limit`` events of ``correlation_id`` in log order;
        - ``deliveries``, ``dead_letters`` and ``replayed_dead_letters`` (the letters
          :meth:`~cantata.store.roles.EventStore.replay_dead_letter` took off the
          queue, with the time of the replay): all those of those events.

        Read from one snapshot where the database offers one (PostgreSQL).
        """

    async def stale_correlations(
        self, app: str, *, older_than: float, limit: int, now: float | None = None
    ) -> list[str]:
        """Correlation ids with live work older than a time, oldest first.

        Live work: live runs, flagged runs, pending or dead deliveries, pending tasks
        (a service whose workers are down leaves its tasks pending). A run parked until
        a time after ``now`` (default: the system's clock) that waits for no event (a
        ``ctx.sleep``, a child's end, a retry's backoff) is not live work until then: it
        waits as it was told to, and a worker may hold a million such runs; it is read
        once due. A parked run waiting for an event is live work.
        """
