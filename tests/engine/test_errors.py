"""Bad input: unknown names, unserialisable values, and the one error tree."""

from __future__ import annotations

import datetime as dt

import pytest

import cantata
from cantata import (
    CantataError,
    ConfigurationError,
    Router,
    SerializationError,
    StepFailed,
    UnknownStep,
    UnknownWorkflow,
    WorkflowContext,
    WorkflowFailed,
)

from .helpers import make_app


async def test_unserialisable_argument_fails_at_start_and_stores_nothing(
    store_url: str,
) -> None:
    app = make_app(store_url)
    ran = False

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: object) -> None:
        nonlocal ran
        ran = True

    async with app:
        with pytest.raises(SerializationError) as info:
            await app.start(place_order, {"id": 1, "paid_by": object()}, idempotency_key="k")
        assert "place_order" in str(info.value)
        assert "object" in str(info.value)
        with pytest.raises(SerializationError):
            await app.start(place_order, {"too_big_for_json": 1 << 70}, idempotency_key="k2")
        assert await app.list_runs() == []
        # nothing was stored under the key: it is still free
        h = await app.start(place_order, {"id": 1}, idempotency_key="k")
        await h.result(timeout=5)
        assert [r.run_id for r in await app.list_runs()] == [h.run_id]
    assert ran


async def test_unknown_workflow_name() -> None:
    app = make_app("memory://")  # the engine checks names, whatever the backend

    @app.workflow
    async def place_order(ctx: WorkflowContext) -> None:
        return None

    async with app:
        with pytest.raises(UnknownWorkflow) as info:
            await app.start("plcae_order")
        assert "plcae_order" in str(info.value)
        assert "place_order" in str(info.value)  # the known ones are listed
        assert await app.list_runs() == []


def test_starting_an_undecorated_function_is_an_error() -> None:
    async def not_a_workflow(ctx: WorkflowContext) -> None:
        return None

    app = make_app("memory://")
    with pytest.raises(CantataError):
        app.workflow(lambda ctx: None)  # not async
    with pytest.raises(ConfigurationError):
        cantata.App("bad name!")
    with pytest.raises(CantataError, match="not a workflow"):
        from cantata.declare.defs import workflow_name

        workflow_name(not_a_workflow)


async def test_unregistered_step_raises_unknown_step() -> None:
    app = make_app("memory://")  # the engine checks names, whatever the backend
    elsewhere = Router()

    async def plain(x: int) -> int:
        return x

    @elsewhere.step
    async def not_included(x: int) -> int:  # its router was never included in the app
        return x

    caught: list[str] = []

    @app.workflow
    async def by_function(ctx: WorkflowContext) -> None:
        await ctx.run(plain, 1)

    @app.workflow
    async def by_name(ctx: WorkflowContext) -> None:
        try:
            await ctx.run("no_such_step", 1)
        except UnknownStep as exc:
            caught.append(str(exc))
            raise

    @app.workflow
    async def by_router(ctx: WorkflowContext) -> None:
        await ctx.run(not_included, 1)

    async with app:
        for wf in (by_function, by_name, by_router):
            h = await app.start(wf)
            with pytest.raises(WorkflowFailed) as info:
                await h.result(timeout=5)
            assert (info.value.error or "").startswith("UnknownStep"), info.value.error
    assert "no_such_step" in caught[0]


async def test_unregistered_compensation_raises_unknown_step() -> None:
    app = make_app("memory://")  # the engine checks names, whatever the backend
    ran = []

    @app.step
    async def reserve() -> None:
        ran.append("reserve")

    async def release() -> None:
        ran.append("release")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(reserve, compensate=release)

    async with app:
        h = await app.start(wf)
        with pytest.raises(WorkflowFailed, match="UnknownStep"):
            await h.result(timeout=5)
    assert ran == []  # detected before the step ran


async def test_unserialisable_step_result_fails_the_step_without_retry(store_url: str) -> None:
    app = make_app(store_url)
    count = 0

    @app.step(retry=cantata.Retry(max_attempts=3, initial_interval=0.01))
    async def make() -> object:
        nonlocal count
        count += 1
        return {"when": object()}

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.run(make)
        except StepFailed as exc:
            return exc.error_type
        return "?"

    async with app:
        h = await app.start(wf)
        assert await h.result(timeout=5) == "SerializationError"
    assert count == 1


async def test_unserialisable_step_argument_or_workflow_result_fails_the_run(
    store_url: str,
) -> None:
    app = make_app(store_url)

    @app.step
    async def take(x: object) -> None:
        return None

    @app.workflow
    async def bad_arg(ctx: WorkflowContext) -> None:
        await ctx.run(take, object())

    @app.workflow
    async def bad_result(ctx: WorkflowContext) -> object:
        return object()

    @app.workflow
    async def dates_are_fine(ctx: WorkflowContext) -> dt.date:
        return dt.date(2024, 2, 29)

    async with app:
        h1 = await app.start(bad_arg)
        with pytest.raises(WorkflowFailed, match="SerializationError"):
            await h1.result(timeout=5)
        h2 = await app.start(bad_result)
        with pytest.raises(WorkflowFailed, match="SerializationError"):
            await h2.result(timeout=5)
        h3 = await app.start(dates_are_fine)
        assert await h3.result(timeout=5) == dt.date(2024, 2, 29)


def test_every_public_error_is_a_cantata_error() -> None:
    names = [n for n in cantata.__all__ if isinstance(getattr(cantata, n), type)]
    errors = [getattr(cantata, n) for n in names if issubclass(getattr(cantata, n), Exception)]
    assert len(errors) > 15
    for exc in errors:
        assert issubclass(exc, CantataError), exc
        assert isinstance(exc.code, str) and exc.code
    assert len({e.code for e in errors}) == len(errors)  # stable, distinct codes
    assert issubclass(cantata.WorkflowCompensated, cantata.WorkflowError)
    assert issubclass(cantata.WorkflowCancelled, cantata.WorkflowError)
    assert issubclass(cantata.WorkflowFailed, cantata.WorkflowError)
