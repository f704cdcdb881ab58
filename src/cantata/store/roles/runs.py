"""Runs, their history and their step heartbeats: what the engine records.

Every write of a run is fenced where it says so: a worker that lost a run cannot
commit for it (docs/leases.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cantata.model.records import (
    Attempt,
    HistoryEntry,
    RunRecord,
    RunWrite,
    StepHeartbeat,
)
from cantata.model.status import RunStatus


class RunStore(Protocol):
    """Runs and their history (all times are POSIX seconds from the app's clock)."""

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None, *, actor: str = "system"
    ) -> tuple[RunRecord, bool]:
        """Insert ``run`` unless its (app, idempotency_key) exists; audited as
        ``run.created`` by ``actor`` (the operator who started it, or ``system``) in
        the same transaction.

        Returns ``(stored_run, created)``: the existing run and ``False`` when the key
        was used before for the same start: the same workflow, and the same
        ``args_hash`` or else equal arguments as canonical JSON
        (:func:`cantata.model.idempotency.same_start`: a hash made otherwise, before
        hashes were canonical, still matches). ``first``, the run's first checkpoint
        (by its owner, ``run.owner``), is committed in the same transaction when the
        run is created, and not at all when it is not.

        Raises:
            IdempotencyConflict: the key belongs to another start
                (:func:`cantata.model.idempotency.start_conflict` says which way).
        """

    async def get_run(self, app: str, run_id: str) -> RunRecord | None:
        """One run, or ``None``."""

    async def list_runs(
        self,
        app: str,
        *,
        status: RunStatus | None = None,
        workflow: str | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Runs, newest first."""

    async def oldest_live_run(self, app: str) -> float | None:
        """The ``created_at`` of the oldest run of ``app`` that is not final (pending,
        running or compensating), ``None`` when there is none. One index lookup per
        status. (A wait counts the events published since its run started: the NATS
        broker starts a new consumer of events from outside for waits there.)"""

    async def claim_runs(
        self,
        app: str,
        worker_id: str,
        workflows: Sequence[str],
        *,
        stale_before: float,
        limit: int,
        versions: Sequence[str] | None = None,
        run_ids: Sequence[str] | None = None,
        now: float | None = None,
        pin_version: str | None = None,
        unchanged: Sequence[float] | None = None,
        keep_versions_of: Sequence[str] = (),
    ) -> list[RunRecord]:
        """Take ownership of live runs of ``workflows`` that nobody owns.

        A run is claimable when it is live and its owner is ``None`` or a worker
        whose expiry (last heartbeat + its own lease) is before ``stale_before``, the
        current time (or unknown). Runs
        already owned by ``worker_id`` are never returned. Each claim increments the
        run's ``fence``; writes with an older fence fail with ``LeaseLost``.
        ``versions`` keeps only runs pinned to one of them or to no version, and runs
        cancelled while they waited in a queue, never begun, whatever their version
        (ending one runs none of its code: docs/flow-control.md#queues);
        ``run_ids`` only those runs (see docs/operating.md, versions). A parked run
        (:mod:`cantata.store.roles.parking`) is claimable only once woken, or, with
        ``now``, once its ``wake_at`` is at or before ``now``; the claim clears its
        parking. With ``pin_version``, each claimed run is pinned to that version (the
        claiming worker's code goes on with it: from then on its history holds that
        code's calls), in the same statement, except the runs of the workflows in
        ``keep_versions_of`` already pinned to a version, which keep it (a saga's run:
        its calls are its map's, docs/operating.md, versions; pinned to none, it is
        pinned as any run). With ``unchanged`` (one per ``run_ids``,
        in their order), a run is claimed only if its ``updated_at`` is still that one:
        a run another worker moved on since the caller read it (and checked that its
        code replays it) is left alone.

        A run in progress in a queue with a ``per_worker`` limit (begun, its owner gone)
        is claimed only within that queue's room on ``worker_id``: ``per_worker`` less
        the runs of the queue it has in progress (``model.flow.takeovers``, oldest
        begin first), decided under the same serialization as
        :meth:`claim_queued_runs` (SQLite: the write lock; PostgreSQL: the queue's
        row locked), so the two never count past the limit together. The others stay
        claimable (docs/flow-control.md#queues).
        """

    async def owned_runs(self, app: str, worker_id: str) -> dict[str, int]:
        """Live runs owned by ``worker_id``: run id -> fence.

        Lets a worker check its hold on its runs (docs/leases.md): a run it owns but
        does not execute (a claim whose answer was lost in an outage) is resumed, and
        an execution whose run it no longer owns (taken over) is stopped.
        """

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        """Apply one checkpoint atomically, if ``fence`` still owns the run.

        Upserts ``write.entries`` (by key) and ``write.attempts`` (by key+attempt),
        appends ``write.events`` (as :meth:`append_events`), creates
        ``write.tasks`` (a ``task_id`` that exists is left alone; a task without a
        correlation id gets the run's), then changes status, result, error and
        flags; ``release`` clears the owner; ``wake`` wakes that run if parked
        (a parent waiting for this run in ``ctx.call``). Writes one audit record when the
        checkpoint is a state change (see the module docstring); listeners hear
        ``runs`` when the run ends or is let go (a backend may leave it out for the
        checkpoints in between, see ``add_listener``), plus ``events`` and ``tasks``
        when there were any.

        Raises:
            LeaseLost: the run's fence is no longer ``fence``.
        """

    async def request_cancel(
        self, app: str, run_id: str, *, actor: str = "system"
    ) -> RunRecord | None:
        """Flag a live run for cancellation; returns the run (``None`` if unknown).

        The request is audited (``run.cancel_requested`` by ``actor``) whenever the
        run exists, with ``applied`` false when it had already ended.
        """

    async def cancelled_runs(self, app: str, run_ids: Sequence[str]) -> list[str]:
        """Those of ``run_ids`` that are flagged for cancellation."""

    async def load_history(self, app: str, run_id: str) -> list[HistoryEntry]:
        """A run's history, in ``seq`` order."""

    async def load_attempts(self, app: str, run_id: str) -> list[Attempt]:
        """Every attempt of every step of a run, in start order (then number, then
        key). A step with no ``attempts`` row whose history entry holds its only
        attempt (begun, or completed by it, without an error: ``attempts`` 1) has that
        attempt read from the entry (:func:`cantata.store.common.with_first_attempts`),
        so that a writer may leave the row out; so do :meth:`load_histories`,
        ``trace_records`` and ``superseded_attempts``."""

    async def load_histories(
        self, app: str, run_ids: Sequence[str]
    ) -> dict[str, tuple[list[HistoryEntry], list[Attempt]]]:
        """:meth:`load_history` and :meth:`load_attempts` of many runs in one read each:
        run id -> (history, attempts), every id given a key (empty lists for a run with
        neither, or none stored). A worker loads the runs of a claim this way, not with
        two round trips per run."""

    async def excuse_attempts(self, app: str, run_id: str, attempts: Sequence[Attempt]) -> int:
        """Record that a live worker was cut off in these attempts of its own (by a pause
        past its lease, the run taken over): each stored attempt with the same key,
        number and ``started_at`` that is still unfinished or marked ``WorkerLost`` takes
        the given ``ended_at``, ``error_type`` and ``error``; a first attempt without a
        row (a lean writer leaves out the row its history entry says alone:
        docs/leases.md, "Where an attempt is recorded") gets one, while that entry still
        says it (one attempt, in progress, begun at the same ``started_at``). Not fenced: the run is
        another worker's by now. Returns how many attempts changed. A later write
        marking an excused attempt ``WorkerLost`` (same start time) leaves it excused;
        a later attempt under its number replaces it as usual (see docs/leases.md).
        Not audited.
        """

    async def child_runs(self, app: str, parent_run_id: str) -> list[RunRecord]:
        """Runs started by ``parent_run_id``."""

    async def record_step_heartbeat(self, app: str, run_id: str, beat: StepHeartbeat) -> None:
        """Keep ``beat`` as the newest heartbeat of step ``beat.key`` of ``run_id``.

        A beat of an older attempt than the one kept is ignored (a slow write of a
        lost attempt must not overwrite its retry's details). Not audited.
        """

    async def last_step_heartbeat(self, app: str, run_id: str, key: str) -> StepHeartbeat | None:
        """The newest heartbeat kept for step ``key`` of ``run_id`` (``None`` if none)."""
