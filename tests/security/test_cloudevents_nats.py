"""The CloudEvents NATS binding, checked with the CloudEvents SDK both ways.

Structured mode out (``Content-Type: application/cloudevents+json``); structured and
binary mode (``ce-`` headers, the data as the body) in.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest
from cloudevents.v1.conversion import to_binary, to_structured
from cloudevents.v1.http import CloudEvent, from_http

from cantata import App, Event
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats


def receiving_app(nats_url: str, tmp_path: Path) -> tuple[App, Any, list[Event[Any]]]:
    name = app_name("ce")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)
    got: list[Event[Any]] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        got.append(event)

    return app, broker, got


@pytest.mark.parametrize("mode", ["binary", "structured"])
async def test_events_made_with_the_sdk_are_handled(
    nats_url: str, tmp_path: Path, mode: str
) -> None:
    app, broker, got = receiving_app(nats_url, tmp_path)
    sdk_event = CloudEvent(
        {"type": "order.placed", "source": "https://legacy.example/orders",
         "subject": "order-42", "correlationid": "biz-42", "datacontenttype": "application/json"},
        {"order_id": 42, "lines": [{"sku": "A", "qty": 2}]},
    )
    headers, body = (to_binary if mode == "binary" else to_structured)(sdk_event)
    async with streams_removed(nats_url, app.name), app:
        names = broker.names(app.name)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(
                names.event("order.placed"), body, stream=names.stream,
                headers={k: str(v) for k, v in headers.items()},
            )
        finally:
            await nc.close()
        await eventually(lambda: got, what=f"the {mode}-mode event handled")
        assert await app.dead_letters() == []
    [event] = got
    assert event.id == sdk_event["id"]
    assert event.data == {"order_id": 42, "lines": [{"sku": "A", "qty": 2}]}
    assert (event.source, event.subject, event.correlation_id) == (
        "https://legacy.example/orders", "order-42", "biz-42")


async def test_events_cantata_publishes_are_read_by_the_sdk(
    nats_url: str, tmp_path: Path
) -> None:
    app, broker, got = receiving_app(nats_url, tmp_path)
    async with streams_removed(nats_url, app.name), app:
        names = broker.names(app.name)
        nc = await nats.connect(nats_url)
        captured: asyncio.Queue[Any] = asyncio.Queue()
        try:
            await nc.subscribe(names.event("order.placed"), cb=captured.put)
            await nc.flush()
            sent = await app.publish("order.placed", {"order_id": 7}, subject="order-7",
                                     correlation_id="biz-7")
            msg = await asyncio.wait_for(captured.get(), 10)
        finally:
            await nc.close()
        await eventually(lambda: got, what="handled")
    assert msg.headers["Content-Type"] == "application/cloudevents+json"
    parsed = from_http(dict(msg.headers), msg.data)
    assert parsed["id"] == sent.id and parsed["type"] == "order.placed"
    assert parsed["source"] == sent.source and parsed["subject"] == "order-7"
    assert parsed["correlationid"] == "biz-7" and parsed["specversion"] == "1.0"
    assert parsed.data == {"order_id": 7}
    assert orjson.loads(msg.data)["data"] == {"order_id": 7}


async def test_a_binary_event_with_a_bad_body_is_dead_lettered_with_the_reason(
    nats_url: str, tmp_path: Path
) -> None:
    app, broker, got = receiving_app(nats_url, tmp_path)
    async with streams_removed(nats_url, app.name), app:
        names = broker.names(app.name)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().publish(
                names.event("order.placed"), b"{not json", stream=names.stream,
                headers={"ce-specversion": "1.0", "ce-id": "b-1", "ce-source": "legacy",
                         "ce-type": "order.placed", "Content-Type": "application/json"},
            )
        finally:
            await nc.close()
        [dl] = await eventually(app.dead_letters, what="the dead letter")
    assert "not the JSON" in dl.error and got == []
