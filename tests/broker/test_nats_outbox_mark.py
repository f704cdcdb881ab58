"""The relay's ``Cantata-Outbox`` header names the store and stream it came from.

The consumer that keeps events from outside for waits (nats_outside) acks the relay's
own copies unread: the store holds their events. Before, it acked any message with the
header, whatever its value, so a message another store's relay published (copied onto
this app's subjects by a bridge or a tool that kept the headers: another environment
on the same server, another app) was acked unread and lost for this store's waits.
Now only the value this store's relay writes for this stream is acked unread; any
other value (another store's, another stream's, the old ``1``, garbage) makes the
message an outside one: stored unless the store has it already.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import RawStreamMsg

from cantata import App, Event, WorkflowContext
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_names import OUTBOX_HEADER, Names, outbox_mark
from cantata.store.sqlite import SQLiteStore
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats


@pytest.fixture
async def tool(nats_url: str) -> AsyncIterator[Client]:
    """A NATS client of a user's tool (a bridge copying messages, headers and all)."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


def waiting_app(name: str, store: Any, broker: NatsBroker) -> App:
    app = App(name, store=store, broker=broker, poll_interval=0.05)

    @app.workflow
    async def approval(ctx: WorkflowContext, order_id: str) -> Any:
        ev = await ctx.wait_for_event("invoice.approved", match={"order_id": order_id},
                                      timeout=30)
        return [ev.id, ev.data]

    return app


async def last_copy(nc: Client, names: Names, event_id: str) -> RawStreamMsg:
    """The relay's message of ``event_id`` on its type's subject (once it is there)."""
    async def relayed() -> RawStreamMsg | None:
        try:
            last = await nc.jetstream().get_last_msg(names.stream,
                                                     names.event("invoice.approved"))
        except Exception:
            return None
        return last if event_id.encode() in (last.data or b"") else None

    found: RawStreamMsg = await eventually(relayed, what=f"the relay's copy of {event_id}")
    return found


async def copy_to(nc: Client, names: Names, msg: RawStreamMsg, **headers: str) -> None:
    """What a bridge does: the message with its headers, onto another app's subject."""
    kept = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
    assert msg.data is not None
    await nc.jetstream().publish(names.event("invoice.approved"), msg.data,
                                 stream=names.stream, headers={**kept, **headers})


async def test_a_copy_of_another_environments_relay_message_is_kept_for_waits(
    nats_url: str, tmp_path: Path, tool: Client
) -> None:
    """Two stores of one app name on one server (production, and staging with its own
    prefix); a tool mirrors production's messages into staging, headers included.
    Staging's waits see them: a relay header of another store is not staging's own."""
    name = app_name("mark")
    prod_broker = nats_broker(nats_url)
    prod = App(name, store=f"sqlite:///{tmp_path}/prod.db", broker=prod_broker,
               poll_interval=0.05)
    staging_broker = nats_broker(nats_url, prefix="staging")
    staging = waiting_app(name, f"sqlite:///{tmp_path}/staging.db", staging_broker)
    async with streams_removed(nats_url, name), prod, staging:
        run = await staging.start("approval", "x1")
        published = await prod.publish("invoice.approved", {"order_id": "x1"})
        copy = await last_copy(tool, prod_broker.names(name), published.id)
        assert (copy.headers or {}).get(OUTBOX_HEADER), copy.headers  # the relay's own
        await copy_to(tool, staging_broker.names(name), copy)
        assert await run.result(timeout=15) == [published.id, {"order_id": "x1"}]
        kept = await staging.store.get_event(name, published.id)
        assert kept is not None and kept.data == {"order_id": "x1"}


async def test_a_copy_of_another_apps_relay_message_is_kept_for_waits(
    nats_url: str, tmp_path: Path, tool: Client
) -> None:
    """Two apps of two stores on one server: app ``billing``'s relay copy, bridged onto
    app ``shop``'s subject, reaches ``shop``'s wait."""
    billing_name, shop_name = app_name("billing"), app_name("shop")
    billing_broker = nats_broker(nats_url)
    billing = App(billing_name, store=f"sqlite:///{tmp_path}/billing.db",
                  broker=billing_broker, poll_interval=0.05)
    shop_broker = nats_broker(nats_url)
    shop = waiting_app(shop_name, f"sqlite:///{tmp_path}/shop.db", shop_broker)
    async with streams_removed(nats_url, billing_name, shop_name), billing, shop:
        run = await shop.start("approval", "b1")
        published = await billing.publish("invoice.approved", {"order_id": "b1"})
        copy = await last_copy(tool, billing_broker.names(billing_name), published.id)
        await copy_to(tool, shop_broker.names(shop_name), copy)
        assert await run.result(timeout=15) == [published.id, {"order_id": "b1"}]


