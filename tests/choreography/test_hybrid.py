"""The hybrid: events start workflows; workflows emit events and wait for answers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cantata
from cantata import App, HandlerContext, WaitTimeout, WorkflowContext, WorkflowFailed
from tests.choreography.helpers import SETTLE, eventually, make_app


def order_app(store: str) -> tuple[App, list[cantata.Event[Any]]]:
    """order.placed starts ``fulfil``, which asks payments for a charge and waits for it."""
    app = make_app(store)
    requests: list[cantata.Event[Any]] = []

    @app.workflow
    async def fulfil(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.emit("payment.requested", {"order_id": order["order_id"], "amount": 10})
        paid = await ctx.wait_for_event(
            "payment.captured", match={"order_id": order["order_id"]}, timeout=10
        )
        return {
            "order_id": order["order_id"],
            "payment": paid.data["payment_id"],
            "correlation_id": ctx.correlation_id,
            "answer_correlation_id": paid.correlation_id,
        }

    @app.on("payment.requested", group="payments")
    async def capture(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        requests.append(event)
        await ctx.emit(
            "payment.captured",
            {"order_id": event.data["order_id"], "payment_id": f"pay-{event.data['order_id']}"},
        )

    app.start_on("order.placed", fulfil)
    return app, requests


async def only_run(app: App, workflow: str = "fulfil") -> cantata.RunInfo:
    runs: list[cantata.RunInfo] = await eventually(lambda: app.list_runs(workflow=workflow),
                                                  what="a run to start")
    assert len(runs) == 1, runs
    return runs[0]


async def test_an_event_starts_a_workflow_that_emits_waits_and_completes(store_url: str) -> None:
    app, requests = order_app(store_url)
    async with app:
        placed = await app.publish("order.placed", {"order_id": 42})
        run = await only_run(app)
        result = await app.get_handle(run.run_id).result(timeout=10)

    assert result == {
        "order_id": 42,
        "payment": "pay-42",
        "correlation_id": placed.id,  # the run joined the event's correlation id
        "answer_correlation_id": placed.id,  # and so did the handler's answer
    }
    [request] = requests
    assert request.correlation_id == placed.id
    assert request.data == {"order_id": 42, "amount": 10}


async def test_a_trigger_joins_a_given_correlation_id(store_url: str) -> None:
    app, _ = order_app(store_url)
    async with app:
        await app.publish("order.placed", {"order_id": 1}, correlation_id="tx-1")
        run = await only_run(app)
        result = await app.get_handle(run.run_id).result(timeout=10)
    assert result["correlation_id"] == "tx-1"
    assert result["answer_correlation_id"] == "tx-1"


async def test_one_run_per_event_id_even_if_published_twice(store_url: str) -> None:
    app, requests = order_app(store_url)
    async with app:
        first = await app.publish("order.placed", {"order_id": 3}, id="order-3-placed")
        run = await only_run(app)
        await app.get_handle(run.run_id).result(timeout=10)
        again = await app.publish("order.placed", {"order_id": 3}, id="order-3-placed")
        await asyncio.sleep(SETTLE)
        runs = await app.list_runs(workflow="fulfil")

    assert first.id == again.id == "order-3-placed"
    assert [r.run_id for r in runs] == [run.run_id]
    assert len(requests) == 1


async def test_distinct_events_start_distinct_runs(store_url: str) -> None:
    app, _ = order_app(store_url)
    async with app:
        for n in range(3):
            await app.publish("order.placed", {"order_id": n})
        runs = await eventually(
            lambda: _runs_when(app, 3, "completed"), what="three completed runs"
        )
        results = [await app.get_handle(r.run_id).result(timeout=5) for r in runs]
    assert sorted(r["payment"] for r in results) == ["pay-0", "pay-1", "pay-2"]


async def _runs_when(app: App, n: int, status: str) -> list[cantata.RunInfo]:
    runs = await app.list_runs(workflow="fulfil", status=status)
    return runs if len(runs) == n else []


async def test_wait_sees_a_match_published_after_start_before_the_wait(store_url: str) -> None:
    app = make_app(store_url)
    gate = asyncio.Event()
    in_step = asyncio.Event()

    @app.step
    async def slow_prepare() -> None:
        in_step.set()
        await gate.wait()

    @app.workflow
    async def approve(ctx: WorkflowContext, invoice: str) -> str:
        await ctx.run(slow_prepare)
        ev = await ctx.wait_for_event("invoice.approved", match={"invoice": invoice}, timeout=0.5)
        return str(ev.data["by"])

    async with app:
        handle = await app.start(approve, "inv-1")
        await asyncio.wait_for(in_step.wait(), 5)
        await app.publish("invoice.approved", {"invoice": "inv-2", "by": "mallory"})
        await app.publish("invoice.approved", {"invoice": "inv-1", "by": "ada"})
        gate.set()  # only now does the workflow begin its wait
        assert await handle.result(timeout=10) == "ada"


async def test_wait_ignores_events_published_before_the_run_started(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: WorkflowContext) -> str:
        try:
            ev = await ctx.wait_for_event("invoice.approved", timeout=0.3)
        except WaitTimeout:
            return "timed out"
        return str(ev.id)

    async with app:
        await app.publish("invoice.approved", {"invoice": "old"})
        await asyncio.sleep(0.01)
        handle = await app.start(approve)
        assert await handle.result(timeout=10) == "timed out"


async def test_each_event_is_consumed_by_one_wait_of_a_run(store_url: str) -> None:
    app = make_app(store_url)
    gate = asyncio.Event()

    @app.step
    async def hold() -> None:
        await gate.wait()

    @app.workflow
    async def scan(ctx: WorkflowContext) -> list[Any]:
        await ctx.run(hold)
        first = await ctx.wait_for_event("item.scanned", timeout=5)
        second = await ctx.wait_for_event("item.scanned", timeout=5)
        try:
            third = await ctx.wait_for_event("item.scanned", timeout=0.3)
        except WaitTimeout:
            return [first.data["sku"], second.data["sku"], None]
        return [first.data["sku"], second.data["sku"], third.data["sku"]]

    async with app:
        handle = await app.start(scan)
        await eventually(lambda: _status_is(app, handle.run_id, "running"))
        await app.publish("item.scanned", {"sku": "A"})
        await app.publish("item.scanned", {"sku": "B"})
        gate.set()
        assert await handle.result(timeout=10) == ["A", "B", None]


async def test_two_runs_waiting_for_one_type_each_see_their_own_match(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: WorkflowContext, invoice: str) -> str:
        ev = await ctx.wait_for_event("invoice.approved", match={"invoice": invoice}, timeout=10)
        return str(ev.data["by"])

    async with app:
        a = await app.start(approve, "a")
        b = await app.start(approve, "b")
        await app.publish("invoice.approved", {"invoice": "b", "by": "bob"})
        await app.publish("invoice.approved", {"invoice": "a", "by": "ann"})
        assert await a.result(timeout=10) == "ann"
        assert await b.result(timeout=10) == "bob"


async def _status_is(app: App, run_id: str, status: str) -> bool:
    return str(await app.get_handle(run_id).status()) == status


async def test_a_wait_that_never_matches_fails_the_run_with_wait_timeout(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: WorkflowContext) -> None:
        await ctx.wait_for_event("invoice.approved", match={"invoice": "x"}, timeout=0.2)

    async with app:
        handle = await app.start(approve)
        await app.publish("invoice.approved", {"invoice": "y"})  # not a match
        with pytest.raises(WorkflowFailed) as info:
            await handle.result(timeout=10)
    assert "WaitTimeout" in str(info.value)


async def test_a_workflow_can_catch_wait_timeout(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: WorkflowContext) -> str:
        try:
            await ctx.wait_for_event("invoice.approved", timeout=0.2)
        except WaitTimeout as exc:
            assert isinstance(exc, cantata.CantataError)
            await ctx.emit("invoice.escalated", {})
            return "escalated"
        return "approved"

    escalations: list[cantata.Event[Any]] = []

    @app.on("invoice.escalated", group="managers")
    async def escalate(event: cantata.Event[Any]) -> None:
        escalations.append(event)

    async with app:
        handle = await app.start(approve)
        assert await handle.result(timeout=10) == "escalated"
        await eventually(lambda: escalations)
    assert escalations[0].correlation_id == handle.run_id


async def test_a_match_behind_many_other_events_of_the_type_is_found(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def approve(ctx: WorkflowContext, invoice: str) -> str:
        ev = await ctx.wait_for_event("invoice.approved", match={"invoice": invoice}, timeout=10)
        return str(ev.data["by"])

    async with app:
        handle = await app.start(approve, "mine")
        for n in range(201):  # a busy system: other invoices approved meanwhile
            await app.publish("invoice.approved", {"invoice": f"other-{n}", "by": "x"})
        await app.publish("invoice.approved", {"invoice": "mine", "by": "ada"})
        assert await handle.result(timeout=10) == "ada"


async def test_a_wait_survives_an_app_restart(sqlite_url: str) -> None:
    def build() -> App:
        app = make_app(sqlite_url)

        @app.workflow
        async def approve(ctx: WorkflowContext, invoice: str) -> dict[str, Any]:
            await ctx.emit("invoice.submitted", {"invoice": invoice})
            ev = await ctx.wait_for_event(
                "invoice.approved", match={"invoice": invoice}, timeout=30
            )
            return {"by": ev.data["by"], "correlation_id": ctx.correlation_id}

        return app

    first = build()
    async with first:
        handle = await first.start("approve", "inv-9")
        await eventually(lambda: _waiting(first, handle.run_id), what="the run to reach its wait")
    # the worker is gone mid-wait; the answer arrives while no worker runs
    api = build()
    async with api.client():
        await api.publish("invoice.approved", {"invoice": "inv-9", "by": "ada"})
    second = build()
    async with second:
        result = await second.get_handle(handle.run_id).result(timeout=15)
        runs = await second.list_runs(workflow="approve")
    assert result == {"by": "ada", "correlation_id": handle.run_id}
    assert len(runs) == 1


async def _waiting(app: App, run_id: str) -> bool:
    history = await app.store.load_history(app.name, run_id)
    return any(e.kind == "wait" and e.status == "waiting" for e in history)
