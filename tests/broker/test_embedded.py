"""The broker contract on the embedded broker (the event log in the store)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from cantata.broker.base import BrokerMessage
from cantata.broker.embedded import EmbeddedBroker
from cantata.broker.factory import broker_from_url
from cantata.errors import ConfigurationError
from cantata.model.event import Event
from cantata.model.records import Declaration
from cantata.store.base import Store
from cantata.store.sqlite import SQLiteStore


class GatedClaims:
    """A store whose next claim waits for ``gate`` and, like a database, still
    completes when the caller stops waiting for it."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.armed = False
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self._pending: list[asyncio.Task[Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def claim_deliveries(self, *args: Any, **kw: Any) -> Any:
        if not self.armed:
            return await self._store.claim_deliveries(*args, **kw)
        self.armed = False

        async def claim() -> Any:
            await self.gate.wait()
            return await self._store.claim_deliveries(*args, **kw)

        task = asyncio.ensure_future(claim())
        self._pending.append(task)
        self.entered.set()
        return await asyncio.shield(task)


async def test_stopping_during_a_claim_loses_no_delivery() -> None:
    real = SQLiteStore(":memory:", synchronous="OFF")
    await real.open()
    store = GatedClaims(real)
    broker = EmbeddedBroker(poll_interval=0.05)
    await broker.open(store)
    handled: list[str] = []
    got_one = asyncio.Event()

    async def handle(msg: BrokerMessage) -> None:
        assert msg.event is not None
        if await msg.complete():
            handled.append(msg.event.id)
            got_one.set()

    try:
        # The app's part before subscribing: the group declared, the worker's row alive.
        await real.declare("shop", [Declaration("handler", "billing", "order.placed")])
        await real.heartbeat("shop", "w1", time.time(), None, lease=10.0)
        sub = await broker.subscribe("shop", "billing", ["order.placed"], handle, worker_id="w1")
        await asyncio.sleep(0.1)
        store.armed = True
        event: Event[Any] = Event(type="order.placed", data={})
        await real.append_events("shop", [event])
        await asyncio.wait_for(store.entered.wait(), 2)
        stopping = asyncio.create_task(sub.stop())
        await asyncio.sleep(0.05)
        store.gate.set()  # the claim commits although the subscriber is stopping
        await stopping
        again = await broker.subscribe("shop", "billing", ["order.placed"], handle, worker_id="w1")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(got_one.wait(), 3)
        await again.stop()
        assert handled == [event.id]
    finally:
        await broker.close()
        await real.close()


@pytest.mark.parametrize("url", ["embedded", "embedded://"])
def test_factory_builds_the_embedded_broker(url: str) -> None:
    broker = broker_from_url(url)
    assert isinstance(broker, EmbeddedBroker)
    assert broker.relays_outbox is False


@pytest.mark.parametrize("url", ["kafka://u:pw@host:9092", "embeded", "sqlite:///x.db", ""])
def test_factory_refuses_other_urls_naming_them_and_the_accepted_forms(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        broker_from_url(url)
    message = str(info.value)
    assert "embedded" in message and "nats://" in message
    assert "pw" not in message
    if url:
        assert url.replace(":pw@", ":***@") in message
