"""Two copies of one event on NATS never run in two live workers at once.

A second copy comes when the relay re-drives an event after the broker lost its data,
or when another system publishes one event twice under two message ids. Each worker
takes the group's delivery in the store before it runs a copy
(``EventStore.take_deliveries``): the other worker's copy waits until the first is
settled, then is acked unrun (docs/guarantees.md). A copy that ends unrun lets go of
what it took, so a copy at another worker is not left waiting for this one's death.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Sequence
from typing import Any

import nats
import pytest

from cantata import App, Event
from cantata.model.records import DELIVERY_DONE
from cantata.store.base import Settlement, Store
from cantata.store.factory import store_from_url
from cantata.store.roles.events import DeliveryHold
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats

RUNS_AT_MOST = 30.0  # seconds the first handler waits for the other worker's look


class Spied:
    """A worker's store, noting what each take of a delivery found: (event id, holder)."""

    def __init__(self, url: str) -> None:
        self.store = store_from_url(url)
        self.took: list[tuple[str, str | None]] = []
        self.looked = asyncio.Event()
        take = self.store.take_deliveries

        async def noted(app: str, group: str, event_ids: Sequence[str], worker_id: str, *,
                        stale_before: float) -> dict[str, DeliveryHold]:
            got = await take(app, group, event_ids, worker_id, stale_before=stale_before)
            self.took += [(k, h.holder) for k, h in got.items()]
            if got:
                self.looked.set()
            return got

        self.store.take_deliveries = noted  # type: ignore[method-assign]


def worker(name: str, store: Store, nats_url: str, runs: list[tuple[str, str]],
           label: str, until: asyncio.Event | None = None) -> App:
    """A worker of app ``name`` whose billing handler runs until ``until`` is set (at
    most :data:`RUNS_AT_MOST` s), one event at a time, noting (``label``, "start" or
    "end") in ``runs``."""
    # (one message at a time: a worker running one fetches no other)
    app = App(name, store=store, broker=nats_broker(nats_url), poll_interval=0.05,
              concurrency=1)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        runs.append((label, "start"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for((until or asyncio.Event()).wait(), RUNS_AT_MOST)
        runs.append((label, "end"))

    return app


async def publish_copy(nats_url: str, app: App, event: Event[Any], message_id: str) -> None:
    """``event`` on its subject, as another system would publish it, under
    ``message_id`` (two ids: the server keeps both copies)."""
    names = nats_broker(nats_url).names(app.name)
    nc = await nats.connect(nats_url)
    try:
        await nc.jetstream().publish(names.event(event.type), event.to_json(),
                                     stream=names.stream, headers={"Nats-Msg-Id": message_id})
    finally:
        await nc.close()


async def test_a_second_copy_at_another_worker_waits_for_the_first(
    store: str, nats_url: str
) -> None:
    name = app_name("copies")
    runs: list[tuple[str, str]] = []
    spy_a, spy_b = Spied(store), Spied(store)
    # a runs the first copy until b has looked at the second (however slow b's start)
    a = worker(name, spy_a.store, nats_url, runs, "a", until=spy_b.looked)
    b = worker(name, spy_b.store, nats_url, runs, "b")
    event = Event(type="order.placed", data={"order": 1}, correlation_id="order-1")
    async with streams_removed(nats_url, name), a:
        await publish_copy(nats_url, a, event, f"copy-{uuid.uuid4().hex}")
        # a runs the first copy: at its concurrency, it fetches nothing more, so the
        # second copy goes to b
        await eventually(lambda: ("a", "start") in runs, what="a running the first copy")
        async with b:
            await publish_copy(nats_url, a, event, f"copy-{uuid.uuid4().hex}")
            await eventually(lambda: spy_b.took, what="b looking at the second copy")

            async def settled() -> bool:
                rows = await a.store.deliveries(name, event.id)
                return any(r.group == "billing" and r.status == DELIVERY_DONE for r in rows)

            await eventually(settled, what="the delivery done", timeout=15)
            await asyncio.sleep(1.0)  # room for a second run, if one began
            holder = a.engine.worker_id
    # b never ran it: it found the delivery held by a
    assert runs == [("a", "start"), ("a", "end")], runs
    assert spy_b.took[0] == (event.id, holder), spy_b.took


async def test_a_copy_handed_back_unrun_lets_go_of_its_delivery(
    store: str, nats_url: str
) -> None:
    """The relay's copy of an event whose retry is due later goes back to NATS until
    then: the delivery it took is free again for whichever worker gets the copy."""
    name = app_name("copies")
    runs: list[tuple[str, str]] = []
    client = App(name, store=store, broker=nats_broker(nats_url))
    client.on("order.placed", group="billing")(lambda event: None)
    names = nats_broker(nats_url).names(name)
    async with streams_removed(nats_url, name):
        async with client.client():  # stored and relayed; nobody serves it yet
            event = await client.publish("order.placed", {"order": 2})
            nc = await nats.connect(nats_url)
            try:
                js = nc.jetstream()

                async def relayed() -> bool:
                    return (await js.stream_info(names.stream)).state.messages == 1

                await eventually(relayed, what="the relay's copy")
            finally:
                await nc.close()
            # its first attempt failed; the next is due in a minute
            assert await client.store.settle_delivery(name, "billing", event.id, Settlement(
                "retry", 1, error="E: x", retry_at=time.time() + 60))
        spy = Spied(store)
        app = worker(name, spy.store, nats_url, runs, "a")
        async with app:
            await eventually(lambda: spy.took, what="the relay's copy taken")
            holder = app.engine.worker_id

            async def free() -> bool:
                holds = await app.store.delivery_holds(name, "billing", [event.id],
                                                       stale_before=float("-inf"))
                return holds[event.id].holder is None

            await eventually(free, what="the delivery let go of")
    assert spy.took[0] == (event.id, holder)
    assert runs == []
