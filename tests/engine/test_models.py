"""Pydantic models as arguments and results, restored by type hint."""

from __future__ import annotations

import datetime as dt

import pydantic
import pytest

from cantata import App, IdempotencyConflict, WorkflowContext, WorkflowFailed

from .helpers import make_app


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
        receipt = await ctx.run(charge, order)
        seen.append(receipt)
        return receipt

    @app.workflow
    async def via_child(ctx: WorkflowContext, order: Order) -> Receipt:
        receipt = await ctx.call(checkout, order)
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
        bad = await app.start("strict", {"id": "not a number"})
        with pytest.raises(WorkflowFailed, match="SerializationError"):
            await bad.result(timeout=5)
    assert isinstance(seen[0], Order)


async def test_child_workflow_result_is_restored_by_type_hint(store_url: str) -> None:
    seen: list[object] = []
    app = shop(store_url, seen)
    async with app:
        h = await app.start("via_child", ORDER)
        assert await h.result(timeout=5) == Receipt(order_id=7, total=19.0)
    assert isinstance(seen[-1], Receipt), type(seen[-1])
