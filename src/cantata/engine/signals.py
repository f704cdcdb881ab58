"""Signals the engine raises inside one run's execution (not business errors)."""

from __future__ import annotations

from cantata.model.status import RunStatus


class _DeadlinePassed(BaseException):
    """Internal: raised at a durable point once the run's deadline has passed."""


class CompensatedElsewhere(Exception):
    """Raised by a workflow whose compensation already ran outside it (choreographed saga).

    The run ends with ``status`` and the message as its error, as if it had unwound here.
    """

    def __init__(
        self, error: str, status: RunStatus = RunStatus.COMPENSATED, flagged: bool = False
    ) -> None:
        super().__init__(error)
        self.status = status
        self.flagged = flagged


class _Abandon(BaseException):
    """Internal: this worker lost the run (lease taken over, or shutting down)."""


class _StoreFailed(BaseException):
    """Internal: the store failed mid-run; the run is retried from its history.

    A ``BaseException`` so that neither workflow code nor the engine's failure handling
    turns an infrastructure error into a failed (and compensated) business run.
    """


class _BranchStopped(BaseException):
    """Internal: raised at a durable point of a branch of the workflow (an
    ``asyncio.gather``, a task it did not await) still running once the workflow's code
    failed or returned: the run ends, so the branch begins nothing new. Its message
    says what the run did ("failed", "returned"); none when a step's branch was
    cancelled before the step began (engine/branches.py)."""


class _Fenced(BaseException):
    """Internal: the step body was stopped because this worker's hold lapsed."""
