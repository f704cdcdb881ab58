"""The flow-control part of the store protocol: queues, slots and schedules.

:class:`~cantata.store.base.Store` includes :class:`FlowStore`. Every claim is
decided inside one transaction that serializes the claimers of the same queue or
slot scope (SQLite: the write lock; PostgreSQL: the row of the queue, or an
advisory lock for a slot scope), with the rules of :mod:`cantata.model.flow`, so
no number of processes can exceed a limit. :mod:`cantata.testing.contract.flow`
is the executable definition.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

from cantata.model.flow import (
    QueueClaim,
    QueueEntry,
    QueuePosition,
    QueueSpec,
    QueueStats,
    Rate,
    ScheduleRow,
    SlotGrant,
)
from cantata.model.records import RunRecord


class FlowStore(Protocol):
    """Queues, cluster-wide slots and schedules (times are POSIX seconds)."""

    # -- queues -------------------------------------------------------------------

    async def declare_queue(
        self, app: str, spec: QueueSpec, *, worker_id: str, stale_before: float
    ) -> None:
        """Record ``spec``; replaces a definition whose declarer is gone or is ``worker_id``.

        Raises:
            QueueConflict: a live worker (its expiry, heartbeat + its own lease, at or
                after ``stale_before``: the current time) declared the queue with other
                limits; the message names each one.
        """

    async def queues(self, app: str) -> list[QueueSpec]:
        """The queues of ``app``, by name."""

    async def create_queued_run(
        self, run: RunRecord, entry: QueueEntry, *, actor: str = "system"
    ) -> tuple[RunRecord, bool]:
        """:meth:`Store.create_run` for a run that waits in ``entry.queue`` (its
        ``run.created`` by ``actor``).

        The run is stored ``pending`` and unowned with its queue row, in one
        transaction; :meth:`Store.claim_runs` leaves it alone until
        :meth:`claim_queued_runs` lets it begin (or its cancellation is requested).
        """

    async def claim_queued_runs(
        self,
        app: str,
        worker_id: str,
        queue: str,
        workflows: list[str],
        *,
        now: float,
        limit: int,
        exclude_versions: Sequence[str] = (),
        only_versions: Sequence[str] | None = None,
        pin_version: str | None = None,
        replay_checked: Mapping[str, float] | None = None,
        keep_versions_of: Sequence[str] = (),
    ) -> QueueClaim:
        """Let waiting runs of ``workflows`` in ``queue`` begin on ``worker_id``.

        Within the recorded limits of the queue, per partition: in progress
        (begun, run still live) below ``concurrency``, begins in the last
        ``rate.window`` seconds below ``rate.limit``; in progress on this worker
        below ``per_worker``, counting as this worker's the runs in progress that no
        worker owns or whose owner's expiry is before ``now``, that it would take over
        (:meth:`Store.claim_runs`: of ``workflows``, not parked, pinned to
        ``pin_version`` or to none), so that the room that frees goes to them first.
        With ``priorities``, lower numbers first; then oldest first. Past a first page
        of waiting runs all held back by their own partitions' limits, the best runs
        of each other partition with room are read (``model.flow.ClaimPages``), so a
        run of a new partition key begins at the first claim after it is queued.
        Admitted runs are owned by ``worker_id`` (fence + 1), with their begin time
        recorded. A waiting run that can no longer begin (its cancel asked, or ended) that
        the claim meets has its row dropped and takes no slot: the claim admits the runs
        past it instead (``model.flow.Admissions``), so a freed slot is not left to a later
        claim. Runs pinned to one of ``exclude_versions`` (newer code than the worker's,
        docs/operating.md), or, with ``only_versions``, to a version not in it, are not
        candidates: they keep waiting, in their place, for a worker that takes them (while
        they can still begin: the row of one cancelled or ended meanwhile is met, and
        dropped, as above). Runs pinned to no version are candidates whatever these say.
        With ``pin_version``, each admitted run is pinned to that version (the code that
        begins it), as :meth:`Store.claim_runs` does, with the same exception: a run of one
        of ``keep_versions_of`` already pinned to a version keeps it. With
        ``replay_checked`` (run id -> ``updated_at``), a run with recorded history (retried,
        or forked) pinned to a version other than ``pin_version`` (and not to none) is a
        candidate only if it is listed there and its ``updated_at`` is still the one listed:
        the caller checked that its code replays that history (:meth:`Store.foreign_runs`
        with ``queued`` finds them); the others keep waiting, in their place, as above.
        Without it (``None``), such runs begin unchecked (a worker told ``--any-version``).
        """

    async def queue_stats(self, app: str, *, now: float) -> list[QueueStats]:
        """Depth, in progress, begins in the rate window and oldest waiting, per queue."""

    async def queue_position(self, app: str, run_id: str) -> QueuePosition | None:
        """Where a run waits, how many waiting runs of its partition go first, and
        since when it waits (``since``: when it was queued, or queued again by a
        retry); ``None`` if it does not wait in a queue."""

    async def run_queue(self, app: str, run_id: str) -> QueueEntry | None:
        """The queue, partition and priority a run waits or runs in (``None``: it was
        not started in a queue, or its row was pruned after the run ended, see
        :meth:`prune_queue_runs`)."""

    async def prune_queue_runs(
        self, app: str, queue: str, *, before: float, limit: int
    ) -> int:
        """Delete at most ``limit`` rows of ``queue`` that can no longer matter: their
        run has ended (or is gone) and began before ``before`` (the caller's time less
        the longest window the queue's begins are counted in: its rate's, and that of
        :meth:`queue_stats`). A row that never began (its run cancelled while it
        waited) is left until a claim meets it. Returns how many were deleted.

        Rows are picked by their key and deleted once: two pruners at once delete
        each row once between them, a claim of the queue at the same time counts as
        if the rows were still there (they are outside its windows and not in
        progress), and a pruner never waits for a claim's locks (nor a claim for long
        for a pruner's).
        """

    # -- slots of limited steps and handler groups -----------------------------------

    async def acquire_slot(
        self,
        app: str,
        scope: str,
        holder: str,
        worker_id: str,
        *,
        concurrency: int | None,
        rate: Rate | None,
        now: float,
        stale_before: float,
        lapsed_before: float | None = None,
        forget_before: float | None = None,
        begin_at: float | None = None,
    ) -> SlotGrant:
        """Take a slot of ``scope`` for ``holder`` if ``concurrency`` and ``rate`` allow,
        first come, first served.

        Slots of other workers whose expiry (heartbeat + their own lease) is before
        ``stale_before``, the current time (or that are gone), are freed first. A
        holder that already has a slot of ``worker_id`` keeps it (granted again,
        nothing counted twice); with a rate, its latest begin is re-timed to
        ``begin_at`` (its code begins again, or later than first recorded), or, if that
        begin has left the window, it asks as a new holder. A slot of ``holder`` that
        another live worker holds is never taken over: the request is denied as when no
        slot is free (it waits), so a stale execution of a run another worker took
        over, asking under the same holder, is not granted the new owner's slot (nor
        the new owner the stale one's while that worker lives). A grant records a
        begin for the rate at ``begin_at`` (``None``: ``now``; a later time when the
        caller will begin its code then, a slow store's round trip ahead). A begin is
        recorded only while fewer than ``limit`` begins are kept (those after ``now``
        minus the window, future ones included), and a re-timing only moves a kept one
        later: so no window ever holds more than ``limit``, wherever the begins fall.

        Waiters: a request that is denied registers ``holder`` as a waiter of ``scope``
        (or keeps its place, noting that it asked at ``now``). A request is granted
        only if the free slots (and the rate's free begins) outnumber the live waiters
        that registered before it: a newcomer never takes a slot an older waiter is
        owed, whichever asks first after a release, in whichever process. A waiter is
        live if it asked at or after ``lapsed_before`` (``None``: ``forget_before``) and
        its worker is live (or is ``worker_id``); one that has not asked since
        ``forget_before`` (the asking worker's ``now - lease``; ``None``: never for
        that), or whose worker's lease lapsed, is removed. A grant removes
        the holder's waiter row. Denied by the rate, ``retry_at`` is when the window
        has room for this waiter's turn (the oldest waiter: the next begin it frees).
        """

    async def release_slot(self, app: str, scope: str, holder: str, worker_id: str) -> None:
        """Free ``holder``'s slot of ``scope`` if ``worker_id`` holds it (nothing if it
        holds none): a worker never frees a slot another worker was granted, even under
        the same holder. The listeners hear ``slots``
        (:data:`~cantata.store.roles.lifecycle.SLOTS`), those of other processes too
        where the store can tell them (``hears_others``)."""

    async def withdraw_slot_request(
        self, app: str, scope: str, holder: str, worker_id: str
    ) -> None:
        """``holder`` stops waiting for a slot of ``scope`` (its run was cancelled, its
        handler's message lost): its waiter row, if ``worker_id``'s, is removed, so the
        waiters behind it move up, and the waiting processes hear of it as of a release,
        ``slots``
        (nothing if it does not wait)."""

    async def slots_held(self, app: str, scope: str) -> int:
        """How many slots of ``scope`` are held (by live or not-yet-expired workers)."""

    # -- schedules ------------------------------------------------------------------------

    async def put_schedule(
        self, app: str, row: ScheduleRow, *, actor: str | None = None, replace: bool = True
    ) -> bool:
        """Insert ``row``, or replace the spec and source of the schedule of that name
        (keeping its state and pause). Returns True when it was new. With ``actor``
        (an operator's change), one audit record in the same transaction:
        ``schedule.created`` or ``schedule.replaced`` (:func:`~cantata.store.audit.
        schedule_put_entry`). The listeners hear ``schedules`` (``SCHEDULES``).
        With ``replace=False`` a schedule of that name is left as it is (no record,
        nothing heard) and False returned: of simultaneous creations of one name,
        exactly one inserts."""

    async def schedules(self, app: str) -> list[ScheduleRow]:
        """Every schedule of ``app``, by name."""

    async def update_schedule(
        self,
        app: str,
        name: str,
        version: int,
        *,
        state: str | None = None,
        paused: bool | None = None,
        actor: str | None = None,
    ) -> bool:
        """Compare-and-set: apply if the schedule's version is still ``version`` (then
        version + 1). False if it changed meanwhile or is gone. With ``actor`` and
        ``paused``, an applied change writes ``schedule.paused`` or
        ``schedule.resumed`` to the audit log in the same transaction. An applied
        change of ``paused`` makes the listeners hear ``schedules``; one of ``state``
        alone (a scheduler's bookkeeping) does not."""

    async def delete_schedule(self, app: str, name: str, *, actor: str | None = None) -> bool:
        """Remove a schedule; False if there was none. With ``actor``, a removal writes
        ``schedule.deleted`` to the audit log in the same transaction. A removal makes
        the listeners hear ``schedules``."""
