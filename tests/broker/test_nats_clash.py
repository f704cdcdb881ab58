"""A message reusing a stored event's id with other content never replaces it.

docs/security.md: an id reused with other content is refused, a dead letter when it
arrives from the broker. The stored event is the truth: when the forged copy reaches
a group before the real one (the relay has not published yet, NATS lost the real
copy, or the forger's message id made the server drop the relay's), the group
handles the stored content and the forged message is dead-lettered as itself.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, Event
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_consumer import INVALID_TYPE
from cantata.store.roles.events import DeliveryHold
from cantata.store.sqlite import SQLiteStore
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats


async def test_a_forged_copy_first_is_dead_lettered_and_the_stored_event_handled(
    store: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = app_name("clash")
    broker = nats_broker(nats_url)
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    seen: list[tuple[str, Any]] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: Event[Any]) -> None:
        seen.append(("inventory", event.data))

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        seen.append(("billing", event.data))

    names = broker.names(name)
    async with streams_removed(nats_url, name):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            async with app.client():  # stored, both deliveries pending
                real = await app.publish("order.placed", {"amount": 10})

                async def relayed() -> bool:
                    info = await js.stream_info(names.stream)
                    return info.state.messages == 1

                await eventually(relayed, what="the relay's copy")
            # the real copy is lost (or not relayed yet); another system reuses the id
            await js.purge_stream(names.stream)
            forged = dict(json.loads(real.to_json()), data={"amount": 999999})
            await js.publish(names.event(real.type), json.dumps(forged).encode(),
                             stream=names.stream)
            async with app:
                await eventually(lambda: len(seen) == 2, what="both groups handled it")

                async def two_letters() -> list[Any]:
                    letters = await app.dead_letters()
                    return letters if len(letters) == 2 else []

                letters = await eventually(two_letters, what="the forged copy dead-lettered")
                await asyncio.sleep(0.5)  # nothing more comes
                states = {d.group: d.status for d in await app.store.deliveries(name, real.id)}
        finally:
            await nc.close()
    assert sorted(seen) == [("billing", {"amount": 10}), ("inventory", {"amount": 10})]
    assert states == {"inventory": "done", "billing": "done"}
    assert sorted(d.group for d in letters) == ["billing", "inventory"]
    for letter in letters:
        assert letter.event.type == INVALID_TYPE
        assert letter.error.startswith(f"DuplicateEventId: event id {real.id}")
        assert "999999" in letter.event.data["payload"]
    assert f"refused a message reusing event id {real.id}" in caplog.text


class RelayHeldBack(NatsBroker):
    """The real NATS broker whose outbox relay publishes only once ``go`` is set: the
    relay has not published yet while another system puts a copy on the stream."""

    def __init__(self, url: str, **kw: Any) -> None:
        super().__init__(url, **kw)
        self.go = asyncio.Event()

    async def publish(self, app: str, events: Sequence[Event[Any]], *, again: bool = False) -> None:
        await self.go.wait()
        await super().publish(app, events, again=again)


async def test_a_forged_copy_of_an_event_handed_off_here_is_dead_lettered(
    store: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An event this worker handed to its own group at once (no NATS round trip) is
    settled here; a copy of it coming from NATS is acked without a store read when it
    is the relay's. A forged copy with its id (and its ``Nats-Msg-Id``, so the server
    drops the relay's real one) is read and dead-lettered like any other."""
    name = app_name("clash")
    broker = RelayHeldBack(nats_url, fetch_timeout=0.25, ack_wait=5.0, reconnect_time_wait=0.2)
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    seen: list[Any] = []

    @app.on("invoice.sent", group="mail")
    async def mail(event: Event[Any]) -> None:
        seen.append(event.data)

    names = broker.names(name)
    event_id = f"inv-{uuid.uuid4().hex[:8]}"
    async with streams_removed(nats_url, name), app:
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await app.publish("invoice.sent", {"amount": 10}, id=event_id)  # handed off

            async def settled() -> bool:
                rows = await app.store.deliveries(name, event_id)
                return [(r.group, r.status) for r in rows] == [("mail", "done")]

            await eventually(settled, what="the hand-off settled")
            await asyncio.sleep(0.2)
            forged = Event(
                type="invoice.sent",
                data={"amount": 999999},
                id=event_id,
                source="cantata",
                correlation_id=event_id,
            )
            await js.publish(
                names.event("invoice.sent"),
                forged.to_json(),
                stream=names.stream,
                headers={
                    "Nats-Msg-Id": event_id,
                    "Cantata-Outbox": "1",
                    "Content-Type": "application/cloudevents+json",
                },
            )

            async def one_letter() -> list[Any]:
                return await app.dead_letters()

            [letter] = await eventually(one_letter, what="the forged copy dead-lettered")
            broker.go.set()  # the relay's copy: the server drops it (same message id)

            async def relayed() -> bool:
                return await app.store.unpublished_events(name, limit=10) == []

            await eventually(relayed, what="the outbox empty")
            await asyncio.sleep(0.5)  # nothing more comes
        finally:
            broker.go.set()
            await nc.close()
        stored = await app.store.get_event(name, event_id)
    assert seen == [{"amount": 10}]
    assert stored is not None and stored.data == {"amount": 10}
    assert (letter.group, letter.event.type) == ("mail", INVALID_TYPE)
    assert letter.error.startswith(f"DuplicateEventId: event id {event_id}")
    assert "999999" in letter.event.data["payload"]
    assert f"refused a message reusing event id {event_id}" in caplog.text


class ReadsCounted(SQLiteStore):
    """SQLite, counting the deliveries looked up per group (what a copy from NATS that
    is not acked unread costs)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.looked_up: dict[str, int] = {}

    async def delivery_holds(
        self, app: str, group: str, event_ids: Sequence[str], *, stale_before: float
    ) -> dict[str, DeliveryHold]:
        self.looked_up[group] = self.looked_up.get(group, 0) + len(event_ids)
        return await super().delivery_holds(app, group, event_ids, stale_before=stale_before)

    async def take_deliveries(
        self, app: str, group: str, event_ids: Sequence[str], worker_id: str, *,
        stale_before: float,
    ) -> dict[str, DeliveryHold]:
        self.looked_up[group] = self.looked_up.get(group, 0) + len(event_ids)
        return await super().take_deliveries(app, group, event_ids, worker_id,
                                             stale_before=stale_before)


async def test_the_relays_copies_of_events_handed_off_here_are_acked_unread(
    nats_url: str, tmp_path: Path
) -> None:
    """The forged copy's check leaves the relay's own copies as cheap as they were: no
    store read for any of them."""
    name = app_name("clash")
    broker = nats_broker(nats_url)
    store = ReadsCounted(str(tmp_path / "a.db"))
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    seen: list[str] = []

    @app.on("invoice.sent", group="mail")
    async def mail(event: Event[Any]) -> None:
        seen.append(event.id)

    names = broker.names(name)
    async with streams_removed(nats_url, name), app:
        sent = [await app.publish("invoice.sent", {"n": i}) for i in range(20)]
        await eventually(lambda: len(seen) == 20, what="the hand-offs")
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()

            async def copies_acked() -> bool:
                info = await js.consumer_info(names.stream, names.consumer("mail", "invoice.sent"))
                done: bool = info.delivered.stream_seq == 20 and info.num_ack_pending == 0
                return done

            await eventually(copies_acked, what="the relay's 20 copies acked")
        finally:
            await nc.close()
    assert sorted(seen) == sorted(e.id for e in sent)
    assert store.looked_up.get("mail", 0) == 0, store.looked_up
