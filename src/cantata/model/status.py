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
