"""Cleanup after cancel: cantata.Cancelled inside the workflow, cleanup steps, cleanup_timeout."""

from __future__ import annotations

import pytest

import cantata
from cantata import App, RunStatus, WorkflowCancelled, WorkflowContext

from .helpers import eventually, history_keys, make_app


def cleanup_app(store_url: str, log: list[str], *, cleanup_timeout: float = 60.0) -> App:
    app = make_app(store_url)

    @app.step
    async def reserve(n: int) -> int:
        log.append("reserve")
        return n

    @app.step
    async def release(n: int) -> None:
        log.append("release")

    @app.step
    async def notify_customer(n: int) -> None:
        log.append("notify")

    @app.workflow(cleanup_timeout=cleanup_timeout)
    async def order(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(reserve, n, compensate=release)
        try:
            await ctx.set_value("stage", "waiting")
            await ctx.wait_for_event("order.approved")
        except cantata.Cancelled:
            log.append("caught")
            await ctx.run(notify_customer, n)  # a cleanup step runs despite the cancel
            await ctx.sleep(0.05)  # and so does a durable timer
            raise
        finally:
            log.append("finally")
        return "approved"

    return app


async def test_a_cancelled_workflow_runs_its_cleanup_steps_then_ends_cancelled(
    store_url: str,
) -> None:
    log: list[str] = []
    app = cleanup_app(store_url, log)
    async with app:
        handle = await app.start("order", 1)
        await handle.get_value("stage", wait=10)
        await handle.cancel()
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=20)
        assert await handle.status() == RunStatus.CANCELLED
        # cleanup ran, then the registered compensation (the unwind) ran
        assert log == ["reserve", "caught", "notify", "finally", "release"]
        keys = await history_keys(app, handle.run_id)
        assert "notify_customer#1" in keys and "compensate:release#1" in keys


async def test_a_workflow_that_returns_after_catching_cancelled_still_ends_cancelled(
    store_url: str,
) -> None:
    app = make_app(store_url)
    done: list[str] = []

    @app.step
    async def tidy() -> None:
        done.append("tidy")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.set_value("stage", "sleeping")
            await ctx.sleep(3600)
        except cantata.Cancelled:
            await ctx.run(tidy)
            return "tidied"
        return "slept"

    async with app:
        handle = await app.start(wf)
        await handle.get_value("stage", wait=10)
        await handle.cancel()
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=20)
        assert done == ["tidy"]


async def test_cleanup_past_its_timeout_is_stopped(store_url: str) -> None:
    app = make_app(store_url)
    done: list[str] = []

    @app.step
    async def tidy() -> None:
        done.append("tidy")

    @app.workflow(cleanup_timeout=0.2)
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.set_value("stage", "waiting")
            await ctx.wait_for_event("never")
        except cantata.Cancelled:
            await ctx.run(tidy)
            await ctx.sleep(3600)  # a cleanup that would never end: stopped at 0.2 s
            await ctx.run(tidy)
        return "unreachable"

    async with app:
        handle = await app.start(wf)
        await handle.get_value("stage", wait=10)
        await handle.cancel()
        with pytest.raises(WorkflowCancelled, match="cleanup_timeout"):
            await handle.result(timeout=20)
        assert done == ["tidy"]


def _resumable(store_url: str, log: list[str]) -> App:
    app = make_app(store_url)

    @app.step
    async def tidy(what: str) -> None:
        log.append(what)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.set_value("stage", "waiting")
            await ctx.wait_for_event("never")
        except cantata.Cancelled:
            await ctx.run(tidy, "first")
            await ctx.set_value("stage", "cleaning")
            await ctx.wait_for_event("cleanup.go")  # the worker stops here
            await ctx.run(tidy, "second")
            raise
        return "unreachable"

    return app


async def test_cleanup_after_cancel_is_replay_safe(store_url: str) -> None:
    if store_url.startswith("memory://"):
        pytest.skip("a memory:// store ends with its app: there is nothing to resume")
    log: list[str] = []
    app = _resumable(store_url, log)
    async with app:
        handle = await app.start("wf")
        await handle.get_value("stage", wait=10)
        await handle.cancel()
        await eventually(lambda: _stage(handle, "cleaning"))
    resumed = _resumable(store_url, log)
    async with resumed:
        await resumed.publish("cleanup.go", {})
        with pytest.raises(WorkflowCancelled):
            await resumed.get_handle(handle.run_id).result(timeout=20)
    assert log == ["first", "second"]


async def _stage(handle: cantata.RunHandle, expected: str) -> bool:
    return bool(await handle.get_value("stage") == expected)
