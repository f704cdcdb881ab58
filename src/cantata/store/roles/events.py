"""The event log and its deliveries: one row per (group, event), the inbox.

:class:`EventStore` appends and reads events and settles what handlers did with
them; :class:`OutboxStore` is the outbox an external broker relays from.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cantata.model.event import Event
from cantata.model.records import (
    DeadLetter,
    Delivery,
    DeliveryOutcome,
)

#: How far apart (seconds) the clocks of two processes writing one store may be, for
#: :meth:`EventStore.find_events`'s ``after``: the log's order decides which events
#: follow it; ``stored_at`` only bounds the scan of the ``(app, type, stored_at)``
#: index, so an event stored after ``after`` by a clock this much slow is found still.
AFTER_SKEW = 60.0


@dataclass(slots=True)
class Settlement:
    """The outcome of one handler attempt for (group, event).

    ``done`` marks the delivery handled and appends ``events`` (what the handler
    emitted) in the same transaction; ``retry_at`` schedules another attempt;
    ``dead`` moves it to the dead-letter queue with ``error``.

    ``hold_for`` (a worker id) with ``hold`` ((group, event id) pairs of ``events``):
    those new deliveries are claimed by that worker in the same transaction (their
    first attempt counted), so the worker can handle them at once without a claim of
    its own (the embedded broker's hand-off, docs/performance.md); if it dies they are
    taken over after the lease like any claimed delivery.
    """

    outcome: DeliveryOutcome | str  # a DeliveryOutcome once made (a name is converted)
    attempts: int
    events: list[Event[Any]] = field(default_factory=list)
    error: str | None = None
    retry_at: float = 0.0
    dead_letter_id: str | None = None
    hold_for: str | None = None
    hold: list[tuple[str, str]] = field(default_factory=list)
    held: list[tuple[str, str]] = field(default_factory=list)  # set by the store: of
    # ``hold``, the deliveries it did claim (a new one, pending, nobody's, no attempt)
    addressed: list[int] = field(default_factory=list)  # set by the store (if it
    # says): per event of ``events``, how many groups it was addressed to (0: stored
    # before, or no group)
    stored: list[bool] = field(default_factory=list)  # set by the store (if it says):
    # per event of ``events``, whether this settlement stored it (False: stored before,
    # e.g. by another handler emitting the same id, or its id repeated in ``events``)
    wake: bool = True  # False: ``hold`` has every delivery of ``events`` that a consumer
    # of this process would claim, so the commit need not send ``claims`` (CLAIMS)

    def __post_init__(self) -> None:
        self.outcome = DeliveryOutcome(self.outcome)  # "done", "retry", "dead" or a member

    def stored_events(self) -> list[Event[Any]]:
        """Of ``events``, those this settlement stored: all of them when the store did
        not say (:attr:`stored`). What the ``emitted`` hook and the metrics count, so
        that an event two handlers emit with one id counts once."""
        if len(self.stored) != len(self.events):
            return list(self.events)
        return [e for e, new in zip(self.events, self.stored, strict=True) if new]


@dataclass(frozen=True, slots=True)
class DeliveryHold:
    """One group's delivery of one event, as a broker that hands events off in process
    needs it (:meth:`EventStore.delivery_holds`).

    ``holder`` is the worker that holds the delivery (its owner, e.g. through
    :attr:`Settlement.hold_for`) while that worker's heartbeat is recent enough;
    ``None`` when nobody holds it or its holder is presumed dead (it may be taken over).
    ``next_at``: when the delivery is due (a retry's time). ``event``: the stored event
    (``None`` for a delivery whose event the store does not hold: an event from another
    system that an older version settled without storing it), read in the same query:
    the broker hands a copy to a handler only if it carries the stored content (an id
    reused with other content is refused, docs/security.md). ``error``: the last one
    recorded (a NATS consumer reads there how often a copy was handed back).
    """

    status: str
    attempts: int
    next_at: float
    holder: str | None
    event: Event[Any] | None = field(default=None, compare=False, repr=False)
    error: str | None = field(default=None, compare=False)  # its last recorded error


class EventStore(Protocol):
    """The event log, deliveries and dead letters."""

    async def append_events(
        self, app: str, events: Sequence[Event[Any]], *, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> list[int]:
        """Append events to the log (idempotent by id) and fan out deliveries.

        For each event, one pending delivery row is created per declared handler
        group whose pattern matches its type. Returns, per event, how many groups
        it was addressed to (0 for an event already stored).

        ``actor``: the operator publishing them (``app.publish(actor=...)``). Each
        event this call stores is audited as ``event.published`` by them in the same
        transaction: the record exists if and only if the event does, and an event
        stored before (a retried or repeated publish) gets no second record. A record
        that cannot be appended (``StoreCorrupt``: the chain was tampered with) stores
        no event either.

        ``stored``: a list the store sets, once the call committed, to say per event
        whether this call stored it (``False``: stored before, by another call — one
        at the same moment too — or its id repeated in ``events``). A count of 0 does
        not tell: an event stored here may go to no group. ``app.publish`` of an id its
        caller chose asks, so that of two publishes of one new id at the same moment
        the one that did not store it ends as a repeat (docs/security.md).
        """

    async def append_held(
        self, app: str, events: Sequence[Event[Any]], *, hold_for: str,
        hold: Sequence[tuple[str, str]], wake: bool = True, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> tuple[list[int], list[tuple[str, str]]]:
        """:meth:`append_events`, holding for worker ``hold_for`` the new deliveries
        ``hold`` ((group, event id) pairs) as :attr:`Settlement.hold` does (claimed,
        first attempt counted). Returns the counts and the pairs it did hold (a new
        delivery, pending, nobody's, no attempt). A store may hold none (it then
        returns an empty list): nothing is handed off, the broker delivers them.
        ``wake`` as :attr:`Settlement.wake`; ``actor`` and ``stored`` as in
        :meth:`append_events`."""

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        """One stored event."""

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int,
        after: str | None = None, position: int | None = None,
        match: Mapping[str, Any] | None = None,
    ) -> list[Event[Any]]:
        """Events of ``event_type`` stored at or after ``since``, oldest first.

        ``event_type`` may be a pattern with one-token wildcards (``order.*``).
        ``after``: the id of an event (a triggered run's trigger); the events stored
        after it in the log's own order count too, whatever their ``stored_at`` (each
        writer stamps that with its own clock, so it orders the events of different
        processes only roughly). A store may look for them only among those stored
        at most :data:`AFTER_SKEW` seconds before it by the clocks. An ``after`` not
        stored adds nothing.
        ``position``: a :meth:`log_position` read earlier; the events stored after it
        count too, whatever their ``stored_at`` (not given with ``after``).
        ``match``: a wait's match (``ctx.wait_for_event``); a store may leave out the
        events that cannot match it (:func:`cantata.model.event.match_filter`), in its
        query, so a wait behind many events of its type reads only its candidates. The
        caller checks every event returned.
        """

    async def log_position(self, app: str) -> int:
        """Where the log ends now (0 when empty): the events stored later are after it
        in the log's own order, whatever their writers' clocks, but for those whose
        write was under way at that moment (a reader keeps a margin of time for them).
        The position may be the store's, shared by its apps: it only compares with
        other positions of the store."""

    async def claim_deliveries(
        self,
        app: str,
        worker_id: str,
        groups: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
    ) -> list[Delivery]:
        """Take pending deliveries of ``groups`` that are due and not owned by a live worker.

        A delivery is claimable when ``next_at <= now`` and its owner is ``None`` or
        another worker whose expiry (last heartbeat + its own lease) is before
        ``stale_before``, the current time (or unknown).

        Each claim counts one attempt (``attempts`` is incremented before it is
        returned), so a handler that kills its worker is not retried forever.
        """

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        """Record the outcome of a handler attempt.

        For ``done`` the delivery is marked handled and ``settlement.events`` are
        appended in the same transaction, only if it was not handled before; returns
        ``False`` (and writes nothing) for a delivery already handled. ``retry`` and
        ``dead`` apply to a pending delivery only: for one handled or dead-lettered
        already (by another copy that ran at the same time) they write nothing and
        return ``False``; a dead-lettered one goes back to pending only by its replay.
        """

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        """The per-group delivery rows of one event."""

    async def delivery_states(
        self, app: str, group: str, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        """``event id -> (status, attempts)`` of ``group``'s deliveries of these events;
        an event not addressed to the group (or not stored) is absent. One read for
        many events: a broker checks a whole fetched batch at once."""

    async def delivery_holds(
        self, app: str, group: str, event_ids: Sequence[str], *, stale_before: float
    ) -> dict[str, DeliveryHold]:
        """``event id -> DeliveryHold`` of ``group``'s deliveries of these events (absent:
        not addressed to the group, or not stored), in one read. A holder whose expiry
        (heartbeat + its own lease) is before ``stale_before``, the current time, is
        reported as none (``float("-inf")``: any holder counts). Each carries the
        stored event (``DeliveryHold.event``). The NATS broker looks here before it
        runs a copy of an event another worker may hold, and to check that the copy
        carries the stored content (docs/performance.md)."""

    async def take_deliveries(
        self, app: str, group: str, event_ids: Sequence[str], worker_id: str, *,
        stale_before: float,
    ) -> dict[str, DeliveryHold]:
        """:meth:`delivery_holds`, each pending delivery that no live worker holds (its
        owner none, ``worker_id`` itself, or one whose expiry is before ``stale_before``)
        taken for ``worker_id`` first, in one statement per delivery: reported with
        ``worker_id`` as its holder. Of two workers taking one delivery at once, one
        gets it; the other sees it held. Attempts and due time are left as they are.

        A NATS consumer takes a copy's delivery before it runs the copy, so that two
        copies of one event (a re-drive after the broker lost its data, an outside
        event published twice) never run in two live workers at once
        (docs/guarantees.md). The holder lets go by settling the delivery, or by
        :meth:`release_delivery`, or by its death (the lease). A take need not be
        durable: one a store crash loses is one its holder lost by the same crash."""

    async def release_delivery(
        self, app: str, group: str, event_id: str, worker_id: str
    ) -> bool:
        """Let go of ``worker_id``'s hold on ``group``'s pending delivery of ``event_id``
        without settling it (a copy handed back to the broker unrun, or one whose run
        ended before its settlement was recorded). ``False`` when ``worker_id`` did not
        hold it (settled, or taken over after its lease). Need not be durable."""

    async def dead_letters(
        self, app: str, *, limit: int = 100, group: str | None = None,
        type: str | None = None,
    ) -> list[DeadLetter]:
        """Dead letters, oldest first: the first ``limit`` of ``group``'s (of every
        group with ``None``) whose event is of ``type`` (of any type with ``None``)."""

    async def replay_dead_letter(
        self, app: str, dead_letter_id: str, now: float, *, actor: str = "system"
    ) -> DeadLetter:
        """Take a dead letter off the queue and make its delivery pending again
        (attempts reset). The letter is kept, with ``now`` as the time of its replay,
        for :meth:`~cantata.store.roles.TraceStore.trace_records` only
        (``replayed_dead_letters``): :meth:`dead_letters` no longer lists it.

        Audited as ``dead_letter.replayed`` by ``actor``.

        Raises:
            DeadLetterNotFound: no such dead letter in ``app``.
        """


class OutboxStore(Protocol):
    """The outbox: what the relay hands to an external broker (docs/architecture.md)."""

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        """Outbox: events not yet handed to an external broker, oldest first."""

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        """Outbox: these events reached the external broker."""

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        """Store events that came from the broker, as :meth:`append_events` does, marked
        published and external in the same transaction: the outbox relay never sends
        them back and :meth:`redrive_events` leaves them alone."""

    async def redrive_events(
        self, app: str, *, stored_before: float, limit: int
    ) -> list[Event[Any]]:
        """Outbox: hand back to the outbox (unpublished) up to ``limit`` published events
        stored before ``stored_before`` that some group has still pending (the broker
        lost them, or an operator re-drives them); never external events.

        Returns:
            The events the outbox relay will publish again, oldest first.
        """
