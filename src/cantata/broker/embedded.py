"""The embedded broker: the event log and the inbox live in the store."""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from cantata.broker.base import BrokerStore, Clock, Handler
from cantata.errors import BrokerError, LeaseLost, StoreError, error_text
from cantata.model.codec import new_id
from cantata.model.event import Event, check_pattern, matches
from cantata.model.records import DELIVERY_PENDING, Delivery, DeliveryOutcome
from cantata.quietlog import QuietLog
from cantata.store.base import CLAIMS, Settlement
from cantata.store.roles.lifecycle import idle_wait

log = logging.getLogger("cantata.broker")
quiet = QuietLog(log, every=30.0)  # storage faults: one line now and then, no tracebacks


@dataclass(slots=True)
class EmbeddedMessage:
    """A delivery claimed from the store's delivery rows."""

    # Held for its worker by that worker's lease in the store alone: no other worker
    # claims it before the worker's expiry has passed (cantata.engine.pauses,
    # handler_fence). A NATS message is not: NATS delivers it again once its ack wait
    # has passed since the last "in progress", whatever the store says.
    held_by_lease: ClassVar[bool] = True

    store: BrokerStore
    app: str
    delivery: Delivery
    group: str = ""
    raw: bytes = b""
    error: str | None = None
    attempt: int = 1
    event: Event[Any] | None = None
    settled: bool = field(default=False)
    sub: _EmbeddedSubscription | None = None  # hands off what it emits (see complete)
    stored_emitted: list[Event[Any]] | None = None  # what complete() stored

    def __post_init__(self) -> None:
        self.group = self.delivery.group
        self.event = self.delivery.event
        self.attempt = self.delivery.attempts
        self.raw = self.delivery.event.to_json()

    async def complete(self, emitted: Sequence[Event[Any]] = ()) -> bool:
        """Settle, and hand the emitted events to this worker's subscribers of the
        groups they go to: claimed for this worker in the same transaction (so nobody
        else takes them while it lives), handled at once without a claim of their own
        (docs/performance.md)."""
        self.settled = True
        sub = self.sub
        hold = sub.holds(emitted) if sub is not None and emitted else []
        settlement = Settlement(DeliveryOutcome.DONE, self.attempt, list(emitted),
                                hold_for=sub.worker_id if sub and hold else None, hold=hold,
                                wake=sub is None or not sub.broker.holds_all(sub, emitted, hold))
        try:
            done = await self.store.settle_delivery(
                self.app, self.group, self.delivery.event.id, settlement
            )
        except BaseException as exc:
            # (LeaseLost: this worker is out, as after a crash: a takeover hands them on)
            if sub is not None and hold and not isinstance(exc, LeaseLost):
                # It may have committed all the same (a connection lost after COMMIT):
                # what it held for this worker must not wait for this worker's death.
                sub.broker.recover_holds(sub, emitted, hold)
            raise
        if done:
            self.stored_emitted = settlement.stored_events()
        if done and settlement.held and sub is not None:
            # only what the store did claim: an emitted event stored before (its id
            # reused) may have a delivery someone already has
            sub.broker.handed(sub, emitted, settlement.held)
        return done

    async def retry(self, error: str, delay: float) -> None:
        self.settled = True
        sub = self.sub
        due = (time.time() if sub is None else sub.broker.now()) + delay
        await self.store.settle_delivery(
            self.app, self.group, self.delivery.event.id,
            Settlement(DeliveryOutcome.RETRY, self.attempt, error=error, retry_at=due),
        )
        if sub is not None:
            sub.due(due)

    async def hand_back(self, error: str, delay: float) -> None:
        """Give the delivery back to its group, due after ``delay``, not counted as an
        attempt (its claim counted one), for another worker (the consumer's ``HandBack``).
        Unlike a retry, this worker does not look again at once when it is due: the
        group's other workers find it first as often as this one does."""
        self.settled = True
        self.attempt = max(0, self.attempt - 1)
        await self.store.settle_delivery(
            self.app, self.group, self.delivery.event.id,
            Settlement(DeliveryOutcome.RETRY, self.attempt, error=error,
                       retry_at=(time.time() if self.sub is None else self.sub.broker.now())
                       + delay),
        )

    async def dead(self, error: str) -> None:
        self.settled = True
        await self.store.settle_delivery(
            self.app, self.group, self.delivery.event.id,
            Settlement(DeliveryOutcome.DEAD, self.attempt, error=error, dead_letter_id=new_id()),
        )

    async def extend(self) -> None:
        """Ownership is kept by the worker's heartbeat; nothing to do."""


