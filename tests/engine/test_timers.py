"""Durable timers: ``ctx.sleep`` keeps its wake time across a restart."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata import App, ConfigurationError, RunStatus, WorkflowContext, WorkflowFailed

from .helpers import eventually, make_app


def sleeper_app(url: str, calls: list[str]) -> App:
    app = make_app(url)

    @app.step
    async def before() -> float:
        calls.append("before")
        return time.time()

    @app.step
    async def after() -> float:
        calls.append("after")
        return time.time()

    @app.workflow
    async def nap(ctx: WorkflowContext, seconds: float) -> list[float]:
        t0 = await ctx.run(before)
        await ctx.sleep(seconds)
        t1 = await ctx.run(after)
        return [t0, t1]

    return app


async def test_sleep_waits(store_url: str) -> None:
    calls: list[str] = []
    app = sleeper_app(store_url, calls)
    async with app:
        h = await app.start("nap", 0.3)
        t0, t1 = await h.result(timeout=5)
        history = await app.store.load_history(app.name, h.run_id)
    assert 0.3 <= t1 - t0 < 0.8
    assert calls == ["before", "after"]
    sleep = next(e for e in history if e.kind == "sleep")
    assert sleep.key == "sleep#1" and sleep.status == "completed"


async def test_sleep_keeps_its_wake_time_across_a_restart(sqlite_url: str) -> None:
    calls: list[str] = []
    first = sleeper_app(sqlite_url, calls)
    async with first:
        h = await first.start("nap", 1.5, idempotency_key="nap-1")
        run_id = h.run_id

        async def sleeping() -> bool:
            history = await first.store.load_history(first.name, run_id)
            return any(e.kind == "sleep" for e in history)

        await eventually(sleeping)
        wake_at = next(
            e.wake_at for e in await first.store.load_history(first.name, run_id)
            if e.kind == "sleep"
        )
        assert await h.status() == RunStatus.RUNNING
    # the worker stopped mid-sleep; another process opens the same store later
    assert calls == ["before"]
    assert wake_at is not None
    slept_at = wake_at - 1.5
    await asyncio.sleep(max(0.0, slept_at + 0.8 - time.time()))  # restart 0.8 s into the nap

    second = sleeper_app(sqlite_url, calls)
    async with second:
        t0, t1 = await second.get_handle(run_id).result(timeout=5)
        history = await second.store.load_history(second.name, run_id)
    assert calls == ["before", "after"]  # `before` was not executed again
    # it woke at the original wake time, not 1.5 s after the restart
    assert wake_at - 0.05 <= t1 < wake_at + 0.5, (t1 - wake_at)
    assert t1 - t0 < 2.1
    sleep = next(e for e in history if e.kind == "sleep")
    assert sleep.wake_at == wake_at and sleep.status == "completed"


async def test_past_wake_time_after_restart_continues_at_once(sqlite_url: str) -> None:
    calls: list[str] = []
    first = sleeper_app(sqlite_url, calls)
    async with first:
        h = await first.start("nap", 0.3)

        async def sleeping() -> bool:
            return any(e.kind == "sleep"
                       for e in await first.store.load_history(first.name, h.run_id))

        await eventually(sleeping)
    await asyncio.sleep(0.5)  # the wake time passes while no worker runs
    second = sleeper_app(sqlite_url, calls)
    async with second:
        t_open = time.time()
        _, t1 = await second.get_handle(h.run_id).result(timeout=5)
    assert t1 - t_open < 0.5
    assert calls == ["before", "after"]


async def test_negative_sleep_fails_the_run(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.sleep(-1)

    @app.workflow
    async def zero(ctx: WorkflowContext) -> str:
        await ctx.sleep(0)
        return "ok"

    async with app:
        with pytest.raises(WorkflowFailed, match=r"ctx.sleep\(seconds\) must be >= 0 s"):
            await (await app.start(wf)).result(timeout=5)
        assert await (await app.start(zero)).result(timeout=5) == "ok"


async def test_a_sleep_or_wait_timeout_that_is_no_number_fails_the_run_naming_it(
    store_url: str,
) -> None:
    """The refusal is raised in the workflow's code (a ConfigurationError it could
    catch), so the run fails saying which argument was wrong, not with a TypeError."""
    app = make_app(store_url)

    @app.workflow
    async def nap(ctx: WorkflowContext, seconds: object) -> None:
        await ctx.sleep(seconds)  # type: ignore[arg-type]

    @app.workflow
    async def wait(ctx: WorkflowContext, timeout: object) -> None:
        await ctx.wait_for_event("order.paid", timeout=timeout)  # type: ignore[arg-type]

    @app.workflow
    async def caught(ctx: WorkflowContext) -> str:
        try:
            await ctx.sleep("abc")  # type: ignore[arg-type]
        except ConfigurationError as exc:
            return str(exc)
        return "slept"

    async with app:
        for seconds in ("abc", True, None):
            with pytest.raises(WorkflowFailed, match=(
                rf"ConfigurationError: ctx.sleep\(seconds\) must be a number of seconds >= 0, "
                rf"got {seconds!r}"
            )):
                await (await app.start(nap, seconds)).result(timeout=5)
        with pytest.raises(WorkflowFailed, match=(
            r"ConfigurationError: ctx.wait_for_event\('order.paid'\) timeout must be a "
            r"number of seconds >= 0, got 'soon'"
        )):
            await (await app.start(wait, "soon")).result(timeout=5)
        assert "ctx.sleep(seconds)" in await (await app.start(caught)).result(timeout=5)


async def test_a_sleep_or_wait_longer_than_100_years_fails_the_run_naming_the_limit(
    store_url: str,
) -> None:
    """A wake time past year 9999 has no date: refused in the workflow's code, as a
    ConfigurationError naming the call and the limit (inf too, not a SerializationError)."""
    app = make_app(store_url)

    @app.workflow
    async def nap(ctx: WorkflowContext, seconds: float) -> None:
        await ctx.sleep(seconds)

    @app.workflow
    async def forever(ctx: WorkflowContext) -> None:
        await ctx.sleep(float("inf"))

    @app.workflow
    async def wait(ctx: WorkflowContext, timeout: float) -> None:
        await ctx.wait_for_event("order.paid", timeout=timeout)

    async with app:
        with pytest.raises(WorkflowFailed, match=(
            r"ConfigurationError: ctx.sleep\(seconds\) must be at most 3155760000 seconds "
            r"\(100 years\), got 1e\+16"
        )):
            await (await app.start(nap, 1e16)).result(timeout=5)
        with pytest.raises(WorkflowFailed, match=(
            r"ConfigurationError: ctx.sleep\(seconds\) must be at most 3155760000 seconds "
            r"\(100 years\), got inf"
        )):
            await (await app.start(forever)).result(timeout=5)
        with pytest.raises(WorkflowFailed, match=(
            r"ConfigurationError: ctx.wait_for_event\('order.paid'\) timeout must be at most "
            r"3155760000 seconds \(100 years\), got 1e\+19"
        )):
            await (await app.start(wait, 1e19)).result(timeout=5)
        with pytest.raises(ConfigurationError, match=(
            r"deadline must be at most 3155760000 seconds \(100 years\), got 1e\+16"
        )):
            await app.start(nap, 1, deadline=1e16)
        assert await app.list_runs(status="running") == []
