"""The app the console tests drive: an order saga that compensates when a card is
declined, an order that waits (to cancel), and an email handler that can be broken
and fixed (to make and replay dead letters)."""

from __future__ import annotations

from typing import Any

from cantata import App, Event, Retry


def make_shop(store: str, *, name: str = "shop", state: dict[str, Any] | None = None,
              audit_key: str | None = None) -> App:
    """A shop app on ``store``; ``state["emails_broken"]`` makes the email handler fail."""
    flags = state if state is not None else {"emails_broken": False}
    app = App(name, store=store, broker="embedded", poll_interval=0.05, lease=5.0,
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

    @app.on("order.placed", group="emails", retry=Retry(max_attempts=2, initial_interval=0.01))
    async def send_email(event: Event[Any], ctx: Any) -> None:
        if flags["emails_broken"]:
            raise RuntimeError("SMTP server refused the connection")
        await ctx.emit("email.sent", {"order_id": event.data.get("order_id")})

    return app
