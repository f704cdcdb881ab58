"""NATS JetStream broker: one stream per app, durable pull consumers per group.

Layout on the server, for an app ``shop``:

- stream ``CANTATA_shop`` holding subjects ``cantata.shop.>``;
- each event is published (by the outbox relay) to ``cantata.shop.<event type>`` as
  CloudEvents structured JSON, with ``Nats-Msg-Id: <event id>`` so the server drops
  a republished event inside its duplicate window;
- one durable pull consumer per (group, pattern): NATS 2.9 has no consumers with
  several filter subjects. NATS ``*`` is one token, like Cantata's. An event that
  matches two patterns of one group is received twice; the store makes the second
  harmless (dropped once the first is settled, else its ``complete()`` is ``False``);
- one durable consumer per group on ``cantata.shop._replay.<group>``, fed by
  :meth:`NatsBroker.redeliver` (dead-letter replay to that group only).

Competing subscribers of a group share its durable consumers, which start at the
beginning of the stream. The store stays the source of truth: a stored event is
handed to a group only while the store has it pending for that group (a delivery
row), as with the embedded broker; an event from outside (not in the store) is
handed over as it is, and stored if it is dead-lettered. Settling writes the store
first, then acks, so a lost ack only causes a redelivery the store recognises.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from cantata.broker.base import Handler
from cantata.errors import BrokerError, InvalidEvent, error_text
from cantata.model.codec import new_id
from cantata.model.event import Event, check_pattern
from cantata.model.records import DELIVERY_DEAD, DELIVERY_PENDING, Declaration
from cantata.store.base import Settlement, Store
from cantata.store.factory import mask_url

log = logging.getLogger("cantata.broker")

REPLAY = "_replay"
INVALID_TYPE = "cantata.broker.invalid-payload"  # type of the stand-in for a garbage payload
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_MAX_INVALID_TEXT = 64 * 1024
_PUBLISH_WINDOW = 256  # publishes in flight at once (their acks awaited together)


def _digest(*parts: str, n: int = 10) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:n]


def token(name: str) -> str:
    """``name`` as one NATS subject token, also valid in stream and consumer names.

    Names that need changing get a hash suffix, so two names never share a token.
    """
    if _TOKEN_RE.match(name):
        return name
    return f"{re.sub(r'[^A-Za-z0-9_-]', '_', name)[:48]}_{_digest(name, n=8)}"


def stream_name(app: str) -> str:
    """The JetStream stream that holds ``app``'s events."""
    return f"CANTATA_{token(app)}"


def subject_prefix(app: str) -> str:
    """Every subject of ``app`` starts with this (``cantata.<app>``)."""
    return f"cantata.{token(app)}"


def event_subject(app: str, event_type: str) -> str:
    """Where an event of ``event_type`` is published."""
    return f"{subject_prefix(app)}.{event_type}"


def replay_subject(app: str, group: str) -> str:
    """Where :meth:`NatsBroker.redeliver` publishes for ``group``."""
    return f"{subject_prefix(app)}.{REPLAY}.{token(group)}"


def consumer_name(group: str, pattern: str | None) -> str:
    """The durable consumer of ``group`` for ``pattern`` (``None``: its replay consumer)."""
    if pattern is None:
        return f"{token(group)}-replay"
    return f"{token(group)}-{_digest(group, pattern)}"


class _GiveUp(Exception):
    """Raised from the error callback to end nats-py's endless first connect."""


