"""The broker contract on NATS JetStream, plus what only a server can get wrong."""

from __future__ import annotations

import asyncio
import logging
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest

from cantata.broker.base import BrokerMessage
from cantata.broker.factory import broker_from_url
from cantata.broker.nats import (
    NatsBroker,
    consumer_name,
    event_subject,
    replay_subject,
    stream_name,
    token,
)
from cantata.errors import BrokerError, ConfigurationError
from cantata.model.event import Event
from cantata.model.records import Declaration
from cantata.store.factory import store_from_url
from tests.broker.nats_support import Server, app_name, nats_broker, streams_removed

# -- names ------------------------------------------------------------------------------


def test_names_are_valid_nats_tokens_and_never_shared() -> None:
    valid = r"^[A-Za-z0-9_-]+$"
    assert token("shop") == "shop"
    assert stream_name("shop") == "CANTATA_shop"
    assert event_subject("shop", "order.placed") == "cantata.shop.order.placed"
    assert replay_subject("shop", "billing") == "cantata.shop._replay.billing"
    odd = ["my shop.eu", "my_shop_eu", "a>b", "a*b", "ünï"]
    tokens = [token(n) for n in odd]
    assert len(set(tokens)) == len(odd)
    assert all(re.match(valid, t) for t in tokens), tokens
    names = {
        consumer_name("billing", "order.placed"),
        consumer_name("billing", "order.*"),
        consumer_name("billing", None),
        consumer_name("shipping", "order.placed"),
        consumer_name("billing.eu", "order.placed"),
    }
    assert len(names) == 5
    assert all(re.match(valid, n) for n in names)


# -- the factory --------------------------------------------------------------------------


def test_factory_builds_a_nats_broker() -> None:
    broker = broker_from_url("nats://user:pw@127.0.0.1:4222")
    assert isinstance(broker, NatsBroker)
    assert broker.url == "nats://user:pw@127.0.0.1:4222"
    assert broker.relays_outbox is True


def test_factory_without_nats_py_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cantata.broker.nats", None)
    with pytest.raises(ConfigurationError, match=r"pip install 'cantata\[nats\]'"):
        broker_from_url("nats://127.0.0.1:4222")


# -- connecting ---------------------------------------------------------------------------


@pytest.mark.nats
async def test_an_unreachable_server_is_connected_in_the_background(
    own_server: Callable[..., Server], caplog: pytest.LogCaptureFixture,
) -> None:
    """An outage at open is waited out as one once connected: open() returns, says so
    once, and the broker connects (and makes the streams) when the server comes."""
    server = own_server(user=("alice", "s3cret"), start=False)  # nobody on its port yet
    broker = nats_broker(server.url.replace("nats://", "nats://alice:s3cret@"),
                         connect_attempts=2, reconnect_time_wait=0.05)
    app = app_name("late")
    store = store_from_url("memory://")
    await store.open()
    started = time.monotonic()
    try:
        with caplog.at_level(logging.WARNING, "cantata.broker"):
            await broker.open(store)
            await broker.attach(app)
            assert time.monotonic() - started < 5
            assert not broker.connected
            with pytest.raises(BrokerError, match="not been reached yet"):
                await broker.publish(app, [Event(type="t", data=1)])
            server.start()
            await asyncio.wait_for(broker.wait_connected(), 15)
            async with streams_removed(server.url.replace("nats://", "nats://alice:s3cret@"),
                                       app):
                await _until(lambda: broker.publish(app, [Event(type="t", data=1)]))
    finally:
        await broker.close()
        await store.close()
    said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum("cannot reach NATS" in m for m in said) == 1, said
    assert f"nats://alice:***@127.0.0.1:{server.port}" in said[0]
    assert not any("s3cret" in m for m in said)
    assert any("connected to NATS" in m for m in said), said


async def _until(attempt: Callable[[], Any], timeout: float = 10.0) -> None:
    """``await attempt()`` until it stops raising BrokerError (the stream is being made)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await attempt()
            return
        except BrokerError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


@pytest.mark.nats
async def test_a_server_that_refuses_the_client_fails_open_at_once(
    own_server: Callable[..., Server],
) -> None:
    """Wrong credentials (or a bad host name, a bad URL) never work by waiting."""
    server = own_server(user=("alice", "right"))
    store = store_from_url("memory://")
    await store.open()
    try:
        for url in (server.url.replace("nats://", "nats://alice:s3cret@"), server.url,
                    "nats://no-such-host.invalid:4222"):
            broker = nats_broker(url, connect_attempts=3)
            started = time.monotonic()
            with pytest.raises(BrokerError, match="waiting will not help") as info:
                await broker.open(store)
            assert time.monotonic() - started < 3
            message = str(info.value)
            assert "s3cret" not in message and "\n" not in message
            await broker.close()
    finally:
        await store.close()


@pytest.mark.nats
async def test_server_without_jetstream_is_a_clear_broker_error(
    own_server: Callable[..., Server],
) -> None:
    server = own_server(jetstream=False)
    store = store_from_url("memory://")
    await store.open()
    try:
        with pytest.raises(BrokerError, match="JetStream") as info:
            await nats_broker(server.url).open(store)
    finally:
        await store.close()
    assert server.url in str(info.value) and "-js" in str(info.value)


@pytest.mark.nats
async def test_pull_loops_survive_a_server_restart(own_server: Callable[..., Server]) -> None:
    server = own_server()
    store = store_from_url("memory://")
    await store.open()
    broker = nats_broker(server.url)
    await broker.open(store)
    handled: list[str] = []

    async def handle(msg: BrokerMessage) -> None:
        assert msg.event is not None
        if await msg.complete():
            handled.append(msg.event.id)

    async def publish(event: Event[Any]) -> None:
        await store.append_events("shop", [event])
        deadline = time.monotonic() + 10
        while True:  # the client may still be reconnecting
            try:
                await broker.publish("shop", [event])
                return
            except BrokerError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def until_handled(n: int) -> None:
        deadline = time.monotonic() + 10
        while len(handled) < n:
            assert time.monotonic() < deadline, f"only {len(handled)} of {n} handled"
            await asyncio.sleep(0.02)

    try:
        # (the app declares a group before it subscribes: docs/architecture.md)
        await store.declare("shop", [Declaration("handler", "billing", "order.*")])
        await broker.subscribe("shop", "billing", ["order.*"], handle, worker_id="w1")
        first = Event(type="order.placed", data={"n": 1})
        await publish(first)
        await until_handled(1)
        server.stop()
        await asyncio.sleep(0.5)  # the pull loops fail meanwhile
        server.start()
        second = Event(type="order.placed", data={"n": 2})
        await publish(second)
        await until_handled(2)
        assert handled == [first.id, second.id]
    finally:
        await broker.close()
        await store.close()
