"""The benchmark's Cantata application: the order saga and the choreographed chain.

Its own module (not the demo's): trivial step bodies from ``bench.common`` and the
benchmark's failure rule (every 10th payment fails for good), no flaky gateway.
"""

from __future__ import annotations

import os
from typing import Any

from bench.common import (
    PaymentError,
    charge_payment_fn,
    create_shipment_fn,
    fails,
    release_inventory_fn,
    reserve_inventory_fn,
)
from cantata import App, Event, HandlerContext, Retry, Router, WorkflowContext

# -- orchestration: one saga workflow, three steps and one compensation -------------------

saga = Router()


@saga.step
async def reserve_inventory(order: int) -> dict[str, Any]:
    return reserve_inventory_fn(order)


@saga.step
async def release_inventory(order: int) -> dict[str, Any]:
    return release_inventory_fn(order)


@saga.step(retry=Retry(non_retryable=(PaymentError,)))
async def charge_payment(order: int) -> dict[str, Any]:
    return charge_payment_fn(order)


@saga.step
async def create_shipment(order: int) -> dict[str, Any]:
    return create_shipment_fn(order)


@saga.workflow
async def order_saga(ctx: WorkflowContext, order: int) -> str:
    """reserve -> charge -> ship; a declined payment releases the reservation and the run
    ends COMPENSATED (``handle.result()`` raises ``WorkflowCompensated``)."""
    await ctx.run(reserve_inventory, order, compensate=release_inventory)
    await ctx.run(charge_payment, order)
    await ctx.run(create_shipment, order)
    return "completed"


# -- choreography: services reacting to each other's events -------------------------------
# order.placed -> inventory.reserved -> payment.charged -> shipment.created (terminal), or
# inventory.reserved -> payment.failed -> inventory.released (terminal). 3 handlers/order.

chain = Router()
TERMINAL = ("shipment.created", "inventory.released")
HANDLERS_PER_ORDER = 3


@chain.on("order.placed", group="inventory", emits=["inventory.reserved"])
async def on_order_placed(event: Event[Any], ctx: HandlerContext) -> None:
    await ctx.emit("inventory.reserved", reserve_inventory_fn(event.data["order"]))


@chain.on("inventory.reserved", group="payment", emits=["payment.charged", "payment.failed"])
async def on_inventory_reserved(event: Event[Any], ctx: HandlerContext) -> None:
    order = event.data["order"]
    try:
        await ctx.emit("payment.charged", charge_payment_fn(order))
    except PaymentError:
        await ctx.emit("payment.failed", {"order": order, "reason": "declined"})


@chain.on("payment.charged", group="shipping", emits=["shipment.created"])
async def on_payment_charged(event: Event[Any], ctx: HandlerContext) -> None:
    await ctx.emit("shipment.created", create_shipment_fn(event.data["order"]))


@chain.on("payment.failed", group="inventory", emits=["inventory.released"])
async def on_payment_failed(event: Event[Any], ctx: HandlerContext) -> None:
    await ctx.emit("inventory.released", release_inventory_fn(event.data["order"]))


def terminal_type(order: int) -> str:
    return "inventory.released" if fails(order) else "shipment.created"


def make_app(kind: str, store: str, broker: str, name: str, *,
             poll_interval: float = 0.2) -> App:
    """The app for one scenario: ``kind`` is ``saga`` or ``chain``."""
    app = App(name, store=store, broker=broker, poll_interval=poll_interval)
    app.include(saga if kind == "saga" else chain)
    return app


def from_env() -> App:
    """The app ``cantata worker bench.cantata_app:from_env`` serves (bench/workers.py):
    ``BENCH_KIND``, ``BENCH_APP`` (its name), ``BENCH_POLL``; the CLI's ``--store`` and
    ``--broker`` point it at the scenario's store and broker."""
    return make_app(os.environ["BENCH_KIND"], "memory://", "embedded",
                    os.environ["BENCH_APP"],
                    poll_interval=float(os.environ.get("BENCH_POLL", "0.2")))
