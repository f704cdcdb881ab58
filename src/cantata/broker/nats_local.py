"""The local hand-off of the NATS broker: an event a handler of this process emits goes
at once to this process's subscriber of each group it is addressed to, without waiting
for the outbox relay, the JetStream round trip and the pull (docs/performance.md).

Nothing is given up for it (docs/guarantees.md):

- the handler's settlement holds those deliveries in the store for this worker, in the
  transaction that stores the events (:attr:`Settlement.hold_for`, first attempt
  counted), as the embedded broker does: only what the store did hold is handed off;
- the relay still publishes the event, so the broker's copy still comes. A copy that
  reaches another worker while the holder lives is not run there: it waits (kept alive
  with "in progress") and is acked once the holder settled it, or handed back to NATS
  until the retry the holder scheduled is due. If the holder dies, its heartbeat goes
  stale and the copy is handled by whoever has it after the lease: at-least-once;
- a copy that reaches this process while the hand-off is reserved (from before the
  settlement that holds it commits: :meth:`Handing.hand`) or its handler runs waits
  for it, then is acked without a store read (or handed back until the retry is due)
  when it is the relay's: it carries the body this process published for the event
  (a digest compared, :meth:`Handing.settled_copy`). Any other message with the event's
  id (another system reusing it, a forger who also set its ``Nats-Msg-Id``) is read
  and checked against the store, and dead-lettered if its content differs;
- the store's inbox keeps the effect exactly once: a delivery row is settled once.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cantata.broker.base import BrokerStore
from cantata.errors import LeaseLost
from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import DELIVERY_PENDING, DeliveryOutcome
from cantata.store.base import Settlement

if TYPE_CHECKING:
    from cantata.broker.nats import NatsBroker
    from cantata.broker.nats_consumer import NatsSubscription

Key = tuple[str, str, str]  # (app, group, event id)


class LocalMessage:
    """One delivery handed over in this process (the first attempt of the group)."""

    def __init__(
        self, broker: NatsBroker, app: str, group: str, event: Event[Any],
        sub: NatsSubscription | None = None,
    ) -> None:
        self.group = group
        self.sub = sub
        self.event: Event[Any] | None = event
        self.error: str | None = None
        self.attempt = 1
        self.settled = False
        self.recorded = False  # the store has this hand-off's outcome (else let go of)
        self._broker = broker
        self._app = app
        self._event = event
        self._raw: bytes | None = None
        self.stored_emitted: list[Event[Any]] | None = None  # what complete() stored

    @property
    def raw(self) -> bytes:
        """The event as the broker would carry it (made when asked for)."""
        if self._raw is None:
            self._raw = self._event.to_json()
        return self._raw

    @raw.setter
    def raw(self, value: bytes) -> None:
        self._raw = value

    async def complete(self, emitted: Sequence[Event[Any]] = ()) -> bool:
        self.settled = True
        done, self.stored_emitted = await settle_done(
            self._broker.store, self.sub, self._app, self.group, self._event.id,
            self.attempt, emitted,
        )
        self.recorded = True
        self._broker._handling.settled((self._app, self.group, self._event.id))
        return done

    async def retry(self, error: str, delay: float) -> None:
        self.settled = True
        retry_at = time.time() + delay
        recorded = await self._broker.store.settle_delivery(
            self._app, self.group, self._event.id,
            Settlement(DeliveryOutcome.RETRY, self.attempt, error=error, retry_at=retry_at),
        )
        self.recorded = True
        if recorded:  # the broker's copy is handed back to NATS until then
            self._broker._deferred[(self._app, self.group, self._event.id)] = retry_at

    async def dead(self, error: str) -> None:
        self.settled = True
        await self._broker.store.settle_delivery(
            self._app, self.group, self._event.id,
            Settlement(DeliveryOutcome.DEAD, self.attempt, error=error, dead_letter_id=new_id()),
        )
        self.recorded = True
        self._broker._handling.settled((self._app, self.group, self._event.id))

    async def extend(self) -> None:
        """Nothing to keep alive: the broker's copy waiting for this one is kept alive by
        its subscription."""


async def settle_done(
    store: BrokerStore, sub: NatsSubscription | None, app: str, group: str, event_id: str,
    attempt: int, emitted: Sequence[Event[Any]],
) -> tuple[bool, list[Event[Any]] | None]:
    """Settle (group, event) done with what its handler emitted; the deliveries of the
    emitted events that this worker's subscribers take are held for this worker in the
    same transaction and handed to them at once (see the module's docstring). Whether
    it was settled, and if so the emitted events it stored
    (:meth:`Settlement.stored_events`)."""
    hold = sub.holds(emitted) if sub is not None and emitted else []
    settlement = Settlement(DeliveryOutcome.DONE, attempt, list(emitted),
                            hold_for=sub.worker_id if sub is not None and hold else None,
                            hold=hold)
    try:
        done = await store.settle_delivery(app, group, event_id, settlement)
    except BaseException as exc:
        # (LeaseLost: this worker is out, as after a crash: a takeover hands them on)
        if sub is not None and hold and not isinstance(exc, LeaseLost):
            # It may have committed all the same (a connection lost after COMMIT): what
            # it held for this worker must not wait for this worker's death.
            sub.broker.recover_holds(sub, emitted, hold)
        elif sub is not None and hold:
            sub.broker.start_holds(sub, emitted, hold, [])
        raise
    if sub is not None and hold:
        # only what the store did hold: an emitted event stored before (its id reused)
        # may have a delivery someone else has
        sub.broker.start_holds(sub, emitted, hold, settlement.held if done else [])
    if done and settlement.addressed and sub is not None:
        sub.broker.note_local(emitted, settlement.addressed, settlement.held)
    return done, settlement.stored_events() if done else None


async def held_by(
    store: BrokerStore, app: str, held: Sequence[tuple[str, str]], wait: float,
    stopping: Any,
) -> list[tuple[str, str]] | None:
    """Of ``held``, the deliveries a settlement that seemed to fail did hold (pending,
    their first attempt, under their first fence); looks until the store answers,
    ``None`` once ``stopping()``."""
    found: list[tuple[str, str]] = []
    for event_id in dict.fromkeys(e for _, e in held):
        while True:
            try:
                rows = await store.deliveries(app, event_id)
                break
            except Exception:
                if stopping():  # the worker's end hands them over
                    return None
                await asyncio.sleep(wait)
        found += [(r.group, event_id) for r in rows
                  if (r.group, event_id) in held and r.status == DELIVERY_PENDING
                  and r.attempts == 1 and r.fence == 1]
    return found


class Handing:
    """What this process holds, per (app, group, event id): a broker copy being handled
    (``None``) or a hand-off (a future done when its handler has finished)."""

    def __init__(self) -> None:
        self.held: dict[Key, asyncio.Future[None] | None] = {}
        # hand-offs whose delivery was settled for good (done or dead) in the store:
        # the broker's copy is acked without a store read (the newest few thousand)
        self.done: OrderedDict[Key, None] = OrderedDict()
        # event id -> digest of the body published for it here (the newest few thousand)
        self.bodies: OrderedDict[str, bytes] = OrderedDict()

    def settled(self, key: Key) -> None:
        self.done[key] = None
        if len(self.done) > _DONE_KEPT:
            self.done.popitem(last=False)

    def published(self, event_id: str, body: bytes) -> None:
        """This process published ``body`` for the event ``event_id`` (remembered as a
        digest, for :meth:`settled_copy`)."""
        bodies = self.bodies
        bodies[event_id] = body_digest(body)
        if len(bodies) > _DONE_KEPT:
            bodies.popitem(last=False)

    def settled_copy(self, key: Key, body: bytes) -> bool:
        """Whether a message carrying ``body``, whose ``Nats-Msg-Id`` is ``key``'s event
        id, is the relay's copy of an event a hand-off settled here for good: its body
        is the one published here for the event. Its mark is then used up. Another body
        (another system or a forger reusing the id) is not: it is to be read."""
        if key not in self.done:
            return False
        sent = self.bodies.get(key[2])
        if sent is None or sent != body_digest(body):
            return False
        del self.done[key]
        return True

    def __contains__(self, key: Key) -> bool:
        return key in self.held

    async def take(self, key: Key, keep_alive: Any = None) -> bool:
        """Take ``key`` for a broker copy: ``False`` when another broker copy holds it
        (the first settles it); waits for a hand-off that holds it to finish."""
        while True:
            holder = self.held.get(key, _FREE)
            if holder is _FREE:
                self.held[key] = None
                return True
            if holder is None:
                return False
            assert isinstance(holder, asyncio.Future)
            if keep_alive is not None:
                keep_alive()
            await asyncio.shield(holder)

    def hand(self, key: Key) -> asyncio.Future[None] | None:
        """Reserve ``key`` for a hand-off; ``None`` if it is held already."""
        if key in self.held:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.held[key] = fut
        return fut

    def reserved(self, key: Key) -> asyncio.Future[None]:
        """The hand-off reservation of ``key`` (:meth:`hand`)."""
        fut = self.held.get(key)
        assert isinstance(fut, asyncio.Future), f"{key} was not reserved for a hand-off"
        return fut

    def unreserve(self, key: Key) -> None:
        """End a reservation whose hand-off will not run (the store did not hold it)."""
        fut = self.held.get(key)
        if isinstance(fut, asyncio.Future):
            self.release(key, fut)

    def release(self, key: Key, fut: asyncio.Future[None] | None = None) -> None:
        if self.held.get(key, _FREE) is fut:
            del self.held[key]
        if fut is not None and not fut.done():
            fut.set_result(None)


def body_digest(body: bytes) -> bytes:
    """What tells two message bodies apart: SHA-256 (a forger cannot make another body
    with the same digest; hashlib's fastest such hash for bodies of a few hundred
    bytes)."""
    return hashlib.sha256(body).digest()


_FREE: Any = object()
_DONE_KEPT = 16384
# The bounded memories here and in nats.py drop their oldest entry with
# OrderedDict.popitem(last=False): a dict's ``next(iter(d))`` walks past every slot
# deleted at its front since it was last resized, ~20 µs at this size on every event
# once full (docs/performance.md, round fifteen).