class NatsMessage:
    """One JetStream delivery of one event to one group."""

    def __init__(
        self, msg: Msg, store: Store, app: str, group: str, attempt: int, where: str
    ) -> None:
        self.group = group
        self.raw: bytes = msg.data
        self.attempt = attempt
        self.settled = False
        self._msg = msg
        self._store = store
        self._app = app
        self._where = where  # "stream:sequence", names the stand-in of a garbage payload
        self.event: Event[Any] | None
        self.error: str | None
        try:
            self.event, self.error = Event.from_json(msg.data), None
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
        done = await self._store.settle_delivery(
            self._app, self.group, self.event.id,
            Settlement("done", self.attempt, list(emitted)),
        )
        await self._ack("ack")
        return done

    async def retry(self, error: str, delay: float) -> None:
        self.settled = True
        if self.event is not None:
            recorded = await self._store.settle_delivery(
                self._app, self.group, self.event.id,
                Settlement("retry", self.attempt, error=error, retry_at=time.time() + delay),
            )
            if not recorded:  # handled meanwhile by another delivery: nothing to retry
                await self._ack("ack")
                return
        await self._ack("nak", delay)

    async def dead(self, error: str) -> None:
        self.settled = True
        event = await self._stored(self.event or self._stand_in())
        rows = await self._store.deliveries(self._app, event.id)
        if any(r.group == self.group and r.status == DELIVERY_DEAD for r in rows):
            await self._ack("term")  # dead-lettered before, but the ack was lost
            return
        recorded = await self._store.settle_delivery(
            self._app, self.group, event.id,
            Settlement("dead", self.attempt, error=error, dead_letter_id=new_id()),
        )
        await self._ack("term" if recorded else "ack")

    async def extend(self) -> None:
        await self._ack("wip")

    def _stand_in(self) -> Event[Any]:
        """An event carrying a garbage payload, so its dead letter can be listed."""
        return Event(
            type=INVALID_TYPE,
            id=f"invalid-{_digest(self._where, n=24)}",
            source="cantata.broker.nats",
            data={
                "subject": self._msg.subject,
                "position": self._where,
                "error": self.error,
                "payload": self.raw[:_MAX_INVALID_TEXT].decode("utf-8", "replace"),
            },
        )

    async def _stored(self, event: Event[Any]) -> Event[Any]:
        """Store an event that came from outside, so its dead letter can be listed."""
        if await self._store.get_event(self._app, event.id) is None:
            await self._store.append_events(self._app, [event])
            # It came from the broker: the outbox relay must not send it back there.
            await self._store.mark_published(self._app, [event.id])
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


