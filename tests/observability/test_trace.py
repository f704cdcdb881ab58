"""``build_trace``: one tree per business transaction, across workflows and handlers."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import time
from typing import Any

import pytest
from rich.console import Console

from cantata import App, CantataError, Event, HandlerContext, Retry, WorkflowContext
from cantata.observability.stalled import stalls_of
from cantata.observability.timeline import where_it_stands
from cantata.observability.trace import (
    KINDS,
    TraceNode,
    TraceNotFound,
    build_trace,
    render_timeline,
)
from tests.helpers import eventually, make_app

from .scenarios import Scenario, shop_app


def kinds_of(node: TraceNode) -> list[tuple[str, str, str]]:
    return [(c.kind, c.name, c.status) for c in node.children]


def text_of(root: TraceNode, width: int = 160) -> str:
    out = io.StringIO()
    Console(file=out, width=width, color_system=None).print(render_timeline(root))
    return out.getvalue()


async def test_trace_node_has_exactly_the_public_fields() -> None:
    names = [f.name for f in dataclasses.fields(TraceNode)]
    assert names == ["kind", "name", "status", "group", "started_at", "ended_at", "attempts",
                     "error", "children"]
    assert set(KINDS) == {"run", "step", "compensation", "event", "handler", "timer", "wait",
                          "dead_letter"}


async def test_a_compensated_saga_shows_steps_failure_and_compensation(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["compensated"])

    assert (root.kind, root.name, root.status) == ("run", "place_order", "compensated")
    assert kinds_of(root) == [
        ("step", "reserve", "completed"),
        ("step", "charge", "failed"),
        ("compensation", "release", "completed"),
    ]
    charge = root.children[1]
    assert charge.error == "PaymentDeclined: card of order 1 declined"
    assert charge.attempts == 1
    assert root.error is not None and "PaymentDeclined" in root.error
    for node in root.walk():
        assert node.started_at is not None and node.started_at.tzinfo == dt.UTC
        assert node.ended_at is not None and node.ended_at >= node.started_at
    assert root.correlation_id == scenario.ids["compensated"]


async def test_retries_are_visible_on_a_step_that_succeeded(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["retried"])

    assert root.status == "completed"
    charge = root.find("step", "charge")[0]
    assert (charge.status, charge.attempts) == ("completed", 2)
    assert charge.error == "ConnectionError: payment gateway timed out"
    # the workflow's emit sits in history order, and the reacting service under it
    assert [c.kind for c in root.children] == ["step", "step", "step", "event"]
    shipped = root.children[-1]
    assert shipped.name == "order.shipped"
    [handler] = shipped.children
    assert (handler.kind, handler.group, handler.status) == ("handler", "notifications",
                                                            "completed")
    assert "last retry: ConnectionError: payment gateway timed out" in text_of(root)


async def test_an_event_started_saga_hangs_under_its_event(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["hybrid"])

    assert (root.kind, root.name, root.status) == ("event", "order.approved", "completed")
    [run] = root.children
    assert (run.kind, run.name, run.status) == ("run", "place_order", "completed")
    assert [c.name for c in run.children] == ["reserve", "charge", "ship", "order.shipped"]
    handler = run.children[-1].children[0]
    assert (handler.kind, handler.group, handler.status) == ("handler", "notifications",
                                                            "completed")


async def test_handler_nodes_are_named_after_the_handler_function(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["unhandled"])
    assert {(c.group, c.name) for c in root.children} == {
        ("audit", "audit"), ("inventory", "reserve_stock")}


async def test_a_dead_lettered_handler_and_a_silent_group(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["dead"])

    assert (root.kind, root.name) == ("event", "order.placed")
    assert root.status == "pending"  # the audit group never reacted
    by_group = {c.group: c for c in root.children}
    assert set(by_group) == {"audit", "inventory"}
    audit = by_group["audit"]
    assert (audit.kind, audit.status, audit.attempts, audit.ended_at) == (
        "handler", "pending", 0, None)
    inventory = by_group["inventory"]
    assert inventory.status == "completed"
    [reserved] = inventory.children
    assert (reserved.kind, reserved.name, reserved.status) == ("event", "inventory.reserved",
                                                               "dead")
    [payment] = reserved.children
    assert (payment.kind, payment.group, payment.status, payment.attempts) == (
        "handler", "payment", "dead", 2)
    assert payment.error == "RuntimeError: card of order 4 declined"
    [letter] = payment.children
    assert (letter.kind, letter.group, letter.status) == ("dead_letter", "payment", "dead")
    assert letter.error == "RuntimeError: card of order 4 declined"
    assert letter.ref in {d.id for d in await reader.dead_letters()}

    text = text_of(root)
    assert f"cantata dlq replay {letter.ref}" in text
    assert "group audit has not reacted to order.placed" in text
    assert "group payment gave up on inventory.reserved after 2 attempt(s)" in text


async def test_a_replayed_dead_letter_keeps_its_episode_in_the_trace() -> None:
    """Dead-lettered, replayed, dead-lettered again, replayed, handled: the trace keeps
    both episodes under the handler, and only the open letter is a stall."""
    app = make_app("memory://")
    down = ["RuntimeError: down", "RuntimeError: still down"]

    @app.on("payment.due", group="billing",
            retry=Retry(max_attempts=3, initial_interval=0.01, max_interval=0.01))
    async def charge(event: Event[Any]) -> None:
        if down:
            raise RuntimeError(down[0].split(": ", 1)[1])

    async def dead_letter() -> str:
        [letter] = await eventually(app.dead_letters, what="a dead letter")
        return str(letter.id)

    async with app:
        due = await app.publish("payment.due", {})
        first = await dead_letter()
        await app.replay(first)
        down.pop(0)
        second = await dead_letter()
        root = await build_trace(app.store, app.name, due.id)
        [handler] = root.children
        assert [(c.kind, c.status, c.ref) for c in handler.children] == [
            ("dead_letter", "replayed", first), ("dead_letter", "dead", second)]
        [stall] = stalls_of(root, 0, app.clock.now())
        assert (stall.reason, stall.node.ref) == ("dead_letter", second)
        assert f"cantata dlq replay {first}" not in text_of(root)

        await app.replay(second)
        down.pop(0)
        root = await eventually(
            lambda: _completed_trace(app, due.id), what="the replayed delivery handled")
        assert await app.dead_letters() == []

    [handler] = root.children
    assert (handler.kind, handler.name, handler.status) == ("handler", "charge", "completed")
    assert handler.attempts == 3 + 3 + 1  # every run of the handler, both episodes too
    assert handler.error == "RuntimeError: still down"  # why it was replayed
    letters = handler.children
    assert [(c.kind, c.group, c.status, c.attempts, c.error, c.ref) for c in letters] == [
        ("dead_letter", "billing", "replayed", 3, "RuntimeError: down", first),
        ("dead_letter", "billing", "replayed", 3, "RuntimeError: still down", second),
    ]
    # dead-lettered, replayed, dead-lettered again, replayed again
    stamps = [t for c in letters for t in (c.started_at, c.ended_at) if t is not None]
    assert len(stamps) == 4 and stamps == sorted(stamps)
    assert stalls_of(root, 0, app.clock.now()) == []
    text = text_of(root)
    assert text.count("replayed") >= 2 and "cantata dlq replay" not in text
    assert "where it stands: completed" in text


async def _completed_trace(app: App, correlation_id: str) -> TraceNode | None:
    root = await build_trace(app.store, app.name, correlation_id)
    return root if root.status == "completed" else None


async def test_a_run_waiting_for_an_event_that_never_comes(
    scenario: Scenario, reader: App
) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["waiting"])

    assert (root.kind, root.name, root.status) == ("run", "invoice_order", "running")
    assert kinds_of(root) == [("event", "invoice.requested", "published"),
                              ("wait", "invoice.approved", "waiting")]
    wait = root.children[1]
    assert wait.ended_at is None
    text = text_of(root)
    assert 'run invoice_order waits for invoice.approved matching {"order_id":6}' in text
    assert "where it stands:" in text


async def test_a_failed_compensation_is_shown(scenario: Scenario, reader: App) -> None:
    root = await build_trace(reader.store, reader.name, scenario.ids["comp_failed"])

    assert (root.status, root.ref) == ("failed", scenario.ids["comp_failed"])
    assert [(c.kind, c.name, c.status) for c in root.children[-2:]] == [
        ("compensation", "refund", "failed"), ("compensation", "release", "completed")]
    text = text_of(root)
    assert "compensation failed: refund of run place_order" in text
    assert "flagged for an operator" in text


async def test_an_inner_run_or_event_id_gives_its_whole_transaction(
    scenario: Scenario, reader: App
) -> None:
    whole = await build_trace(reader.store, reader.name, scenario.ids["hybrid"])
    run_id = whole.children[0].ref
    shipped_id = whole.children[0].children[-1].ref
    assert run_id and shipped_id
    for inner in (run_id, shipped_id):
        again = await build_trace(reader.store, reader.name, inner)
        assert again == whole
        assert again.correlation_id == scenario.ids["hybrid"]


async def test_an_unknown_id_is_a_clear_error(reader: App) -> None:
    with pytest.raises(TraceNotFound) as info:
        await build_trace(reader.store, reader.name, "no-such-id")
    assert isinstance(info.value, CantataError)
    assert "'no-such-id'" in str(info.value) and "'shop'" in str(info.value)
    # a library caller is told of the library, not of the CLI's options
    assert "--" not in str(info.value), info.value
    assert str(info.value).endswith("(check the id, and the app's name and store it was "
                                    "recorded in)"), info.value


async def test_a_transaction_joined_under_a_foreign_id() -> None:
    """Runs and events joined with correlation_id=... under an id nothing else has."""
    app = shop_app("memory://")
    async with app:
        handle = await app.start("place_order", {"id": 11}, correlation_id="order-11")
        await handle.result(timeout=5)
        await app.publish("invoice.approved", {"order_id": 11}, correlation_id="order-11")
        root = await build_trace(app.store, app.name, "order-11")
    assert (root.kind, root.name, root.status) == ("run", "place_order", "completed")
    assert root.children[-1].kind == "event" and root.children[-1].name == "invoice.approved"
    assert root.correlation_id == "order-11"


async def test_trace_on_memory_store_and_render_is_plain_text() -> None:
    app = make_app("memory://")

    @app.on("ping", group="pong", emits=["pong"])
    async def pong(event: Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("pong", {})

    async with app:
        ev = await app.publish("ping", {})
        deadline = time.monotonic() + 5
        while True:
            root = await build_trace(app.store, app.name, ev.id)
            if root.status == "completed" or time.monotonic() > deadline:
                break
            await app.clock.sleep(0.02)
    assert root.status == "completed"
    [handler] = root.children
    assert (handler.name, handler.group) == ("pong", "pong")
    assert [c.name for c in handler.children] == ["pong"]
    text = text_of(root)
    assert "where it stands: completed" in text


async def test_timers_and_child_runs_sit_in_history_order() -> None:
    app = make_app("memory://")

    @app.step
    async def pack(n: int) -> int:
        return n

    @app.workflow
    async def child(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(pack, n))

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep(0.01)
        value = await ctx.call(child, n)
        ctx.now()  # recorded values are not trace nodes
        await ctx.sleep(3600)
        return int(value)

    async with app:
        handle = await app.start(parent, 5)
        deadline = time.monotonic() + 5
        while True:
            root = await build_trace(app.store, app.name, handle.run_id)
            if len(root.children) == 3 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.02)
        now = app.clock.now()
        await handle.cancel()

    assert [(c.kind, c.name, c.status) for c in root.children] == [
        ("timer", "sleep", "completed"),
        ("run", "child", "completed"),
        ("timer", "sleep", "waiting"),
    ]
    sub = root.children[1]
    assert [(c.kind, c.name) for c in sub.children] == [("step", "pack")]
    sleeping = root.children[2]
    assert sleeping.due is not None and sleeping.ended_at is None
    # a sleeping run is not stalled: it is waiting as designed
    assert stalls_of(root, 0, now) == []
    assert "sleeping: run parent wakes at" in text_of(root)


@pytest.mark.parametrize("ending", ["failed", "compensated", "completed"])
async def test_an_event_rooted_transaction_stands_where_its_run_ended(ending: str) -> None:
    """A transaction started by a publish reads as the run it started ended, as a
    transaction rooted at that run would (not "completed" whatever the run did)."""
    app = make_app("memory://")

    @app.step
    async def hold(order: dict[str, int]) -> None: ...

    @app.step
    async def release(order: dict[str, int]) -> None: ...

    @app.workflow
    async def approve(ctx: WorkflowContext, order: dict[str, int]) -> str:
        await ctx.run(hold, order, compensate=release if ending == "compensated" else None)
        if ending != "completed":
            raise ValueError("no budget left")
        return "approved"

    app.start_on("order.placed", approve)
    async with app:
        placed = await app.publish("order.placed", {"id": 1})

        async def ended() -> TraceNode | None:
            root = await build_trace(app.store, app.name, placed.id)
            runs = root.find("run", "approve")
            return root if runs and runs[0].status == ending else None

        root = await eventually(ended, what="the run to end")
        line = where_it_stands(root, now=app.clock.now())
    assert root.kind == "event"
    assert line.startswith(f"{ending} — ")
    if ending == "completed":
        assert line.startswith("completed — 1 event(s), 0 handler execution(s), settled")
    else:
        assert line.startswith(f"{ending} — run approve {ending}")
    if ending != "completed":
        assert "ValueError: no budget left" in line
    assert f"where it stands: {ending} — " in text_of(root)
