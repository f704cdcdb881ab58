"""Steps in other services: tasks in the store, served by that service's workers."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, Retry

from .helpers import eventually, make_app


def orders_app(url: str) -> App:
    app = make_app(url, services=["orders"])

    @app.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict) -> Any:
        reserved = await ctx.run("inventory.reserve", order, compensate="inventory.release")
        charged = await ctx.run(app.remote_step("payments.charge"), order)
        return {"reserved": reserved, "charged": charged}

    return app


def inventory_app(url: str, log: list[Any]) -> App:
    app = make_app(url, services=["inventory"])

    @app.step(service="inventory")
    async def reserve(order: dict) -> dict:
        info = cantata.step_info()
        log.append(("reserve", info.attempt, info.idempotency_key))
        if order.get("flaky") and info.attempt == 1:
            raise ConnectionError("db blip")
        return {"sku": order["sku"]}

    @app.step(service="inventory")
    def release(order: dict) -> None:
        log.append(("release",))

    return app


def payments_app(url: str, log: list[Any]) -> App:
    app = make_app(url, services=["payments"])

    @app.step(service="payments", retry=Retry(max_attempts=2, initial_interval=0.01,
                                              non_retryable=(ValueError,)))
    async def charge(order: dict) -> str:
        log.append(("charge", cantata.step_info().attempt))
        if order.get("decline"):
            raise ValueError("card declined")
        return "ch_1"

    return app


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shop.db"


async def test_a_workflow_runs_steps_of_two_other_services(url: str) -> None:
    log: list[Any] = []
    orders, inventory, payments = orders_app(url), inventory_app(url, log), payments_app(url, log)
    async with inventory, payments, orders:
        handle = await orders.start("place_order", {"sku": "A", "flaky": True})
        assert await handle.result(timeout=10) == {"reserved": {"sku": "A"}, "charged": "ch_1"}
        attempts = await orders.store.load_attempts(orders.name, handle.run_id)
        history = await orders.store.load_history(orders.name, handle.run_id)
    assert [x[:2] for x in log] == [("reserve", 1), ("reserve", 2), ("charge", 1)]
    assert log[0][2] == log[1][2] == f"{handle.run_id}:inventory.reserve#1"
    assert [(a.key, a.attempt, a.error_type) for a in attempts][:2] == [
        ("inventory.reserve#1", 1, "ConnectionError"), ("inventory.reserve#1", 2, None)]
    assert [(e.key, e.status, e.attempts) for e in history] == [
        ("inventory.reserve#1", "completed", 2), ("payments.charge#1", "completed", 1)]


async def test_remote_failure_compensates_through_the_other_service(url: str) -> None:
    log: list[Any] = []
    orders, inventory, payments = orders_app(url), inventory_app(url, log), payments_app(url, log)
    async with inventory, payments, orders:
        handle = await orders.start("place_order", {"sku": "B", "decline": True})
        with pytest.raises(cantata.WorkflowCompensated, match="ValueError: card declined"):
            await handle.result(timeout=10)
    assert [x[0] for x in log] == ["reserve", "charge", "release"]


async def test_a_service_that_is_down_leaves_the_task_pending_then_it_runs(url: str) -> None:
    log: list[Any] = []
    orders, inventory = orders_app(url), inventory_app(url, log)
    async with inventory.client():  # declares inventory's steps, serves nothing
        pass
    async with orders:
        handle = await orders.start("place_order", {"sku": "C"})
        await asyncio.sleep(0.5)
        assert log == [] and await handle.status() == "running"
        tasks = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert [(t.service, t.status) for t in tasks] == [("inventory", "pending")]
        payments = payments_app(url, log)
        async with inventory, payments:
            assert await handle.result(timeout=10) == {"reserved": {"sku": "C"},
                                                       "charged": "ch_1"}


async def test_calling_a_step_nobody_declared_is_a_clear_error(url: str) -> None:
    app = make_app(url)

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> None:
        await ctx.run("warehouse.pick", {})

    async with app:
        handle = await app.start(wf)
        with pytest.raises(cantata.WorkflowFailed, match=r"UnknownStep.*warehouse\.pick"):
            await handle.result(timeout=5)


async def test_a_stub_can_wait_for_a_service_that_never_started(url: str) -> None:
    app = make_app(url)
    pick = app.remote_step("warehouse.pick", wait_for_service=True)

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> Any:
        return await ctx.run(pick, {"sku": "D"})

    async with app:
        handle = await app.start(wf)
        await eventually(lambda: _pending(app, handle.run_id))
        warehouse = make_app(url, services=["warehouse"])

        @warehouse.step(service="warehouse", name="pick")
        async def pick_impl(order: dict) -> str:
            return "picked"

        async with warehouse:
            assert await handle.result(timeout=10) == "picked"


async def _pending(app: App, run_id: str) -> bool:
    return bool(await app.store.tasks_of_run(app.name, run_id))
