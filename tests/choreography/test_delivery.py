"""Fan-out across groups, wildcards, exact-beats-wildcard, and the correlation chain."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

import cantata
from cantata import HandlerContext
from tests.choreography.helpers import SETTLE, events_of_type, eventually, make_app


async def test_chain_across_groups_with_a_wildcard_listener(store_url: str) -> None:
    app = make_app(store_url)
    seen: Counter[tuple[str, str]] = Counter()

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        seen["inventory", event.type] += 1
        await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        seen["payment", event.type] += 1
        await ctx.emit("payment.charged", {"order_id": event.data["order_id"]})

    @app.on("payment.charged", group="shipping")
    async def ship(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        seen["shipping", event.type] += 1
        await ctx.emit("order.shipped", {"order_id": event.data["order_id"]})

    @app.on("order.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None:  # a handler may omit ctx
        seen["audit", event.type] += 1

    async with app:
        await app.publish("order.placed", {"order_id": 42}, subject="order-42")
        await eventually(lambda: seen["audit", "order.shipped"], what="the chain to finish")
        await asyncio.sleep(SETTLE)

    assert seen == {
        ("inventory", "order.placed"): 1,
        ("payment", "inventory.reserved"): 1,
        ("shipping", "payment.charged"): 1,
        # the wildcard group sees both order.* events of the chain, and nothing else
        ("audit", "order.placed"): 1,
        ("audit", "order.shipped"): 1,
    }


async def test_every_group_gets_every_matching_event_once(store_url: str) -> None:
    app = make_app(store_url)
    got: dict[str, list[str]] = {"a": [], "b": [], "c": []}

    def recorder(group: str) -> Any:
        async def handle(event: cantata.Event[Any]) -> None:
            got[group].append(event.id)

        return handle

    app.on("order.placed", group="a")(recorder("a"))
    app.on("order.placed", group="b")(recorder("b"))
    app.on("order.*", group="c")(recorder("c"))

    async with app:
        ids = [(await app.publish("order.placed", {"n": n})).id for n in range(10)]
        await eventually(lambda: all(len(v) == 10 for v in got.values()))
        await asyncio.sleep(SETTLE)

    for group, received in got.items():
        assert sorted(received) == sorted(ids), group


@pytest.mark.parametrize("exact_first", [True, False])
async def test_exact_type_beats_wildcard_within_a_group(store_url: str, exact_first: bool) -> None:
    app = make_app(store_url)
    calls: list[tuple[str, str]] = []

    async def exact(event: cantata.Event[Any]) -> None:
        calls.append(("exact", event.type))

    async def wildcard(event: cantata.Event[Any]) -> None:
        calls.append(("wildcard", event.type))

    if exact_first:
        app.on("order.placed", group="g")(exact)
        app.on("order.*", group="g")(wildcard)
    else:
        app.on("order.*", group="g")(wildcard)
        app.on("order.placed", group="g")(exact)

    async with app:
        await app.publish("order.placed", {})
        await app.publish("order.cancelled", {})
        await eventually(lambda: len(calls) >= 2)
        await asyncio.sleep(SETTLE)

    assert sorted(calls) == [("exact", "order.placed"), ("wildcard", "order.cancelled")]


async def test_wildcard_matches_exactly_one_token(store_url: str) -> None:
    app = make_app(store_url)
    seen: list[str] = []

    @app.on("order.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None:
        seen.append(event.type)

    @app.on("order.line.added", group="lines")
    async def lines(event: cantata.Event[Any]) -> None:
        seen.append("lines:" + event.type)

    async with app:
        await app.publish("order.line.added", {})  # two tokens after "order": not order.*
        await app.publish("orders.placed", {})  # another first token
        await app.publish("order.placed", {})
        await eventually(lambda: "order.placed" in seen)
        await asyncio.sleep(SETTLE)

    assert sorted(seen) == ["lines:order.line.added", "order.placed"]


async def test_published_event_starts_its_own_correlation(store_url: str) -> None:
    app = make_app(store_url)
    async with app.client():
        ev = await app.publish("order.placed", {"order_id": 1}, subject="order-1")
    assert ev.correlation_id == ev.id
    assert ev.causation_id is None
    assert ev.subject == "order-1"
    assert ev.type == "order.placed"
    assert ev.data == {"order_id": 1}


async def test_handler_emits_carry_correlation_and_causation(store_url: str) -> None:
    app = make_app(store_url)
    received: dict[str, cantata.Event[Any]] = {}

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        received[event.type] = event
        await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        received[event.type] = event
        await ctx.emit("payment.charged", {"order_id": event.data["order_id"]})

    @app.on("payment.charged", group="shipping")
    async def ship(event: cantata.Event[Any]) -> None:
        received[event.type] = event

    async with app:
        placed = await app.publish("order.placed", {"order_id": 7}, correlation_id="tx-7")
        await eventually(lambda: "payment.charged" in received)

    assert placed.correlation_id == "tx-7"  # joined an existing business transaction
    assert placed.id != "tx-7"
    reserved, charged = received["inventory.reserved"], received["payment.charged"]
    assert received["order.placed"].id == placed.id
    assert received["order.placed"].correlation_id == "tx-7"
    assert reserved.correlation_id == charged.correlation_id == "tx-7"
    assert reserved.causation_id == placed.id
    assert charged.causation_id == reserved.id
    assert len({placed.id, reserved.id, charged.id}) == 3


async def test_handler_emit_keeps_subject_unless_given(store_url: str) -> None:
    app = make_app(store_url)
    got: dict[str, cantata.Event[Any]] = {}

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {})
        await ctx.emit("inventory.audited", {}, subject="audit-1")

    @app.on("inventory.*", group="sink")
    async def sink(event: cantata.Event[Any]) -> None:
        got[event.type] = event

    async with app:
        await app.publish("order.placed", {}, subject="order-9")
        await eventually(lambda: len(got) == 2)

    assert got["inventory.reserved"].subject == "order-9"
    assert got["inventory.audited"].subject == "audit-1"


async def test_sync_handler_runs_too(store_url: str) -> None:
    app = make_app(store_url)
    seen: list[Any] = []

    @app.on("order.placed", group="legacy")
    def legacy(event: cantata.Event[Any]) -> None:  # blocking code runs in a thread
        seen.append(event.data)

    async with app:
        await app.publish("order.placed", {"order_id": 3})
        await eventually(lambda: seen)
    assert seen == [{"order_id": 3}]


async def test_bad_publishes_are_refused_before_anything_is_stored(store_url: str) -> None:
    app = make_app(store_url)
    async with app.client():
        with pytest.raises(cantata.InvalidEvent, match=r"order\.placed"):
            await app.publish("order placed", {})
        with pytest.raises(cantata.InvalidEvent):
            await app.publish("order.*", {})  # a pattern is not an event type
        with pytest.raises(cantata.SerializationError, match=r"order\.placed"):
            await app.publish("order.placed", {"when": object()})
        for bad in ({"id": ""}, {"id": 7}, {"subject": 123}, {"subject": ""},
                    {"correlation_id": 5}, {"source": ""}):
            [name] = bad
            with pytest.raises(cantata.InvalidEvent, match=name):
                await app.publish("order.placed", {}, **bad)
        assert await events_of_type(app, "order.placed") == []


async def test_event_types_starting_with_replay_are_reserved(store_url: str) -> None:
    # NATS sends a group's dead-letter replays to <app subjects>._replay.<group>: a type
    # "_replay.billing" would land there, never reaching a group listening to it (the
    # embedded broker delivered it). Refused on every broker, so both behave the same.
    app = make_app(store_url)
    with pytest.raises(cantata.InvalidEvent, match="'_replay' is reserved"):
        app.on("_replay.billing", group="ops")
    with pytest.raises(cantata.InvalidEvent, match="'_replay' is reserved"):
        app.on("_replay.*", group="ops")
    with pytest.raises(cantata.InvalidEvent, match="'_replay' is reserved"):
        app.on("order.placed", group="ops", emits=["_replay.x"])
    with pytest.raises(cantata.InvalidEvent, match="'_replay' is reserved"):
        app.start_on("_replay.billing", "some_workflow")

    @app.on("*.billing", group="ops")  # a wildcard first token is fine
    async def ops(event: cantata.Event[Any]) -> None: ...

    async with app.client():
        with pytest.raises(cantata.InvalidEvent, match="'_replay' is reserved"):
            await app.publish("_replay.billing", {})
        await app.publish("replay._replay", {})  # only the first token is reserved
        assert await events_of_type(app, "_replay.billing") == []
