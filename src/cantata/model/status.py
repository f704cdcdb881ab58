"""Run statuses."""

from __future__ import annotations

import enum

from cantata.errors import ConfigurationError


class RunStatus(enum.StrEnum):
    """The status of a workflow run; ``str(status)`` is the bare word."""

    PENDING = "pending"
    RUNNING = "running"
    COMPENSATING = "compensating"
    COMPLETED = "completed"
    COMPENSATED = "compensated"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        """True once the run can no longer change."""
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.FAILED, RunStatus.CANCELLED}
)
LIVE_STATUSES = frozenset({RunStatus.PENDING, RunStatus.RUNNING, RunStatus.COMPENSATING})


def parse_status(status: RunStatus | str | None) -> RunStatus | None:
    """``status`` as a :class:`RunStatus` (``None`` stays ``None``).

    Raises:
        ConfigurationError: it names no status; the message lists them.
    """
    if status is None:
        return None
    try:
        return RunStatus(status)
    except ValueError:
        raise ConfigurationError(
            f"unknown run status {status!r}: use one of {', '.join(s.value for s in RunStatus)}"
        ) from None


# What a call the run left open is shown as once the run ended: it was cut short, not
# still going (a cancel interrupts a wait or a sleep; a deadline, a step in flight).
CUT_SHORT = "cancelled"
INTERRUPTED = "interrupted"
_OPEN_CALL = frozenset({"running", "waiting"})


def call_status(status: str, run: RunStatus | str) -> str:
    """A history entry's ``status`` as shown in a run whose status is ``run``: an entry
    still ``running`` or ``waiting`` in a run that has ended is ``cancelled`` (the run
    was cancelled) or ``interrupted`` (it ended otherwise); any other is unchanged. The
    API's steps, the trace and the workflow map all show calls this way."""
    if status in _OPEN_CALL and run in FINAL_STATUSES:
        return CUT_SHORT if run == RunStatus.CANCELLED else INTERRUPTED
    return status
