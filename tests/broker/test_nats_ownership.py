"""A NATS stream belongs to one app in one store.

Two stores (two environments) with one app name on one server must never take each
other's events: the second refuses to start, naming both, unless each broker URL
has its own ``?prefix=``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, BrokerError, ConfigurationError, Event
from cantata.broker.factory import broker_from_url
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_names import REPLAY, Names
from cantata.model.event import RESERVED_FIRST_TOKENS
from tests.broker.nats_support import app_name, streams_removed
from tests.choreography.helpers import SETTLE, eventually

pytestmark = pytest.mark.nats


def shop(name: str, store: str, broker: str, handled: list[str]) -> App:
    app = App(name, store=store, broker=broker, poll_interval=0.05)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    return app


async def test_a_second_store_with_the_same_app_name_refuses_to_start(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("owned")
    handled_a: list[str] = []
    a = shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, handled_a)
    b = shop(name, f"sqlite:///{tmp_path}/staging.db", nats_url, [])
    async with streams_removed(nats_url, name), a:
        with pytest.raises(BrokerError) as info:
            async with b:
                pass
        message = str(info.value)
        assert f"{tmp_path}/prod.db" in message and f"{tmp_path}/staging.db" in message
        assert "?prefix=" in message
        # ... and A is untouched: its events are still all its own.
        events = [await a.publish("order.placed", {"n": i}) for i in range(6)]
        await eventually(lambda: len(handled_a) == 6, what="A handles its 6 events")
        # A client (query commands) of B refuses too: it would relay into A's stream.
        with pytest.raises(BrokerError, match="two stores must not share a stream"):
            async with b.client():
                pass
    assert sorted(handled_a) == sorted(e.id for e in events)


async def test_prefixes_give_two_stores_their_own_streams(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("owned")
    handled_a: list[str] = []
    handled_b: list[str] = []
    a = shop(name, f"sqlite:///{tmp_path}/prod.db", f"{nats_url}?prefix=prod", handled_a)
    b = shop(name, f"sqlite:///{tmp_path}/staging.db", f"{nats_url}?prefix=staging",
             handled_b)
    async with streams_removed(nats_url, name), a, b:
        from_a = [await a.publish("order.placed", {"n": i}) for i in range(6)]
        await eventually(lambda: len(handled_a) == 6, what="A handles its 6 events")
        from_b = [await b.publish("order.placed", {"n": i}) for i in range(2)]
        await eventually(lambda: len(handled_b) == 2, what="B handles its 2 events")
        await asyncio.sleep(SETTLE)
        assert sorted(handled_a) == sorted(e.id for e in from_a)
        assert sorted(handled_b) == sorted(e.id for e in from_b)
        assert await a.stalled(older_than=0) == []
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            streams = {s.config.name: s for s in await js.streams_info()}
        finally:
            await nc.close()
    prod, staging = Names(name, "prod"), Names(name, "staging")
    assert streams[prod.stream].state.messages == 6
    assert streams[staging.stream].state.messages == 2
    assert streams[prod.stream].config.subjects == [f"prod.cantata.{name}.>"]
    assert prod.consumer("billing", "order.placed") != staging.consumer(
        "billing", "order.placed"
    )


def test_prefix_changes_stream_subject_and_consumer_names() -> None:
    plain, staged = Names("shop"), Names("shop", "staging")
    assert (plain.stream, staged.stream) == ("CANTATA_shop", "CANTATA-staging_shop")
    assert staged.event("order.placed") == "staging.cantata.shop.order.placed"
    assert staged.replay("billing") == "staging.cantata.shop._replay.billing"
    # no event type may start with the replays' token: no event travels there
    assert REPLAY in RESERVED_FIRST_TOKENS
    assert staged.consumer("billing", "order.*").startswith("staging_billing-")
    broker = broker_from_url("nats://127.0.0.1:4222?prefix=staging&replicas=1")
    assert isinstance(broker, NatsBroker)
    assert broker.prefix == "staging" and broker.url == "nats://127.0.0.1:4222"


@pytest.mark.parametrize("url", [
    "nats://127.0.0.1:4222?prefix=",
    "nats://127.0.0.1:4222?prefix=a.b",
    "nats://127.0.0.1:4222?prefix=a_b",
    "nats://127.0.0.1:4222?prefix=cantata",
    "nats://127.0.0.1:4222?prefixes=x",
])
def test_bad_prefixes_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        broker_from_url(url)


async def test_a_stream_made_before_owners_were_recorded_is_adopted(
    nats_url: str, tmp_path: Path
) -> None:
    from nats.js.api import StreamConfig

    name = app_name("legacy")
    names = Names(name)
    handled: list[str] = []
    async with streams_removed(nats_url, name):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=names.stream, subjects=[f"{names.subjects}.>"]))
            app = shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, handled)
            async with app:
                event = await app.publish("order.placed", {"n": 1})
                await eventually(lambda: handled == [event.id], what="the event handled")
                store_id = await app.store.identity()
            info = await js.stream_info(names.stream)
        finally:
            await nc.close()
    assert info.config.description is not None
    assert store_id in info.config.description and '"complete": true' in info.config.description