@pytest.mark.parametrize("value", ["1", "garbage", "", "0123abcd/CANTATA_other"])
async def test_a_foreign_or_malformed_relay_header_is_an_outside_message(
    nats_url: str, tmp_path: Path, tool: Client, value: str
) -> None:
    """A user's tool that put a ``Cantata-Outbox`` header of its own on an event (the
    old value ``1``, garbage, empty, another store's): the event is kept for waits."""
    name = app_name("mark")
    broker = nats_broker(nats_url)
    app = waiting_app(name, f"sqlite:///{tmp_path}/a.db", broker)
    event_id = f"ext-{uuid.uuid4().hex[:8]}"
    ce = {"specversion": "1.0", "id": event_id, "source": "legacy",
          "type": "invoice.approved", "data": {"order_id": "t1"}}
    names = broker.names(name)
    async with streams_removed(nats_url, name), app:
        run = await app.start("approval", "t1")
        await tool.jetstream().publish(
            names.event("invoice.approved"), json.dumps(ce).encode(), stream=names.stream,
            headers={"Content-Type": "application/cloudevents+json", OUTBOX_HEADER: value})
        assert await run.result(timeout=15) == [event_id, {"order_id": "t1"}]


class GetsCounted(SQLiteStore):
    """SQLite, counting the events looked up by id (what the keeper reads)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.looked_up: list[str] = []

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        self.looked_up.append(event_id)
        return await super().get_event(app, event_id)


async def test_the_relays_own_copies_carry_its_mark_and_are_acked_unread(
    nats_url: str, tmp_path: Path, tool: Client, caplog: pytest.LogCaptureFixture
) -> None:
    """This store's relay writes its mark (the store's id and the stream's name); the
    keeper acks those copies without a store read. A copy an older Cantata's relay
    wrote (``Cantata-Outbox: 1``, in flight during an upgrade) is read like an
    outside message: the store has its event, so nothing is stored twice and nothing
    is said."""
    name = app_name("mark")
    broker = nats_broker(nats_url)
    store = GetsCounted(str(tmp_path / "a.db"))
    app = waiting_app(name, store, broker)
    names = broker.names(name)
    async with streams_removed(nats_url, name), app:
        runs = [await app.start("approval", f"o{i}") for i in range(5)]
        sent = [await app.publish("invoice.approved", {"order_id": f"o{i}"})
                for i in range(5)]
        for run, event in zip(runs, sent, strict=True):
            assert (await run.result(timeout=15))[0] == event.id
        copy = await last_copy(tool, names, sent[-1].id)
        mark = outbox_mark(await store.identity(), names.stream)
        assert (copy.headers or {}).get(OUTBOX_HEADER) == mark
        assert broker.outbox_mark(name) == mark

        async def acked() -> bool:
            info = await tool.jetstream().consumer_info(
                names.stream, names.outside("invoice.approved"))
            done: bool = info.delivered.stream_seq == 5 and info.num_ack_pending == 0
            return done

        await eventually(acked, what="the relay's 5 copies acked")
        assert [i for i in store.looked_up if i in {e.id for e in sent}] == []

        # an old relay's copy of one of them, as an upgrade may leave in flight
        legacy = {k: v for k, v in (copy.headers or {}).items() if k != "Nats-Msg-Id"}
        assert copy.data is not None
        with caplog.at_level(logging.WARNING, logger="cantata"):
            await tool.jetstream().publish(
                names.event("invoice.approved"), copy.data, stream=names.stream,
                headers={**legacy, OUTBOX_HEADER: "1", "Nats-Msg-Id": "legacy-copy"})

            async def read() -> bool:
                return sent[-1].id in store.looked_up

            await eventually(read, what="the old relay's copy read")

            async def legacy_acked() -> bool:
                info = await tool.jetstream().consumer_info(
                    names.stream, names.outside("invoice.approved"))
                done: bool = info.delivered.stream_seq == 6 and info.num_ack_pending == 0
                return done

            await eventually(legacy_acked, what="the old relay's copy acked")
        found = await store.find_events(name, "invoice.approved", since=0.0, exclude=[],
                                        limit=20)
        assert sorted(e.id for e in found) == sorted(e.id for e in sent)
        assert "reusing event id" not in caplog.text
