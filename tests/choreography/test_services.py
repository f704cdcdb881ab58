"""``App(services=[...])`` (``cantata worker --service``) serves only those services'
handler groups: a group is the reacting service (DESIGN §4), so a handler is served
when its group, or the service of the Router that declared it, is listed."""

from __future__ import annotations

import asyncio
from typing import Any

import cantata
from cantata import Router, RunStatus
from tests.choreography.helpers import SETTLE, eventually, make_app
from tests.saga.flows import build


def shop(url: str, ran: list[str], services: list[str] | None) -> cantata.App:
    app = make_app(url, services=services)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event) -> None:
        ran.append("inventory")

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event) -> None:
        ran.append("billing")

    return app


async def test_a_worker_runs_only_the_handler_groups_of_its_services(sqlite_url: str) -> None:
    ran: list[str] = []
    inventory = shop(sqlite_url, ran, ["inventory"])
    async with inventory:
        await inventory.publish("order.placed", {"order_id": 1})
        await eventually(lambda: "inventory" in ran, what="inventory to react")
        await asyncio.sleep(SETTLE)
        assert ran == ["inventory"]  # billing's delivery waits for a billing worker
        billing = shop(sqlite_url, ran, ["billing"])
        async with billing:
            await eventually(lambda: "billing" in ran, what="billing to react")
            await asyncio.sleep(SETTLE)
    assert sorted(ran) == ["billing", "inventory"]


async def test_without_services_a_worker_runs_every_group(store_url: str) -> None:
    ran: list[str] = []
    app = shop(store_url, ran, None)
    async with app:
        await app.publish("order.placed", {"order_id": 1})
        await eventually(lambda: len(ran) == 2, what="both groups to react")


async def test_a_routers_service_serves_its_handlers_whatever_their_group(
    sqlite_url: str,
) -> None:
    ran: list[str] = []
    app = make_app(sqlite_url, services=["warehouse"])
    router = Router(service="warehouse")

    @router.on("order.placed", group="stock-keeping")
    async def keep(event: cantata.Event) -> None:
        ran.append("stock-keeping")

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event) -> None:
        ran.append("billing")

    app.include(router)
    async with app:
        await app.publish("order.placed", {"order_id": 1})
        await eventually(lambda: ran, what="the warehouse's handler to react")
        await asyncio.sleep(SETTLE)
    assert ran == ["stock-keeping"]


async def test_a_choreographed_sagas_own_handlers_follow_its_workflow(sqlite_url: str) -> None:
    # Its steps declare no service: their handlers (and a parallel stage's join) are
    # served wherever the saga's workflow is, as an orchestrated step runs in its run.
    ledger: dict[str, Any] = {}
    app = make_app(sqlite_url, services=["orders"])
    build(app, "parallel", "choreographed", ledger)
    async with app:
        handle = await app.start("order", {"id": 1})
        result = await handle.result(timeout=20)
        assert (await handle.info()).status == RunStatus.COMPLETED
    assert set(result) == {"reserve", "stock", "fraud", "charge"}
