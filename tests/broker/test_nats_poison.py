"""Poison isolation on NATS: an event the server refuses never blocks the others.

A type too long for the server's control line, or a message over its max_payload, is
refused where it is made (nothing stored); one that reaches the outbox anyway (stored
by an older version, or by a process on another broker) is dead-lettered with the
server's reason while every later event is delivered.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from cantata import App, ConfigurationError, Event, InvalidEvent, PayloadTooLarge
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats

LONG_TYPE = "order." + "x" * 10_000


def shop(name: str, store: str, url: str, handled: list[str], **broker: Any) -> App:
    app = App(name, store=store, broker=nats_broker(url, **broker), poll_interval=0.05)

    @app.on("order.*", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    return app


async def test_publish_refuses_what_the_server_would_refuse_before_storing_it(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("poison")
    # (a server configured with a short control line: a type within Cantata's own bound
    # of 500 characters that its subject does not fit)
    app = shop(name, f"sqlite:///{tmp_path}/a.db", nats_url, [], max_control_line=512)
    async with streams_removed(nats_url, name), app.client():
        with pytest.raises(InvalidEvent, match="control line"):
            await app.publish("order." + "x" * 480, {"n": 1})
        with pytest.raises(InvalidEvent, match="'type' is 10006 characters long"):
            await app.publish(LONG_TYPE, {"n": 1})
        with pytest.raises(PayloadTooLarge, match="max_payload of 1048576 bytes"):
            await app.publish("order.placed", {"blob": "x" * 1_100_000})
        # within the app's max_payload, over the server's once in its envelope: the
        # message says how to send it all the same (a claim check)
        with pytest.raises(PayloadTooLarge, match=r"as a NATS message.*offload_above"):
            await app.publish("order.placed", "x" * 1_048_500)
        assert await app.store.unpublished_events(name, limit=10) == []
        assert await app.store.apps() in ([], [name])
        ok = await app.publish("order.placed", {"blob": "x" * 1000})
        assert await app.store.get_event(name, ok.id) is not None


async def test_refused_events_are_dead_lettered_and_later_events_delivered(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("poison")
    handled: list[str] = []
    app = shop(name, f"sqlite:///{tmp_path}/a.db", nats_url, handled)
    async with streams_removed(nats_url, name), app:
        # Stored behind the broker's back (as by an older Cantata): they reach the relay.
        long_type = Event(type=LONG_TYPE, data={"n": 0})
        too_big = Event(type="order.placed", data={"blob": "x" * 1_100_000})
        await app.store.append_events(name, [long_type, too_big])
        later = [await app.publish("order.placed", {"n": i}) for i in range(10)]
        await eventually(lambda: len(handled) >= 10, what="the 10 later events handled")
        assert sorted(handled) == sorted(e.id for e in later)
        letters = await eventually(
            lambda: _dead(app), what="both refused events dead-lettered"
        )
        by_event = {d.event.id: d for d in letters}
        assert set(by_event) == {long_type.id, too_big.id}
        assert all(d.group == "billing" for d in letters)
        assert "control line" in by_event[long_type.id].error
        assert "max_payload" in by_event[too_big.id].error
        # The relay marks what the broker took in batches, moments later.
        await eventually(
            lambda: _outbox_empty(app, name), what="the outbox empty"
        )


async def _outbox_empty(app: App, name: str) -> bool:
    return await app.store.unpublished_events(name, limit=10) == []


async def _dead(app: App) -> Any:
    letters = await app.dead_letters()
    return letters if len(letters) >= 2 else None


async def test_a_handler_emitting_an_oversized_event_fails_alone(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("poison")
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=nats_broker(nats_url),
              poll_interval=0.05)
    shipped: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any], ctx: Any) -> None:
        size = 1_100_000 if event.data["n"] == 0 else 10
        await ctx.emit("invoice.sent", {"blob": "x" * size})

    @app.on("invoice.sent", group="shipping")
    async def ship(event: Event[Any]) -> None:
        shipped.append(event.id)

    async with streams_removed(nats_url, name), app:
        for i in range(4):
            await app.publish("order.placed", {"n": i})
        await eventually(lambda: len(shipped) == 3, what="3 invoices shipped")
        letters = await eventually(app.dead_letters, what="the oversized emit dead-lettered")
        assert [d.group for d in letters] == ["billing"]
        assert "PayloadTooLarge" in letters[0].error


@pytest.mark.parametrize("group, pattern, message", [
    ("g" * 10_000, "order.placed", "group name of 10000 characters"),
    ("billing", "order." + "x" * 10_000, "pattern of 10006 characters is too long"),
], ids=["long-group", "long-pattern"])
async def test_names_the_server_cannot_take_fail_at_start_up(
    nats_url: str, tmp_path: Path, group: str, pattern: str, message: str
) -> None:
    name = app_name("poison")
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=nats_broker(nats_url))

    @app.on(pattern, group=group)
    async def handle(event: Event[Any]) -> None:
        pass

    started = time.monotonic()
    async with streams_removed(nats_url, name):
        with pytest.raises(ConfigurationError, match=message):
            async with app:
                pass
    assert time.monotonic() - started < 10
