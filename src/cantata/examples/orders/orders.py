"""The orders service: orchestrates the saga, and closes choreographed orders.

The workflow commands the other services by step name: it does not import their
code, and each service may run in its own process (``cantata worker … --service``).
"""

from __future__ import annotations

from cantata import Event, HandlerContext, Router, WorkflowContext

router = Router(service="orders")


@router.workflow
async def place_order(ctx: WorkflowContext, order: dict) -> dict:
    """Reserve, charge, ship; a failure compensates what was done, in reverse."""
    await ctx.run("inventory.reserve", order, compensate="inventory.release")
    await ctx.run("payments.charge", order, compensate="payments.refund")
    shipment = await ctx.run("shipping.ship", order)
    await ctx.emit("order.shipped", {"order_id": order["id"], "tracking": shipment["tracking"]})
    return {"status": "shipped", "tracking": shipment["tracking"]}


@router.on("inventory.released", group="orders", emits=["order.cancelled"])
async def on_stock_released(event: Event, ctx: HandlerContext) -> None:
    """Choreographed: a released reservation cancels the order."""
    await ctx.emit("order.cancelled", {"order_id": event.data["order_id"]})


@router.on("order.shipped", group="orders")
async def on_order_shipped(event: Event) -> None:
    """The orchestrated saga's result reaches an event handler (the hybrid)."""


@router.on("shipment.created", group="orders")
async def on_shipment_created(event: Event) -> None:
    """Tell the customer; nothing to do in the demo."""
