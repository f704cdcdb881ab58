"""The consuming side of the NATS broker: one delivery, and one group's pull loops.

The store stays the source of truth: a stored event is handed to a group only while
the store has it pending for that group (a delivery row), as with the embedded
broker, and with the stored content (a message reusing its id with other content is
dead-lettered, docs/security.md). An event from outside (another system put it on the
app's subjects) is stored when it arrives, as external, with its id as its
correlation id when it carries none (docs/guide.md), unless it came on another type's
subject (:func:`misrouted`): that one is dead-lettered as a stand-in, not stored.
Settling writes the store first, then acks, so a lost ack only causes a redelivery the
store recognises. A copy runs only once its delivery is taken for this worker in the
store (:meth:`~cantata.store.roles.EventStore.take_deliveries`): two copies of one
event never run in two live workers at once (docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cantata.broker.base import BrokerStore, Handler
from cantata.broker.nats_local import LocalMessage, settle_done
from cantata.broker.nats_names import Names, digest
from cantata.broker.nats_publish import ack_all
from cantata.broker.nats_pull import direct, fetch, indirect, usable
from cantata.cancel_safe import wait_event
from cantata.errors import InvalidEvent, StoreError, error_text
from cantata.graceful import finish_unless
from cantata.model.checks import article, check_text
from cantata.model.codec import new_id
from cantata.model.event import BOUNDED_ATTRIBUTES, Event, check_length, is_claim
from cantata.model.records import DELIVERY_DEAD, DELIVERY_PENDING, DeliveryOutcome
from cantata.quietlog import QuietLog
from cantata.store.base import Settlement
from cantata.store.faults import wait_out
from cantata.store.roles.events import DeliveryHold

if TYPE_CHECKING:
    from cantata.broker.nats import NatsBroker

log = logging.getLogger("cantata.broker")
quiet = QuietLog(log, every=30.0)  # storage faults: one line now and then, no tracebacks

# a retry due sooner than this is run now rather than handed back (clock skew, timers)
_EARLY = 0.1
INVALID_TYPE = "cantata.broker.invalid-payload"  # type of the stand-in for a garbage payload
_MAX_INVALID_TEXT = 64 * 1024
# A message that fails this often in a process with something other than a storage
# fault (which is waited out) is given up: NATS stops delivering it (docs/deploy.md).
GIVE_UP_AFTER = 5
_CRASHES_KEPT = 1024  # messages whose failures a subscription counts
# The share of ack_wait after which a running handler's message is told "in progress"
# again (Subscription._keep_alive): well under the quarter of the lease that lies past
# the pause fence (3/4), so that NATS never hands a paused worker's message to another
# worker before its own guard stops the body.
KEEP_ALIVE_SHARE = 1 / 8
# Seconds past ``fetch_timeout`` a stopping subscription waits for its pull loops while
# the server answers (a consumer's check, an unsubscribe), before it cancels them
STOP_PULL_EXTRA = 5.0

#: Where a consumer a subscription makes starts reading: a POSIX time (asked only when
#: the consumer is made); a subscription without one reads from the stream's start.
StartAt = Callable[[], Awaitable[float]]


def decode(msg: Msg) -> Event[Any]:
    """The event a message carries: CloudEvents binary mode when its headers hold the
    ``ce-`` attributes (the NATS protocol binding), structured JSON mode otherwise."""
    headers = msg.headers or {}
    if any(k.lower() == "ce-specversion" for k in headers):
        event: Event[Any] = Event.from_binary(headers, msg.data)
    else:
        event = Event.from_json(msg.data)
    # Another system's event may hold text no store keeps (a NUL, a lone surrogate, an
    # id too long to index): dead-lettered as not a valid event, as a publisher here
    # would have been refused.
    for name in _TEXT_ATTRIBUTES:
        value = getattr(event, name)
        if value is not None:
            check_text(f"event attribute {name!r}", value, error=InvalidEvent)
    for name in BOUNDED_ATTRIBUTES:
        check_length(name, getattr(event, name))
    if event.correlation_id is None:
        # From another system (Cantata's events carry one): a new business transaction,
        # named by the event's id (docs/guide.md §4), so trace and stalled find it.
        event = dataclasses.replace(event, correlation_id=event.id)
    return event


def same_event(stored: Event[Any], message: Event[Any]) -> bool:
    """Whether a message carries the content of the stored event with its id. An
    outside event stored before its correlation id was defaulted (stored with none)
    matches its message, which carries its id as one (see :func:`decode`)."""
    if stored.correlation_id is None and message.correlation_id == message.id:
        stored = dataclasses.replace(stored, correlation_id=stored.id)
    return stored.same_content(message)


def clash(stored: Event[Any], message: Event[Any]) -> str:
    """The dead letter's error for a message reusing ``stored``'s id with other content."""
    return (
        f"DuplicateEventId: event id {stored.id} is already used by {article(stored.type)} "
        f"{stored.type} event (data {stored.data!r:.200}); this {message.type} message (data "
        f"{message.data!r:.200}) was refused: the stored event stays"
    )


def misrouted(names: Names, subject: str, event: Event[Any]) -> str | None:
    """Why ``event`` may not be taken from ``subject``: an event travels on the subject
    of its own type (:meth:`Names.event`), which is where the store sends the groups and
    waits of that type to look for it. ``None`` when it came where it belongs (and for a
    dead-letter replay, whose subject names a group)."""
    belongs = names.event(event.type)
    if subject == belongs or names.is_replay(subject):
        return None
    head = f"{names.subjects}."
    there = subject[len(head) :] if subject.startswith(head) else subject
    return (
        f"event {event.id} of type {event.type!r} came on subject {subject}, where "
        f"{there!r} events go: an event from another system is taken only from the "
        f"subject of its type; publish it on {belongs}"
    )


_TEXT_ATTRIBUTES = ("id", "source", "subject", "correlation_id", "causation_id",
                    "traceparent", "signature")


HANDED_BACK = "(handed back at JetStream delivery "  # ends a hand-back's recorded error


def handed_back_at(error: str | None) -> int | None:
    """The JetStream delivery count at which a delivery was last handed back, read from
    its recorded ``error`` (``None``: its last settlement was no hand-back)."""
    if not error or not error.endswith(")") or HANDED_BACK not in error:
        return None
    count = error.rpartition(HANDED_BACK)[2][:-1]
    return int(count) if count.isdigit() else None


class NatsMessage:
    """One JetStream delivery of one event to one group."""

    def __init__(
        self, msg: Msg, store: BrokerStore, app: str, group: str, attempt: int, where: str,
        sub: NatsSubscription | None = None,
    ) -> None:
        self.group = group
        self.sub = sub  # holds and hands off what the handler emits (nats_local)
        self.raw: bytes = msg.data
        self.attempt = attempt
        self.delivered = attempt  # JetStream's count of deliveries of this message
        self.settled = False
        # The store holds the delivery for this worker (taken for this copy, or held by
        # an earlier attempt here), and the store has recorded no outcome of this copy
        # yet: let go of, should the copy end unsettled (NatsSubscription._let_go).
        self.took = False
        self.recorded = False
        self.stored_emitted: list[Event[Any]] | None = None  # what complete() stored
        self._msg = msg
        self._store = store
        self._app = app
        self._where = where  # "stream:sequence", names the stand-in of a garbage payload
        self.event: Event[Any] | None
        self.error: str | None
        try:
            self.event, self.error = decode(msg), None
        except InvalidEvent as exc:  # "not JSON: ...", "not a CloudEvent: missing ..."
            self.event, self.error = None, str(exc)
        except Exception as exc:  # anything odd inside the JSON
            self.event, self.error = None, f"not a valid event: {error_text(exc)}"

    async def complete(self, emitted: Sequence[Event[Any]] = ()) -> bool:
        """Mark handled and append ``emitted`` in the store, then ack.

        An invalid payload cannot be handled: it is dead-lettered and ``False`` returned.
        """
        if self.event is None:
            await self.dead(f"InvalidEvent: {self.error}")
            return False
        self.settled = True
        done, self.stored_emitted = await settle_done(
            self._store, self.sub, self._app, self.group, self.event.id, self.attempt, emitted
        )
        self.recorded = True
        await self._ack("ack")
        return done

    async def retry(self, error: str, delay: float) -> None:
        self.settled = True
        if self.event is not None:
            recorded = await self._store.settle_delivery(
                self._app, self.group, self.event.id,
                Settlement(
                    DeliveryOutcome.RETRY, self.attempt, error=error, retry_at=time.time() + delay
                ),
            )
            self.recorded = True
            if not recorded:  # handled meanwhile by another delivery: nothing to retry
                await self._ack("ack")
                return
        await self._ack("nak", delay)

    async def hand_back(self, error: str, delay: float) -> None:
        """Give the delivery back to its group for another worker (the consumer's
        ``HandBack``), due after ``delay``, not counted as an attempt: the store keeps
        the attempts before this one, and the error says at which of JetStream's
        deliveries it was handed back, which the next copy subtracts
        (:func:`handed_back_at`)."""
        self.attempt = max(0, self.attempt - 1)
        await self.retry(f"{error} {HANDED_BACK}{self.delivered})", delay)

    async def dead(self, error: str) -> None:
        self.settled = True
        recorded = await self._dead_letter(self.event or self._stand_in(self.error), error)
        self.recorded = self.event is not None
        await self._ack("term" if recorded is not False else "ack")

    async def refuse(self, error: str) -> None:
        """Dead-letter this message as a stand-in (it reuses a stored event's id with
        other content, ``error``), without settling the stored event's delivery nor
        acking: the caller goes on with the stored event, or acks."""
        await self._dead_letter(self._stand_in(error), error)

    async def _dead_letter(self, event: Event[Any], error: str) -> bool | None:
        """Move (group, ``event``) to the dead letters; ``None`` when it was there
        already (the ack was lost), ``False`` when another copy settled it meanwhile."""
        event = await self._stored(event)
        rows = await self._store.deliveries(self._app, event.id)
        if any(r.group == self.group and r.status == DELIVERY_DEAD for r in rows):
            return None
        return await self._store.settle_delivery(
            self._app, self.group, event.id,
            Settlement(DeliveryOutcome.DEAD, self.attempt, error=error, dead_letter_id=new_id()),
        )

    async def extend(self) -> None:
        await self._ack("wip")

    def _stand_in(self, error: str | None) -> Event[Any]:
        """An event carrying a payload that cannot be handled (garbage, or a reused id),
        so its dead letter can be listed; its own transaction (trace, stalled)."""
        stand_in_id = f"invalid-{digest(self._where, n=24)}"
        return Event(
            type=INVALID_TYPE,
            id=stand_in_id,
            source="cantata.broker.nats",
            data={
                "subject": self._msg.subject,
                "position": self._where,
                "error": error,
                "payload": self.raw[:_MAX_INVALID_TEXT].decode("utf-8", "replace"),
            },
            correlation_id=stand_in_id,
        )

    async def _stored(self, event: Event[Any]) -> Event[Any]:
        """Store an event that came from outside, so its dead letter can be listed."""
        if await self._store.get_event(self._app, event.id) is None:
            # It came from the broker: stored as external (in one transaction), so the
            # outbox relay never sends it back there, nor a re-drive.
            await self._store.append_external(self._app, [event])
        return event

    async def _ack(self, kind: str, delay: float | None = None) -> None:
        try:
            if kind == "ack":
                await self._msg.ack()
            elif kind == "nak":
                await self._msg.nak(delay=delay)
            elif kind == "term":
                await self._msg.term()
            else:
                await self._msg.in_progress()
        except nats.errors.MsgAlreadyAckdError:
            pass
        except Exception as exc:  # the store holds the outcome; a redelivery is harmless
            log.warning(
                "%s of a message of group %s failed (%s); NATS redelivers it after its "
                "ack wait and the store recognises it", kind, self.group, error_text(exc),
            )


class NatsSubscription:
    """The pull loops of one subscriber: one per consumer of the group. The consumers it
    makes read from the stream's start, or from the time ``start_at`` gives."""

    def __init__(
        self,
        broker: NatsBroker,
        app: str,
        group: str,
        handler: Handler,
        concurrency: int,
        consumers: list[tuple[str, str, bool]],  # (durable, filter subject, is_replay)
        patterns: Sequence[str] = (),
        *,
        worker_id: str,
        start_at: StartAt | None = None,
    ) -> None:
        self.broker = broker
        self.worker_id = worker_id
        self.patterns = list(patterns)
        self.app = app
        self.names = broker.names(app)
        self.group = group
        self.handler = handler
        self.concurrency = max(1, concurrency)
        self.start_at = start_at
        # Each loop fetches at most its share, so no loop can starve the others.
        self._share = max(1, self.concurrency // len(consumers))
        self._busy = 0  # handlers running plus messages being fetched
        self._capacity = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        # messages whose handler is running: told "in progress" every eighth of ack_wait
        self._held: dict[int, Msg] = {}
        self._keeper = asyncio.create_task(self._keep_alive(), name=f"cantata-nats:{group}:wip")
        # "stream:sequence" -> failures of that message here (see _failed)
        self._crashes: OrderedDict[str, int] = OrderedDict()
        # event id -> callers waiting for the group's delivery state (see _delivery_state)
        self._lookups: dict[str, list[asyncio.Future[DeliveryHold | None]]] = {}
        self._loops = [
            asyncio.create_task(self._pull(*c), name=f"cantata-nats:{group}:{c[0]}")
            for c in consumers
        ]

    async def _pull(self, durable: str, subject: str, replay: bool) -> None:
        psub: JetStreamContext.PullSubscription | None = None
        bound = 0  # the broker's generation of the stream psub was bound on
        fast = False  # psub can be pulled from without a task per message (nats_pull)
        failures = 0
        recheck = 0.0  # (monotonic) when an idle loop checks next that its consumer exists
        try:
            while not self._stopping.is_set():
                want = min(self._share, self.concurrency - self._busy)
                if want <= 0:
                    self._capacity.clear()
                    await self._capacity.wait()
                    continue
                self._busy += want
                msgs: list[Msg] = []
                try:
                    generation = self.broker.generation(self.app)
                    if psub is not None and generation != bound:  # the stream was re-made
                        await self._unbind(psub)
                        psub = None
                    if psub is None and not self.broker.connected:
                        # not reached yet (an outage at open): bound once connected,
                        # without a warning per consumer (the broker said it once)
                        await self._until_connected()
                        continue
                    if psub is None:
                        psub = await self.broker._bind(self.app, durable, subject, self.start_at)
                        bound, fast = generation, usable(psub)
                        recheck = time.monotonic() + self.broker.check_interval
                        if fast:
                            direct(psub)
                    msgs = await (fetch(psub, want, self.broker.fetch_timeout) if fast
                                  else psub.fetch(want, timeout=self.broker.fetch_timeout))
                    failures = 0
                except TimeoutError:  # no message in time (or a reconnect under way)
                    # ... or the consumer was deleted on the server (a pull on it gets no
                    # answer): looked up when idle, every check_interval, and made again
                    if psub is not None and time.monotonic() >= recheck:
                        recheck = time.monotonic() + self.broker.check_interval
                        if await self.broker.consumer_gone(self.app, durable):
                            await self._unbind(psub)
                            psub = None
                except Exception as exc:  # server restarting, consumer lost, ...
                    failures += 1
                    if failures == 1 or failures % 50 == 0:
                        log.warning(
                            "pulling for group %s from NATS at %s failed (%s); retrying",
                            self.group, self.broker.masked_url, error_text(exc),
                        )
                    if isinstance(exc, nats.js.errors.APIError):
                        await self._unbind(psub)  # bind again, recreating what is gone
                        psub = None
                        self.broker._forget_stream(self.app)
                    await wait_event(self._stopping, min(2.0, 0.1 * failures))
                finally:
                    self._busy -= want - len(msgs)
                settled: list[Msg] = []
                for m in msgs:
                    if self._stopping.is_set():  # hand it straight back to the others
                        self._busy -= 1
                        with contextlib.suppress(Exception):
                            await m.nak()
                        continue
                    if self._done_already(m, replay):  # acked below, without a task
                        self._busy -= 1
                        settled.append(m)
                        continue
                    task = asyncio.create_task(self._handle(m, replay))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                if settled:
                    # (a lost ack: NATS delivers it again, and the store says done)
                    await self._ack_all(settled)
                    self._capacity.set()
                if not msgs:
                    await asyncio.sleep(0)  # let a loop waiting for capacity go first
        finally:
            await self._unbind(psub)

    async def _until_connected(self) -> None:
        up = asyncio.ensure_future(self.broker.wait_connected())
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait([up, stop], return_when=asyncio.FIRST_COMPLETED)
        finally:
            up.cancel()
            stop.cancel()

    async def _ack_all(self, msgs: list[Msg]) -> None:
        """Ack messages settled already: in one write when the client allows it."""
        nc = self.broker._nc
        with contextlib.suppress(Exception):
            if nc is not None and await ack_all(nc, msgs):
                return
        for m in msgs:
            with contextlib.suppress(Exception):
                await m.ack()

    @staticmethod
    async def _unbind(psub: JetStreamContext.PullSubscription | None) -> None:
        if psub is not None:
            indirect(psub)
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    def _done_already(self, m: Msg, replay: bool) -> bool:
        """Whether ``m`` is to be acked as it is, unread: another group's replay that a
        wildcard matched, or the relay's copy (its message id is the event id, its body
        the one published here) of an event a hand-off settled here for good."""
        if not replay and self.names.is_replay(m.subject):
            return True  # (a wildcard such as ``*.billing`` matches other groups' replays)
        sent_as = (self.app, self.group, (m.headers or {}).get("Nats-Msg-Id") or "")
        handling = self.broker._handling
        return sent_as not in handling and handling.settled_copy(sent_as, m.data)

    async def _handle(self, m: Msg, replay: bool) -> None:
        key: tuple[str, str, str] | None = None  # set while this call holds the event
        msg: NatsMessage | None = None
        try:
            if self._done_already(m, replay):  # (settled meanwhile)
                await m.ack()
                return
            meta = m.metadata
            msg = NatsMessage(
                m, self.broker.store, self.app, self.group, meta.num_delivered,
                f"{meta.stream}:{meta.sequence.stream}",
                self if self.broker.local_hand_off else None,
            )
            if msg.event is not None and is_claim(msg.event):
                await self._redeem(msg)
            if msg.event is not None:
                wanted = (self.app, self.group, msg.event.id)
                # Claimed before the store is read, so a copy arriving meanwhile is skipped,
                # and one arriving after sees the first one's settlement. A copy of an
                # event handed off in this process waits for the hand-off (nats_local).
                if not await self.broker._handling.take(
                    wanted, lambda: self._held.__setitem__(id(m), m)
                ):
                    # A second copy of one this process is handling right now: the first
                    # settles it. Not acked: NATS acks a message, not one delivery of it,
                    # and this may be the same message delivered again (its ack wait ran
                    # out while it queued here): its ack would drop the message while the
                    # first copy's handler may still die with this worker. Another
                    # message (an outside event re-sent by the outbox relay) comes back
                    # after its ack wait, and the store recognises it.
                    return
                key = wanted
                retry_at = self.broker._deferred.pop(key, None)
                if retry_at is not None and retry_at > time.time():
                    # Its hand-off failed and is to be retried then: NATS keeps it till then.
                    await m.nak(delay=retry_at - time.time())
                    return
                if ((m.headers or {}).get("Nats-Msg-Id") == msg.event.id
                        and self.broker._handling.settled_copy(key, m.data)):
                    # The relay's copy of an event its hand-off settled: the store has
                    # it done. Any other message with that id (an outside one, a forged
                    # copy) is checked against the store below.
                    await m.ack()
                    return
                if not await self._addressed_once_read(msg, msg.event, m):
                    if not msg.settled:  # (a refused duplicate was dead-lettered, a copy
                        await m.ack()  # held elsewhere handed back)
                    return
            self._held[id(m)] = m
            try:
                await self.handler(msg)
            except Exception as exc:
                if isinstance(exc, StoreError):  # a storage fault: one line, not a flood
                    quiet.warning(f"settle:{self.group}", "group %s could not record a "
                                  "message (%s); NATS redelivers it", self.group,
                                  error_text(exc))
                elif await self._failed(m, exc, "handling", hand_back=False):
                    return
                if not msg.settled:
                    await msg.retry(error_text(exc), 1.0)
        except Exception as exc:
            if isinstance(exc, StoreError):
                quiet.warning(f"settle:{self.group}", "settling a message of group %s failed "
                              "(%s); NATS redelivers it", self.group, error_text(exc))
            else:
                await self._failed(m, exc, "settling")
        finally:
            self._held.pop(id(m), None)
            if key is not None:
                if msg is not None and msg.took and not msg.recorded:
                    await self._let_go(key[2])  # (before another copy here may take it)
                self.broker._handling.release(key)
            self._busy -= 1
            self._capacity.set()

    async def _let_go(self, event_id: str) -> None:
        """Let go of this worker's hold on the group's delivery of ``event_id``: a copy
        (or hand-off) that held it ended without recording an outcome (handed back to
        NATS unrun, or its settlement failed). Else a copy of it at another worker
        would wait for this worker's death. Waits out a store outage; a stop gives up
        (the worker's end frees its holds)."""
        try:
            await wait_out(
                lambda: self.broker.store.release_delivery(self.app, self.group, event_id,
                                                           self.worker_id),
                quiet=quiet, key=f"settle:{self.group}",
                what=f"group {self.group} letting go of a delivery",
                give_up=self._stopping.is_set, max_delay=max(0.05, self.broker.lease / 4),
            )
        except Exception as exc:
            quiet.warning(f"settle:{self.group}", "group %s could not let go of its hold "
                          "on event %s (%s); it ends with this worker's lease", self.group,
                          event_id, error_text(exc))

    async def _failed(
        self, m: Msg, exc: Exception, what: str, *, hand_back: bool = True
    ) -> bool:
        """Report a failure on ``m`` that is not a storage fault (a storage fault is
        waited out): a message the store cannot keep, or a bug. One line now and then
        (the traceback at debug level); ``hand_back``: NATS is asked to deliver it
        again after a backoff (0.5 s, doubling). After :data:`GIVE_UP_AFTER` failures
        of the message here, NATS is told to stop delivering it (``True``), so that it
        cannot loop for ever."""
        who = self.who
        log.debug("%s a message of %s failed", what, who, exc_info=exc)
        try:
            meta = m.metadata
            where = f"{meta.stream}:{meta.sequence.stream}"
        except Exception:
            where = m.reply or "?"
        failures = self._crashes.pop(where, 0) + 1
        if failures < GIVE_UP_AFTER:
            self._crashes[where] = failures
            while len(self._crashes) > _CRASHES_KEPT:
                self._crashes.popitem(last=False)
            quiet.warning(
                f"crash:{self.app}:{self.group}", "%s a message of %s failed (%s); NATS "
                "delivers it again (given up after %d such failures)", what, who,
                error_text(exc), GIVE_UP_AFTER,
            )
            if hand_back:
                with contextlib.suppress(Exception):
                    await m.nak(delay=0.5 * 2 ** (failures - 1))
            return False
        event_id = (m.headers or {}).get("Nats-Msg-Id") or "unknown"
        log.error(
            "%s gave up on the message at %s (message id %s) after %d failures in this "
            "worker, the last: %s. NATS no longer delivers it: an event the store holds "
            "stays pending for the group (`cantata stalled` shows it, `cantata dlq redrive` "
            "sends it again); an event from another system was not kept", who, where,
            event_id, failures, error_text(exc),
        )
        with contextlib.suppress(Exception):
            await m.term()
        return True

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def who(self) -> str:
        """What log lines call this subscription."""
        return f"group {self.group}"

    def holds(self, emitted: Sequence[Event[Any]]) -> list[tuple[str, str]]:
        """(group, event id) of ``emitted`` that this worker's subscribers take at once
        (held for this worker by the settlement that stores them).

        Each is reserved for its hand-off here, before the settlement commits: a broker
        copy that comes between the commit and the hand-off's start (the relay may
        publish at once) waits for the hand-off, and is not run as a second attempt.
        The caller ends every reservation (:meth:`NatsBroker.start_holds`)."""
        if not self.broker.local_hand_off:
            return []
        out: list[tuple[str, str]] = []
        routes = self.broker.routes
        handling = self.broker._handling
        for e in emitted:
            for sub in routes(self.app, self.worker_id, e.type):
                # (_busy also counts the messages the pulls wait for: not a measure of
                # work here)
                if (not sub._stopping.is_set() and len(sub._inflight) < sub.concurrency
                        and handling.hand((self.app, sub.group, e.id)) is not None):
                    out.append((sub.group, e.id))
        return out

    def hand_off(self, event: Event[Any]) -> None:
        """Handle ``event``, whose delivery to this group a settlement of this worker
        has just held for it (reserved by :meth:`holds`), here at once (nats_local)."""
        key = (self.app, self.group, event.id)
        fut = self.broker._handling.reserved(key)
        self._busy += 1
        task = asyncio.create_task(self._handle_local(LocalMessage(
            self.broker, self.app, self.group, event, self), key, fut))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _handle_local(
        self, msg: LocalMessage, key: tuple[str, str, str], fut: asyncio.Future[None]
    ) -> None:
        try:
            await self.handler(msg)
        except Exception as exc:
            if isinstance(exc, StoreError):
                quiet.warning(f"settle:{self.group}", "group %s could not record event %s "
                              "(%s); NATS delivers it again", self.group, key[2],
                              error_text(exc))
            else:
                log.exception("handler of group %s crashed on event %s", self.group, key[2])
            if not msg.settled:
                with contextlib.suppress(Exception):  # else the broker's copy retries it
                    await msg.retry(error_text(exc), 1.0)
        finally:
            if not msg.recorded:
                await self._let_go(key[2])
            self.broker._handling.release(key, fut)
            self._busy -= 1
            self._capacity.set()

    async def _redeem(self, msg: NatsMessage) -> None:
        """Replace a claim check by the event it names, read from the store."""
        assert msg.event is not None
        event_id = msg.event.id
        stored = await self.broker.store.get_event(self.app, event_id)
        if stored is None:
            msg.event, msg.error = None, (
                f"claim check for event {event_id}: the event is not in the store "
                "(published by another store? both must share one)"
            )
        else:
            msg.event = stored

    async def _keep_alive(self) -> None:
        """Tell NATS the handlers still running are working, so a handler longer than
        ``ack_wait`` is not delivered again elsewhere while it runs (only a dead
        worker's messages are).

        Every eighth of ``ack_wait`` (the lease): NATS delivers a message again once
        ``ack_wait`` has passed since its last "in progress", so a pause of this whole
        process (SIGSTOP, a VM stall) of ``ack_wait`` less this period lets another
        worker begin it. At an eighth that is 7/8 of the lease, past the fence (3/4) at
        which the paused worker's own guard stops the body as it resumes
        (:func:`cantata.engine.pauses.handler_fence`): the two never run side by side.
        (At a third, a pause between 2/3 and 3/4 of the lease let them, docs/leases.md.)"""
        while True:
            await asyncio.sleep(max(0.1, self.broker.ack_wait * KEEP_ALIVE_SHARE))
            for m in list(self._held.values()):
                with contextlib.suppress(Exception):  # settled meanwhile, or reconnecting
                    await m.in_progress()

    async def _addressed(self, msg: NatsMessage, event: Event[Any], m: Msg) -> bool:
        """Whether the store addressed ``event`` to this group and it is this worker's to
        handle now: its delivery taken for this worker (:meth:`_take`, ``msg.took``);
        sets ``msg.attempt``. A delivery another live worker holds (another copy or a
        hand-off running there) is waited for, kept alive, and then acked once settled;
        one whose retry is not due yet is handed back to NATS until then
        (``msg.settled``).

        The stored event is the truth, and is what the handler gets (``msg.event``): a
        message reusing its id with other content is dead-lettered (as a stand-in
        carrying the message) and, while the delivery is pending, the stored event is
        handled all the same. An event from outside is stored first (:meth:`_keep`),
        unless it came on another type's subject: then it is handed over as a payload
        that is not a valid event (``msg.event`` ``None``), to be dead-lettered as a
        stand-in, and is not stored (the groups of its type would never get it)."""
        state = await self._delivery_state(event.id)
        msg.took = self._mine(state)
        if state is not None and state.event is not None:
            stored = state.event
        else:
            wrong = misrouted(self.names, m.subject, event)
            if wrong is not None and await self.broker.store.get_event(self.app, event.id) is None:
                msg.event, msg.error = None, wrong
                return True
            state, stored = await self._keep(event)
            msg.took = msg.took or self._mine(state)
        wait = 0.005
        while (state is not None and state.status == DELIVERY_PENDING
               and not self._mine(state)):
            # Another live worker holds it (a copy it runs, a hand-off there), or took it
            # as this one looked: waited for, then acked once settled.
            if self._stopping.is_set():  # hand it back: the holder may still need it
                msg.settled = True
                await msg._ack("nak")
                return False
            self._held[id(m)] = m  # told "in progress" while it waits
            await asyncio.sleep(wait)
            wait = min(wait * 2, 0.5, self.broker.ack_wait / 4)
            state = await self._delivery_state(event.id)
            msg.took = self._mine(state)
        if not same_event(stored, event):
            # Another system reused the id (or forged the event): the stored one stays.
            await msg.refuse(clash(stored, event))
            quiet.warning(
                f"clash:{self.app}:{self.group}", "group %s refused a message reusing event "
                "id %s with other content (stored: %s %.200r; message: %s %.200r): "
                "dead-lettered as a stand-in; %s", self.group, event.id, stored.type,
                stored.data, event.type, event.data,
                "the stored event is handled" if state is not None
                and state.status == DELIVERY_PENDING else "nothing else is done",
            )
            if state is None or state.status != DELIVERY_PENDING:
                return False  # (acked by the caller)
        # The handler gets the stored event, as from the embedded broker (a copy differs
        # at most in what is not content: the time an outside event without one got
        # here, a correlation id given on arrival).
        msg.event = event = stored
        if state is None:
            # Stored before the group was declared, or of a type the group does not take
            # (another type on this subject): the store did not address it here (as
            # with the embedded broker).
            return False
        if state.status != DELIVERY_PENDING:
            return False  # handled or dead-lettered: a duplicate (say, a second pattern)
        due_in = state.next_at - time.time()
        if (state.attempts > 0 and due_in > _EARLY and msg.attempt == 1
                and (m.headers or {}).get("Nats-Msg-Id") == event.id):
            # The relay's copy, first delivered, of an event whose hand-off (here or
            # elsewhere) failed and is to be retried later: NATS keeps it until then.
            # (Not a re-drive, published again on purpose, nor a copy NATS redelivers
            # after a nak of its own.)
            msg.settled = True
            await msg._ack("nak", due_in)
            return False
        # nats-server 2.9 sometimes redelivers a nak'ed message with a delivery count
        # of 1: the attempts the store recorded are the floor.
        msg.attempt = max(msg.attempt, state.attempts + 1)
        handed = handed_back_at(state.error)
        if handed is not None and msg.delivered > handed:
            # (JetStream counts the hand-backs as deliveries: only the copies since the
            # last one that did not settle, cut short by a crash, are attempts)
            msg.attempt = state.attempts + msg.delivered - handed
        return True

    async def _addressed_once_read(self, msg: NatsMessage, event: Event[Any], m: Msg) -> bool:
        """:meth:`_addressed`, waiting out a store outage (or a full or read-only
        store) while holding the message: told "in progress" meanwhile, NATS does not
        deliver it again. Each delivery counts as an attempt (a handler cut short by a
        worker crash is charged so), so leaving it to NATS would charge every ack wait of
        the outage, and an outage of five dead-lettered the event as cut short by
        crashes though no worker died. A stop hands it back (the store's error)."""
        self._held[id(m)] = m
        return await wait_out(
            lambda: self._addressed(msg, event, m), quiet=quiet,
            key=f"settle:{self.group}", what=f"group {self.group} reading a delivery",
            give_up=self._stopping.is_set, max_delay=max(0.05, self.broker.lease / 4),
        )

    async def _keep(self, event: Event[Any]) -> tuple[DeliveryHold | None, Event[Any]]:
        """This group's delivery of ``event`` and the stored event, for a copy whose
        delivery the batch lookup did not find with its event: most often an event from
        outside (another system put it on the app's subjects), stored here as external
        on its first arrival at any consumer of the app, so that its id is taken, every
        group it matches has a delivery, and waits and trace see it (the first copy
        stores it, the others find it stored). Read again after the store: another
        consumer may have stored it (and so addressed it here) meanwhile."""
        store = self.broker.store
        stored = await store.get_event(self.app, event.id)
        if stored is None:
            await store.append_external(self.app, [event])
        state = (await self._take([event.id])).get(event.id)
        if state is not None and state.event is not None:
            return state, state.event
        if stored is None:
            stored = await store.get_event(self.app, event.id)
        if stored is None:  # (never: stored above) the store lost it again
            raise StoreError(f"event {event.id} of app {self.app!r} was stored but cannot "
                             "be read back")
        return state, stored

    def _take(self, event_ids: list[str]) -> Awaitable[dict[str, DeliveryHold]]:
        """This group's deliveries of ``event_ids``, each pending one that no other live
        worker holds taken for this worker (one statement for the batch): so that two
        copies of one event never run in two live workers at once (docs/guarantees.md)."""
        return self.broker.store.take_deliveries(
            self.app, self.group, event_ids, self.worker_id,
            stale_before=self.broker.stale_before())

    def _mine(self, state: DeliveryHold | None) -> bool:
        """Whether ``state`` is a pending delivery this worker holds (:meth:`_take`)."""
        return (state is not None and state.status == DELIVERY_PENDING
                and state.holder == self.worker_id)

    def _delivery_state(self, event_id: str) -> asyncio.Future[DeliveryHold | None]:
        """This group's delivery of ``event_id`` in the store, looked up together with
        those of the other messages of the same fetch (one read for the batch)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[DeliveryHold | None] = loop.create_future()
        if not self._lookups:
            loop.call_soon(self._look_up)
        self._lookups.setdefault(event_id, []).append(fut)
        return fut

    def _look_up(self) -> None:
        lookups, self._lookups = self._lookups, {}
        task = asyncio.ensure_future(self._look_up_now(lookups))
        self._inflight.add(task)
        task.add_done_callback(self._inflight.discard)

    async def _look_up_now(
        self, lookups: dict[str, list[asyncio.Future[DeliveryHold | None]]]
    ) -> None:
        try:
            states = await self._take(list(lookups))
        except Exception as exc:
            for futs in lookups.values():
                for f in futs:
                    if not f.done():
                        f.set_exception(exc)
            return
        for event_id, futs in lookups.items():
            for f in futs:
                if not f.done():
                    f.set_result(states.get(event_id))

    async def stop(self) -> None:
        """Stop pulling (a fetch under way ends within ``fetch_timeout``), then wait for
        the handlers that are running. A pull loop waiting on a server that is gone (a
        fetch, a consumer's check) is cancelled at once: its wait could only end in a
        timeout, and a message fetched meanwhile is redelivered after its ack wait."""
        self._stopping.set()
        self._capacity.set()
        await finish_unless(self._loops, self.broker.fetch_timeout + STOP_PULL_EXTRA,
                            lambda: not self.broker.reachable)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        self._keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._keeper
        self.broker.forget(self)
