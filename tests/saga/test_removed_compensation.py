"""A deploy removes a step's ``compensate=`` while a choreographed run's failure event,
which asks for that compensation, is in flight.

The new code has no undo for the step, and other hops of it react to the event, so
nothing would tell the run waits there. It waits for a worker whose code has the run's
map, says so in ``cantata stalled`` and the trace, and goes on once one runs."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

from cantata import App, NonRetryable, Saga, Step, WorkflowCompensated
from cantata.observability.timeline import where_it_stands
from tests.helpers import eventually

from ..engine.helpers import make_app

UNDO_GROUP = "order.orders_reserve"


def shop(url: str, services: list[str] | None, undo: bool, effects: Counter[str],
         gate: asyncio.Event | None = None) -> App:
    """reserve (orders, undone by release when ``undo``) → charge (payments), which
    fails for good once ``gate`` is set."""
    app = make_app(url, services=services)

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        effects["reserve"] += 1
        return f"r-{order['id']}"

    @app.step(service="orders")
    async def release(order: dict[str, Any]) -> None:
        effects["release"] += 1

    @app.step(service="payments")
    async def charge(order: dict[str, Any]) -> str:
        effects["charge"] += 1
        if gate is not None:
            await gate.wait()
        raise NonRetryable("card declined")

    app.include(Saga("order", Step(reserve, compensate=release if undo else None),
                     Step(charge), mode="choreographed"))
    return app


async def test_a_failure_in_flight_when_its_compensation_is_removed_says_why_it_waits(
    shared_store: str,
) -> None:
    effects: Counter[str] = Counter()
    gate = asyncio.Event()
    orders = shop(shared_store, ["orders"], True, effects)
    payments = shop(shared_store, ["payments"], True, effects, gate)
    async with payments:
        async with orders:
            handle = await orders.start("order", {"id": 1})
            await eventually(lambda: effects["charge"] == 1, 20.0, "charge under way")
        gate.set()  # charge fails, once the orders worker (which would undo) is gone

        async def undo_pending() -> list[Any]:
            return [s for s in await payments.stalled(older_than=0)
                    if s.reason == "unhandled_event" and s.node.group == UNDO_GROUP]

        await eventually(undo_pending, 20.0, "the undo hop in flight")
    new = shop(shared_store, None, False, effects)  # release removed from the saga
    async with new:
        async def told() -> str | None:
            for s in await new.stalled(older_than=0):
                if s.node.group == UNDO_GROUP and (s.hint or "").startswith(
                        "no live worker's code has map"):
                    return s.hint
            return None

        # (once the old workers' leases have passed: till then their code has the map)
        said = await eventually(told, 20.0, "the undo's wait told")
        for words in ("compensation of step 'orders.reserve'", "order.payments_charge.failed",
                      "removed that step's compensate=", "the run waits for it",
                      "the run's version"):
            assert words in said, said
        info = await new.get_handle(handle.run_id).info()
        where = where_it_stands(await new.trace(info.correlation_id))
        assert "compensation of step 'orders.reserve'" in where, where
        assert effects["release"] == 0 and info.status == "running"
    back = shop(shared_store, None, True, effects)  # a worker of the run's map
    async with back:
        try:
            await back.get_handle(handle.run_id).result(20)
        except WorkflowCompensated:
            pass
        else:
            raise AssertionError("the run did not end compensated")
    assert effects == Counter(reserve=1, charge=1, release=1)


def three(url: str, undo_check: bool) -> App:
    """reserve (undone by release) → check (undone by uncheck when ``undo_check``) →
    charge."""
    app = make_app(url)

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        return "r"

    @app.step(service="orders")
    async def release(order: dict[str, Any]) -> None:
        return None

    @app.step(service="orders")
    async def check(order: dict[str, Any]) -> str:
        return "c"

    @app.step(service="orders")
    async def uncheck(order: dict[str, Any]) -> None:
        return None

    @app.step(service="payments")
    async def charge(order: dict[str, Any]) -> str:
        raise NonRetryable("card declined")

    app.include(Saga("order", Step(reserve, compensate=release),
                     Step(check, compensate=uncheck if undo_check else None), Step(charge),
                     mode="choreographed"))
    return app


async def test_a_run_begun_before_maps_were_carried_gets_the_cause_dead_lettered(
    tmp_path: Path,
) -> None:
    """The failure event of a run of an older release (its events carry no map) asks
    for the compensation of ``check``, which the deploy removed; other hops of the new
    code react to the event (reserve's undo), so it is no stray event: it is
    dead-lettered with the cause rather than settled unhandled, which would lose it."""
    url = f"sqlite:///{tmp_path}/shop.db"
    async with three(url, True).client():
        pass  # the old code declared its groups (and check's undo of the failure)
    new = three(url, False)
    async with new:
        await new.publish("order.payments_charge.failed", {
            "run_id": "r-old", "input": {"id": 1},
            "results": {"orders.reserve": "r", "orders.check": "c"},
            "failure": {"step": "payments.charge", "type": "NonRetryable",
                        "message": "card declined", "attempts": 1},
            "undo": ["orders.check", "orders.reserve"], "undone": [], "failures": []})
        [letter] = await eventually(new.dead_letters, 20.0, "the undo's event dead-lettered")
        assert letter.group == "order.orders_check"
        for words in ("no compensation of step 'orders.check' of saga 'order'",
                      "order.payments_charge.failed", "removed the step's compensate=",
                      "the run waits for it", "cantata dlq replay"):
            assert words in letter.error, letter.error