class _EmbeddedSubscription:
    def __init__(
        self,
        broker: EmbeddedBroker,
        app: str,
        group: str,
        handler: Handler,
        worker_id: str,
        concurrency: int,
        patterns: Sequence[str] = (),
    ) -> None:
        self.broker = broker
        self.app = app
        self.group = group
        self.patterns = list(patterns)
        self.handler = handler
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.wakeup = asyncio.Event()
        # The last claim may have left deliveries in the store for want of room here:
        # a handler that ends then looks again (else the commits that store events do).
        self.behind = False
        self.stopping = False
        self.inflight: set[asyncio.Task[None]] = set()
        self.dues: list[float] = []  # heap: when the retries this worker settled are due
        self.task = asyncio.create_task(self._loop(), name=f"cantata-consume:{group}")

    async def _loop(self) -> None:
        store = self.broker.store
        while not self.stopping:
            # Cleared before claiming: a wake-up during the claim must not be lost.
            self.wakeup.clear()
            free = self.concurrency - len(self.inflight)
            claimed: list[Delivery] = []
            self.behind = free <= 0
            if free > 0:
                now = self.broker.now()
                careful = self.broker.may_take_over
                # holders past their own expiry are gone (each judged by its own lease)
                stale_before = now if careful is None or careful() else float("-inf")
                try:
                    claimed = await store.claim_deliveries(
                        self.app, self.worker_id, [self.group], now=now,
                        stale_before=stale_before, limit=free,
                    )
                except Exception as exc:  # the store may be restarting: keep going
                    quiet.warning(f"claim:{self.group}", "claiming deliveries for group %s "
                                  "failed (%s); retrying", self.group, error_text(exc))
                    await asyncio.sleep(self.broker.poll_interval)
                    continue
            for delivery in claimed:
                self.start(delivery)
            if claimed and len(claimed) == free:
                self.behind = True
                await asyncio.sleep(0)
                continue
            await self._idle()

    def due(self, at: float) -> None:
        """A retry of this group is due ``at`` (the broker's clock): look then."""
        heapq.heappush(self.dues, at)
        self.wakeup.set()

    async def _idle(self) -> None:
        """Until woken, the poll interval passes, or the next retry this worker settled
        is due on the app's clock (which a skipping test clock moves to at once)."""
        clock, now = self.broker.clock, self.broker.now()
        while self.dues and self.dues[0] <= now:
            heapq.heappop(self.dues)
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.wakeup.wait())]
        if self.dues:
            waits.append(asyncio.ensure_future(clock.sleep(self.dues[0] - now)))
        try:
            # While the store hears other processes, commits that store events wake
            # this loop (CLAIMS), and another worker's expiry does (Engine.wake_claimers);
            # not while this worker may not take over yet (it may soon)
            wait = self.broker.poll_interval
            careful = self.broker.may_take_over
            if careful is None or careful():
                wait = idle_wait(self.broker.store, wait)
            await asyncio.wait(waits, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    def holds(self, emitted: Sequence[Event[Any]]) -> list[tuple[str, str]]:
        """(group, event id) of ``emitted`` that this worker's subscribers take at once."""
        out: list[tuple[str, str]] = []
        routes = self.broker.routes
        for e in emitted:
            for sub in routes(self.app, self.worker_id, e.type):
                if not sub.stopping and len(sub.inflight) < sub.concurrency:
                    out.append((sub.group, e.id))
        return out if len(out) < 2 else list(dict.fromkeys(out))

    def start(self, delivery: Delivery, *, unless_in_hand: bool = False) -> None:
        key = (self.app, self.group, delivery.event.id)
        if unless_in_hand and key in self.broker.in_hand:  # a hold recover_holds found
            return
        self.broker.in_hand.add(key)
        task = asyncio.create_task(self._handle(delivery))
        self.inflight.add(task)
        task.add_done_callback(self.inflight.discard)
        task.add_done_callback(lambda _: self.broker.in_hand.discard(key))

    async def _handle(self, delivery: Delivery) -> None:
        msg = EmbeddedMessage(self.broker.store, self.app, delivery, sub=self)
        try:
            try:
                await self.handler(msg)
            except Exception as exc:
                if isinstance(exc, StoreError):  # a storage fault: one line, not a flood
                    quiet.warning(f"settle:{self.group}", "group %s could not record event "
                                  "%s (%s); it is retried", self.group, delivery.event.id,
                                  error_text(exc))
                else:
                    log.exception(
                        "handler of group %s crashed on event %s", self.group,
                        delivery.event.id,
                    )
                if not msg.settled:
                    await msg.retry(f"{type(exc).__name__}: {exc}", 1.0)
            else:
                if not msg.settled:
                    # Left claimed, it would never come back while this worker lives.
                    log.warning(
                        "handler of group %s returned without settling event %s; retrying it",
                        self.group, delivery.event.id,
                    )
                    await msg.retry("RuntimeError: the handler did not settle the message", 1.0)
        except Exception as exc:
            if isinstance(exc, StoreError):
                quiet.warning(f"settle:{self.group}", "settling event %s for group %s failed "
                              "(%s)", delivery.event.id, self.group, error_text(exc))
            else:
                log.exception("settling event %s for group %s failed", delivery.event.id,
                              self.group)
        finally:
            if self.behind:
                self.wakeup.set()

    async def stop(self) -> None:
        # Not cancelled: a claim cancelled while the store commits it would leave
        # deliveries owned by this (live) worker and handled by nobody.
        self.stopping = True
        self.wakeup.set()
        await self.task
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)


