"""A choreographed saga's step renamed by a deploy while a run's hop for the old step
is in flight.

The new code has no handler for the old step's group, so the run waits there, as an
orchestrated run whose recorded step the code no longer makes waits for a worker of
its version. What an operator sees says so: ``cantata stalled`` and the trace name the
step no live worker's code has and what to do, and ``cantata check-replay`` lists the
run. The new code's own runs are not held up, and the old group's delivery of their
events is told as a leftover. A run one hop further waits for a worker of its map
(the new code hands its event back), and goes on once one runs."""

from __future__ import annotations

from typing import Any

from cantata import App, GroupInUse, Saga, Step
from cantata.engine.replaycheck import replay_report
from cantata.observability.timeline import where_it_stands
from tests.helpers import eventually

from ..engine.helpers import make_app


def before(url: str, services: list[str] | None = None) -> App:
    """The old deploy: reserve, then charge. Its workers serve the orders service only
    (the payments worker that would take the charge hop is gone by the deploy)."""
    app = make_app(url, services=services or ["orders"])

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        return f"r-{order['id']}"

    @app.step(service="payments")
    async def charge(order: dict[str, Any]) -> str:
        return f"c-{order['id']}"

    app.include(Saga("order", Step(reserve), Step(charge), mode="choreographed"))
    return app


def after(url: str) -> App:
    """The new deploy: charge renamed bill; its workers serve every service."""
    app = make_app(url)

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        return f"r-{order['id']}"

    @app.step(service="payments")
    async def bill(order: dict[str, Any]) -> str:
        return f"b-{order['id']}"

    app.include(Saga("order", Step(reserve), Step(bill), mode="choreographed"))
    return app


OLD_GROUP = "order.payments_charge"


async def test_a_hop_in_flight_for_a_renamed_step_says_why_it_waits(shared_store: str) -> None:
    old = before(shared_store)
    async with old:
        handle = await old.start("order", {"id": 1})

        async def charge_pending() -> list[Any]:
            return [s for s in await old.stalled(older_than=0)
                    if s.reason == "unhandled_event" and s.node.group == OLD_GROUP]

        await eventually(charge_pending, 20.0, "the charge hop in flight")
    new = after(shared_store)
    async with new:
        fresh = await new.start("order", {"id": 2})
        assert await fresh.result(20) == {"orders.reserve": "r-2", "payments.bill": "b-2"}

        async def hops() -> dict[str, str | None]:
            return {s.correlation_id: s.hint for s in await new.stalled(older_than=0)
                    if s.reason == "unhandled_event" and s.node.group == OLD_GROUP}

        # (once the old worker's lease has passed: till then a live worker's code has it)
        found = await eventually(lambda: _both(hops), 20.0, "both runs' old hops told")
        stuck = await new.get_handle(handle.run_id).info()
        done = await new.get_handle(fresh.run_id).info()
        waits, leftover = found[stuck.correlation_id] or "", found[done.correlation_id] or ""
        for words in ("no live worker's code has step 'payments.charge' of saga 'order'",
                      "renamed or removed", "waits for it", "check-replay"):
            assert words in waits, waits
        assert "left over" in leftover and "waits for it" not in leftover, leftover

        where = where_it_stands(await new.trace(stuck.correlation_id))
        assert "no live worker's code has step 'payments.charge'" in where, where

        report = await replay_report(new)
        assert [(p.run_id, p.problem, p.recorded) for p in report.problems] == [
            (handle.run_id, "non_determinism", OLD_GROUP)]
        assert "'payments.charge'" in report.problems[0].detail


