"""Mermaid maps: workflows from code or history, the choreography declared and observed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, HandlerContext, Saga, Step, WorkflowContext
from cantata.errors import UnknownWorkflow
from cantata.observability.eventmap import choreography_mermaid
from cantata.observability.graph import (
    GraphUnavailable,
    items_from_code,
    workflow_items,
    workflow_mermaid,
)
from tests.helpers import make_app

from .scenarios import Scenario, shop_app


async def test_a_plain_workflow_is_drawn_from_its_source_with_compensations() -> None:
    app = shop_app("memory://")
    text = await workflow_mermaid(app.router, app.name, "place_order", None)

    assert text.startswith("flowchart TD\n")
    assert "from code (static analysis)" in text
    for line in (
        'n1["reserve"]', 'n2["charge"]', 'n3["ship"]', 'n4>"emit order.shipped"]',
        'c1[/"↩ release"/]', 'c2[/"↩ refund"/]',
        "start --> n1", "n1 --> n2", "n2 --> n3", "n3 --> n4",
        'n2 -.->|"fails"| c1', 'n3 -.->|"fails"| c2', "c2 -.-> c1", "c1 -.-> undone",
    ):
        assert f"    {line}\n" in text, line


async def test_waits_emits_sleeps_and_branches_are_read_from_code() -> None:
    app = make_app("memory://")

    @app.step
    async def remind(order: dict[str, Any]) -> None: ...

    @app.workflow
    async def follow_up(ctx: WorkflowContext, order: dict[str, Any]) -> None:
        await ctx.emit("invoice.requested", order)
        await ctx.sleep(60)
        if order.get("vip"):
            await ctx.run("remind", order)
        for _ in range(3):
            await ctx.wait_for_event("invoice.approved", match={"id": order["id"]})

    items = workflow_items(app.router, "follow_up")
    assert items is not None
    assert [(i.kind, i.name, i.note) for i in items[0]] == [
        ("emit", "invoice.requested", ""), ("sleep", "sleep 60 s", ""),
        ("step", "remind", "if"), ("wait", "invoice.approved", "loop"),
    ]
    text = await workflow_mermaid(app.router, app.name, "follow_up", None)
    assert 'n3["remind (if)"]' in text and "n2 -.-> n3" in text
    assert 'n4{{"wait for invoice.approved (loop)"}}' in text


async def test_a_declarative_saga_is_drawn_from_its_map() -> None:
    app = shop_app("memory://")
    steps = app.steps
    app.include(Saga("checkout", Step(steps["reserve"].fn, compensate=steps["release"].fn),
                     Step(steps["charge"].fn, compensate="refund"), Step(steps["ship"].fn)))
    text = await workflow_mermaid(app.router, app.name, "checkout", None)
    assert "declared saga" in text
    assert 'n1["reserve"]' in text and 'c2[/"↩ refund"/]' in text
    assert 'n3 -.->|"fails"| c2' in text


async def test_dynamic_workflows_fall_back_to_the_latest_recorded_run(
    scenario: Scenario, tmp_path: Path
) -> None:
    async def dynamic(ctx: WorkflowContext, names: list[str]) -> None:
        for name in names:
            await ctx.run(name, {})

    assert items_from_code(dynamic) is None  # the steps are chosen at run time
    app = make_app(scenario.copy(tmp_path))
    app.workflow(name="place_order")(dynamic)  # same name as the recorded runs
    async with app.client():
        text = await workflow_mermaid(app.router, app.name, "place_order", app.store)
    assert "from the history of run" in text
    assert '["reserve"]' in text and '["ship"]' in text


async def test_unknown_and_undrawable_workflows_are_clear_errors() -> None:
    app = make_app("memory://")

    @app.workflow
    async def dynamic(ctx: WorkflowContext, names: list[str]) -> None:
        for name in names:
            await ctx.run(name, {})

    with pytest.raises(UnknownWorkflow, match="no workflow named 'nope'"):
        await workflow_mermaid(app.router, app.name, "nope", None)
    with pytest.raises(GraphUnavailable, match="no recorded run"):
        await workflow_mermaid(app.router, app.name, "dynamic", None)


async def test_the_choreography_map_from_code() -> None:
    app = shop_app("memory://")
    text = await choreography_mermaid(app.router, app.name, None)
    assert text.startswith("flowchart LR\n")
    nodes = {line.split("(", 1)[0].split("[", 1)[0].strip(): line for line in text.splitlines()}
    def id_of(label: str) -> str:
        return next(k for k, v in nodes.items() if f'"{label}"' in v)

    placed, inventory = id_of("order.placed"), id_of("inventory: reserve_stock")
    reserved, payment = id_of("inventory.reserved"), id_of("payment: take_payment")
    workflow = id_of("workflow place_order")
    for edge in (
        f"{placed} --> {inventory}", f"{inventory} --> {reserved}", f"{reserved} --> {payment}",
        f"{id_of('order.approved')} --> {workflow}", f"{workflow} --> {id_of('order.shipped')}",
        f"{id_of('invoice.approved')} --> {id_of('workflow invoice_order')}",
    ):
        assert f"    {edge}\n" in text, edge
    assert "never seen" not in text and "undeclared" not in text


async def test_the_choreography_map_marks_declared_but_unseen_and_seen_but_undeclared(
    scenario: Scenario, tmp_path: Path
) -> None:
    app = shop_app(scenario.copy(tmp_path))

    @app.on("payment.charged", group="ledger", emits=["ledger.booked"])
    async def book(event: cantata.Event[Any]) -> None: ...

    # take_payment in the store emitted payment.charged; pretend the code forgot to say so
    app.handlers[:] = [
        h if h.fn.__name__ != "take_payment" else type(h)(**{**_fields(h), "emits": ()})
        for h in app.handlers
    ]
    async with app.client():
        text = await choreography_mermaid(app.router, app.name, app.store)

    lines = text.splitlines()
    def id_of(label: str) -> str:
        return next(ln.split("[")[0].split("(")[0].strip() for ln in lines if f'"{label}"' in ln)

    ledger, charged = id_of("ledger: book"), id_of("payment.charged")
    payment = id_of("payment: take_payment")
    assert f'    {charged} -.->|"never seen"| {ledger}' in lines
    assert f'    {payment} ==>|"undeclared"| {charged}' in lines
    assert f"    {id_of('order.placed')} --> {id_of('inventory: reserve_stock')}" in lines


def _fields(obj: Any) -> dict[str, Any]:
    return {name: getattr(obj, name) for name in obj.__dataclass_fields__}


async def test_handlers_typed_with_a_context_are_mapped() -> None:
    app: App = make_app("memory://")

    @app.on("a.b", group="g", emits=["c.d"])
    async def h(event: cantata.Event[Any], ctx: HandlerContext) -> None: ...

    text = await choreography_mermaid(app.router, app.name, None)
    assert '"g: h"' in text
