"""Pydantic models as arguments and results, restored by type hint."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import pydantic
import pytest

from cantata import (
    App,
    IdempotencyConflict,
    SerializationError,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.engine.replaycheck import check_replay

from .helpers import eventually, make_app


class Order(pydantic.BaseModel):
    id: int
    items: list[str]
    placed_at: dt.datetime


class Receipt(pydantic.BaseModel):
    order_id: int
    total: float


def shop(url: str, seen: list[object]) -> App:
    app = make_app(url)

    @app.step
    async def charge(order: Order) -> Receipt:
        seen.append(order)
        return Receipt(order_id=order.id, total=9.5 * len(order.items))

    @app.workflow
    async def checkout(ctx: WorkflowContext, order: Order) -> Receipt:
        seen.append(order)
        receipt: Receipt = await ctx.run(charge, order)
        seen.append(receipt)
        return receipt

    @app.workflow
    async def via_child(ctx: WorkflowContext, order: Order) -> Receipt:
        receipt: Receipt = await ctx.call(checkout, order)
        seen.append(receipt)
        return receipt

    @app.workflow
    async def strict(ctx: WorkflowContext, order: Order) -> None:
        return None

    return app


ORDER = Order(id=7, items=["pen", "ink"], placed_at=dt.datetime(2024, 5, 1, 12, tzinfo=dt.UTC))


async def test_models_are_restored_in_workflow_step_and_result(store_url: str) -> None:
    seen: list[object] = []
    app = shop(store_url, seen)
    async with app:
        h = await app.start("checkout", ORDER, idempotency_key="o-7")
        receipt = await h.result(timeout=5)
        # the same model (same JSON) with the same key is the same run
        assert (await app.start("checkout", ORDER.model_copy(), idempotency_key="o-7")).run_id \
            == h.run_id
        with pytest.raises(IdempotencyConflict):
            await app.start("checkout", ORDER.model_copy(update={"id": 8}), idempotency_key="o-7")
    assert receipt == Receipt(order_id=7, total=19.0)
    assert isinstance(receipt, Receipt)
    wf_arg, step_arg, step_result = seen
    assert isinstance(wf_arg, Order) and wf_arg == ORDER
    assert isinstance(step_arg, Order) and step_arg == ORDER
    assert isinstance(step_result, Receipt)


async def test_plain_dict_argument_is_validated_into_the_model(store_url: str) -> None:
    seen: list[object] = []
    app = shop(store_url, seen)
    async with app:
        h = await app.start("checkout", {"id": 1, "items": [], "placed_at": "2024-01-01T00:00:00Z"})
        assert await h.result(timeout=5) == Receipt(order_id=1, total=0.0)
    assert isinstance(seen[0], Order)


async def test_arguments_that_do_not_fit_the_declared_type_are_refused_at_start(
        store_url: str) -> None:
    """A process with the workflow's code validates the arguments as the worker would
    restore them, before the run is written: one line naming the workflow, the argument
    and its fields. A process without the code starts by name and the worker refuses."""
    seen: list[object] = []
    app = shop(store_url, seen)
    async with app:
        for workflow in ("strict", strict_fn(app)):
            with pytest.raises(SerializationError) as info:
                await app.start(workflow, {"id": "not a number", "items": []})
            message = str(info.value)
            assert "\n" not in message, message
            assert message.startswith(
                "workflow 'strict' argument 1 (order) does not match its declared type "
                "Order: id: Input should be a valid integer"), message
            assert "(got 'not a number')" in message and "placed_at: Field required" in message
            assert message.endswith("(nothing was started)"), message
        assert await app.find_runs() == []
        if store_url.startswith("memory"):  # (a memory store is no other process's)
            return
        bare = App(app.name, store=store_url)  # a client without the code: the worker checks
        async with bare.client():
            bad = await bare.start("strict", {"id": "not a number"})
        await bare.close()
        with pytest.raises(WorkflowFailed, match="SerializationError"):
            await app.get_handle(bad.run_id).result(timeout=5)
    assert seen == []


def strict_fn(app: App) -> Callable[..., Any]:
    return app.workflows["strict"].fn


async def test_child_workflow_result_is_restored_by_type_hint(store_url: str) -> None:
    seen: list[object] = []
    app = shop(store_url, seen)
    async with app:
        h = await app.start("via_child", ORDER)
        assert await h.result(timeout=5) == Receipt(order_id=7, total=19.0)
    assert isinstance(seen[-1], Receipt), type(seen[-1])


def with_callers(app: App) -> App:
    """``shop`` plus parents that start ``strict`` (which takes an ``Order``) with what
    they are given, by ``ctx.call`` or ``ctx.start_child``."""

    @app.workflow
    async def caller(ctx: WorkflowContext, how: str, order: dict[str, object]) -> list[str]:
        said = []
        start = ctx.call if how == "call" else ctx.start_child
        try:
            await start("strict", order)
        except SerializationError as exc:  # the parent may catch it and go on
            said.append(str(exc))
        await ctx.call("strict", ORDER)
        return said

    @app.workflow
    async def uncaught(ctx: WorkflowContext, order: dict[str, object]) -> None:
        await ctx.start_child("strict", order)

    return app


async def test_a_child_whose_arguments_do_not_fit_its_types_is_refused_in_the_parent(
        store_url: str) -> None:
    """``ctx.call`` and ``ctx.start_child`` check the child's declared types as a start
    does, before anything is recorded: one SerializationError line naming the call, the
    parent's run, the child workflow, the argument and the field. The parent may catch
    it; uncaught, it fails the parent (once: a workflow's error, not a step's retry)."""
    seen: list[object] = []
    app = with_callers(shop(store_url, seen))
    async with app:
        for how in ("call", "start_child"):
            h = await app.start("caller", how, {"id": "bad", "items": []})
            [message] = await h.result(timeout=10)
            assert "\n" not in message, message
            assert message.startswith(
                f"ctx.{how} in run {h.run_id} of caller: workflow 'strict' argument 1 "
                "(order) does not match its declared type Order: id: Input should be a "
                "valid integer"), message
            assert "placed_at: Field required" in message, message
            assert message.endswith("(nothing was started)"), message
            # nothing recorded for the refused call: only the good child's entry
            kids = await app.store.child_runs(app.name, h.run_id)
            assert len(kids) == 1, kids
            children = [e for e in await app.store.load_history(app.name, h.run_id)
                        if e.kind == "child"]
            assert len(children) == 1, children
        bad = await app.start("uncaught", {"id": 1, "items": "pen"})
        with pytest.raises(WorkflowFailed, match=r"SerializationError: ctx\.start_child in "
                           r"run \S+ of uncaught: workflow 'strict' argument 1 \(order\) "
                           r"does not match its declared type Order: items: Input should "
                           r"be a valid list"):
            await bad.result(timeout=10)
        assert await app.store.child_runs(app.name, bad.run_id) == []
        assert len(await app.find_runs(workflow="strict")) == 2  # the two good children


async def test_a_refused_child_is_refused_again_when_its_parent_replays(
        sqlite_url: str) -> None:
    """The refusal takes no place in history, so a replay of the parent (here in a
    worker that took the run over after a restart, and in check-replay) meets it at the
    same call and takes the same path: the same message caught, one child, no
    divergence from the calls recorded after it."""

    def build() -> App:
        app = shop(sqlite_url, [])

        @app.workflow
        async def patient(ctx: WorkflowContext, order: dict[str, object]) -> str:
            try:
                await ctx.start_child("strict", order)
                said = "started"
            except SerializationError as exc:
                said = str(exc)
            await ctx.set_value("said", said)  # a call recorded after it, final
            await ctx.wait_for_event("go", timeout=60)
            await ctx.call("strict", ORDER)
            return said

        return app

    first = build()
    async with first:
        h = await first.start("patient", {"id": "bad", "items": [], "placed_at": "x"})

        async def waiting() -> bool:
            history = await first.store.load_history(first.name, h.run_id)
            return any(e.kind == "wait" for e in history)

        await eventually(waiting, what="the parent to wait for its event")
        assert await check_replay(first) == []  # the code replays the run as it ran
    second = build()
    async with second:
        await second.publish("go", {})
        said = await second.get_handle(h.run_id).result(timeout=10)
        kids = await second.store.child_runs(second.name, h.run_id)
    assert said.startswith(f"ctx.start_child in run {h.run_id} of patient: workflow "
                           "'strict' argument 1 (order)"), said
    assert len(kids) == 1 and kids[0].status.is_final, kids