async def test_the_old_group_is_not_retired_while_a_run_waits_on_it(shared_store: str) -> None:
    old = before(shared_store)
    async with old:
        handle = await old.start("order", {"id": 1})

        async def charge_pending() -> list[Any]:
            return [s for s in await old.stalled(older_than=0)
                    if s.reason == "unhandled_event" and s.node.group == OLD_GROUP]

        await eventually(charge_pending, 20.0, "the charge hop in flight")
    new = after(shared_store)
    async with new:
        async def refused() -> str | None:
            try:
                await new.retire_group(OLD_GROUP)
            except GroupInUse as exc:
                # (once the old worker's lease has passed: till then it serves the group)
                return str(exc) if "wait on its pending deliveries" in str(exc) else None
            raise AssertionError("the old group was retired under a waiting run")

        said = await eventually(refused, 20.0, "the retire refused for the waiting run")
        for words in ("choreographed saga 'order'", "1 live run(s)", handle.run_id,
                      "run a worker whose code has the group"):
            assert words in said, said
        assert [g.stats.pending for g in await new.groups() if g.stats.group == OLD_GROUP] == [1]
        back = before(shared_store, ["orders", "payments"])  # a worker of the old code
        async with back:
            assert await back.get_handle(handle.run_id).result(20) == {
                "orders.reserve": "r-1", "payments.charge": "c-1"}

        async def retired() -> bool:
            try:
                return (await new.retire_group(OLD_GROUP)).declarations != ()
            except GroupInUse as exc:
                assert "wait on its pending deliveries" not in str(exc), exc
                return False  # (the old worker's lease has not passed yet)

        assert await eventually(retired, 20.0, "the old group retired once no run waits")


async def _both(hops: Any) -> dict[str, str | None] | None:
    found: dict[str, str | None] = await hops()
    told = [h for h in found.values() if h and h.startswith("no live worker's code")]
    return found if len(told) == 2 else None


def three_steps(url: str, middle: str, services: list[str] | None) -> App:
    """reserve → ``middle`` → ship: reserve and the middle step in the orders service,
    ship in the shipping service."""
    app = make_app(url, services=services)

    @app.step(service="orders")
    async def reserve(order: dict[str, Any]) -> str:
        return f"r-{order['id']}"

    async def pay(order: dict[str, Any]) -> str:
        return f"p-{order['id']}"

    pay.__name__ = pay.__qualname__ = middle
    paid = app.step(service="orders")(pay)

    @app.step(service="shipping")
    async def ship(order: dict[str, Any]) -> str:
        return f"s-{order['id']}"

    app.include(Saga("order", Step(reserve), Step(paid), Step(ship), mode="choreographed"))
    return app


async def test_the_event_of_a_renamed_step_waits_for_a_worker_of_its_map(
    shared_store: str,
) -> None:
    """The old step finished before the deploy: its ``done`` event waits for the next
    hop, whose group the new code still serves but under the new step's event. It is
    neither settled unhandled nor run by the new code: it waits, pending, for a worker
    whose code has the run's map, and its stall says so; once one runs, the run ends."""
    old = three_steps(shared_store, "charge", ["orders"])
    async with old:
        handle = await old.start("order", {"id": 1})

        async def ship_pending() -> list[Any]:
            return [s for s in await old.stalled(older_than=0)
                    if s.reason == "unhandled_event" and s.node.group == "order.shipping_ship"]

        await eventually(ship_pending, 20.0, "the ship hop in flight")
    new = three_steps(shared_store, "bill", None)
    async with new:
        fresh = await new.start("order", {"id": 2})
        assert await fresh.result(20) == {"orders.reserve": "r-2", "orders.bill": "p-2",
                                          "shipping.ship": "s-2"}

        async def told() -> list[Any]:
            return [s for s in await new.stalled(older_than=0)
                    if s.node.group == "order.shipping_ship" and (
                        s.reason == "dead_letter" or (s.reason == "unhandled_event" and (
                            s.hint or "").startswith("no live worker's code has map")))]

        [stall] = await eventually(told, 20.0, "the old event's wait told")
        run = await new.get_handle(handle.run_id).info()
        assert stall.correlation_id == run.correlation_id  # not the new code's run
        assert stall.reason == "unhandled_event"  # not dead-lettered: it waits
        said = stall.hint or ""
        for words in ("order.orders_charge.done", "group order.shipping_ship", "this run's map",
                      "the run waits for it", "the run's version"):
            assert words in said, said
        assert run.status == "running"
        assert await new.dead_letters() == []
        report = await replay_report(new)
        assert [(p.run_id, p.problem) for p in report.problems] == [
            (handle.run_id, "non_determinism")]
        assert "order.orders_charge.done" in report.problems[0].detail
    back = three_steps(shared_store, "charge", None)  # a worker of the run's map
    async with back:
        assert await back.get_handle(handle.run_id).result(20) == {
            "orders.reserve": "r-1", "orders.charge": "p-1", "shipping.ship": "s-1"}