class _NatsSubscription:
    """The pull loops of one subscriber: one per consumer of the group."""

    def __init__(
        self,
        broker: NatsBroker,
        app: str,
        group: str,
        handler: Handler,
        concurrency: int,
        consumers: list[tuple[str, str, bool]],  # (durable, filter subject, is_replay)
    ) -> None:
        self.broker = broker
        self.app = app
        self.group = group
        self.handler = handler
        self.concurrency = max(1, concurrency)
        # Each loop fetches at most its share, so no loop can starve the others.
        self._share = max(1, self.concurrency // len(consumers))
        self._busy = 0  # handlers running plus messages being fetched
        self._capacity = asyncio.Event()
        self._stopping = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        # event id -> callers waiting for the group's delivery state (see _delivery_state)
        self._lookups: dict[str, list[asyncio.Future[tuple[str, int] | None]]] = {}
        self._loops = [
            asyncio.create_task(self._pull(*c), name=f"cantata-nats:{group}:{c[0]}")
            for c in consumers
        ]

    async def _pull(self, durable: str, subject: str, replay: bool) -> None:
        psub: JetStreamContext.PullSubscription | None = None
        failures = 0
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
                    if psub is None:
                        psub = await self.broker._bind(self.app, durable, subject)
                    msgs = await psub.fetch(want, timeout=self.broker.fetch_timeout)
                    failures = 0
                except TimeoutError:  # no message in time (or a reconnect under way)
                    pass
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
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stopping.wait(), min(2.0, 0.1 * failures))
                finally:
                    self._busy -= want - len(msgs)
                for m in msgs:
                    if self._stopping.is_set():  # hand it straight back to the others
                        self._busy -= 1
                        with contextlib.suppress(Exception):
                            await m.nak()
                        continue
                    task = asyncio.create_task(self._handle(m, replay))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
                if not msgs:
                    await asyncio.sleep(0)  # let a loop waiting for capacity go first
        finally:
            await self._unbind(psub)

    @staticmethod
    async def _unbind(psub: JetStreamContext.PullSubscription | None) -> None:
        if psub is not None:
            with contextlib.suppress(Exception):
                await psub.unsubscribe()

    async def _handle(self, m: Msg, replay: bool) -> None:
        key: tuple[str, str, str] | None = None  # set while this call holds the event
        try:
            if not replay and m.subject.startswith(f"{subject_prefix(self.app)}.{REPLAY}."):
                # A wildcard such as ``*.billing`` also matches another group's replays.
                await m.ack()
                return
            meta = m.metadata
            msg = NatsMessage(
                m, self.broker.store, self.app, self.group, meta.num_delivered,
                f"{meta.stream}:{meta.sequence.stream}",
            )
            if msg.event is not None:
                if (self.app, self.group, msg.event.id) in self.broker._handling:
                    # A second copy (e.g. an outside event re-sent by the outbox relay) of
                    # one this process is handling right now: the first settles it.
                    await m.ack()
                    return
                # Claimed before the store is read, so a copy arriving meanwhile is skipped
                # above, and one arriving after sees the first one's settlement.
                key = (self.app, self.group, msg.event.id)
                self.broker._handling.add(key)
                if not await self._addressed(msg, msg.event):
                    await m.ack()
                    return
            try:
                await self.handler(msg)
            except Exception as exc:
                log.exception("handler of group %s crashed on a message", self.group)
                if not msg.settled:
                    await msg.retry(error_text(exc), 1.0)
        except Exception:
            log.exception("settling a message of group %s failed", self.group)
        finally:
            if key is not None:
                self.broker._handling.discard(key)
            self._busy -= 1
            self._capacity.set()

    async def _addressed(self, msg: NatsMessage, event: Event[Any]) -> bool:
        """Whether the store addressed ``event`` to this group; sets ``msg.attempt``."""
        state = await self._delivery_state(event.id)
        if state is None:
            # Stored before the group was declared: the store did not address it here
            # (as with the embedded broker). Not stored at all: it comes from outside.
            return await self.broker.store.get_event(self.app, event.id) is None
        status, attempts = state
        if status != DELIVERY_PENDING:
            return False  # handled or dead-lettered: a duplicate (say, a second pattern)
        # nats-server 2.9 sometimes redelivers a nak'ed message with a delivery count
        # of 1: the attempts the store recorded are the floor.
        msg.attempt = max(msg.attempt, attempts + 1)
        return True

    def _delivery_state(self, event_id: str) -> asyncio.Future[tuple[str, int] | None]:
        """This group's delivery of ``event_id`` in the store, looked up together with
        those of the other messages of the same fetch (one read for the batch)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[tuple[str, int] | None] = loop.create_future()
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
        self, lookups: dict[str, list[asyncio.Future[tuple[str, int] | None]]]
    ) -> None:
        try:
            states = await self.broker.store.delivery_states(self.app, self.group, list(lookups))
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
        the handlers that are running."""
        self._stopping.set()
        self._capacity.set()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        with contextlib.suppress(ValueError):
            self.broker._subs.remove(self)