class _WallClock:
    """The clock of a broker no app has adopted."""

    def now(self) -> float:
        return time.time()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class EmbeddedBroker:
    """Delivers events from the store itself: no server needed.

    Args:
        poll_interval: seconds between looks at the store for work committed by other
            processes (work committed by this process wakes consumers at once).
        lease: accepted for compatibility, and unused: a delivery held by a silent
            worker is taken over once that worker's own lease (``App(lease=...)``,
            recorded with each of its heartbeats) has passed since its last heartbeat,
            whatever the lease of the worker that takes it (docs/leases.md).

    Left out, the poll interval is the app's (see :meth:`adopt_timing`), or else
    0.2 s. Handler retries are due on the app's clock too.
    """

    relays_outbox = False

    def __init__(self, url: str = "embedded", *, poll_interval: float | None = None,
                 lease: float | None = None) -> None:
        self.url = url
        del lease  # see the class docstring
        self._poll_given = poll_interval is not None
        self.poll_interval = 0.2 if poll_interval is None else poll_interval
        self.may_take_over: Callable[[], bool] | None = None
        self.clock: Clock = _WallClock()
        self._store: BrokerStore | None = None
        self._subs: list[_EmbeddedSubscription] = []
        # (app, worker id, event type) -> the subscriptions it goes to (see routes)
        self._routes: dict[tuple[str, str, str], list[_EmbeddedSubscription]] = {}
        self.in_hand: set[tuple[str, str, str]] = set()  # (app, group, event id) started
        self._recovering: set[asyncio.Future[None]] = set()

    def adopt_timing(
        self, *, lease: float, poll_interval: float,
        may_take_over: Callable[[], bool] | None = None, clock: Clock | None = None,
    ) -> None:
        """Use the app's poll interval, unless this broker was given its own.

        A worker's runs and deliveries are kept by one heartbeat row, which records the
        worker's own lease (``lease``, not needed here): a silent worker's deliveries
        are taken over when its runs are, once that lease has passed since its last
        heartbeat, and under the same rule: ``may_take_over()`` false (this worker's
        own hold lapsed in a store outage or a pause, see docs/leases.md) claims only
        deliveries that nobody holds.
        """
        del lease  # each holder is judged by the lease it heartbeats with
        self.may_take_over = may_take_over
        if clock is not None:
            self.clock = clock
        if not self._poll_given:
            self.poll_interval = poll_interval

    def now(self) -> float:
        """The time deliveries are due against: the app's clock, but never behind the
        wall clock, in which the store stamps new events (a skipping test clock that
        has not moved yet must not hold them back)."""
        return max(time.time(), self.clock.now())

    @property
    def store(self) -> BrokerStore:
        if self._store is None:
            raise BrokerError("the embedded broker is not open: open the app first")
        return self._store

    async def open(self, store: BrokerStore) -> None:
        self._store = store
        store.add_listener(self._on_change)

    def _on_change(self, channel: str) -> None:
        # Not for a commit that held for this worker every delivery it would claim
        # (Settlement.wake): the hand-off has them, a claim would find nothing.
        if channel == CLAIMS:
            self.wake()

    async def attach(self, app: str, *, offload_above: int | None = None) -> None:
        """Nothing to prepare: the app's events are in its store (where they are read
        whatever their size)."""

    def check_event(self, app: str, event: Event[Any]) -> None:
        """Nothing to check: the store holds any event it can encode."""

    def wake(self) -> None:
        for sub in self._subs:
            sub.wakeup.set()

    def hand_off(self, app: str, events: Sequence[Event[Any]]) -> None:
        """Nothing more to do: a handler's emitted events were handed off as they were
        settled (:meth:`EmbeddedMessage.complete`), published ones as they were
        appended (:meth:`append`), and the commit that stored any other event woke the
        subscribers."""

    async def append(
        self, app: str, events: Sequence[Event[Any]], *, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> list[int]:
        """Store events this process publishes; the deliveries this worker's
        subscribers take are claimed for it in the same transaction and started at
        once, as a handler's settlement does (:meth:`EmbeddedMessage.complete`)."""
        sub = next((s for s in self._subs if s.app == app and not s.stopping), None)
        hold = sub.holds(events) if sub is not None and events else []
        if sub is None or not hold:
            return await self.store.append_events(app, events, actor=actor, stored=stored)
        try:
            counts, held = await self.store.append_held(
                app, events, hold_for=sub.worker_id, hold=hold,
                wake=not self.holds_all(sub, events, hold), actor=actor, stored=stored,
            )
        except BaseException as exc:
            if not isinstance(exc, LeaseLost):  # it may have committed all the same
                self.recover_holds(sub, events, hold)
            raise
        if held:
            self.handed(sub, events, held)
        return counts

    def routes(self, app: str, worker_id: str, event_type: str) -> list[_EmbeddedSubscription]:
        """The subscriptions of ``worker_id`` in this process that ``event_type`` goes
        to (a subscription stays listed once stopped: callers check ``stopping``)."""
        key = (app, worker_id, event_type)
        subs = self._routes.get(key)
        if subs is None:
            subs = self._routes[key] = [
                s for s in self._subs if s.app == app and s.worker_id == worker_id
                and any(matches(p, event_type) for p in s.patterns)
            ]
        return subs

    def holds_all(self, by: _EmbeddedSubscription, events: Sequence[Event[Any]],
                  hold: Sequence[tuple[str, str]]) -> bool:
        """Whether ``hold`` has every delivery of ``events`` that a consumer of this
        process would claim (its store tells no other process: Settlement.wake)."""
        want = {(s.group, e.id) for e in events
                for s in self.routes(by.app, by.worker_id, e.type)}
        return want.issubset(hold)

    def handed(self, by: _EmbeddedSubscription, events: Sequence[Event[Any]],
               held: Sequence[tuple[str, str]], *, recovered: bool = False) -> None:
        """Start the deliveries ``by``'s settlement claimed for its worker."""
        now = self.now()
        by_id = {e.id: e for e in events}
        for group, event_id in held:
            sub = next((s for s in self._subs if s.app == by.app and s.group == group
                        and s.worker_id == by.worker_id), None)
            if sub is not None:  # (always: holds() chose it)
                sub.start(Delivery(group, by_id[event_id], DELIVERY_PENDING, 1, now, None,
                                   now, 1), unless_in_hand=recovered)

    def recover_holds(self, by: _EmbeddedSubscription, events: Sequence[Event[Any]],
                      held: Sequence[tuple[str, str]]) -> None:
        """A settlement that held deliveries for ``by``'s worker failed, or seemed to:
        look in the store (until it answers) and start those it did hold."""
        task = asyncio.ensure_future(self._recover(by, list(events), list(held)))
        self._recovering.add(task)
        task.add_done_callback(self._recovering.discard)

    async def _recover(self, by: _EmbeddedSubscription, events: list[Event[Any]],
                       held: list[tuple[str, str]]) -> None:
        found: list[tuple[str, str]] = []
        for event_id in dict.fromkeys(e for _, e in held):
            while True:
                try:
                    rows = await self.store.deliveries(by.app, event_id)
                    break
                except Exception:
                    if by.stopping:  # the worker's death hands them over
                        return
                    await asyncio.sleep(self.poll_interval)
            # held by that settlement: its first attempt, under its fence, still pending
            found += [(r.group, event_id) for r in rows
                      if (r.group, event_id) in held and r.status == DELIVERY_PENDING
                      and r.attempts == 1 and r.fence == 1]
        if found:
            self.handed(by, events, found, recovered=True)

    async def close(self) -> None:
        for sub in list(self._subs):
            await sub.stop()
        self._subs.clear()
        self._routes.clear()

    async def publish(
        self, app: str, events: Sequence[Event[Any]], *, again: bool = False
    ) -> None:
        await self.store.append_events(app, events)

    async def subscribe(
        self,
        app: str,
        group: str,
        patterns: Sequence[str],
        handler: Handler,
        *,
        worker_id: str,
        concurrency: int = 64,
    ) -> _EmbeddedSubscription:
        """Consume ``group``'s deliveries from the store.

        The group must be declared in the store (the store addresses each new event
        to the groups declared then) and ``worker_id`` kept alive by its heartbeat:
        the app does both (docs/architecture.md); a delivery this worker claims is
        taken over once its heartbeat is older than its own lease.
        """
        for p in patterns:
            check_pattern(p)
        sub = _EmbeddedSubscription(self, app, group, handler, worker_id, concurrency,
                                    patterns)
        self._subs.append(sub)
        self._routes.clear()
        return sub

    async def redeliver(self, app: str, group: str, event: Event[Any]) -> None:
        """The store's delivery row is pending again; wake the consumers."""
        self.wake()
