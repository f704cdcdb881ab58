"""What the choreography consumer needs of the worker it runs in, as a Protocol.

The consumer imports nothing of the engine: the app hands it a host (the engine's
is :class:`cantata.engine.handler_host.EngineHost`). See docs/architecture.md.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

from cantata.declare.defs import HandlerDef, TriggerDef
from cantata.declare.router import Router
from cantata.fencing import Fence
from cantata.model.event import Event
from cantata.quietlog import QuietLog

from .context import HandlerContext


class HandlerCounters(Protocol):
    """The process's counters the consumer adds to."""

    handled: int
    handler_failures: int
    dead_lettered: int
    retries: int


class HandlerHooks(Protocol):
    """The extension hooks around handler attempts (``cantata.engine.hooks.Hooks``)."""

    def __bool__(self) -> bool: ...

    def handler(
        self, group: str, event: Event[Any], attempt: int
    ) -> AbstractContextManager[None]: ...

    def notify(self, method: str, *args: Any) -> None: ...


class ConsumerHost(Protocol):
    """The worker a :class:`~cantata.choreography.consumer.Consumer` runs in."""

    @property
    def app(self) -> str: ...

    @property
    def worker_id(self) -> str: ...

    @property
    def lease(self) -> float: ...

    @property
    def router(self) -> Router:
        """This process's declarations (its handlers and triggers)."""
        ...

    @property
    def metrics(self) -> HandlerCounters: ...

    @property
    def hooks(self) -> HandlerHooks: ...

    @property
    def quiet(self) -> QuietLog:
        """Where storage faults are logged, one line now and then."""
        ...

    def serves(self, declaration: HandlerDef | TriggerDef) -> bool:
        """True if this process runs the handler (or starts the trigger's workflow)."""
        ...

    def pause_fence(self, held_by_lease: bool) -> Fence:
        """The guard of a handler body beginning now: true once this worker's hold may
        have lapsed by a pause of the whole process (SIGSTOP, a VM paused), or once a
        pause past the fence was noticed since: the body is then not resumed
        (:func:`cantata.fencing.guarded`, docs/leases.md). For a delivery
        ``held_by_lease`` (held for this worker by its lease in the store alone: the
        embedded broker's), only a pause that the heartbeat after it did not prove
        harmless; until that heartbeat answers, the pending verdict: the body is held
        meanwhile."""
        ...

    def stray(self, group: str, event: Event[Any]) -> str | None:
        """Why ``event``, which no handler or trigger of ``group`` matches, must be
        dead-lettered rather than settled unhandled (``None``: settle it), e.g. an
        event of an earlier map of a choreographed saga, which its run waits for.

        Raises:
            HandBack: the delivery is another worker's to handle (a choreographed saga's
                hop of a run whose map is not this code's).
        """
        ...

    def signature_problem(self, event: Event[Any], *, required: bool) -> Exception | None:
        """Why ``event`` must be refused for its signature (``None``: it may pass)."""
        ...

    def handler_context(self, hdef: HandlerDef, event: Event[Any]) -> HandlerContext:
        """The ``ctx`` of one handler attempt."""
        ...

    async def start_run(self, trigger: TriggerDef, event: Event[Any]) -> None:
        """Start the trigger's workflow for ``event`` (once per event id)."""
        ...

    async def take_slot(
        self, hdef: HandlerDef, event_id: str, extend: Callable[[], Awaitable[None]]
    ) -> str | None:
        """Wait for a slot of a limited handler group (asked only for a group with a
        ``concurrency``); the holder to release (or ``None``)."""
        ...

    async def release_slot(self, hdef: HandlerDef, holder: str) -> None: ...

    async def report_orphans(self, events: Sequence[Event[Any]]) -> None:
        """Count and log emitted events that nothing in the app listens to, best-effort
        (never raises: the events are stored; see choreography/orphans.py)."""
        ...
