"""NATS JetStream broker: one stream per app (per store), durable pull consumers per group.

Names on the server are in :mod:`cantata.broker.nats_names` (``?prefix=`` gives an
environment its own), the limits a server enforces in :mod:`cantata.broker.nats_limits`,
stream ownership and lost-data recovery in :mod:`cantata.broker.nats_streams`, and the
consuming side in :mod:`cantata.broker.nats_consumer`.

- each event is published (by the outbox relay) to ``cantata.<app>.<event type>`` as
  CloudEvents structured JSON (``Content-Type: application/cloudevents+json``, the
  NATS protocol binding; binary mode is accepted on input), with
  ``Nats-Msg-Id: <event id>`` so the server drops a republished event inside its
  duplicate window;
- one durable pull consumer per (group, pattern): NATS 2.9 has no consumers with
  several filter subjects. NATS ``*`` is one token, like Cantata's. An event that
  matches two patterns of one group is received twice; the store makes the second
  harmless (dropped once the first is settled, else its ``complete()`` is ``False``);
- one durable consumer per group on ``cantata.<app>._replay.<group>``, fed by
  :meth:`NatsBroker.redeliver` (dead-letter replay to that group only);
- one durable consumer per type that workflows wait for, which stores the events
  other systems put there (:mod:`cantata.broker.nats_outside`): the relay's own
  copies carry a ``Cantata-Outbox`` header with this store's mark
  (``<store id>/<stream>``, :func:`~cantata.broker.nats_names.outbox_mark`) and are
  acked unread; a message with another value is read as one from outside.

Competing subscribers of a group share its durable consumers, which start at the
beginning of the stream; those keeping events from outside for waits start at the
creation of the app's oldest run not final, less ``clock_skew``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import errno
import logging
import socket
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cantata.broker.base import BrokerStore, Clock, Handler
from cantata.broker.nats_consumer import INVALID_TYPE, NatsMessage, NatsSubscription, StartAt
from cantata.broker.nats_limits import DEFAULT_MAX_CONTROL_LINE, Limits, refusal
from cantata.broker.nats_local import Handing, held_by
from cantata.broker.nats_names import (
    OUTBOX_HEADER,
    REPLAY,
    Names,
    check_prefix,
    consumer_name,
    event_subject,
    outbox_mark,
    replay_subject,
    stream_name,
    subject_prefix,
    token,
)
from cantata.broker.nats_outside import KEEPER, OnStored, OutsideKeeper, Since
from cantata.broker.nats_publish import Publisher, Window, safe, usable
from cantata.broker.nats_streams import Streams
from cantata.errors import BrokerError, BrokerNotConnected, EventsRefused, LeaseLost, error_text
from cantata.model.codec import new_id
from cantata.model.event import (
    STRUCTURED_CONTENT_TYPE,
    Event,
    check_pattern,
    claim_stub,
    matches,
)
from cantata.quietlog import QuietLog, outage_interval
from cantata.store.factory import mask_url

__all__ = [
    "INVALID_TYPE", "REPLAY", "NatsBroker", "NatsMessage", "consumer_name", "event_subject",
    "replay_subject", "stream_name", "subject_prefix", "token",
]

log = logging.getLogger("cantata.broker")

_PUBLISH_WINDOW = 256  # publishes in flight at once (their acks awaited together)
_PUBLISH_TIMEOUT = 5.0  # seconds for the server's acks of one window of publishes
# message bodies made by check_event, kept for publish: as many as a busy relay may be
# behind (thousands of events held back or in its queue), within a memory bound
_WIRED_KEPT = 16384
_WIRED_BYTES = 32 * 1024 * 1024
_NOT_HELD: Any = object()
# the max_payload assumed before the server was reached (it tells its own on connecting)
_UNKNOWN_PAYLOAD = 2**62
_CONSUMER_NOT_FOUND = 10014  # JetStream's err_code (10059: the stream is not found)
# A connection silently gone (half-open: a dropped NAT mapping, a vanished host, a
# blackholing network) is found by pings it does not answer: one every half lease (at
# least every PING_LEAST seconds), and the client connects again when PINGS_UNANSWERED
# are outstanding as the next is due, so within about 1.5 leases, as the PostgreSQL
# listener's probe finds it (docs/leases.md); the client's default is 2 pings 120 s apart.
PING_LEAST = 1.0
PINGS_UNANSWERED = 2


class _GiveUp(Exception):
    """Raised from the error callback to end nats-py's endless first connect."""


class _Unreachable(BrokerError):
    """No attempt to connect reached the server: an outage, waited out."""


# errno values of a server that is down or cut off (not of a wrong address or name)
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN,
}