class NatsBroker:
    """A :class:`~cantata.broker.base.Broker` on NATS JetStream (nats-server 2.9+).

    Args:
        url: ``nats://[user:password@]host:port``.
        ack_wait: seconds a delivered message may stay unsettled before NATS redelivers
            it (a handler keeps it longer with ``extend()``).
        fetch_timeout: seconds each pull waits for messages; also bounds how long
            ``stop()`` takes.
        connect_attempts: attempts of the first connection before ``open()`` gives up;
            once connected, the client reconnects forever.
        reconnect_time_wait: seconds between connection attempts.
        max_age: seconds events are kept in the stream (``None``: no limit).
        duplicate_window: seconds within which a republished event id is dropped.
    """

    relays_outbox = True

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        ack_wait: float = 30.0,
        fetch_timeout: float = 1.0,
        connect_attempts: int = 3,
        reconnect_time_wait: float = 1.0,
        max_age: float | None = None,
        duplicate_window: float = 120.0,
        replicas: int = 1,
    ) -> None:
        self.url = url
        self.replicas = max(1, replicas)
        self._handling: set[tuple[str, str, str]] = set()  # (app, group, event id) in hand
        self.masked_url = mask_url(url)
        self.ack_wait = ack_wait
        self.fetch_timeout = fetch_timeout
        self.connect_attempts = max(1, connect_attempts)
        self.reconnect_time_wait = reconnect_time_wait
        self.max_age = max_age
        self.duplicate_window = duplicate_window
        self._store: Store | None = None
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._streams: set[str] = set()
        self._subs: list[_NatsSubscription] = []

    # -- lifecycle --------------------------------------------------------------------

    @property
    def store(self) -> Store:
        if self._store is None:
            raise BrokerError("the NATS broker is not open: open the app first")
        return self._store

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            raise BrokerError(f"the NATS broker for {self.masked_url} is not open")
        return self._js

    async def open(self, store: Store) -> None:
        """Connect and check that JetStream is enabled.

        Raises:
            BrokerError: the server cannot be reached after ``connect_attempts``
                attempts, or it runs without JetStream.
        """
        self._store = store
        if self._nc is not None:
            return
        nc = Client()
        opening = True
        failures = 0

        async def on_error(exc: Exception) -> None:
            nonlocal failures
            if opening:
                failures += 1
                if failures >= self.connect_attempts:
                    raise _GiveUp(error_text(exc))
            else:
                log.warning("NATS at %s: %s", self.masked_url, error_text(exc))

        async def on_disconnect() -> None:
            if not opening and self._nc is not None:  # not when close() disconnects
                log.warning("disconnected from NATS at %s; reconnecting", self.masked_url)

        async def on_reconnect() -> None:
            log.info("reconnected to NATS at %s", self.masked_url)

        try:
            await nc.connect(
                self.url, name="cantata", error_cb=on_error, disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect, max_reconnect_attempts=-1,
                reconnect_time_wait=self.reconnect_time_wait,  # type: ignore[arg-type]
                connect_timeout=2,
            )
        except Exception as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            reason = str(exc) if isinstance(exc, _GiveUp) else error_text(exc)
            raise BrokerError(
                f"cannot reach NATS at {self.masked_url} after {failures or 1} attempt(s) "
                f"({reason}): start nats-server with JetStream (nats-server -js) or fix the "
                "broker URL (CANTATA_BROKER)"
            ) from None
        opening = False
        js = nc.jetstream(timeout=5)
        try:
            await js.account_info()
        except Exception as exc:
            await nc.close()
            if isinstance(
                exc, (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError)
            ):
                raise BrokerError(
                    f"NATS at {self.masked_url} does not have JetStream enabled: start "
                    "nats-server with -js (or a `jetstream {}` block in its config)"
                ) from None
            raise BrokerError(
                f"NATS at {self.masked_url} did not answer a JetStream request "
                f"({error_text(exc)}); check the server and this account's JetStream access"
            ) from None
        self._nc, self._js = nc, js

    async def close(self) -> None:
        """Stop every subscription, then disconnect."""
        subs = list(self._subs)
        if subs:
            await asyncio.gather(*(s.stop() for s in subs), return_exceptions=True)
        self._subs.clear()
        nc, self._nc, self._js = self._nc, None, None  # before close(): no warning
        self._streams.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    def wake(self) -> None:
        """Nothing to do: the server pushes new messages to waiting pulls."""

    @contextlib.contextmanager
    def _translate(self, what: str) -> Iterator[None]:
        try:
            yield
        except BrokerError:
            raise
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise BrokerError(
                f"{what} on NATS at {self.masked_url} failed: {error_text(exc)}"
            ) from exc

    # -- streams and consumers ----------------------------------------------------------

    async def _stream(self, app: str) -> str:
        name = stream_name(app)
        if name in self._streams:
            return name
        try:
            await self.js.stream_info(name)
        except nats.js.errors.NotFoundError:
            config = StreamConfig(
                name=name, subjects=[f"{subject_prefix(app)}.>"],
                retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
                duplicate_window=self.duplicate_window, max_age=self.max_age,
                num_replicas=self.replicas,
            )
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError:  # created meanwhile by another process
                await self.js.stream_info(name)
        self._streams.add(name)
        return name

    def _forget_stream(self, app: str) -> None:
        self._streams.discard(stream_name(app))

    async def _bind(
        self, app: str, durable: str, subject: str
    ) -> JetStreamContext.PullSubscription:
        """Open a pull subscription on a durable consumer, creating what is missing."""
        stream = await self._consumer(app, durable, subject)
        return await self.js.pull_subscribe_bind(durable, stream=stream)

    async def _consumer(self, app: str, durable: str, subject: str) -> str:
        """Create the durable consumer (and the stream) if missing; returns the stream."""
        stream = await self._stream(app)
        try:
            await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            await self.js.add_consumer(
                stream,
                ConsumerConfig(
                    name=durable, durable_name=durable, filter_subject=subject,
                    ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait, max_deliver=-1,
                    # From the stream's start, so nothing published before the first
                    # subscriber is lost; _addressed() drops what the store did not
                    # address to the group.
                    deliver_policy=DeliverPolicy.ALL,
                ),
            )
        return stream

    # -- the Broker protocol --------------------------------------------------------------

    async def publish(self, app: str, events: Sequence[Event[Any]]) -> None:
        """Publish stored events; the server drops an event id seen in its duplicate
        window, and the store makes a later duplicate harmless."""
        if not events:
            return
        with self._translate(f"publishing {len(events)} event(s) of app {app!r}"):
            stream = await self._stream(app)
            # Pipelined: the messages leave in order on the one connection (so the stream
            # keeps that order) and their acks are awaited together, not one round trip
            # per event. If one fails, the caller publishes them all again; the server
            # drops the ids it has already stored.
            js = self.js
            for i in range(0, len(events), _PUBLISH_WINDOW):
                await asyncio.gather(*(
                    js.publish(event_subject(app, event.type), event.to_json(),
                               stream=stream, headers={"Nats-Msg-Id": event.id})
                    for event in events[i : i + _PUBLISH_WINDOW]
                ))

    async def subscribe(
        self,
        app: str,
        group: str,
        patterns: Sequence[str],
        handler: Handler,
        *,
        worker_id: str,
        concurrency: int = 64,
    ) -> _NatsSubscription:
        unique = list(dict.fromkeys(check_pattern(p) for p in patterns))
        await self.store.declare(app, [Declaration("handler", group, p) for p in unique])
        consumers = [
            (consumer_name(group, p), event_subject(app, p), False) for p in unique
        ] + [(consumer_name(group, None), replay_subject(app, group), True)]
        with self._translate(f"subscribing group {group!r} of app {app!r}"):
            # Create everything now, so events published after subscribe() returns reach it.
            for durable, subject, _ in consumers:
                await self._consumer(app, durable, subject)
        sub = _NatsSubscription(self, app, group, handler, concurrency, consumers)
        self._subs.append(sub)
        return sub

    async def redeliver(self, app: str, group: str, event: Event[Any]) -> None:
        """Publish ``event`` to ``group``'s replay subject (a new message id, so the
        server does not drop it as a duplicate)."""
        with self._translate(f"redelivering event {event.id} to group {group!r}"):
            stream = await self._stream(app)
            await self.js.publish(
                replay_subject(app, group), event.to_json(), stream=stream,
                headers={"Nats-Msg-Id": f"replay-{new_id()}"},
            )
