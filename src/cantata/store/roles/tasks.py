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
    ) -> list[TaskRecord]:
        """Take pending tasks of ``services`` that are due and not owned by a live worker.

        Exactly like :meth:`claim_deliveries`: a task is claimable when
        ``next_at <= now`` and its owner is ``None`` or another worker whose last
        heartbeat is older than ``stale_before`` (or unknown). Each claim sets the
        owner and increments ``attempts`` and ``fence``; the updated records are
        returned, due first.
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
    ) -> bool:
        """Record the outcome of a task attempt, if ``fence`` still owns the pending task.

        In one transaction: upserts ``attempts`` under the task's run (as
        :meth:`commit_run` does), then ``outcome`` ``"done"`` stores ``result``;
        ``"failed"`` stores ``error`` and ``error_type`` for good; ``"retry"`` keeps
        the task pending, unowned and due at ``next_at``, with the error recorded.
        ``done`` and ``failed`` are audited. Returns ``False`` and writes nothing
        when the task is unknown, finished, or claimed since with a newer fence.

        Raises:
            ValueError: ``outcome`` is none of ``done``, ``failed``, ``retry``.
        """

    async def get_task(self, app: str, task_id: str) -> TaskRecord | None:
        """One task, or ``None``."""

    async def tasks_of_run(self, app: str, run_id: str) -> list[TaskRecord]:
        """The tasks a run created, oldest first."""
