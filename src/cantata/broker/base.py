"""The delivery seam: the :class:`Broker` protocol every event transport implements.

The store is the source of truth: every event is first committed to the store's
event log, in the transaction of whatever emitted it, together with one pending
delivery row per declared group (the inbox). A broker moves events to the
consumers of each group:

- the embedded broker reads the store's delivery rows directly;
- an external broker (NATS JetStream) receives events from the outbox relay
  (``relays_outbox``) and delivers them to one durable consumer per group.

Either way a consumer settles a message through the message itself:
:meth:`BrokerMessage.complete` marks the (group, event) handled and appends the
events the handler emitted in one store transaction, then acknowledges it to the
broker, so a redelivered event changes nothing twice.
:class:`cantata.testing.contract.BrokerContract` is the executable definition.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from cantata.model.event import Event
from cantata.store.roles import EventStore, OutboxStore, StoreLifecycle, WorkerStore


class Clock(Protocol):
    """Where due times are read and waited for: the app's clock (``App(clock=)``, see
    ``engine/clock.py``; ``cantata.testing`` passes one that skips)."""

    def now(self) -> float:
        """POSIX seconds."""

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""


class BrokerStore(StoreLifecycle, WorkerStore, EventStore, OutboxStore, Protocol):
    """The roles of the store a broker uses: listeners and identity, declarations
    and heartbeats, the event log with its deliveries, and the outbox (relayed
    brokers). Any :class:`~cantata.store.base.Store` is one."""


@runtime_checkable
class BrokerMessage(Protocol):
    """One delivery of one event to one group."""

    group: str
    event: Event[Any] | None  # None when the payload is not a valid event
    error: str | None  # why the payload is not a valid event
    raw: bytes
    attempt: int  # 1 for the first delivery to this group

    async def complete(self, emitted: Sequence[Event[Any]] = ()) -> bool:
        """Mark handled and append ``emitted`` in one store transaction, then ack.

        Returns ``False`` (and appends nothing) when the (group, event) had already
        been handled: the caller is looking at a duplicate delivery.

        A message may then say which of ``emitted`` this settlement stored, in an
        attribute ``stored_emitted`` (:meth:`Settlement.stored_events`): an event
        another handler emitted with the same id before is not new, and is not
        counted again (:func:`stored_emitted`).
        """

    async def retry(self, error: str, delay: float) -> None:
        """Record the failed attempt and have the event redelivered after ``delay`` s."""

    async def dead(self, error: str) -> None:
        """Move the (group, event) to the dead-letter queue and stop redelivering it."""

    async def extend(self) -> None:
        """Tell the broker the handler is still working (keeps the delivery claimed)."""


Handler = Callable[[BrokerMessage], Awaitable[None]]


@runtime_checkable
class Subscription(Protocol):
    """A running consumer of one group."""

    async def stop(self) -> None:
        """Stop receiving; in-flight handlers finish first."""


@runtime_checkable
class Broker(Protocol):
    """Moves committed events to the consumers of each group."""

    url: str
    relays_outbox: bool  # True: the app must run the outbox relay into publish()

    async def open(self, store: BrokerStore) -> None:
        """Connect (and create streams as needed).

        Raises:
            BrokerError: the broker cannot be reached; the message names the URL.
        """

    async def close(self) -> None:
        """Stop every subscription and disconnect."""

    def adopt_timing(
        self, *, lease: float, poll_interval: float,
        may_take_over: Callable[[], bool] | None = None, clock: Clock | None = None,
    ) -> None:
        """Take the app's lease (and poll interval) for what the broker times itself
        (NATS: its ``ack_wait``), unless the broker was given its own. A dead worker's
        deliveries held in the store are taken over after the same time as its runs
        (its expiry: its last heartbeat + the lease it heartbeats with), and only
        when ``may_take_over()`` says this worker's own hold is sound (see
        docs/leases.md). ``clock``: the app's, for the due times of
        handler retries the broker keeps itself (a broker whose server keeps them
        ignores it)."""

    async def attach(self, app: str, *, offload_above: int | None = None) -> None:
        """Prepare what ``app`` needs on the broker (a stream), once opened.

        ``offload_above``: events larger than this many bytes travel as a claim check
        (:func:`cantata.model.event.claim_stub`): the consumer reads them from the store.

        Raises:
            BrokerError: it belongs to another store (two environments sharing one app
                name on one server); the message names both.
        """

    def check_event(self, app: str, event: Event[Any]) -> None:
        """Raise if the broker would refuse ``event`` (its size or type), so it is
        refused where it is made, before it is stored.

        Raises:
            InvalidEvent: the broker cannot carry its type.
            PayloadTooLarge: it is larger than the broker carries.
        """

    async def publish(
        self, app: str, events: Sequence[Event[Any]], *, again: bool = False
    ) -> None:
        """Make already-stored events deliverable. Idempotent by event id, unless
        ``again`` (a re-drive: send them even if the broker saw their ids before).

        Raises:
            EventsRefused: some events can never be carried (the others were
                published); the outbox relay dead-letters them with the reason.
        """

    async def append(
        self, app: str, events: Sequence[Event[Any]], *, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> list[int]:
        """Store events this process publishes (``store.append_events``, same result).
        A broker that hands events off holds, in the same transaction, the deliveries
        this process's subscribers take at once (``store.append_held``) and starts them
        (docs/performance.md); it may just append. ``actor`` (an operator's publish)
        goes to the store, which audits each event it stores in the same transaction;
        ``stored`` goes to the store too, which says in it which events it stored."""

    async def subscribe(
        self,
        app: str,
        group: str,
        patterns: Sequence[str],
        handler: Handler,
        *,
        worker_id: str,
        concurrency: int = 64,
    ) -> Subscription:
        """Deliver every event matching ``patterns`` to ``handler``; within a group,
        competing subscribers (in any process) share the events."""

    async def redeliver(self, app: str, group: str, event: Event[Any]) -> None:
        """Deliver ``event`` again to ``group`` only (dead-letter replay).

        The store has already made the delivery pending again.
        """

    def wake(self) -> None:
        """Hint that new events may be due (in-process notification); may do nothing."""

    def hand_off(self, app: str, events: Sequence[Event[Any]]) -> None:
        """Events this process has just committed (told after :meth:`append` and after
        each settlement): a broker may deliver them at once to this process's
        subscribers, but only deliveries its worker holds in the store (the embedded
        and NATS brokers hand off what a settlement's ``Settlement.hold`` or
        :meth:`append` held, as they commit, and do nothing here); the broker's own
        delivery still follows (see docs/performance.md)."""


def stored_emitted(msg: BrokerMessage, emitted: Sequence[Event[Any]]) -> list[Event[Any]]:
    """Of ``emitted``, what ``msg.complete(emitted)`` stored, as the message says
    (``stored_emitted``, see :meth:`BrokerMessage.complete`); all of them when it does
    not say (a broker of a plugin)."""
    told = getattr(msg, "stored_emitted", None)
    return list(emitted) if told is None else list(told)
