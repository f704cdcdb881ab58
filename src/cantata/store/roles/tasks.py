"""Tasks: steps of a run served by another service's workers (docs/architecture.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cantata.model.records import (
    Attempt,
    TaskRecord,
)

#: The outcomes :meth:`TaskStore.finish_task` accepts.
TASK_OUTCOMES = ("done", "failed", "retry")


class TaskStore(Protocol):
    """Tasks in the store: created by a run's checkpoint, claimed and finished here."""

    async def claim_tasks(
        self,
        app: str,
        worker_id: str,
        services: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
        steps: Sequence[str] | None = None,
    ) -> list[TaskRecord]:
        """Take pending tasks of ``services`` that are due and not owned by a live worker.

        Exactly like :meth:`claim_deliveries`: a task is claimable when
        ``next_at <= now`` and its owner is ``None`` or another worker whose expiry
        (last heartbeat + its own lease) is before ``stale_before`` (or unknown):
        ``stale_before`` is the current time, as ``now`` usually is. Each claim sets the
        owner and increments ``attempts`` and ``fence``; the updated records are
        returned, due first.

        ``steps`` (when given) restricts the claim to tasks of those step names: a
        worker whose code lacks a step leaves its tasks to the workers that have it.
        With ``steps``, a task addressed to no service yet (``service`` is
        :data:`~cantata.model.records.UNADDRESSED`) is claimed too, and its
        ``service`` becomes the one the app's declarations give its step.
        A task whose run has ended (a final status) is never claimed.
        """

    async def finish_task(
        self,
        app: str,
        task_id: str,
        fence: int,
        *,
        outcome: str,
        attempts: Sequence[Attempt],
        result: str | None = None,
        error: str | None = None,
        error_type: str | None = None,
        next_at: float = 0.0,
        count: int | None = None,
    ) -> bool:
        """Record the outcome of a task attempt, if ``fence`` still owns the pending task.

        In one transaction: upserts ``attempts`` under the task's run (as
        :meth:`commit_run` does), then ``outcome`` ``"done"`` stores ``result``;
        ``"failed"`` stores ``error`` and ``error_type`` for good; ``"retry"`` keeps
        the task pending, unowned and due at ``next_at``, with the error recorded.
        ``count`` (when given) becomes the task's ``attempts``: the attempts made,
        where a claim that started none (its worker died first) counted one.
        ``done`` and ``failed`` are audited. Returns ``False`` and writes nothing
        when the task is unknown, finished, or claimed since with a newer fence.

        Raises:
            ValueError: ``outcome`` is none of ``done``, ``failed``, ``retry``.
        """

    async def start_task_attempt(
        self, app: str, task_id: str, fence: int, attempts: Sequence[Attempt]
    ) -> bool:
        """Upsert ``attempts`` under the task's run (an attempt's start, recorded before
        its step runs, and earlier attempts closed as lost), if ``fence`` still owns
        the pending task; else ``False`` and nothing written."""

    async def withdraw_tasks(
        self,
        app: str,
        run_id: str,
        *,
        stale_before: float,
        error: str,
        actor: str | None = None,
        task_ids: Sequence[str] | None = None,
    ) -> list[str]:
        """Withdraw the pending tasks of ``run_id`` (those of ``task_ids`` when given)
        that no live worker holds (no owner, or one whose expiry, heartbeat + its own
        lease, is before ``stale_before``, the current time): each becomes ``failed``
        with ``error_type`` ``"Withdrawn"`` and ``error``, unowned, audited as
        ``task.withdrawn`` by ``actor`` (a worker id). A task a live worker holds is
        left to finish. Returns the ids withdrawn.
        """

    async def get_task(self, app: str, task_id: str) -> TaskRecord | None:
        """One task, or ``None``."""

    async def tasks_of_run(self, app: str, run_id: str) -> list[TaskRecord]:
        """The tasks a run created, oldest first."""
