"""Orphans: events nobody listens to are counted and logged, not silently lost."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import cantata
from tests.choreography.helpers import eventually, make_app


async def test_an_event_nobody_consumes_is_counted_and_logged(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store_url)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None: ...

    async with app:
        with caplog.at_level(logging.WARNING, logger="cantata"):
            ev = await app.publish("order.refunded", {"order_id": 1})
            await app.publish("order.refunded", {"order_id": 2})
        assert app.metrics.orphans == {"order.refunded": 2}

    messages = [r.getMessage() for r in caplog.records if "orphan" in r.getMessage()]
    assert len(messages) == 1  # loud once per type; the count keeps the tally
    assert "order.refunded" in messages[0] and ev.id in messages[0]


async def test_consumed_types_are_not_orphans(store_url: str) -> None:
    app = make_app(store_url)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None: ...

    @app.on("payment.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None: ...

    @app.workflow
    async def fulfil(ctx: cantata.WorkflowContext, order: dict[str, int]) -> None: ...

    app.start_on("order.shipped", fulfil)

    async with app:
        await app.publish("order.placed", {})
        await app.publish("payment.charged", {})
        await app.publish("order.shipped", {})
        assert app.metrics.orphans == {}


async def test_a_handler_declared_by_another_service_counts(sqlite_url: str) -> None:
    inventory = make_app(sqlite_url)

    @inventory.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None: ...

    api = make_app(sqlite_url)  # same system, no handlers of its own
    async with inventory, api.client():
        await api.publish("order.placed", {})
        assert api.metrics.orphans == {}
        await api.publish("order.lost", {})
        assert api.metrics.orphans == {"order.lost": 1}


async def test_a_type_a_running_wait_declares_is_not_an_orphan(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: cantata.WorkflowContext) -> str:
        ev = await ctx.wait_for_event("invoice.approved", timeout=10)
        return str(ev.data["by"])

    async with app:
        handle = await app.start(approve)
        await eventually(lambda: _declares_wait(app), what="the wait to be declared")
        await app.publish("invoice.approved", {"by": "ada"})
        assert await handle.result(timeout=10) == "ada"
        assert app.metrics.orphans == {}


async def _declares_wait(app: cantata.App) -> bool:
    return any(d.kind == "wait" for d in await app.store.declarations(app.name))


async def test_a_handler_emitting_a_type_nobody_consumes_is_an_orphan(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(store_url)
    done: list[int] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {})  # nobody listens: lost in silence
        await ctx.emit("order.audited", {})  # the audit group listens
        done.append(1)

    @app.on("order.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None: ...

    async with app:
        with caplog.at_level(logging.WARNING, logger="cantata"):
            await app.publish("order.placed", {})
            await eventually(lambda: app.metrics.orphans, what="the orphan to be counted")
        assert app.metrics.orphans == {"inventory.reserved": 1}
    assert any("inventory.reserved" in r.getMessage() for r in caplog.records)


async def test_a_workflow_emitting_a_type_nobody_consumes_is_an_orphan(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def fulfil(ctx: cantata.WorkflowContext) -> None:
        await ctx.emit("order.fulfilled", {})

    async with app:
        await (await app.start(fulfil)).result(timeout=10)
        assert app.metrics.orphans == {"order.fulfilled": 1}


def test_the_types_a_router_matches_are_worked_out_anew_as_it_declares_more() -> None:
    from cantata.choreography.orphans import _local_types
    from cantata.declare.router import Router

    router = Router()
    assert not _local_types(router).known("order.refunded")
    router.waits.add(("refunds", "order.refunded"))  # (a wait declared later)
    assert _local_types(router).known("order.refunded")
    assert not _local_types(Router()).known("order.refunded")  # (per router)


async def test_orphans_reported_at_once_read_the_declarations_once(store_url: str) -> None:
    app = make_app(store_url)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None: ...

    async with app:
        store = app.store
        read = store.declarations
        reads = 0

        async def counted(name: str) -> list[Any]:
            nonlocal reads
            reads += 1
            return await read(name)

        store.declarations = counted  # type: ignore[method-assign, assignment]
        # (a burst: each check finds the brief cache empty while the first read runs)
        await asyncio.gather(*(app.publish("order.refunded", {"n": n}) for n in range(20)))
        assert app.metrics.orphans == {"order.refunded": 20}
        assert reads == 1
