"""Cancellation and run deadlines: both stop at a durable point and compensate."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from cantata import (
    App,
    ConfigurationError,
    Retry,
    RunStatus,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowContext,
    WorkflowFailed,
)

from .helpers import eventually, make_app


def shop(url: str, calls: list[str]) -> App:
    app = make_app(url)

    @app.step
    async def reserve(n: int) -> None:
        calls.append(f"reserve {n}")

    @app.step
    async def release(n: int) -> None:
        calls.append(f"release {n}")

    @app.step
    async def ship(n: int) -> None:
        calls.append(f"ship {n}")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(reserve, n, compensate=release)
        await ctx.sleep(30)
        await ctx.run(ship, n)
        return "shipped"

    @app.workflow
    async def waits(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(reserve, n, compensate=release)
        await ctx.wait_for_event("invoice.approved", match={"n": n}, timeout=60)
        return "approved"

    @app.workflow
    async def bare(ctx: WorkflowContext) -> None:
        await ctx.sleep(30)

    return app


async def _entry_kind_recorded(app: App, run_id: str, kind: str) -> None:
    async def check() -> bool:
        return any(e.kind == kind for e in await app.store.load_history(app.name, run_id))

    await eventually(check)


async def test_cancel_interrupts_a_pending_sleep_at_once_and_compensates(store_url: str) -> None:
    calls: list[str] = []
    app = shop(store_url, calls)
    async with app:
        h = await app.start("order", 1)
        await _entry_kind_recorded(app, h.run_id, "sleep")
        t0 = time.monotonic()
        await h.cancel()
        with pytest.raises(WorkflowCancelled) as info:
            await h.result(timeout=5)
        assert time.monotonic() - t0 < 1.0
        assert await h.status() == RunStatus.CANCELLED
        assert str(await h.status()) == "cancelled"
        await h.cancel()  # cancelling a finished run does nothing
        assert await h.status() == RunStatus.CANCELLED
    assert calls == ["reserve 1", "release 1"]
    assert info.value.status == "cancelled"


async def test_cancel_interrupts_a_pending_wait_for_event(store_url: str) -> None:
    calls: list[str] = []
    app = shop(store_url, calls)
    async with app:
        h = await app.start("waits", 2)
        await _entry_kind_recorded(app, h.run_id, "wait")
        t0 = time.monotonic()
        await h.cancel()
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)
        assert time.monotonic() - t0 < 1.0
    assert calls == ["reserve 2", "release 2"]


async def test_cancel_without_compensation_ends_cancelled(store_url: str) -> None:
    app = shop(store_url, [])
    async with app:
        h = await app.start("bare")
        await _entry_kind_recorded(app, h.run_id, "sleep")
        await h.cancel()
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)


async def test_cancel_during_a_step_stops_at_the_next_durable_point(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[str] = []
    started = asyncio.Event()
    go_on = asyncio.Event()

    @app.step
    async def reserve() -> None:
        calls.append("reserve")
        started.set()
        await go_on.wait()

    @app.step
    async def release() -> None:
        calls.append("release")

    @app.step
    async def ship() -> None:
        calls.append("ship")

    @app.workflow
    async def order(ctx: WorkflowContext) -> None:
        await ctx.run(reserve, compensate=release)
        await ctx.run(ship)

    async with app:
        h = await app.start(order)
        await started.wait()
        await h.cancel()
        go_on.set()  # the in-flight step finishes; its compensation is now registered
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)
    assert calls == ["reserve", "release"]


async def test_cancel_during_the_last_step_ends_cancelled_and_compensates(
    store_url: str,
) -> None:
    """The run's end is its next durable point: a cancel that came while the last step
    ran is not lost because the workflow returned right after it."""
    app = make_app(store_url)
    calls: list[str] = []
    started = asyncio.Event()
    go_on = asyncio.Event()

    @app.step
    async def charge() -> None:
        calls.append("charge")
        started.set()
        await go_on.wait()

    @app.step
    async def refund() -> None:
        calls.append("refund")

    @app.workflow
    async def pay(ctx: WorkflowContext) -> str:
        await ctx.run(charge, compensate=refund)
        return "paid"

    async with app:
        h = await app.start(pay)
        await started.wait()
        await h.cancel()
        await asyncio.sleep(0.1)  # the worker has heard of the cancel
        go_on.set()
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)
        assert await h.status() == "cancelled"
    assert calls == ["charge", "refund"]


async def test_cancel_before_the_run_starts(sqlite_url: str) -> None:
    calls: list[str] = []
    client = shop(sqlite_url, calls)
    async with client.client():  # no worker in this process: the run stays pending
        h = await client.start("order", 3)
        assert await h.status() == RunStatus.PENDING
        await h.cancel()
        worker = shop(sqlite_url, calls)
        async with worker:
            with pytest.raises(WorkflowCancelled):
                await worker.get_handle(h.run_id).result(timeout=5)
    assert calls == []


async def test_cancel_from_another_process(sqlite_url: str) -> None:
    calls: list[str] = []
    worker = shop(sqlite_url, calls)
    client = make_app(sqlite_url)
    async with worker, client.client():
        h = await worker.start("order", 4)
        await _entry_kind_recorded(worker, h.run_id, "sleep")
        await client.get_handle(h.run_id).cancel()  # noticed by the worker's watch loop
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)
    assert calls == ["reserve 4", "release 4"]


async def test_deadline_fails_the_run_and_compensates(store_url: str) -> None:
    calls: list[str] = []
    app = shop(store_url, calls)
    async with app:
        t0 = time.monotonic()
        h = await app.start("order", 5, deadline=0.3)
        with pytest.raises(WorkflowCompensated) as info:
            await h.result(timeout=5)
        elapsed = time.monotonic() - t0
    assert 0.25 <= elapsed < 1.5
    assert "DeadlineExceeded" in (info.value.error or "")
    assert calls == ["reserve 5", "release 5"]


async def test_deadline_without_compensation_ends_failed(store_url: str) -> None:
    app = shop(store_url, [])
    async with app:
        h = await app.start("bare", deadline=0.2)
        with pytest.raises(WorkflowFailed) as info:
            await h.result(timeout=5)
    assert (info.value.error or "").startswith("DeadlineExceeded")


async def test_deadline_interrupts_retry_backoff(store_url: str) -> None:
    app = make_app(store_url)
    count = 0

    @app.step(retry=Retry(max_attempts=10, initial_interval=5.0))
    async def flaky() -> None:
        nonlocal count
        count += 1
        raise ConnectionError("down")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(flaky)

    async with app:
        t0 = time.monotonic()
        h = await app.start(wf, deadline=0.3)
        with pytest.raises(WorkflowFailed, match="DeadlineExceeded"):
            await h.result(timeout=5)
        assert time.monotonic() - t0 < 1.5
    assert count == 1


async def test_deadline_survives_a_restart(sqlite_url: str) -> None:
    calls: list[str] = []
    first = shop(sqlite_url, calls)
    async with first:
        t0 = time.monotonic()
        h = await first.start("order", 6, deadline=1.0)
        await _entry_kind_recorded(first, h.run_id, "sleep")
    await asyncio.sleep(0.3)
    second = shop(sqlite_url, calls)
    async with second:
        with pytest.raises(WorkflowCompensated, match="DeadlineExceeded"):
            await second.get_handle(h.run_id).result(timeout=5)
    assert time.monotonic() - t0 < 1.8
    assert calls == ["reserve 6", "release 6"]


async def test_deadline_must_be_positive(store_url: str) -> None:
    app = shop(store_url, [])
    async with app:
        with pytest.raises(ConfigurationError):
            await app.start("bare", deadline=0)
        for deadline in ("soon", True, float("nan")):
            with pytest.raises(ConfigurationError, match=(
                rf"deadline must be a number of seconds > 0, got {deadline!r}"
            )):
                await app.start("bare", deadline=deadline)  # type: ignore[arg-type]  # on purpose
        assert await app.list_runs() == []


def slow_shop(url: str, calls: list[str], seconds: float = 3.0) -> App:
    """A shop whose ``pack`` step runs past the deadlines the tests give."""
    app = shop(url, calls)

    @app.step(retry=Retry(max_attempts=5, initial_interval=0.01))
    async def pack(n: int) -> int:
        calls.append(f"pack {n}")
        await asyncio.sleep(seconds)
        return n

    @app.step(retry=Retry(max_attempts=5, initial_interval=0.01))
    def pack_sync(n: int) -> int:
        calls.append(f"pack_sync {n}")
        time.sleep(seconds)
        return n

    @app.workflow
    async def last_step_slow(ctx: WorkflowContext, n: int) -> int:
        await ctx.run("reserve", n, compensate="release")
        result: int = await ctx.run(pack, n)
        return result

    @app.workflow
    async def sync_last_step_slow(ctx: WorkflowContext, n: int) -> int:
        await ctx.run("reserve", n, compensate="release")
        result: int = await ctx.run(pack_sync, n)
        return result

    @app.workflow
    async def slow_then_ship(ctx: WorkflowContext, n: int) -> None:
        await ctx.run("reserve", n, compensate="release")
        try:
            await ctx.run(pack, n)
        except Exception:  # a deadline is not a step failure the workflow can catch
            calls.append("caught")
        await ctx.run("ship", n)

    return app


async def _cut_attempts(app: App, run_id: str, step: str) -> list[tuple[str | None, bool]]:
    attempts = await app.store.load_attempts(app.name, run_id)
    return [(a.error_type, a.ended_at is not None) for a in attempts if step in a.key]


@pytest.mark.parametrize("workflow", ["last_step_slow", "sync_last_step_slow", "slow_then_ship"])
async def test_deadline_cuts_the_step_in_flight(store_url: str, workflow: str) -> None:
    calls: list[str] = []
    # The step runs 1.6 s, past the 0.5 s deadline and past the 1.5 s within which the
    # run must have ended (so it ended by the cut, not by the step's return): a thread
    # cannot be cut, and the app's close waits for the rest of pack_sync's sleep.
    app = slow_shop(store_url, calls, seconds=1.6)
    step = "pack_sync" if workflow.startswith("sync") else "pack"
    async with app:
        t0 = time.monotonic()
        h = await app.start(workflow, 7, deadline=0.5)
        with pytest.raises(WorkflowCompensated, match="DeadlineExceeded") as info:
            await h.result(timeout=5)
        elapsed = time.monotonic() - t0
        assert await h.status() == RunStatus.COMPENSATED
        # the attempt in flight is cut like a step timeout, and not retried
        assert await _cut_attempts(app, h.run_id, step) == [("DeadlineExceeded", True)]
        entry = next(e for e in await app.store.load_history(app.name, h.run_id)
                     if e.name == step)
        assert entry.error_type == "DeadlineExceeded"
    assert 0.45 <= elapsed < 1.5, elapsed
    assert "passed its deadline" in (info.value.error or "")
    assert calls == ["reserve 7", f"{step} 7", "release 7"]


async def test_deadline_cuts_a_step_resumed_after_a_restart(sqlite_url: str) -> None:
    calls: list[str] = []
    first = slow_shop(sqlite_url, calls)
    async with first:
        t0 = time.monotonic()
        h = await first.start("last_step_slow", 8, deadline=1.2)

        async def packing() -> bool:
            return bool(await _cut_attempts(first, h.run_id, "pack"))

        await eventually(packing)
    # the first worker stopped mid-step (its attempt Interrupted); the next one resumes
    # the step and cuts it at the recorded deadline
    second = slow_shop(sqlite_url, calls)
    async with second:
        with pytest.raises(WorkflowCompensated, match="DeadlineExceeded"):
            await second.get_handle(h.run_id).result(timeout=5)
        elapsed = time.monotonic() - t0
        cut = await _cut_attempts(second, h.run_id, "pack")
    assert 1.1 <= elapsed < 2.2, elapsed
    assert cut[-1] == ("DeadlineExceeded", True)
    assert calls == ["reserve 8", "pack 8", "pack 8", "release 8"]


async def test_a_workflow_returning_past_its_deadline_does_not_complete(store_url: str) -> None:
    app = make_app(store_url)

    @app.step
    async def stubborn() -> str:
        with contextlib.suppress(asyncio.CancelledError):  # it swallows the cut
            await asyncio.sleep(3)
        return "done"

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        result: str = await ctx.run(stubborn)
        return result

    async with app:
        h = await app.start(wf, deadline=0.3)
        with pytest.raises(WorkflowFailed, match="DeadlineExceeded"):
            await h.result(timeout=5)
        assert await h.status() == RunStatus.FAILED
