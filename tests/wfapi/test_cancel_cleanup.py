"""Cleanup after cancel: cantata.Cancelled inside the workflow, cleanup steps, cleanup_timeout."""

from __future__ import annotations

import asyncio
import time
import types
from typing import Any, cast

import pytest

import cantata
from cantata import App, RunStatus, WorkflowCancelled, WorkflowContext

from .helpers import eventually, history_keys, make_app


def coro_name(task: asyncio.Task[Any]) -> str:
    """The qualified name of the coroutine ``task`` runs."""
    coro = cast("types.CoroutineType[Any, Any, Any]", task.get_coro())
    return coro.__qualname__


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


async def _cancelled_in_its_cleanup(app: App) -> Any:
    """Start an order, cancel it once it has reserved, and wait until it ended."""
    handle = await app.start("order", 1)
    await handle.get_value("stage", wait=10)
    await handle.cancel()
    with pytest.raises(WorkflowCancelled):
        await handle.result(timeout=20)
    return handle


async def test_a_cancelled_workflow_runs_its_cleanup_steps_then_ends_cancelled(
    store_url: str,
) -> None:
    log: list[str] = []
    app = cleanup_app(store_url, log)
    async with app:
        handle = await _cancelled_in_its_cleanup(app)
        assert await handle.status() == RunStatus.CANCELLED
        # cleanup ran, then the registered compensation (the unwind) ran
        assert log == ["reserve", "caught", "notify", "finally", "release"]
        keys = await history_keys(app, handle.run_id)
        assert "notify_customer#1" in keys and "compensate:release#1" in keys


async def test_a_cancelled_run_that_ended_leaves_no_cleanup_timer_behind(
    store_url: str,
) -> None:
    """The cleanup window's timer ends with the run: left running until the window
    closed (a minute by default), it held a stop of the worker a second (the drain
    gives what is left of the engine's tasks a moment before it cancels them)."""
    app = cleanup_app(store_url, [])
    async with app:
        await _cancelled_in_its_cleanup(app)

        def timers() -> list[str]:
            return [repr(t) for t in app.engine.background()
                    if coro_name(t) == "_close_after"]

        async def none_left() -> bool:
            return not timers()

        await eventually(none_left, timeout=5)


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


async def test_a_cleanup_sleep_is_cut_at_cleanup_timeout_with_park_after_zero(
    store_url: str,
) -> None:
    """``park_after=0`` evicts a run as soon as it waits; a run cleaning up after a
    cancel stays in memory instead (the store would hand it back at once, cancel
    requested), so its cleanup window closes on time, with no replay loop."""
    app = make_app(store_url, park_after=0)

    @app.workflow(cleanup_timeout=1.0)
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.wait_for_event("never")
        except cantata.Cancelled:
            await ctx.sleep(20)  # stopped when the cleanup window closes, 1 s in
            raise
        return "unreachable"

    async with app:
        handle = await app.start(wf)
        await eventually(lambda: app.engine.metrics.parked == 1)  # in its wait, parked
        await handle.cancel()
        started = time.monotonic()
        with pytest.raises(WorkflowCancelled) as ended:
            await handle.result(timeout=30)
        took = time.monotonic() - started
        parked = app.engine.metrics.parked
    assert 1.0 <= took < 4.0, (took, parked)
    assert "cleanup took longer than its cleanup_timeout of 1.0 s" in str(ended.value)
    assert parked == 1


def _slow_cleanup(store_url: str, log: list[str]) -> App:
    app = make_app(store_url, shutdown_grace=0.1)

    @app.step
    async def tidy() -> None:
        log.append("tidy")
        if len(log) == 1:
            await asyncio.sleep(30)  # the worker stops in the middle of it

    @app.workflow(cleanup_timeout=1.0)
    async def wf(ctx: WorkflowContext) -> str:
        try:
            await ctx.wait_for_event("never")
        except cantata.Cancelled:
            await ctx.run(tidy)
            raise
        return "unreachable"

    return app


async def test_a_run_resumed_past_its_cleanup_window_starts_no_cleanup_step(
    sqlite_url: str,
) -> None:
    """The window is counted from its recorded start: a worker resuming the run after
    it closed raises ``Cancelled`` at the first durable point, before any attempt."""
    log: list[str] = []
    first = _slow_cleanup(sqlite_url, log)
    async with first:
        handle = await first.start("wf")
        await eventually(lambda: _waiting(first, handle.run_id))
        await handle.cancel()
        await eventually(lambda: log == ["tidy"])
    await asyncio.sleep(1.2)  # the window closes while no worker runs the run
    second = _slow_cleanup(sqlite_url, log)
    async with second:
        with pytest.raises(WorkflowCancelled, match="cleanup_timeout"):
            await second.get_handle(handle.run_id).result(timeout=20)
    assert log == ["tidy"]


async def _waiting(app: App, run_id: str) -> bool:
    return any(e.kind == "wait" for e in await app.store.load_history(app.name, run_id))


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
