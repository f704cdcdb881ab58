"""The same order flow as choreography: services react to each other's events.

order.placed → inventory.reserved → payment.charged → shipment.created;
a declined payment emits payment.failed, which the inventory service answers by
releasing the stock (inventory.released) and the order service by order.cancelled.
"""

from __future__ import annotations

from cantata import Event, HandlerContext, Retry, Router

from .services import gateway_flaky, payment_declined

router = Router()


@router.on("order.placed", group="inventory", emits=["inventory.reserved"])
async def reserve_stock(event: Event, ctx: HandlerContext) -> None:
    await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})


@router.on("payment.failed", group="inventory", emits=["inventory.released"])
async def release_stock(event: Event, ctx: HandlerContext) -> None:
    await ctx.emit("inventory.released", {"order_id": event.data["order_id"]})


@router.on(
    "inventory.reserved", group="payment", retry=Retry(max_attempts=3, initial_interval=0.05),
    emits=["payment.charged", "payment.failed"],
)
async def charge(event: Event, ctx: HandlerContext) -> None:
    order_id = event.data["order_id"]
    if gateway_flaky(order_id, ctx.attempt):
        raise ConnectionError("payment gateway timed out")
    if payment_declined(order_id):
        await ctx.emit("payment.failed", {"order_id": order_id, "reason": "card declined"})
    else:
        await ctx.emit("payment.charged", {"order_id": order_id})


@router.on("payment.charged", group="shipping", emits=["shipment.created"])
async def ship(event: Event, ctx: HandlerContext) -> None:
    order_id = event.data["order_id"]
    await ctx.emit("shipment.created", {"order_id": order_id, "tracking": f"TRK-{order_id:05d}"})


@router.on("inventory.released", group="orders", emits=["order.cancelled"])
async def cancel_order(event: Event, ctx: HandlerContext) -> None:
    await ctx.emit("order.cancelled", {"order_id": event.data["order_id"]})


@router.on("order.shipped", group="notifications")
async def notify_shipped(event: Event, ctx: HandlerContext) -> None:
    """The orchestrated saga's result reaches a choreographed service (the hybrid)."""


@router.on("shipment.created", group="notifications")
async def notify_shipment(event: Event, ctx: HandlerContext) -> None:
    """Tell the customer; nothing to do in the demo."""
