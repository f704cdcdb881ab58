"""The local hand-off of the NATS broker: an event this process just committed goes to
this process's subscriber of each group it is addressed to at once, without waiting for
the outbox relay, the JetStream round trip and the pull (docs/performance.md).

Nothing is given up for it (docs/guarantees.md):

- the relay still publishes the event, so the broker's copy still comes: if this
  process dies before the hand-off's handler commits, the copy (never acked) is
  delivered again, here after a restart or to another worker: at-least-once;
- the store's inbox keeps the effect exactly once: the hand-off settles the group's
  delivery row like any delivery (``settle_delivery`` appends the handler's events only
  if the row was not handled before), and the broker's copy, when it comes, finds the
  row handled and is acked without running the handler;
- a copy that arrives while the hand-off's handler runs waits for it (kept alive with
  "in progress"), then is settled by what the store says; one whose hand-off failed and
  was scheduled for a retry is handed back to NATS until the retry is due.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import DeliveryOutcome
from cantata.store.base import Settlement

if TYPE_CHECKING:
    from cantata.broker.nats import NatsBroker

Key = tuple[str, str, str]  # (app, group, event id)


class LocalMessage:
    """One delivery handed over in this process (the first attempt of the group)."""

    def __init__(self, broker: NatsBroker, app: str, group: str, event: Event[Any]) -> None:
        self.group = group
        self.event: Event[Any] | None = event
        self.error: str | None = None
        self.attempt = 1
        self.settled = False
        self._broker = broker
        self._app = app
        self._event = event
        self._raw: bytes | None = None

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
        done = await self._broker.store.settle_delivery(
            self._app, self.group, self._event.id,
            Settlement(DeliveryOutcome.DONE, self.attempt, list(emitted)),
        )
        self._broker._handling.settled((self._app, self.group, self._event.id))
        return done

    async def retry(self, error: str, delay: float) -> None:
        self.settled = True
        retry_at = time.time() + delay
        recorded = await self._broker.store.settle_delivery(
            self._app, self.group, self._event.id,
            Settlement(DeliveryOutcome.RETRY, self.attempt, error=error, retry_at=retry_at),
        )
        if recorded:  # the broker's copy is handed back to NATS until then
            self._broker._deferred[(self._app, self.group, self._event.id)] = retry_at

    async def dead(self, error: str) -> None:
        self.settled = True
        await self._broker.store.settle_delivery(
            self._app, self.group, self._event.id,
            Settlement(DeliveryOutcome.DEAD, self.attempt, error=error, dead_letter_id=new_id()),
        )
        self._broker._handling.settled((self._app, self.group, self._event.id))

    async def extend(self) -> None:
        """Nothing to keep alive: the broker's copy waiting for this one is kept alive by
        its subscription."""


class Handing:
    """What this process holds, per (app, group, event id): a broker copy being handled
    (``None``) or a hand-off (a future done when its handler has finished)."""

    def __init__(self) -> None:
        self.held: dict[Key, asyncio.Future[None] | None] = {}
        # hand-offs whose delivery was settled for good (done or dead) in the store:
        # the broker's copy is acked without a store read (the newest few thousand)
        self.done: dict[Key, None] = {}

    def settled(self, key: Key) -> None:
        self.done[key] = None
        if len(self.done) > _DONE_KEPT:
            del self.done[next(iter(self.done))]

    def settled_here(self, key: Key) -> bool:
        """Whether ``key`` was settled for good by a hand-off (forgotten once asked)."""
        return self.done.pop(key, _FREE) is None

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
        """Take ``key`` for a hand-off; ``None`` if it is held already."""
        if key in self.held:
            return None
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.held[key] = fut
        return fut

    def release(self, key: Key, fut: asyncio.Future[None] | None = None) -> None:
        if self.held.get(key, _FREE) is fut:
            del self.held[key]
        if fut is not None and not fut.done():
            fut.set_result(None)


_FREE: Any = object()
_DONE_KEPT = 4096
