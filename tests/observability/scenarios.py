"""An order system driven through both styles and broken in different places.

``populate(url)`` fills a store with one business transaction per situation and
returns their correlation ids:

- ``compensated``: the saga's charge is declined; reserve is compensated.
- ``retried``: the charge meets a gateway hiccup once, then the order ships.
- ``hybrid``: an event starts the saga (``start_on``); the run emits
  ``order.shipped``, which the notifications service handles.
- ``dead``: choreography; the payment service fails for good on
  ``inventory.reserved`` (dead letter).
- ``unhandled``: ``order.placed`` reaches the ``audit`` group, declared by a service
  that never runs, so its delivery stays pending.
- ``waiting``: a run waits for ``invoice.approved``, which never comes.
- ``comp_failed``: shipping fails, and the refund compensating the charge fails too.
- ``pending``: a run of a workflow only a non-serving service declares.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cantata
from cantata import App, HandlerContext, Retry, WorkflowContext, WorkflowError
from tests.helpers import eventually, make_app

FAST = Retry(max_attempts=2, initial_interval=0.01, backoff=1.0, max_interval=0.02)


class PaymentDeclined(ValueError):
    """The card was declined (not retried)."""


def shop_app(store: str) -> App:
    """The serving app: a saga, a waiting workflow, and choreographed services."""
    app = make_app(store)

    @app.step
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": order["id"]}

    @app.step
    async def release(order: dict[str, Any]) -> None:
        return None

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01,
                          non_retryable=(PaymentDeclined,)))
    async def charge(order: dict[str, Any]) -> dict[str, Any]:
        if order.get("decline"):
            raise PaymentDeclined(f"card of order {order['id']} declined")
        if order.get("flaky") and cantata.step_info().attempt == 1:
            raise ConnectionError("payment gateway timed out")
        return {"charged": order["id"]}

    @app.step(retry=FAST)
    async def refund(order: dict[str, Any]) -> None:
        if order.get("refund_breaks"):
            raise RuntimeError("refund API is down")

    @app.step(retry=FAST)
    async def ship(order: dict[str, Any]) -> dict[str, Any]:
        if order.get("ship_breaks"):
            raise RuntimeError("carrier rejected the parcel")
        return {"tracking": f"TRK-{order['id']}"}

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.run(reserve, order, compensate=release)
        await ctx.run(charge, order, compensate=refund)
        shipment: dict[str, Any] = await ctx.run(ship, order)
        await ctx.emit("order.shipped", {"order_id": order["id"], **shipment})
        return shipment

    @app.workflow
    async def invoice_order(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        await ctx.emit("invoice.requested", {"order_id": order["id"]})
        await ctx.wait_for_event("invoice.approved", match={"order_id": order["id"]},
                                 timeout=3600)
        return "invoiced"

    @app.on("order.placed", group="inventory", emits=["inventory.reserved"])
    async def reserve_stock(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("inventory.reserved", dict(event.data))

    @app.on("inventory.reserved", group="payment", retry=FAST, emits=["payment.charged"])
    async def take_payment(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        if event.data.get("card") == "bad":
            raise RuntimeError(f"card of order {event.data['order_id']} declined")
        await ctx.emit("payment.charged", {"order_id": event.data["order_id"]})

    @app.on("order.shipped", group="notifications")
    async def notify(event: cantata.Event[Any]) -> None:
        return None

    app.start_on("order.approved", place_order)
    return app


def absent_service(store: str) -> App:
    """A service of the same system that declares things but never runs a worker."""
    app = make_app(store)

    @app.on("order.placed", group="audit")
    async def audit(event: cantata.Event[Any]) -> None:  # pragma: no cover - never runs
        return None

    @app.workflow
    async def restock(ctx: WorkflowContext, sku: str) -> None:  # pragma: no cover
        return None

    return app


@dataclass
class Scenario:
    """Correlation ids of the transactions ``populate`` made."""

    url: str
    ids: dict[str, str]

    def copy(self, folder: Path) -> str:
        """A private copy of the store (for tests that declare things in it)."""
        target = folder / "copy.db"
        with sqlite3.connect(self.url.removeprefix("sqlite:///")) as src, \
                sqlite3.connect(target) as dst:
            src.backup(dst)
        return f"sqlite:///{target}"


async def _settled(app: App, cid: str, statuses: dict[str, str]) -> bool:
    """True once every group named in ``statuses`` reached that delivery status."""
    records = await app.store.trace_records(app.name, cid, limit=1000)
    got = {d.group: d.status for d in records.deliveries}
    return all(got.get(g) == s for g, s in statuses.items())


async def populate(url: str) -> Scenario:
    """Drive every situation into the store at ``url`` and return their ids."""
    ids: dict[str, str] = {}
    absent = absent_service(url)
    shop = shop_app(url)
    async with absent.client(), shop:
        async def saga(key: str, order: dict[str, Any]) -> None:
            handle = await shop.start("place_order", order)
            ids[key] = handle.run_id
            with contextlib.suppress(WorkflowError):
                await handle.result(timeout=10)

        await saga("compensated", {"id": 1, "decline": True})
        await saga("retried", {"id": 2, "flaky": True})
        await saga("comp_failed", {"id": 7, "ship_breaks": True, "refund_breaks": True})

        approved = await shop.publish("order.approved", {"id": 3})
        ids["hybrid"] = approved.id
        await eventually(lambda: _settled(shop, approved.id, {
            "start:place_order": "done", "notifications": "done"}))

        dead = await shop.publish("order.placed", {"order_id": 4, "card": "bad"})
        ids["dead"] = dead.id
        await eventually(lambda: _settled(shop, dead.id, {"payment": "dead"}))

        placed = await shop.publish("order.placed", {"order_id": 5})
        ids["unhandled"] = placed.id
        await eventually(lambda: _settled(shop, placed.id, {"payment": "done"}))

        waiting = await shop.start("invoice_order", {"id": 6})
        ids["waiting"] = waiting.run_id

        async def waits() -> bool:
            history = await shop.store.load_history(shop.name, waiting.run_id)
            return any(e.kind == "wait" and e.status == "waiting" for e in history)

        await eventually(waits)
        pending = await absent.start("restock", "sku-9")
        ids["pending"] = pending.run_id
    return Scenario(url, ids)


def example() -> App:
    """``tests.observability.scenarios:example`` for the CLI (store from ``$CANTATA_STORE``)."""
    return shop_app(os.environ.get("CANTATA_STORE", "memory://"))
