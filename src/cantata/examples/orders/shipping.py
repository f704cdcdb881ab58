"""The shipping service: ships paid orders."""

from __future__ import annotations

from cantata import Event, HandlerContext, Router

router = Router(service="shipping")


@router.step
async def ship(order: dict) -> dict:
    """Orchestrated: ship the order (``shipping.ship``)."""
    return {"order_id": order["id"], "tracking": f"TRK-{order['id']:05d}"}


@router.on("payment.charged", group="shipping", emits=["shipment.created"])
async def on_payment_charged(event: Event, ctx: HandlerContext) -> None:
    """Choreographed: a paid order is shipped."""
    order_id = event.data["order_id"]
    await ctx.emit("shipment.created", {"order_id": order_id, "tracking": f"TRK-{order_id:05d}"})
