"""Keeping the events from outside that workflows wait for.

An event another system (one not written with Cantata) puts on the app's subjects is
stored when it first reaches any consumer of the app: a handler group's or a
``start_on`` trigger's (:mod:`cantata.broker.nats_consumer`). ``ctx.wait_for_event``
reads the store only, so a type that only workflows wait for would never be stored:
a worker that runs such workflows also consumes the types they wait for, with one
durable consumer per type shared by every worker of the app
(``_cantata-outside-<digest>``, :meth:`Names.outside`), and stores each event from
outside that is not stored yet, as external (idempotent by event id: one row however
many consumers see it). The outbox relay's own copies carry the ``Cantata-Outbox``
header with this store's mark on this stream (:func:`~cantata.broker.nats_names.outbox_mark`:
the store's id and the stream's name): the store has those, so they are acked unread,
in batches, without a store read or a task each. A message whose header holds any
other value — another store's relay copy brought here by a tool that kept the headers
(another environment on the server, another app, a clone of this store under another
prefix), a value made up, or the ``1`` of Cantata before the mark — is read like any
message from outside: stored unless the store has its event (then acked, nothing
stored twice). So a copy an older relay published during an upgrade costs one store
read, and is never taken for an event the store holds when it is not. An event on
another type's subject is not kept (:func:`~cantata.broker.nats_consumer.misrouted`).

Such a consumer, made for the first time (or again, deleted on the server), does not
read the stream from its start: a wait counts the events published since its run
started, so it starts at the creation of the app's oldest run that is not final (now
when there is none), less the broker's ``clock_skew`` (the workers' clocks and the
server's may differ). An event published after that run started and before any wait
of its type began is still read; millions of older messages are not, nor are old
events stored now as if they had just come (a wait would take them).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from nats.aio.msg import Msg

from cantata.broker.base import BrokerMessage
from cantata.broker.nats_consumer import NatsSubscription, decode, misrouted, same_event
from cantata.broker.nats_names import OUTBOX_HEADER
from cantata.errors import InvalidEvent, StoreError, error_text
from cantata.model.event import Event, is_claim
from cantata.quietlog import QuietLog

if TYPE_CHECKING:
    from cantata.broker.nats import NatsBroker

log = logging.getLogger("cantata.broker")
quiet = QuietLog(log, every=30.0)

#: The keeper's name where a group's goes (task names; it is no group: it settles no
#: delivery).
KEEPER = "outside-for-waits"
_CONCURRENCY = 16  # messages stored at once by one worker's keeper

OnStored = Callable[[list[Event[Any]]], None]
#: The creation time of the app's oldest run not final (``None``: every run is final).
Since = Callable[[], Awaitable[float | None]]


async def _no_handler(msg: BrokerMessage) -> None:  # (the keeper handles no message)
    raise AssertionError("the outside keeper runs no handler")


class OutsideKeeper(NatsSubscription):
    """Stores the events from outside of the types this worker's workflows wait for.

    Args:
        patterns: the waited-for types (a durable consumer each); more come with
            :meth:`add` as runs reach waits of types found only at run time.
        since: the creation of the app's oldest run not final, asked as a consumer is
            made (where it starts).
        on_stored: told the events stored here (to wake this process's waits at once).
    """

    def __init__(
        self, broker: NatsBroker, app: str, patterns: Sequence[str], *, worker_id: str,
        since: Since, on_stored: OnStored | None = None,
    ) -> None:
        names = broker.names(app)
        self.since = since
        super().__init__(
            broker, app, KEEPER, _no_handler, _CONCURRENCY,
            [(names.outside(p), names.event(p), False) for p in patterns], patterns,
            worker_id=worker_id, start_at=self._start,
        )
        self.on_stored = on_stored

    async def _start(self) -> float:
        """Where a consumer made here starts reading (see the module's docstring)."""
        now = time.time()  # (before the read: a run created meanwhile is later)
        oldest = await self.since()
        return min(now, now if oldest is None else oldest) - self.broker.clock_skew

    @property
    def who(self) -> str:
        return f"the consumer keeping events from outside for waits (app {self.app})"

    def add(self, pattern: str) -> None:
        """Keep the events from outside of ``pattern`` too (a pull loop of its own)."""
        if pattern in self.patterns or self._stopping.is_set():
            return
        self.patterns.append(pattern)
        self._share = max(1, self.concurrency // len(self.patterns))
        durable = self.names.outside(pattern)
        self._loops.append(asyncio.create_task(
            self._pull(durable, self.names.event(pattern), False),
            name=f"cantata-nats:outside:{durable}",
        ))

    def _done_already(self, m: Msg, replay: bool) -> bool:
        """This store's relay's copy of a stored event (its header holds this store's
        mark on this stream, nothing else), or a replay to some group that a wildcard
        matched: acked unread."""
        if self.names.is_replay(m.subject):
            return True
        headers = m.headers
        if headers is None:
            return False
        mark = headers.get(OUTBOX_HEADER)
        return mark is not None and mark == self.broker.outbox_mark(self.app)

    async def _handle(self, m: Msg, replay: bool) -> None:
        try:
            if self._done_already(m, replay):
                await m.ack()
                return
            await self._keep_message(m)
        except Exception as exc:
            if isinstance(exc, StoreError):  # an outage: waited out, one line now and then
                quiet.warning(f"keep:{self.app}", "storing an event from outside of app %s "
                              "failed (%s); NATS delivers it again", self.app,
                              error_text(exc))
                with contextlib.suppress(Exception):
                    await m.nak(delay=1.0)
            else:
                await self._failed(m, exc, "storing")
        finally:
            self._busy -= 1
            self._capacity.set()

    async def _keep_message(self, m: Msg) -> None:
        try:
            event = decode(m)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, InvalidEvent) else (
                f"not a valid event: {error_text(exc)}")
            # No group of this type here to dead-letter it: said, and dropped.
            quiet.warning(f"invalid:{self.app}", "a message on %s is not a valid event "
                          "(%s): no wait can see it; it was dropped", m.subject, reason)
            await m.ack()
            return
        if is_claim(event):  # (from the relay: the store has its event)
            await m.ack()
            return
        wrong = misrouted(self.names, m.subject, event)
        if wrong is not None:
            # Not stored: the groups of its type would never get it (they read its
            # type's subject); those of this subject dead-letter it.
            quiet.warning(
                f"misrouted:{self.app}",
                "a message on %s was not kept for waits: %s",
                m.subject,
                wrong,
            )
            await m.ack()
            return
        store = self.broker.store
        stored = await store.get_event(self.app, event.id)
        if stored is None:
            await store.append_external(self.app, [event])
            if self.on_stored is not None:
                self.on_stored([event])
        elif not same_event(stored, event):
            quiet.warning(
                f"clash:{self.app}", "a message reusing event id %s with other content was "
                "not kept (stored: %s %.200r; message: %s %.200r): waits see the stored "
                "event", event.id, stored.type, stored.data, event.type, event.data,
            )
        await m.ack()
