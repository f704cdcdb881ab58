"""The runtime interface: what the workflow context and the journal ask of a run.

``WorkflowContext`` (``ctx``) and the :class:`~cantata.engine.journal.Journal` talk to
the run they execute only through these protocols (docs/architecture.md). The
engine's ``RunExecution`` implements them; ``cantata check-replay`` implements them
too (``replaycheck._DryRun``), with every effect replaced by a stop at the run's
frontier, so that a dry replay takes the very path a real one does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

from cantata.model.parking import Parking
from cantata.model.records import EntryKind, HistoryEntry, RunRecord, RunWrite

from .event_waits import Wants

if TYPE_CHECKING:
    from cantata.declare.defs import StepDef, WorkflowDef

    from .compensation import ApiState
    from .engine import Engine
    from .journal import Journal


#: What a wait does with a pending cancel or deadline (JournalRuntime.wait_until).
Interrupt = Literal["raise", "return", "ignore"]


class Watch(NamedTuple):
    """What wakes a waiting run on news: events of a type (those it ``wants``), or a
    run or task that ends."""

    on: Literal["event", "run"]
    name: str  # the event type, or the run id / task id
    wants: Wants = Wants()  # (events) which of them may end the wait


class JournalRuntime(Protocol):
    """The effects the journal needs: time, commits, waiting, interrupts."""

    run: RunRecord

    def now(self) -> float:
        """The engine clock's time."""
        ...

    async def commit(self, write: RunWrite) -> None:
        """Write one fenced checkpoint (with every entry held for it)."""
        ...

    def defer(self, write: RunWrite) -> None:
        """Commit ``write`` with the run's next checkpoint, or on its own once the
        workflow yields to the event loop."""
        ...

    def hold(self, entry: HistoryEntry) -> None:
        """Commit ``entry`` with the run's next checkpoint (a recorded value)."""
        ...

    async def wait_until(
        self,
        wake_at: float | None,
        wake: Callable[[], Awaitable[bool]] | None = None,
        *,
        poll: bool = True,
        park: Parking | None = None,
        interrupt: Interrupt = "raise",
    ) -> None:
        """Sleep until ``wake_at``, an interrupt, or ``wake()`` returns True; ``park``:
        what wakes the run if it is evicted from memory meanwhile; ``interrupt``: a
        pending cancel or deadline is raised (``"raise"``), ends the wait
        (``"return"``) or waits until the wait ends (``"ignore"``)."""
        ...

    def watching(self, watch: Watch | None) -> AbstractContextManager[None]:
        """While inside: news about ``watch`` wakes :meth:`wait_until`."""
        ...

    def cancel_pending(self) -> bool:
        """A cancellation waits to be raised into the workflow."""
        ...

    def interrupted(self) -> bool:
        """A cancel or deadline waits to be raised at the next durable point."""
        ...

    def check_interrupt(self) -> None:
        """Raise the pending cancel or deadline, if any."""
        ...

    def new_call(self, key: str) -> None:
        """A call history has no record of passed the checks and begins now."""
        ...


class WorkflowRuntime(JournalRuntime, Protocol):
    """What ``ctx`` may use: the run, its journal, its steps, the engine's services."""

    wdef: WorkflowDef
    engine: Engine
    journal: Journal
    compensations: list[tuple[StepDef, list[Any]]]
    api: ApiState
    patches: dict[str, bool]  # ctx.patched answers, fixed for the whole run
    compensating: bool  # only the undoing goes on: no interrupt is raised any more

    async def store_first(self) -> None:
        """The run is stored (a run started here is stored with its first checkpoint):
        before anything that names it as its parent is written."""
        ...

    async def call_step(
        self, sdef: StepDef, args: list[Any], key: str, kind: EntryKind = EntryKind.STEP
    ) -> Any:
        """Run (or replay) one step or compensation; its decoded JSON result."""
        ...

    async def run_step(
        self, sdef: StepDef, args: list[Any], key: str, compensate: StepDef | None
    ) -> Any:
        """``ctx.run`` of one step: its decoded JSON result, ``compensate`` registered
        once it completed (engine/branches.py: a cancel of its branch by the
        workflow's code waits for it to end)."""
        ...
