"""Which broker an app's events go through, as its serving workers record it in the
store, so that a process on another broker is refused where it would reach none of them.

A worker records its broker when it starts serving (a ``broker`` declaration of the
app, the last one serving wins). An operator's command (``cantata dlq replay``, ``dlq
redrive``, ``publish``, the console) checks its own broker against it with
:func:`check`: a dead letter replayed through the embedded broker while the workers
read NATS would leave the list and be delivered to nobody.

Brokers are told apart by kind and NATS name space (``?prefix=``), not by host: one
NATS cluster has many addresses.
"""

from __future__ import annotations

from dataclasses import dataclass

from cantata.broker.base import Broker
from cantata.errors import BrokerMismatch, SerializationError
from cantata.model import codec
from cantata.model.records import Declaration
from cantata.store.base import Store
from cantata.store.factory import mask_url

KIND = "broker"
NAME = "events"


@dataclass(frozen=True, slots=True)
class Binding:
    """A broker as a worker records it."""

    key: str  # what is compared: the kind, and a NATS name space
    shown: str  # its URL (password masked, with its ?prefix=), for messages
    relays_outbox: bool  # events reach it through the outbox relay (NATS), not the store

    @classmethod
    def of(cls, broker: Broker) -> Binding:
        """The binding of an open or closed broker (by its ``url`` and ``prefix``)."""
        url = str(getattr(broker, "url", "") or type(broker).__name__)
        prefix = str(getattr(broker, "prefix", "") or "")
        kind = url.split("://", 1)[0].lower() if "://" in url else url.strip().lower()
        kind = kind or type(broker).__name__
        shown = mask_url(url)
        if prefix:
            shown += f"{'&' if '?' in shown else '?'}prefix={prefix}"
        return cls(kind + (f"?prefix={prefix}" if prefix else ""), shown,
                   bool(getattr(broker, "relays_outbox", False)))

    def declaration(self) -> Declaration:
        """The declaration a serving worker records."""
        return Declaration(KIND, NAME, detail=codec.dumps({
            "key": self.key, "shown": self.shown, "relays_outbox": self.relays_outbox}))

    @classmethod
    def parse(cls, d: Declaration) -> Binding | None:
        """The binding a declaration records (``None``: not one this code wrote)."""
        try:
            info = codec.loads(d.detail or "")
            return cls(str(info["key"]), str(info["shown"]), bool(info["relays_outbox"]))
        except (SerializationError, KeyError, TypeError):
            return None


async def recorded(store: Store, app: str) -> Binding | None:
    """The broker ``app``'s workers last served with (``None``: none has served since
    workers recorded it)."""
    for d in await store.declarations(app):
        if d.kind == KIND and d.name == NAME:
            return Binding.parse(d)
    return None


async def check(store: Store, app: str, broker: Broker, *, publishing: bool = False) -> None:
    """Refuse to redeliver (or, with ``publishing``, to publish) through ``broker`` when
    the app's workers take its events through another broker that only they relay to.

    A worker on the embedded broker reads deliveries from the store, so anything
    reaches it. A worker on NATS reads its name space only: a redelivery reaches it
    through that broker alone; a publish through a broker with no relay of its own
    (embedded) waits in the outbox, which the workers' relay sends on, but one relayed
    to another name space is taken off the outbox and never reaches them.

    Raises:
        BrokerMismatch: naming the workers' broker and how to use it.
    """
    theirs = await recorded(store, app)
    if theirs is None or not theirs.relays_outbox:
        return
    mine = Binding.of(broker)
    if mine.key == theirs.key or (publishing and not mine.relays_outbox):
        return
    what = "events published" if publishing else "redeliveries"
    raise BrokerMismatch(
        f"the workers of app {app!r} take its events through broker {theirs.shown}, not "
        f"{mine.shown}: pass --broker {theirs.shown} (or set CANTATA_BROKER); {what} "
        "through another broker reach none of them"
    )
