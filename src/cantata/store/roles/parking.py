"""The parking part of the store protocol: runs released while they wait.

:class:`~cantata.store.base.Store` includes :class:`ParkingStore`. A parked run is
live, owned by nobody, and has a ``wake_at`` (see :mod:`cantata.model.parking`);
:meth:`Store.claim_runs` leaves it alone until it is due (``now`` given) or woken.
Waking clears what it waits for, so any worker serving its workflow claims it and
replays its history. Every lookup here is an index range: a million parked runs
cost no scan. ``cantata.testing.contract.parking`` is the executable
definition.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from cantata.model.parking import Parking


class ParkingStore(Protocol):
    """Parked runs (times are POSIX seconds from the app's clock)."""

    async def park_run(self, app: str, run_id: str, fence: int, parking: Parking) -> None:
        """Release a live run held with ``fence`` and park it until ``parking`` wakes it.

        A run whose cancellation was requested is released but not parked (it is
        claimable at once, to be cancelled). Not audited (the run's state does not
        change), and no listener hears it (nobody can claim it yet).

        Raises:
            LeaseLost: the run's fence is no longer ``fence``.
        """

    async def wake_runs(self, app: str, run_ids: Sequence[str]) -> int:
        """Wake those of ``run_ids`` that are parked; returns how many. Listeners hear
        ``runs`` when any was."""

    async def wake_waiting(self, app: str, waits_for: str, matches: Sequence[str]) -> int:
        """Wake the runs parked in an event wait ``waits_for`` whose ``wait_match`` is
        one of ``matches``; returns how many. Listeners hear ``runs`` when any was."""

    async def parked_waits(self, app: str) -> list[str]:
        """The distinct ``waits_for`` of runs parked in an event wait."""

    async def waits_looked(self, app: str) -> tuple[int, float] | None:
        """Where the looks for parked waits' events have got to (:meth:`mark_waits_looked`):
        the log position (:meth:`EventStore.log_position`) and the time, by the clock of
        the worker that marked it; ``None`` before any mark."""

    async def mark_waits_looked(self, app: str, position: int, at: float) -> None:
        """Mark that the events stored up to ``position`` in the log were looked at for
        the parked waits of ``app`` (a look that began at ``position`` at time ``at``
        has ended). The mark only moves forward: a lower ``position`` leaves it as it
        is. Not audited, and no listener hears it."""

    async def parked_runs(self, app: str, run_ids: Sequence[str], *, now: float) -> set[str]:
        """Those of ``run_ids`` that are parked and not due at ``now`` (neither woken nor
        past their ``wake_at``): the others, live and unowned, are claimable now.
        ``cantata stalled`` asks it of runs that wait for an event, to tell one still
        waiting from one whose event came (:mod:`cantata.observability.stall_hints`)."""

    async def next_wake(
        self, app: str, workflows: Sequence[str], *, after: float
    ) -> float | None:
        """The earliest ``wake_at`` after ``after`` of a parked run of ``workflows``."""
