"""Replay: recorded results and values come back, step identity is name + occurrence,
and diverging code is caught with ``NonDeterminismError``."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import pytest

import cantata
from cantata import (
    App,
    NonDeterminismError,
    Retry,
    RunStatus,
    StepFailed,
    WorkflowContext,
    WorkflowFailed,
)

from .helpers import eventually, history_keys, make_app


async def _stop_when(app: App, run_id: str, kind: str) -> None:
    """Wait until the run has recorded an entry of ``kind`` (then the caller closes app)."""

    async def check() -> bool:
        return any(e.kind == kind for e in await app.store.load_history(app.name, run_id))

    await eventually(check)


async def test_recorded_values_are_the_same_on_replay(sqlite_url: str) -> None:
    seen: list[list[Any]] = []

    def build() -> App:
        app = make_app(sqlite_url)

        @app.step
        async def remember(values: list[Any]) -> None:
            seen.append(values)

        @app.workflow
        async def wf(ctx: WorkflowContext) -> list[Any]:
            now, rnd, uid = ctx.now(), ctx.random(), ctx.uuid()  # plain, not awaited
            assert isinstance(now, dt.datetime) and now.tzinfo is not None
            assert isinstance(rnd, float) and 0 <= rnd < 1
            assert isinstance(uid, uuid.UUID)
            values = [now.isoformat(), rnd, str(uid)]
            await ctx.run(remember, values)
            await ctx.sleep(0.4)
            return [*values, ctx.now().isoformat(), ctx.random(), str(ctx.uuid())]

        return app

    first = build()
    async with first:
        h = await first.start("wf")
        await _stop_when(first, h.run_id, "sleep")
    second = build()
    async with second:
        out = await second.get_handle(h.run_id).result(timeout=5)
        keys = await history_keys(second, h.run_id)
    assert len(seen) == 1  # the step was not executed again
    assert out[:3] == seen[0]  # replay returned the recorded now / random / uuid
    assert out[3] >= out[0]
    assert keys[:3] == ["now#1", "random#1", "uuid#1"]
    assert {"now#2", "random#2", "uuid#2"} <= set(keys)


async def test_step_identity_is_name_and_occurrence(store_url: str) -> None:
    app = make_app(store_url)
    keys: list[str] = []

    @app.step
    async def reserve(x: int) -> int:
        keys.append(cantata.step_info().key)
        return x

    @app.step
    async def charge(x: int) -> int:
        keys.append(cantata.step_info().key)
        return x

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(reserve, 1)
        await ctx.run(charge, 1)
        await ctx.run(charge, 2)
        await ctx.run("reserve", 2)

    async with app:
        h = await app.start(wf)
        await h.result(timeout=5)
        recorded = await history_keys(app, h.run_id)
    assert keys == ["reserve#1", "charge#1", "charge#2", "reserve#2"]
    assert recorded == keys


def _versioned_app(
    url: str, calls: list[str], body: str, caught: list[NonDeterminismError] | None = None
) -> App:
    """The same workflow name with different bodies, as after a deploy."""
    app = make_app(url)

    def step(name: str) -> Callable[..., Any]:
        async def fn(x: int) -> str:
            calls.append(name)
            return f"{name}:{x}"

        fn.__name__ = name
        return app.step(fn)

    a, b, c = step("a"), step("b"), step("c")

    async def v1(ctx: WorkflowContext, x: int) -> list[str]:
        out = [await ctx.run(a, x), await ctx.run(b, x)]
        await ctx.sleep(0.3)
        return out

    async def v2_adds_code_around_steps(ctx: WorkflowContext, x: int) -> list[str]:
        local = x * 10  # plain code added before, between and after the recorded steps
        out = [await ctx.run(a, x)]
        out.append(await ctx.run(b, x))
        await ctx.sleep(0.3)
        out.append(await ctx.run(c, local))  # a new step after the recorded ones
        return out

    async def v2_calls_another_step(ctx: WorkflowContext, x: int) -> list[str]:
        out = [await ctx.run(a, x), await ctx.run(c, x)]  # b was recorded here
        await ctx.sleep(0.3)
        return out

    bodies = {f.__name__: f for f in (v1, v2_adds_code_around_steps, v2_calls_another_step)}

    @app.workflow(name="flow")
    async def flow(ctx: WorkflowContext, x: int) -> list[str]:
        try:
            return await bodies[body](ctx, x)
        except NonDeterminismError as exc:  # what the workflow code itself sees
            if caught is not None:
                caught.append(exc)
            raise

    return app


async def _run_v1_until_sleep(url: str, calls: list[str]) -> str:
    first = _versioned_app(url, calls, "v1")
    async with first:
        h = await first.start("flow", 1)
        await _stop_when(first, h.run_id, "sleep")
    return h.run_id


async def test_adding_code_around_steps_does_not_break_a_live_run(sqlite_url: str) -> None:
    calls: list[str] = []
    run_id = await _run_v1_until_sleep(sqlite_url, calls)
    second = _versioned_app(sqlite_url, calls, "v2_adds_code_around_steps")
    async with second:
        out = await second.get_handle(run_id).result(timeout=5)
    assert out == ["a:1", "b:1", "c:10"]
    assert calls == ["a", "b", "c"]


async def test_diverging_code_raises_non_determinism_error(sqlite_url: str) -> None:
    calls: list[str] = []
    run_id = await _run_v1_until_sleep(sqlite_url, calls)
    caught: list[NonDeterminismError] = []
    second = _versioned_app(sqlite_url, calls, "v2_calls_another_step", caught)
    async with second:
        h = second.get_handle(run_id)
        with pytest.raises(WorkflowFailed) as info:
            await h.result(timeout=5)
        run = await h.info()
    assert calls == ["a", "b"]  # nothing ran under the new code
    assert run.status == RunStatus.FAILED and run.flagged
    err = info.value.error or ""
    assert err.startswith("NonDeterminismError")
    assert "'b#1'" in err and "'c#1'" in err  # both the recorded and the new call named
    assert len(caught) == 1
    assert (caught[0].run_id, caught[0].recorded, caught[0].new) == (run_id, "b#1", "c#1")


async def test_removed_step_is_non_determinism(sqlite_url: str) -> None:
    calls: list[str] = []
    run_id = await _run_v1_until_sleep(sqlite_url, calls)
    # Other code (another version) that cannot replay the run: its workers leave it for
    # a worker of its version (docs/operating.md); told to take any version, it fails.
    second = make_app(sqlite_url, any_version=True)

    @second.step(name="a")
    async def a(x: int) -> str:
        return "a"

    @second.workflow(name="flow")
    async def shorter(ctx: WorkflowContext, x: int) -> list[str]:
        return [await ctx.run(a, x)]  # b#1 is in history but never called now

    async with second:
        with pytest.raises(WorkflowFailed, match="NonDeterminismError") as info:
            await second.get_handle(run_id).result(timeout=5)
    assert "b#1" in (info.value.error or "")


async def test_step_failed_is_the_same_exception_on_replay(sqlite_url: str) -> None:
    calls: list[int] = []

    def build() -> App:
        app = make_app(sqlite_url)

        @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
        async def charge(n: int) -> None:
            calls.append(n)
            raise ConnectionError(f"gateway: card {n}: declined")

        @app.workflow
        async def wf(ctx: WorkflowContext) -> list[Any]:
            try:
                await ctx.run(charge, 7)
            except StepFailed as exc:
                first = [exc.step, exc.error_type, exc.error_message, exc.attempts, str(exc)]
            await ctx.sleep(0.3)
            return first

        return app

    first_app = build()
    async with first_app:
        h = await first_app.start("wf")
        await _stop_when(first_app, h.run_id, "sleep")
    second_app = build()
    async with second_app:
        out = await second_app.get_handle(h.run_id).result(timeout=5)
    assert calls == [7, 7]  # not retried again after the restart
    assert out[:4] == ["charge", "ConnectionError", "gateway: card 7: declined", 2]
    assert "ConnectionError: gateway: card 7: declined" in out[4]


async def test_concurrent_steps_replay_by_identity(sqlite_url: str) -> None:
    calls: list[str] = []

    def build() -> App:
        app = make_app(sqlite_url)

        @app.step
        async def fetch(name: str, delay: float) -> str:
            calls.append(name)
            await asyncio.sleep(delay)
            return name.upper()

        @app.workflow
        async def fan_out(ctx: WorkflowContext) -> list[str]:
            results = await asyncio.gather(
                ctx.run(fetch, "x", 0.05), ctx.run(fetch, "y", 0.0), ctx.run(fetch, "z", 0.02)
            )
            await ctx.sleep(0.3)
            return list(results)

        return app

    first = build()
    async with first:
        h = await first.start("fan_out")
        await _stop_when(first, h.run_id, "sleep")
    second = build()
    async with second:
        assert await second.get_handle(h.run_id).result(timeout=5) == ["X", "Y", "Z"]
    assert sorted(calls) == ["x", "y", "z"]


async def test_compensation_resumes_after_a_restart(sqlite_url: str) -> None:
    calls: list[str] = []
    block_release = True

    def build() -> App:
        app = make_app(sqlite_url)

        @app.step
        async def reserve() -> None:
            calls.append("reserve")

        @app.step
        async def charge() -> None:
            calls.append("charge")

        @app.step
        async def refund() -> None:
            calls.append("refund")

        @app.step
        async def release() -> None:
            calls.append(f"release {cantata.step_info().attempt}")
            if block_release:
                await asyncio.sleep(60)  # the worker stops during this compensation

        @app.workflow
        async def order(ctx: WorkflowContext) -> None:
            await ctx.run(reserve, compensate=release)
            await ctx.run(charge, compensate=refund)
            raise RuntimeError("fraud suspected")

        return app

    first = build()
    async with first:
        h = await first.start("order")
        await eventually(lambda: "release 1" in calls)
        assert await h.status() == RunStatus.COMPENSATING
    block_release = False
    second = build()
    async with second:
        with pytest.raises(cantata.WorkflowCompensated, match="fraud suspected"):
            await second.get_handle(h.run_id).result(timeout=5)
        attempts = await second.store.load_attempts(second.name, h.run_id)
    # refund finished before the stop and is not run again; release runs again, and
    # the attempt the stop cut short is not counted (docs/leases.md)
    assert calls == ["reserve", "charge", "refund", "release 1", "release 1"]
    release = [a for a in attempts if "release" in a.key]
    assert [(a.attempt, a.error_type) for a in release] == [(1, None)]
