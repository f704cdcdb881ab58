"""Idempotent start, and the step idempotency key handed to external APIs."""

from __future__ import annotations

import asyncio

import pytest

import cantata
from cantata import CantataError, IdempotencyConflict, Retry, WorkflowContext

from .helpers import make_app


async def test_an_empty_or_non_string_key_is_refused_not_shared() -> None:
    app = make_app("memory://")

    @app.workflow
    async def wf(ctx: WorkflowContext, n: int) -> int:
        return n

    async with app:
        for key in ("", 42):
            with pytest.raises(cantata.ConfigurationError,
                               match=r"idempotency_key must be a non-empty string, got"):
                await app.start(wf, 1, idempotency_key=key)  # type: ignore[arg-type]
        assert await app.list_runs() == []


async def test_same_key_returns_the_same_run(store_url: str) -> None:
    app = make_app(store_url)
    executed: list[int] = []

    @app.step
    async def charge(order: dict[str, int]) -> int:
        executed.append(order["id"])
        return order["id"]

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, int]) -> int:
        return int(await ctx.run(charge, order))

    async with app:
        h1 = await app.start(place_order, {"id": 42}, idempotency_key="order-42")
        h2 = await app.start(place_order, {"id": 42}, idempotency_key="order-42")
        assert h1.run_id == h2.run_id
        assert await h1.result(timeout=5) == 42
        # after the run has finished too
        h3 = await app.start("place_order", {"id": 42}, idempotency_key="order-42")
        assert h3.run_id == h1.run_id
        assert await h3.result(timeout=5) == 42
        # a new key is a new run
        h4 = await app.start(place_order, {"id": 42}, idempotency_key="order-42-b")
        assert h4.run_id != h1.run_id
        await h4.result(timeout=5)
        runs = await app.list_runs()
    assert executed == [42, 42]
    assert len(runs) == 2


async def test_concurrent_starts_with_one_key_make_one_run(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def wf(ctx: WorkflowContext, x: int) -> int:
        return x

    async with app:
        handles = await asyncio.gather(
            *(app.start(wf, 1, idempotency_key="same") for _ in range(10))
        )
        assert len({h.run_id for h in handles}) == 1
        assert await handles[0].result(timeout=5) == 1
        assert len(await app.list_runs()) == 1


async def test_same_key_with_other_arguments_conflicts(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, int]) -> int:
        return order["id"]

    @app.workflow
    async def other(ctx: WorkflowContext, order: dict[str, int]) -> int:
        return order["id"]

    async with app:
        h = await app.start(place_order, {"id": 1}, idempotency_key="k")
        with pytest.raises(IdempotencyConflict) as info:
            await app.start(place_order, {"id": 2}, idempotency_key="k")
        assert isinstance(info.value, CantataError)
        assert "k" in str(info.value)
        with pytest.raises(IdempotencyConflict):
            await app.start(other, {"id": 1}, idempotency_key="k")
        assert await h.result(timeout=5) == 1
        assert [r.run_id for r in await app.list_runs()] == [h.run_id]


async def test_same_key_with_dict_keys_in_another_order_is_the_same_run(
    store_url: str,
) -> None:
    app = make_app(store_url)

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, int]) -> int:
        return order["id"]

    async with app:
        h1 = await app.start(place_order, {"id": 42, "total": 5}, idempotency_key="o-42")
        h2 = await app.start(place_order, {"total": 5, "id": 42}, idempotency_key="o-42")
        assert h2.run_id == h1.run_id
        with pytest.raises(IdempotencyConflict, match="with different arguments"):
            await app.start(place_order, {"total": 5, "id": 43}, idempotency_key="o-42")
        assert await h1.result(timeout=5) == 42


async def test_same_key_for_another_workflow_names_it(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def place_order(ctx: WorkflowContext, n: int) -> int:
        return n

    @app.workflow
    async def refund(ctx: WorkflowContext, n: int) -> int:
        return n

    async with app:
        h = await app.start(place_order, 1, idempotency_key="k-1")
        with pytest.raises(IdempotencyConflict) as info:
            await app.start(refund, 1, idempotency_key="k-1")
    text = str(info.value)
    assert f"belongs to run {h.run_id} of workflow place_order, not refund" in text
    assert "different arguments" not in text


async def test_step_idempotency_key_is_stable_across_retries(store_url: str) -> None:
    app = make_app(store_url)
    seen: list[cantata.StepInfo] = []

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01))
    async def charge(amount: int) -> None:
        seen.append(cantata.step_info())
        if cantata.step_info().attempt < 3:
            raise ConnectionError("gateway timeout")

    @app.workflow
    async def pay(ctx: WorkflowContext) -> None:
        await ctx.run(charge, 1)
        await ctx.run(charge, 2)

    async with app:
        h1 = await app.start(pay)
        await h1.result(timeout=5)
        h2 = await app.start(pay)
        await h2.result(timeout=5)
    first_run = [s for s in seen if s.run_id == h1.run_id]
    assert [s.attempt for s in first_run] == [1, 2, 3, 1, 2, 3]
    first_call = {s.idempotency_key for s in first_run[:3]}
    second_call = {s.idempotency_key for s in first_run[3:]}
    assert len(first_call) == 1 and len(second_call) == 1
    assert first_call != second_call  # one key per step occurrence
    other_run = {s.idempotency_key for s in seen if s.run_id == h2.run_id}
    assert not other_run & (first_call | second_call)  # and per run
