"""The transactional outbox: a handler's emits are committed only with its success."""

from __future__ import annotations

import asyncio
from typing import Any

import cantata
from cantata import HandlerContext, Retry
from tests.choreography.helpers import FAST, SETTLE, events_of_type, eventually, make_app


async def test_emits_of_a_failed_attempt_are_never_seen(store_url: str) -> None:
    app = make_app(store_url)
    downstream: list[cantata.Event[Any]] = []
    attempts: list[int] = []

    @app.on("order.placed", group="inventory", retry=Retry(max_attempts=1))
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        attempts.append(1)
        await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})
        raise RuntimeError("stock service down")

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any]) -> None:
        downstream.append(event)

    async with app:
        await app.publish("order.placed", {"order_id": 1})
        await eventually(app.dead_letters, what="the failure to be dead-lettered")
        await asyncio.sleep(SETTLE)
        assert await events_of_type(app, "inventory.reserved") == []

    assert attempts == [1]
    assert downstream == []


async def test_only_the_successful_attempts_emits_are_delivered_once(store_url: str) -> None:
    app = make_app(store_url)
    downstream: list[cantata.Event[Any]] = []
    emitted_ids: list[str] = []

    @app.on("order.placed", group="inventory", retry=Retry(max_attempts=5, initial_interval=0.01))
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        attempt = len(emitted_ids) + 1
        sent = await ctx.emit("inventory.reserved", {"attempt": attempt})
        emitted_ids.append(sent.id)
        if attempt < 3:
            raise RuntimeError(f"flaky #{attempt}")

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any]) -> None:
        downstream.append(event)

    async with app:
        await app.publish("order.placed", {"order_id": 1})
        await eventually(lambda: downstream, what="the successful attempt's emit")
        await asyncio.sleep(SETTLE)
        logged = await events_of_type(app, "inventory.reserved")
        assert await app.dead_letters() == []

    assert len(emitted_ids) == 3
    assert [e.data for e in downstream] == [{"attempt": 3}]
    assert [e.id for e in downstream] == [emitted_ids[2]]
    assert [e.id for e in logged] == [emitted_ids[2]]


async def test_emits_wait_for_the_handler_to_finish(store_url: str) -> None:
    app = make_app(store_url)
    release = asyncio.Event()
    downstream: list[str] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {})
        await release.wait()  # the emit is buffered while the handler is still running

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any]) -> None:
        downstream.append(event.type)

    async with app:
        await app.publish("order.placed", {})
        await asyncio.sleep(SETTLE)
        assert downstream == []
        assert await events_of_type(app, "inventory.reserved") == []
        release.set()
        await eventually(lambda: downstream)


async def test_emits_of_an_eventually_dead_lettered_handler_never_leak(store_url: str) -> None:
    app = make_app(store_url)
    downstream: list[str] = []
    calls: list[int] = []

    @app.on("order.placed", group="inventory", retry=FAST)
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        calls.append(1)
        await ctx.emit("inventory.reserved", {"n": len(calls)})
        await ctx.emit("inventory.audited", {"n": len(calls)})
        raise ValueError("always")

    @app.on("inventory.*", group="payment")
    async def charge(event: cantata.Event[Any]) -> None:
        downstream.append(event.type)

    async with app:
        await app.publish("order.placed", {})
        await eventually(app.dead_letters)
        await asyncio.sleep(SETTLE)
        assert await events_of_type(app, "inventory.reserved") == []
        assert await events_of_type(app, "inventory.audited") == []

    assert len(calls) == FAST.max_attempts
    assert downstream == []
