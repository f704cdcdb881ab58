"""Sagas: compensations run in reverse, only for steps that succeeded, with their own retries."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from cantata import (
    App,
    Retry,
    RunStatus,
    StepFailed,
    WorkflowCompensated,
    WorkflowContext,
    WorkflowFailed,
)

from .helpers import make_app

ONCE = Retry(max_attempts=1)
FAST = Retry(max_attempts=3, initial_interval=0.01)


def saga_app(
    store_url: str, calls: list[tuple[str, object]]
) -> tuple[App, dict[str, Callable[..., Any]], Callable[..., Any]]:
    app = make_app(store_url)

    def recorder(name: str) -> Callable[..., Any]:
        async def fn(x: int) -> str:
            calls.append((name, x))
            return f"{name}:{x}"

        fn.__name__ = name
        return app.step(retry=FAST)(fn)

    steps = {n: recorder(n) for n in ("reserve", "charge", "ship", "release", "refund", "unship")}

    @app.step(retry=ONCE)
    async def explode(x: int) -> None:
        calls.append(("explode", x))
        raise RuntimeError(f"carrier down for {x}")

    return app, steps, explode


async def test_failed_step_runs_compensations_in_reverse_order(store_url: str) -> None:
    calls: list[tuple[str, object]] = []
    app, s, explode = saga_app(store_url, calls)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(s["reserve"], n, compensate=s["release"])
        await ctx.run(s["charge"], n + 1, compensate=s["refund"])
        await ctx.run(s["ship"], n + 2, compensate=s["unship"])
        await ctx.run(explode, n + 3)
        return "done"

    async with app:
        h = await app.start(order, 10)
        with pytest.raises(WorkflowCompensated) as info:
            await h.result(timeout=5)
        assert await h.status() == RunStatus.COMPENSATED
    # each compensation gets the arguments of the step it undoes, newest first
    assert calls == [
        ("reserve", 10), ("charge", 11), ("ship", 12), ("explode", 13),
        ("unship", 12), ("refund", 11), ("release", 10),
    ]
    err = info.value.error or ""
    assert "StepFailed" in err and "RuntimeError" in err and "carrier down for 13" in err
    assert info.value.status == "compensated"
    assert info.value.run_id == h.run_id


async def test_failure_with_no_compensation_registered_ends_failed(store_url: str) -> None:
    calls: list[tuple[str, object]] = []
    app, s, explode = saga_app(store_url, calls)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(s["reserve"], n)
        await ctx.run(explode, n)
        return "done"

    async with app:
        h = await app.start(order, 1)
        with pytest.raises(WorkflowFailed) as info:
            await h.result(timeout=5)
        assert str(await h.status()) == "failed"
    assert "carrier down for 1" in (info.value.error or "")
    assert calls == [("reserve", 1), ("explode", 1)]


async def test_workflow_raising_compensates(store_url: str) -> None:
    calls: list[tuple[str, object]] = []
    app, s, _ = saga_app(store_url, calls)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(s["reserve"], n, compensate=s["release"])
        raise ValueError("customer is blocked")

    async with app:
        h = await app.start(order, 5)
        with pytest.raises(WorkflowCompensated) as info:
            await h.result(timeout=5)
    assert calls == [("reserve", 5), ("release", 5)]
    assert "ValueError: customer is blocked" in (info.value.error or "")


async def test_compensation_registered_only_after_its_step_succeeded(store_url: str) -> None:
    calls: list[tuple[str, object]] = []
    app, s, explode = saga_app(store_url, calls)

    @app.workflow
    async def partial(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(s["reserve"], n, compensate=s["release"])
        await ctx.run(explode, n, compensate=s["refund"])  # fails: refund must not run
        return "done"

    @app.workflow
    async def nothing_done(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(explode, n, compensate=s["refund"])
        return "done"

    async with app:
        h = await app.start(partial, 1)
        with pytest.raises(WorkflowCompensated):
            await h.result(timeout=5)
        assert calls == [("reserve", 1), ("explode", 1), ("release", 1)]

        calls.clear()
        h2 = await app.start(nothing_done, 2)
        with pytest.raises(WorkflowFailed):  # its only step failed: nothing to compensate
            await h2.result(timeout=5)
        assert calls == [("explode", 2)]


async def test_compensations_do_not_run_when_the_workflow_completes(store_url: str) -> None:
    calls: list[tuple[str, object]] = []
    app, s, explode = saga_app(store_url, calls)

    @app.workflow
    async def tolerant(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(s["reserve"], n, compensate=s["release"])
        try:
            await ctx.run(explode, n, compensate=s["refund"])
        except StepFailed as exc:
            return f"recovered from {exc.error_type}"
        return "done"

    async with app:
        h = await app.start(tolerant, 3)
        assert await h.result(timeout=5) == "recovered from RuntimeError"
        assert await h.status() == RunStatus.COMPLETED
    assert calls == [("reserve", 3), ("explode", 3)]


async def test_compensation_named_by_string(store_url: str) -> None:
    calls: list[tuple[str, object]] = []
    app, _, _ = saga_app(store_url, calls)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        await ctx.run("reserve", n, compensate="release")
        raise RuntimeError("no")

    async with app:
        h = await app.start(order, 4)
        with pytest.raises(WorkflowCompensated):
            await h.result(timeout=5)
    assert calls == [("reserve", 4), ("release", 4)]


async def test_compensation_is_retried(store_url: str) -> None:
    app = make_app(store_url)
    undo_attempts: list[int] = []

    @app.step
    async def reserve(n: int) -> None:
        return None

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01))
    async def release(n: int) -> None:
        import cantata

        undo_attempts.append(cantata.step_info().attempt)
        if len(undo_attempts) < 2:
            raise ConnectionError("inventory flaky")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        await ctx.run(reserve, n, compensate=release)
        raise RuntimeError("payment declined")

    async with app:
        h = await app.start(order, 1)
        with pytest.raises(WorkflowCompensated):
            await h.result(timeout=5)
        attempts = await app.store.load_attempts(app.name, h.run_id)
        info = await h.info()
    assert undo_attempts == [1, 2]
    comp = [a for a in attempts if "release" in a.key]
    assert [a.attempt for a in comp] == [1, 2]
    assert comp[0].error_type == "ConnectionError"
    assert not info.flagged


async def test_compensation_failing_for_good_fails_the_run_flagged(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[str] = []

    @app.step
    async def reserve(n: int) -> None:
        calls.append("reserve")

    @app.step
    async def charge(n: int) -> None:
        calls.append("charge")

    @app.step
    async def release(n: int) -> None:
        calls.append("release")

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def refund(n: int) -> None:
        calls.append("refund")
        raise RuntimeError("refund API rejected the request")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        await ctx.run(reserve, n, compensate=release)
        await ctx.run(charge, n, compensate=refund)
        raise ValueError("shipping address invalid")

    async with app:
        h = await app.start(order, 1)
        with pytest.raises(WorkflowFailed) as info:
            await h.result(timeout=5)
        run = await h.info()
        failed = await app.list_runs(status="failed")
    # the failed refund is retried, then the remaining compensations still run
    assert calls == ["reserve", "charge", "refund", "refund", "release"]
    assert run.status == RunStatus.FAILED
    assert run.flagged
    err = info.value.error or ""
    assert "ValueError: shipping address invalid" in err
    assert "refund API rejected the request" in err
    assert [r.run_id for r in failed] == [h.run_id]


async def test_steps_that_complete_in_parallel_branches_after_a_failure_are_compensated(
    store_url: str,
) -> None:
    """A saga undoes every completed step with a compensation, newest first: a step of
    an asyncio.gather branch still running when another branch failed is waited for,
    then undone; no branch begins a step once the run has failed."""
    calls: list[str] = []
    app = make_app(store_url)

    @app.step(retry=ONCE)
    async def quick(n: int) -> int:
        calls.append("quick")
        return n

    @app.step(retry=ONCE)
    async def slow(n: int) -> int:
        await asyncio.sleep(0.4)
        calls.append("slow")
        return n

    @app.step(retry=ONCE)
    async def boom(n: int) -> None:
        await asyncio.sleep(0.1)
        calls.append("boom")
        raise RuntimeError(f"carrier down for {n}")

    @app.step(retry=ONCE)
    async def after(n: int) -> None:
        calls.append("after")

    @app.step
    async def undo_quick(n: int) -> None:
        calls.append("undo_quick")

    @app.step
    async def undo_slow(n: int) -> None:
        calls.append("undo_slow")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        async def branch() -> None:
            await ctx.run(slow, n, compensate=undo_slow)
            await ctx.run(after, n)  # the run failed meanwhile: never begun

        await asyncio.gather(ctx.run(quick, n, compensate=undo_quick), branch(),
                             ctx.run(boom, n))

    async with app:
        handle = await app.start(order, 1)
        with pytest.raises(WorkflowCompensated, match="carrier down for 1"):
            await handle.result(timeout=10)
        history = await app.store.load_history(app.name, handle.run_id)
    assert calls == ["quick", "boom", "slow", "undo_slow", "undo_quick"]
    assert [(e.key, e.status) for e in history] == [
        ("quick#1", "completed"), ("slow#1", "completed"), ("boom#1", "failed"),
        ("compensate:undo_slow#1", "completed"), ("compensate:undo_quick#1", "completed")]
