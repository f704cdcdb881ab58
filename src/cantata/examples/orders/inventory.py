"""The inventory service: serves stock steps and reacts to order events."""

from __future__ import annotations

from cantata import Event, HandlerContext, Router

router = Router(service="inventory")


@router.step
async def reserve(order: dict) -> dict:
    """Orchestrated: reserve the order's items (``inventory.reserve``)."""
    return {"order_id": order["id"], "reserved": order.get("items", 1)}


@router.step
async def release(order: dict) -> None:
    """Compensation of ``inventory.reserve``."""


@router.on("order.placed", group="inventory", emits=["inventory.reserved"])
async def on_order_placed(event: Event, ctx: HandlerContext) -> None:
    """Choreographed: a placed order reserves stock."""
    await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})


@router.on("payment.failed", group="inventory", emits=["inventory.released"])
async def on_payment_failed(event: Event, ctx: HandlerContext) -> None:
    """Choreographed compensation: a failed payment releases the stock."""
    await ctx.emit("inventory.released", {"order_id": event.data["order_id"]})
