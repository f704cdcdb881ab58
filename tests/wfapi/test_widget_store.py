"""The DBOS widget-store sample, ported: the checkout workflow publishes its payment id
and progress with ctx.set_value; the web client reads them with handle.get_value
instead of keeping (and polling) a table of its own."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import App, Retry, StepFailed, WorkflowContext

from .helpers import eventually, make_app, other_process


async def _is(handle: Any, key: str, expected: Any) -> bool:
    return bool(await handle.get_value(key) == expected)


def widget_store(store_url: str, stock: dict[str, int]) -> App:
    app = make_app(store_url)

    @app.step
    async def reserve_inventory(order: dict[str, Any]) -> None:
        if stock["widgets"] < order["qty"]:
            raise ValueError("out of stock")
        stock["widgets"] -= order["qty"]

    @app.step
    async def undo_reserve_inventory(order: dict[str, Any]) -> None:
        stock["widgets"] += order["qty"]

    @app.step(retry=Retry(max_attempts=1))
    async def fulfil(order: dict[str, Any]) -> str:
        return f"shipped {order['qty']}"

    @app.workflow
    async def checkout(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        await ctx.set_value("progress", "reserving")
        try:
            await ctx.run(reserve_inventory, order, compensate=undo_reserve_inventory)
        except StepFailed:
            await ctx.set_value("payment_id", None)
            return "out of stock"
        payment_id = f"pay-{ctx.uuid()}"
        await ctx.set_value("payment_id", payment_id)
        await ctx.set_value("progress", "awaiting payment")
        paid = await ctx.wait_for_event("payment.status", match={"payment_id": payment_id},
                                        timeout=60)
        if paid.data["status"] != "paid":
            await ctx.compensate()
            await ctx.set_value("progress", "cancelled")
            return "payment failed"
        await ctx.set_value("progress", "fulfilling")
        shipped = await ctx.run(fulfil, order)
        await ctx.set_value("progress", "done")
        return str(shipped)

    return app


@pytest.mark.parametrize("status", ["paid", "declined"])
async def test_widget_store_checkout(store_url: str, status: str) -> None:
    stock = {"widgets": 5}
    app = widget_store(store_url, stock)
    async with app:
        handle = await app.start("checkout", {"qty": 2})
        # The web server (any process) waits for the payment id to redirect the buyer.
        async with other_process(store_url) as web:
            reader = (web or app).get_handle(handle.run_id)
            payment_id = await reader.get_value("payment_id", wait=10)
            assert str(payment_id).startswith("pay-")
            await eventually(lambda: _is(reader, "progress", "awaiting payment"))
        assert stock["widgets"] == 3
        await app.publish("payment.status", {"payment_id": payment_id, "status": status})
        if status == "paid":
            assert await handle.result(timeout=20) == "shipped 2"
            assert await handle.get_value("progress") == "done"
            assert stock["widgets"] == 3
        else:
            from cantata import WorkflowCompensated

            with pytest.raises(WorkflowCompensated) as info:
                await handle.result(timeout=20)
            assert info.value.result == "payment failed"
            assert await handle.get_value("progress") == "cancelled"
            assert stock["widgets"] == 5  # the reservation was undone


async def test_widget_store_out_of_stock(store_url: str) -> None:
    app = widget_store(store_url, {"widgets": 1})
    async with app:
        handle = await app.start("checkout", {"qty": 2})
        assert await handle.get_value("payment_id", wait=10) is None
        assert await handle.result(timeout=20) == "out of stock"
