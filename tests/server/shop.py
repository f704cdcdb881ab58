"""The app the console tests drive: an order saga that compensates when a card is
declined, an order that waits (to cancel), an invoice that fails while billing is down
(to retry and fork; it sets search attributes), and an email handler that can be broken
and fixed (to make and replay dead letters)."""

from __future__ import annotations

import asyncio
from typing import Any

from cantata import App, Event, Retry


def make_shop(store: str, *, name: str = "shop", state: dict[str, Any] | None = None,
              audit_key: str | None = None, broker: str = "embedded") -> App:
    """A shop app on ``store`` (its events on ``broker``); ``state["emails_broken"]``
    makes the email handler fail, ``state["billing_down"]`` the invoice's ``bill`` step
    (``state["billing_gate"]``, a ``threading.Event``: it waits until that is set)."""
    flags: dict[str, Any] = state if state is not None else {"emails_broken": False}
    app = App(name, store=store, broker=broker, poll_interval=0.05, lease=5.0,
              audit_key=audit_key)

    @app.step
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": order["id"]}

    @app.step
    async def release(order: dict[str, Any]) -> None:
        return None

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def charge(order: dict[str, Any]) -> dict[str, Any]:
        if order.get("card") == "declined":
            raise ValueError(f"card declined for order {order['id']}: {order.get('note', '')}")
        return {"charged": order.get("total", 0)}

    @app.step
    async def refund(order: dict[str, Any]) -> None:
        return None

    @app.step
    async def ship(order: dict[str, Any]) -> dict[str, Any]:
        return {"shipped": order["id"]}

    @app.workflow
    async def place_order(ctx: Any, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.run(reserve, order, compensate=release)
        await ctx.run(charge, order, compensate=refund)
        await ctx.run(ship, order)
        return {"status": "shipped", "order": order["id"]}

    @app.workflow
    async def await_approval(ctx: Any, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.run(reserve, order, compensate=release)
        await ctx.wait_for_event("invoice.approved", match={"order_id": order["id"]},
                                 timeout=3600)
        return {"status": "approved"}

    @app.step(retry=Retry(max_attempts=1))
    async def bill(order: dict[str, Any]) -> dict[str, Any]:
        gate = flags.get("billing_gate")  # (a run seen while running: set from a test)
        if gate is not None:
            await asyncio.to_thread(gate.wait, 60)
        if flags.get("billing_down"):
            raise RuntimeError(f"the billing service is down (order {order['id']})")
        return {"billed": order.get("total", 0)}

    @app.workflow
    async def invoice(ctx: Any, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.set_attributes(customer=order.get("customer", "walk-in"), order=order["id"])
        await ctx.run(reserve, order)
        await ctx.run(bill, order)
        return {"status": "invoiced", "order": order["id"]}

    @app.on("order.placed", group="emails", retry=Retry(max_attempts=2, initial_interval=0.01))
    async def send_email(event: Event[Any], ctx: Any) -> None:
        if flags["emails_broken"]:
            raise RuntimeError("SMTP server refused the connection")
        await ctx.emit("email.sent", {"order_id": event.data.get("order_id")})

    return app