def unreachable(exc: BaseException) -> bool:
    """Whether a connection attempt failed because the server is down or cut off
    (waited out), rather than refusing this client (credentials, TLS, a bad URL or
    host name: fixed by the operator)."""
    if isinstance(exc, (ssl.SSLError, socket.gaierror)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, nats.errors.TimeoutError)):
        return True
    return isinstance(exc, OSError) and exc.errno in _UNREACHABLE_ERRNOS


class NatsBroker:
    """A :class:`~cantata.broker.base.Broker` on NATS JetStream (nats-server 2.9+).

    Args:
        url: ``nats://[user:password@]host:port``.
        ack_wait: seconds a delivered message may stay unsettled before NATS redelivers
            it: a message whose worker died is handled elsewhere after this long. A
            live worker tells NATS it is still working every eighth of it, however
            long its handler runs. Default: the app's lease (see :meth:`adopt_timing`).
        fetch_timeout: seconds each pull waits for messages; also bounds how long
            ``stop()`` takes.
        connect_attempts: attempts of the first connection in ``open()``; a server
            still unreachable then is connected in the background (``open()`` returns),
            and once connected, the client reconnects forever. A server that refuses
            the client (credentials, TLS, a bad URL or host name) fails ``open()``.
        reconnect_time_wait: seconds between connection attempts.
        max_age: seconds events are kept in the stream (``None``: no limit).
        duplicate_window: seconds within which a republished event id is dropped.
        replicas: copies of each stream in a NATS cluster.
        prefix: a name space of its own on the server for this environment
            (``?prefix=staging`` in the URL): it changes stream, subject and consumer
            names, so two stores can use one app name on one server.
        max_control_line: the server's ``max_control_line`` if configured other than
            its default (4096 bytes); subjects are checked against it.
        check_interval: seconds between checks that an app's stream is still the one
            its consumers were made on (a server that lost its data gets it re-made,
            and the events the store has pending published again).
        hand_off: hand the events a handler of this process emits to this process's
            subscribers at once, held for this worker in the store by the handler's
            settlement (see :mod:`cantata.broker.nats_local`); on by default,
            ``?handoff=0`` turns it off (every event then goes through NATS).
        clock_skew: seconds by which the clocks of the app's processes and of the NATS
            server may differ: a consumer keeping events from outside for waits, made
            for the first time, starts this long before the oldest run not final
            (:mod:`cantata.broker.nats_outside`).
    """

    relays_outbox = True

    def __init__(
        self,
        url: str = "nats://127.0.0.1:4222",
        *,
        ack_wait: float | None = None,
        fetch_timeout: float = 1.0,
        connect_attempts: int = 3,
        reconnect_time_wait: float = 1.0,
        max_age: float | None = None,
        duplicate_window: float = 120.0,
        replicas: int = 1,
        prefix: str = "",
        max_control_line: int = DEFAULT_MAX_CONTROL_LINE,
        check_interval: float = 5.0,
        hand_off: bool = True,
        clock_skew: float = 60.0,
    ) -> None:
        self.url = url
        self.local_hand_off = hand_off
        self.replicas = max(1, replicas)
        self.prefix = check_prefix(prefix)
        self.max_control_line = max_control_line
        self._handling = Handing()  # (app, group, event id) in hand, see nats_local
        # (app, group, event id) -> when the retry of a failed hand-off is due
        self._deferred: dict[tuple[str, str, str], float] = {}
        self._offload: dict[str, int | None] = {}  # app -> claim check above this size
        # the app's lease: a holder of a delivery silent for longer is presumed dead
        self.lease = 10.0
        self.may_take_over: Callable[[], bool] | None = None
        self._recovering: set[asyncio.Task[None]] = set()
        self.masked_url = mask_url(url)
        self._ack_wait_given = ack_wait is not None
        self.ack_wait = 10.0 if ack_wait is None else ack_wait
        self.fetch_timeout = fetch_timeout
        self.connect_attempts = max(1, connect_attempts)
        self.reconnect_time_wait = reconnect_time_wait
        self.max_age = max_age
        self.duplicate_window = duplicate_window
        self._store: BrokerStore | None = None
        self._nc: Client | None = None
        self._connecting: asyncio.Task[None] | None = None  # connects in the background
        self._up = asyncio.Event()  # set once connected
        self.fast_publish = True  # the relay's publishes pipelined (nats_publish)
        self._pub: Publisher | None = None
        self._pub_nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._streams = Streams(
            url, self.prefix, duplicate_window=duplicate_window, max_age=max_age,
            replicas=self.replicas,
        )
        self._subs: list[NatsSubscription] = []
        self._keepers: dict[str, OutsideKeeper] = {}  # app -> its waited-for types' keeper
        self._names: dict[str, Names] = {}
        self._marks: dict[str, str] = {}  # stream -> this store's outbox mark on it
        self._limits: Limits | None = None
        # (app, worker id, event type) -> this process's subscriptions it goes to
        self._routes: dict[tuple[str, str, str], list[NatsSubscription]] = {}
        # event id -> (the event, its message body), made by check_event for publish
        self._wired: OrderedDict[str, tuple[Event[Any], bytes]] = OrderedDict()
        self._wired_bytes = 0  # the size of the bodies kept in _wired
        # ids of events every delivery of which this worker held (see held_here)
        self._local: OrderedDict[str, None] = OrderedDict()
        self.check_interval = check_interval
        self.clock_skew = max(0.0, clock_skew)
        self._watches: dict[str, asyncio.Task[None]] = {}
        # an outage fails every reconnection attempt: one line per max(10 s, lease)
        self.quiet = QuietLog(log, every=outage_interval(self.lease))

    def names(self, app: str) -> Names:
        """Where ``app``'s stream, subjects and consumers are on the server (one
        :class:`Names` per app: it remembers its subjects)."""
        names = self._names.get(app)
        if names is None or names.prefix != self.prefix:
            names = self._names[app] = Names(app, self.prefix)
        return names

    def outbox_mark(self, app: str) -> str | None:
        """The ``Cantata-Outbox`` value this store's relay writes on ``app``'s stream
        (:func:`~cantata.broker.nats_names.outbox_mark`: the store's id and the
        stream's name); ``None`` until a stream was first looked at (the store's id is
        read then)."""
        stream = self.names(app).stream
        mark = self._marks.get(stream)
        if mark is None:
            identity = self._streams.identity
            if identity is None:
                return None
            mark = self._marks[stream] = outbox_mark(identity, stream)
        return mark

    @property
    def limits(self) -> Limits:
        """The limits of the connected server (its INFO's max_payload); before the
        first connection, its control line only (an event over its max_payload is then
        refused when the relay publishes it, and dead-lettered with the reason)."""
        if self._nc is None:
            if self._connecting is None:
                raise BrokerError(f"the NATS broker for {self.masked_url} is not open")
            if self._limits is None or self._limits.max_control_line != self.max_control_line:
                self._limits = Limits(_UNKNOWN_PAYLOAD, self.max_control_line)
            return self._limits
        limits = self._limits  # (asked for per event: made again only when they change)
        if (limits is None or limits.max_payload != self._nc.max_payload
                or limits.max_control_line != self.max_control_line):
            limits = self._limits = Limits(self._nc.max_payload, self.max_control_line)
        return limits

    # -- lifecycle --------------------------------------------------------------------

    @property
    def store(self) -> BrokerStore:
        if self._store is None:
            raise BrokerError("the NATS broker is not open: open the app first")
        return self._store

    @property
    def js(self) -> JetStreamContext:
        if self._js is None:
            if self._connecting is not None:
                raise BrokerNotConnected(
                    f"NATS at {self.masked_url} has not been reached yet (connecting in the "
                    "background; events wait in the outbox): start it or fix the URL"
                )
            raise BrokerError(f"the NATS broker for {self.masked_url} is not open")
        return self._js

    async def open(self, store: BrokerStore) -> None:
        """Connect and check that JetStream is enabled.

        A server that cannot be reached (connection refused, timed out) is waited out
        as an outage is once connected: ``open()`` returns, says so once, and keeps
        connecting in the background; events wait in the store's outbox and the
        consumers are set up when the connection comes (docs/deploy.md).

        Raises:
            BrokerError: the server refuses this client for good (credentials, TLS, a
                malformed URL) or runs without JetStream.
        """
        self._store = store
        if self._nc is not None or self._connecting is not None:
            return
        self._up = asyncio.Event()
        try:
            self._nc, self._js = await self._connect(self.connect_attempts)
        except _Unreachable as exc:
            self.quiet.warning("connection", "%s; working on without it: events wait in "
                               "the outbox, and it is connected in the background", exc)
            self._connecting = asyncio.create_task(
                self._connect_later(), name=f"cantata-nats-connect:{self.masked_url}"
            )
        else:
            self._up.set()

    @property
    def connected(self) -> bool:
        """Whether the client has connected (it may be reconnecting after an outage)."""
        return self._js is not None

    @property
    def reachable(self) -> bool:
        """Whether the client is connected right now (not before its first connection,
        not while it reconnects after an outage): what is sent meanwhile waits for the
        server, or for a timeout if it does not come back."""
        nc = self._nc
        return nc is not None and nc.is_connected

    async def wait_connected(self) -> None:
        """Until the client has connected (at once if it has)."""
        await self._up.wait()

    async def _connect_later(self) -> None:
        """Connect in the background (the server was unreachable at open), then make the
        streams of the apps attached meanwhile; subscriptions bind themselves."""
        delay = self.reconnect_time_wait
        while True:
            await asyncio.sleep(delay)
            try:
                nc, js = await self._connect(1)
            except BrokerError as exc:
                key = "connection" if isinstance(exc, _Unreachable) else "refused"
                self.quiet.warning(key, "%s; retrying", exc)
                delay = min(max(delay, 0.1) * 2, max(self.reconnect_time_wait, 5.0))
                continue
            break
        self._nc, self._js, self._connecting = nc, js, None
        self._up.set()
        if not self.quiet.recovered("connection", "connected to NATS at %s",
                                    self.masked_url):
            log.info("connected to NATS at %s", self.masked_url)
        self.quiet.recovered("refused", "connected to NATS at %s", self.masked_url)
        for app in list(self._offload):
            try:
                with self._translate(f"preparing the stream of app {app!r}"):
                    await self._stream(app)
            except Exception as exc:  # (the relay's publishes fail with it too)
                log.warning("%s", error_text(exc))

    async def _connect(self, attempts: int) -> tuple[Client, JetStreamContext]:
        """A connected client whose account has JetStream, after up to ``attempts``
        attempts.

        Raises:
            _Unreachable: no attempt reached the server (refused, timed out).
            BrokerError: the server refused the client, or has no JetStream.
        """
        nc = Client()
        opening = True
        failures = 0
        last: BaseException | None = None
        closing = False

        async def on_error(exc: Exception) -> None:
            nonlocal failures, last
            if closing:
                return
            if opening:
                failures += 1
                last = exc
                if failures >= attempts or not unreachable(exc):
                    raise _GiveUp(error_text(exc))
            else:
                # (a connection attempt that timed out says nothing: "TimeoutError: ")
                self.quiet.warning("connection", "NATS at %s: %s; reconnecting",
                                   self.masked_url, error_text(exc) if str(exc).strip()
                                   else f"{type(exc).__name__} (no answer in time)")

        async def on_disconnect() -> None:
            if not opening and self._nc is not None:  # not when close() disconnects
                log.warning("disconnected from NATS at %s; reconnecting", self.masked_url)

        async def on_reconnect() -> None:
            if not self.quiet.recovered("connection", "reconnected to NATS at %s",
                                        self.masked_url):
                log.info("reconnected to NATS at %s", self.masked_url)

        try:
            await nc.connect(
                self.url, name="cantata", error_cb=on_error, disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect, max_reconnect_attempts=-1,
                reconnect_time_wait=self.reconnect_time_wait,  # type: ignore[arg-type]
                connect_timeout=2,
                ping_interval=self.ping_interval,  # type: ignore[arg-type]
                max_outstanding_pings=PINGS_UNANSWERED,
            )
        except BaseException as exc:
            cause = last if isinstance(exc, _GiveUp) and last is not None else exc
            closing = True  # (what closing reports is not a connection attempt)
            with contextlib.suppress(Exception):
                await nc.close()
            if not isinstance(exc, Exception):  # cancelled (closed meanwhile)
                raise
            reason = str(exc) if isinstance(exc, _GiveUp) else error_text(exc)
            if unreachable(cause):
                raise _Unreachable(
                    f"cannot reach NATS at {self.masked_url} after {failures or 1} "
                    f"attempt(s) ({reason}): start nats-server with JetStream "
                    "(nats-server -js) or fix the broker URL (CANTATA_BROKER)"
                ) from None
            raise BrokerError(
                f"cannot connect to NATS at {self.masked_url} ({reason}), and waiting "
                "will not help: fix the broker URL, its credentials or TLS settings "
                "(CANTATA_BROKER)"
            ) from None
        opening = False
        js = nc.jetstream(timeout=5)
        try:
            await js.account_info()
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await nc.close()
            if not isinstance(exc, Exception):  # cancelled (closed meanwhile)
                raise
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
        return nc, js

    async def close(self) -> None:
        """Stop every subscription, then disconnect."""
        watches, self._watches = list(self._watches.values()), {}
        watches += list(self._recovering)
        if self._connecting is not None:
            watches.append(self._connecting)
            self._connecting = None
        for task in watches:
            task.cancel()
        await asyncio.gather(*watches, return_exceptions=True)
        subs = list(self._subs) + list(self._keepers.values())
        if subs:
            await asyncio.gather(*(s.stop() for s in subs), return_exceptions=True)
        self._subs.clear()
        self._keepers.clear()
        self._routes.clear()
        nc, self._nc, self._js = self._nc, None, None  # before close(): no warning
        self._streams.clear()
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    def wake(self) -> None:
        """Nothing to do: the server pushes new messages to waiting pulls."""

    def hand_off(self, app: str, events: Sequence[Event[Any]]) -> None:
        """Nothing more to do: a handler's emitted events were held for this worker and
        handed off as they were settled (nats_local.settle_done); any other event goes
        through NATS (handing it off without a hold would let another worker run it
        at the same time)."""

    async def append(
        self, app: str, events: Sequence[Event[Any]], *, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> list[int]:
        """Store events this process publishes; the deliveries this worker's
        subscribers take are held for it in the same transaction and handed to them at
        once, as a handler's settlement does (nats_local.settle_done)."""
        sub = next((s for s in self._subs if s.app == app and not s.stopping), None)
        hold = sub.holds(events) if sub is not None and events else []
        if sub is None or not hold:
            return await self.store.append_events(app, events, actor=actor, stored=stored)
        try:
            counts, held = await self.store.append_held(
                app, events, hold_for=sub.worker_id, hold=hold, actor=actor,
                stored=stored,
            )
        except BaseException as exc:
            if not isinstance(exc, LeaseLost):  # it may have committed all the same
                self.recover_holds(sub, events, hold)
            else:
                self.start_holds(sub, events, hold, [])
            raise
        self.start_holds(sub, events, hold, held)
        self.note_local(events, counts, held)
        return counts

    def note_local(self, events: Sequence[Event[Any]], addressed: Sequence[int],
                   held: Sequence[tuple[str, str]]) -> None:
        """Remember the events whose every delivery (``addressed[i]`` groups) this worker
        holds: nobody else waits for their copies (see :meth:`held_here`)."""
        per_event: dict[str, int] = {}
        for _, event_id in held:
            per_event[event_id] = per_event.get(event_id, 0) + 1
        local = self._local
        for event, n in zip(events, addressed, strict=False):
            if n == per_event.get(event.id, 0):
                local[event.id] = None
        while len(local) > _WIRED_KEPT:
            local.popitem(last=False)

    def held_here(self, event_id: str) -> bool:
        """Whether every delivery of ``event_id`` was held by this worker as it was
        stored (forgotten once asked): the outbox relay may publish it a moment later,
        in a batch, off the hops that handle it here (choreography/relay.py)."""
        return self._local.pop(event_id, _NOT_HELD) is None

    def routes(self, app: str, worker_id: str, event_type: str) -> list[NatsSubscription]:
        """This process's subscriptions of ``worker_id`` that ``event_type`` goes to."""
        key = (app, worker_id, event_type)
        subs = self._routes.get(key)
        if subs is None:
            subs = self._routes[key] = [
                s for s in self._subs if s.app == app and s.worker_id == worker_id
                and any(matches(p, event_type) for p in s.patterns)
            ]
        return subs

    def forget(self, sub: NatsSubscription) -> None:
        """``sub`` stopped."""
        with contextlib.suppress(ValueError):
            self._subs.remove(sub)
        self._routes.clear()

    def start_holds(self, by: NatsSubscription, events: Sequence[Event[Any]],
                    hold: Sequence[tuple[str, str]], held: Sequence[tuple[str, str]]) -> None:
        """End the reservations of ``hold`` (:meth:`NatsSubscription.holds`): start the
        hand-offs of what ``by``'s settlement did hold, free the rest."""
        if held:
            self.handed(by, events, held)
        if len(held) < len(hold):
            done = set(held)
            for group, event_id in hold:
                if (group, event_id) not in done:
                    self._handling.unreserve((by.app, group, event_id))

    def handed(self, by: NatsSubscription, events: Sequence[Event[Any]],
               held: Sequence[tuple[str, str]]) -> None:
        """Start the deliveries ``by``'s settlement held for its worker."""
        by_id = {e.id: e for e in events}
        for group, event_id in held:
            sub = next((s for s in self._subs if s.app == by.app and s.group == group
                        and s.worker_id == by.worker_id), None)
            if sub is not None:  # (always: holds() chose it)
                sub.hand_off(by_id[event_id])
            else:
                self._handling.unreserve((by.app, group, event_id))

    def recover_holds(self, by: NatsSubscription, events: Sequence[Event[Any]],
                      hold: Sequence[tuple[str, str]]) -> None:
        """A settlement that held deliveries for ``by``'s worker failed, or seemed to:
        look in the store (until it answers) and start those it did hold."""
        async def recover() -> None:
            found: list[tuple[str, str]] | None = None
            try:
                found = await held_by(self.store, by.app, hold, 0.2, lambda: by.stopping)
            finally:
                self.start_holds(by, events, hold, found or [])

        task = asyncio.ensure_future(recover())
        self._recovering.add(task)
        task.add_done_callback(self._recovering.discard)

    def stale_before(self) -> float:
        """Holders whose expiry (heartbeat + their own lease) is before this, the current
        time, are presumed dead; none is while this worker's own hold may have lapsed
        (docs/leases.md)."""
        careful = self.may_take_over
        if careful is not None and not careful():
            return float("-inf")
        return time.time()

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
        return await self._streams.ensure(self.js, self.store, self.names(app))

    def _forget_stream(self, app: str) -> None:
        self._streams.forget(self.names(app))

    def generation(self, app: str) -> int:
        """How many times ``app``'s stream was found re-made (its consumers with it)."""
        return self._streams.generations.get(self.names(app).stream, 0)

    def _watch(self, app: str) -> None:
        if app not in self._watches:
            self._watches[app] = asyncio.create_task(
                self._watch_stream(app), name=f"cantata-nats-watch:{app}"
            )

    async def _watch_stream(self, app: str) -> None:
        """Notice a stream deleted or re-made (the server lost its data) while the pull
        loops wait: a pull on a consumer that no longer exists just times out (a pull
        loop that gets nothing checks its own consumer: :meth:`consumer_gone`)."""
        names = self.names(app)
        while True:
            await asyncio.sleep(self.check_interval)
            try:
                if not await self._streams.replaced(self.js, names):
                    continue
                log.warning("NATS stream %s at %s is gone or new: re-making it and its "
                            "consumers", names.stream, self.masked_url)
                self._forget_stream(app)
                await self._stream(app)
            except Exception as exc:  # disconnected, ...: the pull loops report it
                log.debug("checking stream %s failed: %s", names.stream, error_text(exc))

    async def consumer_gone(self, app: str, durable: str) -> bool:
        """Whether the durable consumer ``durable`` was deleted on the server (as ``nats
        consumer rm`` does): a pull on it just times out. Said once, in a warning; the
        pull loop then binds again, which makes the consumer anew, and the group's
        events flow again (from the stream's start: the store drops what the group
        settled). ``False`` when the check cannot be made (disconnected; a stream that
        is gone is the stream watch's to re-make)."""
        stream = self.names(app).stream
        try:
            await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError as exc:
            if exc.err_code != _CONSUMER_NOT_FOUND:
                return False
            log.warning(
                "NATS consumer %s of stream %s at %s is gone (deleted on the server): "
                "making it again; its group's pending events are delivered again",
                durable, stream, self.masked_url,
            )
            return True
        except Exception as exc:  # disconnected, ...: the pull loop reports that
            log.debug("checking consumer %s failed: %s", durable, error_text(exc))
        return False

    async def _bind(
        self, app: str, durable: str, subject: str, start: StartAt | None = None
    ) -> JetStreamContext.PullSubscription:
        """Open a pull subscription on a durable consumer, creating what is missing."""
        stream = await self._consumer(app, durable, subject, start)
        return await self.js.pull_subscribe_bind(durable, stream=stream)

    async def _consumer(
        self, app: str, durable: str, subject: str, start: StartAt | None = None
    ) -> str:
        """Create the durable consumer (and the stream) if missing; returns the stream.
        A new consumer reads from the stream's start, or from the time ``start`` gives
        (asked only when the consumer is made)."""
        stream = await self._stream(app)
        try:
            await self.js.consumer_info(stream, durable)
        except nats.js.errors.NotFoundError:
            self._forget_stream(app)  # the stream may be new: check it again
            stream = await self._stream(app)
            config = ConsumerConfig(
                name=durable,
                durable_name=durable,
                filter_subject=subject,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self.ack_wait,
                max_deliver=-1,
                # From the stream's start, so nothing published before the first
                # subscriber is lost; _addressed() drops what the store did not
                # address to the group.
                deliver_policy=DeliverPolicy.ALL,
            )
            if start is not None:
                config.deliver_policy = DeliverPolicy.BY_START_TIME
                config.opt_start_time = datetime.datetime.fromtimestamp(await start(), datetime.UTC)
            try:
                await self.js.add_consumer(stream, config)
            except nats.js.errors.APIError as exc:
                # Made meanwhile by another worker (its start a moment apart): that one
                # is used. Otherwise the refusal stands.
                try:
                    await self.js.consumer_info(stream, durable)
                except nats.js.errors.NotFoundError:
                    raise exc from None
        return stream

    def adopt_timing(
        self, *, lease: float, poll_interval: float,
        may_take_over: Callable[[], bool] | None = None, clock: Clock | None = None,
    ) -> None:
        """Take the app's lease as ``ack_wait`` unless this broker was given one, so a
        dead worker's messages are handled elsewhere after the same time as its runs
        (consumers made before keep theirs), and ping the server every half lease, so
        a connection silently gone is replaced within about 1.5 leases."""
        self.lease, self.may_take_over = lease, may_take_over
        self.quiet.every = max(10.0, lease)
        if not self._ack_wait_given:
            self.ack_wait = max(1.0, lease)
        if self._nc is not None:  # (from its next ping on)
            self._nc.options["ping_interval"] = self.ping_interval

    @property
    def ping_interval(self) -> float:
        """Seconds between the client's pings: half the app's lease, at least
        :data:`PING_LEAST` (see :data:`PINGS_UNANSWERED`)."""
        return max(PING_LEAST, self.lease / 2)

    # -- the Broker protocol --------------------------------------------------------------

    async def attach(self, app: str, *, offload_above: int | None = None) -> None:
        """Create ``app``'s stream, or check that this store owns it.

        Raises:
            BrokerError: the stream belongs to another store (or app); the message
                names both.
        """
        self._offload[app] = offload_above
        if self._connecting is not None:
            return  # made once connected (_connect_later)
        with self._translate(f"preparing the stream of app {app!r}"):
            await self._stream(app)

    def check_event(self, app: str, event: Event[Any]) -> None:
        """Raise if the server would refuse ``event``: its subject must fit the server's
        control line, its message the server's max_payload.

        Raises:
            InvalidEvent: the event type is too long for a subject.
            PayloadTooLarge: the message is over the server's max_payload.
        """
        payload = self.wire(app, event)
        self.limits.check_event(self.names(app), event, payload)
        # kept for publish (the same event object, once committed), the newest few
        wired = self._wired
        gone = wired.pop(event.id, None)
        self._wired_bytes += len(payload) - (len(gone[1]) if gone is not None else 0)
        wired[event.id] = (event, payload)
        while len(wired) > _WIRED_KEPT or (self._wired_bytes > _WIRED_BYTES and len(wired) > 1):
            self._wired_bytes -= len(wired.popitem(last=False)[1][1])

    def wire(self, app: str, event: Event[Any]) -> bytes:
        """The message body of ``event``: its CloudEvent, or a claim check when it is
        larger than the app's ``offload_above`` (the event stays in the store)."""
        payload = event.to_json()
        limit = self._offload.get(app)
        if limit is not None and len(payload) > limit:
            return claim_stub(event).to_json()
        return payload

    async def publish(
        self, app: str, events: Sequence[Event[Any]], *, again: bool = False
    ) -> None:
        """Publish stored events; the server drops an event id seen in its duplicate
        window (unless ``again``: a re-drive), and the store makes a later duplicate
        harmless.

        Raises:
            EventsRefused: the server refuses some events for good (too large, subject
                too long); all the others were published.
            BrokerError: the server cannot take events now (try again).
        """
        if not events:
            return
        names, limits = self.names(app), self.limits
        refused: dict[str, str] = {}
        sendable: list[tuple[Event[Any], bytes]] = []
        wired = self._wired
        for event in events:
            made = wired.pop(event.id, None)
            if made is not None:
                self._wired_bytes -= len(made[1])
            payload = made[1] if made is not None and made[0] is event else self.wire(app, event)
            try:
                limits.check_event(names, event, payload)
            except Exception as exc:  # InvalidEvent, PayloadTooLarge
                refused[event.id] = error_text(exc)
            else:
                sendable.append((event, payload))
        if self.local_hand_off and not again:  # (see Handing.settled_copy)
            for event, payload in sendable:
                self._handling.published(event.id, payload)
        with self._translate(f"publishing {len(events)} event(s) of app {app!r}"):
            stream = await self._stream(app)
            mark = self.outbox_mark(app)
            assert mark is not None  # (_stream read the store's id)
            try:
                await self._send(names, stream, mark, sendable, again)
            except Exception as exc:
                if refusal(exc) is None:
                    self._forget_stream(app)  # it may be gone: look at it again next time
                    raise
                # One of them is refused: send them one by one to learn which.
                for event, payload in sendable:
                    try:
                        await self._send(names, stream, mark, [(event, payload)], again)
                    except Exception as one:
                        reason = refusal(one)
                        if reason is None:
                            raise
                        refused[event.id] = f"BrokerError: {reason} ({error_text(one)})"
        if refused:
            raise EventsRefused(refused)

    async def _send(
        self, names: Names, stream: str, mark: str,
        batch: Sequence[tuple[Event[Any], bytes]], again: bool = False,
    ) -> None:
        # Pipelined: the messages leave in order on the one connection (so the stream
        # keeps that order) and their acks come back to one reply subscription
        # (publish_async: no request, timer and inbox per event), awaited together. If
        # one fails, the caller publishes them all again; the server drops the ids it
        # has already stored.
        js = self.js
        tail = f":again-{new_id()}" if again else ""
        publisher = self._publisher()
        for i in range(0, len(batch), _PUBLISH_WINDOW):
            acks: list[asyncio.Future[Any]] = []
            window: Window | None = None
            try:
                items = [(names.event(e.type), e.id + tail, p)
                         for e, p in batch[i : i + _PUBLISH_WINDOW]]
                if publisher is not None and safe(stream) and safe(mark) and all(
                    safe(s) and safe(m) for s, m, _ in items
                ):
                    window = await publisher.publish(items, stream, mark)
                    acks.append(window.done)
                else:
                    for subject, msg_id, payload in items:
                        acks.append(await js.publish_async(
                            subject, payload, stream=stream,
                            headers={"Nats-Msg-Id": msg_id,
                                     "Content-Type": STRUCTURED_CONTENT_TYPE,
                                     OUTBOX_HEADER: mark},
                        ))
                try:
                    async with asyncio.timeout(_PUBLISH_TIMEOUT):
                        if window is not None:
                            await window.done
                        else:
                            await asyncio.gather(*acks)
                except TimeoutError:
                    raise nats.errors.TimeoutError from None
            finally:
                if publisher is not None and window is not None and not window.done.done():
                    publisher.forget(window)
                for ack in acks:  # (frees its place among the pending publishes)
                    if not ack.done():
                        ack.cancel()

    def _publisher(self) -> Publisher | None:
        """The connection's pipelined publisher (nats_publish), unless turned off or the
        client lacks what it needs."""
        nc = self._nc
        if nc is None or not self.fast_publish:
            return None
        if self._pub is None or self._pub_nc is not nc:
            if not usable(nc):
                return None
            self._pub, self._pub_nc = Publisher(nc, STRUCTURED_CONTENT_TYPE), nc
        return self._pub

    async def subscribe(
        self,
        app: str,
        group: str,
        patterns: Sequence[str],
        handler: Handler,
        *,
        worker_id: str,
        concurrency: int = 64,
    ) -> NatsSubscription:
        """Deliver ``group``'s events to ``handler`` from one durable consumer per pattern.

        The group must be declared in the store (the store addresses each new event to
        the groups declared then: an event it did not address to the group is skipped,
        nats_consumer) and ``worker_id`` kept alive by its heartbeat: the app does both
        before it subscribes (docs/architecture.md). Nothing is written here: a
        declaration written at subscription would be bare (no service, no handler's
        detail), replacing the app's full one.

        Raises:
            ConfigurationError: the group name or a pattern cannot be used on this server
                (checked before anything is created).
        """
        names = self.names(app)
        self.limits.check_subscription(names, group, patterns)
        unique = list(dict.fromkeys(check_pattern(p) for p in patterns))
        consumers = [
            (names.consumer(group, p), names.event(p), False) for p in unique
        ] + [(names.consumer(group, None), names.replay(group), True)]
        if self._connecting is None:  # (else the pull loops make them once connected)
            with self._translate(f"subscribing group {group!r} of app {app!r}"):
                # Create everything now, so events published after subscribe() returns
                # reach it.
                for durable, subject, _ in consumers:
                    await self._consumer(app, durable, subject)
        sub = NatsSubscription(self, app, group, handler, concurrency, consumers, unique,
                               worker_id=worker_id)
        self._subs.append(sub)
        self._routes.clear()
        self._watch(app)
        return sub

    async def keep_outside(
        self, app: str, patterns: Sequence[str], *, worker_id: str, since: Since,
        on_stored: OnStored | None = None,
    ) -> None:
        """Store the events other systems put on ``app``'s subjects of ``patterns``
        (types this worker's workflows wait for) as they arrive, so that waits see them
        although no handler group takes them (nats_outside). Called again with the
        types runs reach at run time; a type already kept is not added twice.
        ``since`` gives the creation of the app's oldest run not final (``None``: there
        is none): a type's consumer, made for the first time, starts there (less
        ``clock_skew``), not at the stream's start. ``on_stored`` is told the events
        stored here."""
        names = self.names(app)
        wanted: list[str] = []
        for pattern in dict.fromkeys(patterns):
            try:
                self.limits.check_subscription(names, KEEPER, [pattern])
            except Exception as exc:  # (waits check their types: not expected)
                log.warning("events from outside of type %r are not kept for waits: %s",
                            pattern, error_text(exc))
                continue
            wanted.append(pattern)
        keeper = self._keepers.get(app)
        if keeper is None:
            if wanted:
                self._keepers[app] = OutsideKeeper(self, app, wanted, worker_id=worker_id,
                                                   since=since, on_stored=on_stored)
                self._watch(app)
            return
        for pattern in wanted:
            keeper.add(pattern)

    async def redeliver(self, app: str, group: str, event: Event[Any]) -> None:
        """Publish ``event`` to ``group``'s replay subject (a new message id, so the
        server does not drop it as a duplicate)."""
        with self._translate(f"redelivering event {event.id} to group {group!r}"):
            stream = await self._stream(app)
            await self.js.publish(
                self.names(app).replay(group), self.wire(app, event), stream=stream,
                headers={"Nats-Msg-Id": f"replay-{new_id()}",
                         "Content-Type": STRUCTURED_CONTENT_TYPE},
            )
