"""The order saga under central control: one workflow commands every step."""

from __future__ import annotations

import cantata
from cantata import Retry, Router

from .services import PaymentDeclined, gateway_flaky, payment_declined

router = Router()


@router.step
async def reserve_inventory(order: dict) -> dict:
    return {"order_id": order["id"], "reserved": order.get("items", 1)}


@router.step
async def release_inventory(order: dict) -> None:
    return None


@router.step(retry=Retry(max_attempts=3, initial_interval=0.05, non_retryable=(PaymentDeclined,)))
async def charge_payment(order: dict) -> dict:
    info = cantata.step_info()
    if gateway_flaky(order["id"], info.attempt):
        raise ConnectionError("payment gateway timed out")
    if payment_declined(order["id"]):
        raise PaymentDeclined(f"card of order {order['id']} declined")
    return {"order_id": order["id"], "charge_id": info.idempotency_key}


@router.step
async def refund_payment(order: dict) -> None:
    return None


@router.step
async def ship_order(order: dict) -> dict:
    return {"order_id": order["id"], "tracking": f"TRK-{order['id']:05d}"}


@router.workflow
async def place_order(ctx: cantata.WorkflowContext, order: dict) -> dict:
    """Reserve, charge, ship; a failure compensates what was done, in reverse."""
    await ctx.run(reserve_inventory, order, compensate=release_inventory)
    await ctx.run(charge_payment, order, compensate=refund_payment)
    shipment = await ctx.run(ship_order, order)
    await ctx.emit("order.shipped", {"order_id": order["id"], "tracking": shipment["tracking"]})
    return {"status": "shipped", "tracking": shipment["tracking"]}
