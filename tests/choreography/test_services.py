"""``App(services=[...])`` (``cantata worker --service``) serves only those services'
handler groups: a group is the reacting service (docs/guide.md §3), so a handler is served
when its group, or the service of the Router that declared it, is listed."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cantata
from cantata import Router, RunStatus
from tests.choreography.helpers import SETTLE, eventually, make_app
from tests.saga.flows import build


def shop(url: str, ran: list[str], services: list[str] | None) -> cantata.App:
    app = make_app(url, services=services)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None:
        ran.append("inventory")

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event[Any]) -> None:
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
    async def keep(event: cantata.Event[Any]) -> None:
        ran.append("stock-keeping")

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event[Any]) -> None:
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


@pytest.mark.parametrize(("services", "message"), [
    ("inventory", "services must be a list of service or group names, not one string: "
                  "services=\\['inventory'\\]"),
    (["inventory", ""], "services: '' is no service or handler group name"),
    (["inventory", 42], "services: 42 is no service or handler group name"),
    ([None], "services: None is no service or handler group name"),
    (["inv\x00entory"], "services: 'inv\\\\x00entory' holds a NUL"),
    (["inv\ud800"], "services: 'inv\\\\ud800' holds a lone surrogate"),
    (42, "services must be a list of service or group names, got int 42"),
])
def test_services_that_name_no_service_or_group_are_refused(
        services: Any, message: str) -> None:
    with pytest.raises(cantata.ConfigurationError, match=message):
        make_app("memory://", services=services)


def test_services_take_every_service_and_handler_group_name() -> None:
    """A service name (letters, digits, '-', '_') or any handler group's name: a group
    may hold dots and spaces."""
    names = ["inventory", "billing-v2", "shop.emails", "Emails Team", "x" * 300]
    app = make_app("memory://", services=iter(names))
    assert app.services == frozenset(names)
    for group in names:
        app.on("order.placed", group=group)(lambda event: None)


@pytest.mark.parametrize("group", ["", "inv\x00entory", "inv\ud800", 42])
def test_a_handler_group_that_no_store_keeps_is_refused_where_it_is_declared(
        group: Any) -> None:
    app = make_app("memory://")
    with pytest.raises(cantata.RegistrationError, match="group"):
        app.on("order.placed", group=group)(lambda event: None)
