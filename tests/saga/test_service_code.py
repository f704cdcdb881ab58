"""A saga whose steps belong to services with their own code, in both modes.

Orchestrated, a step of another service is a task its workers take: the service's
code only declares the step. Choreographed, the step's hop is a handler built from
the saga: the service's workers serve it only if their app includes the saga too.
When it does not, the run's stall says so (and what to do) rather than only that a
group has not reacted."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import App, Saga, Step
from tests.helpers import eventually

from ..engine.helpers import make_app

MODES = ("orchestrated", "choreographed")



def shared_saga(mode: str) -> Saga:
    """The map both services can import (steps named by their services)."""
    return Saga("order", Step("orders.reserve", compensate="orders.release"),
                Step("payments.charge"), mode=mode)  # type: ignore[arg-type]


def orders_app(url: str, mode: str) -> App:
    app = make_app(url, services=["orders"])

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        return f"r-{order['id']}"

    @app.step(service="orders")
    async def release(order: dict[str, Any], reservation: str) -> None: ...

    app.include(shared_saga(mode))
    return app


def payments_app(url: str, *, with_saga: str | None) -> App:
    """The payments service: its step, and the saga only when ``with_saga`` (a mode)."""
    app = make_app(url, services=["payments"])

    @app.step(service="payments")
    async def charge(order: dict[str, Any]) -> str:
        return f"c-{order['id']}"

    if with_saga is not None:
        app.include(shared_saga(with_saga))
    return app


@pytest.mark.parametrize("mode", MODES)
async def test_a_service_that_includes_the_saga_serves_its_step_in_both_modes(
    shared_store: str, mode: str
) -> None:
    orders = orders_app(shared_store, mode)
    payments = payments_app(shared_store, with_saga="orchestrated")
    async with payments, orders:
        handle = await orders.start("order", {"id": 1})
        assert await handle.result(20) == {"orders.reserve": "r-1", "payments.charge": "c-1"}


async def test_a_service_without_the_saga_is_named_in_the_stall(shared_store: str) -> None:
    orders = orders_app(shared_store, "choreographed")
    payments = payments_app(shared_store, with_saga=None)
    async with payments, orders:
        handle = await orders.start("order", {"id": 1})

        async def unhandled() -> list[Any]:
            return [s for s in await orders.stalled(older_than=0)
                    if s.reason == "unhandled_event" and s.node.group == "order.payments_charge"]

        [stall] = await eventually(unhandled, 20.0, "the charge hop to stall")
        await handle.cancel()
    hint = stall.hint or ""
    for words in ("payments.charge", "saga order", "service payments", "--service payments",
                  "app.include"):
        assert words in hint, hint


def orders_serving_everything(url: str) -> App:
    """The orders service run without ``services=`` (as ``cantata worker`` without
    ``--service``): it serves every group, though its code lacks ``payments.charge``."""
    app = make_app(url)

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        return f"r-{order['id']}"

    @app.step(service="orders")
    async def release(order: dict[str, Any], reservation: str) -> None: ...

    app.include(shared_saga("choreographed"))
    return app


async def test_a_worker_without_the_steps_code_leaves_its_hop_to_one_that_has_it(
    shared_store: str,
) -> None:
    orders = orders_serving_everything(shared_store)
    payments = payments_app(shared_store, with_saga="orchestrated")
    async with payments, orders:
        handle = await orders.start("order", {"id": 1})
        assert await handle.result(20) == {"orders.reserve": "r-1", "payments.charge": "c-1"}
        root = await orders.trace(handle.run_id)
    hops = []
    stack = [root]
    while stack:
        node = stack.pop()
        stack.extend(node.children)
        if node.kind == "handler" and node.group == "order.payments_charge":
            hops.append((node.status, node.attempts, node.error))
    # taken by the payments worker at once: never tried (and failed) where the step is not
    assert hops == [("completed", 1, None)]
