"""The payments service: charges cards, as a step and as a reaction to events."""

from __future__ import annotations

import cantata
from cantata import Event, HandlerContext, Retry, Router

from .services import PaymentDeclined, gateway_flaky, payment_declined

router = Router(service="payments")
RETRY = Retry(max_attempts=3, initial_interval=0.05, non_retryable=(PaymentDeclined,))


@router.step(retry=RETRY)
async def charge(order: dict) -> dict:
    """Orchestrated: charge the card (``payments.charge``), idempotently."""
    info = cantata.step_info()
    if gateway_flaky(order["id"], info.attempt):
        raise ConnectionError("payment gateway timed out")
    if payment_declined(order["id"]):
        raise PaymentDeclined(f"card of order {order['id']} declined")
    return {"order_id": order["id"], "charge_id": info.idempotency_key}


@router.step
async def refund(order: dict) -> None:
    """Compensation of ``payments.charge``."""


@router.on("inventory.reserved", group="payments", retry=RETRY,
           emits=["payment.charged", "payment.failed"])
async def on_stock_reserved(event: Event, ctx: HandlerContext) -> None:
    """Choreographed: reserved stock is paid for, or the payment fails."""
    order_id = event.data["order_id"]
    if gateway_flaky(order_id, ctx.attempt):
        raise ConnectionError("payment gateway timed out")
    if payment_declined(order_id):
        await ctx.emit("payment.failed", {"order_id": order_id, "reason": "card declined"})
    else:
        await ctx.emit("payment.charged", {"order_id": order_id})
