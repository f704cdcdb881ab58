"""Branches of a workflow cancelled by its own code (an ``asyncio.TaskGroup`` whose other
branch failed, a timeout around a step), and branches it did not await: a step in
progress ends as it will, its outcome recorded, and is compensated if the run unwinds;
a replay meets the cancel where the first execution did (engine/branches.py)."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from typing import Any

import pytest

from cantata import (
    App,
    Retry,
    RunStatus,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.engine.replaycheck import replay_report
from cantata.model import codec

from .helpers import eventually, make_app

ONCE = Retry(max_attempts=1)


def _steps(history: list[Any]) -> list[tuple[str, str]]:
    return [(e.key, e.status) for e in history]


async def _until(began: set[str], *names: str) -> None:
    """Wait until the step bodies ``names`` have begun (a failure then finds them in
    progress, however slow the machine)."""
    await eventually(lambda: began.issuperset(names))


def _cancelled(history: list[Any], key: str) -> bool:
    [entry] = [e for e in history if e.key == key]
    return bool(codec.loads(entry.detail or "{}").get("cancelled"))


async def test_steps_in_progress_in_branches_a_taskgroup_cancels_are_waited_for_and_undone(
    sqlite_url: str,
) -> None:
    """A TaskGroup cancels the other branches when one fails: a step still running in
    them (an async body, a sync one in its thread) ends, is recorded and compensated;
    the branch begins no further step."""
    calls: list[str] = []
    began: set[str] = set()
    app = make_app(sqlite_url)

    @app.step(retry=ONCE)
    async def hold(n: int) -> int:
        began.add("hold")
        await asyncio.sleep(0.4)
        calls.append("hold")
        return n

    @app.step(retry=ONCE)
    def pack(n: int) -> int:
        began.add("pack")
        time.sleep(0.4)  # in its thread: a cancel of its branch cannot stop it
        calls.append("pack")
        return n

    @app.step(retry=ONCE)
    async def boom(n: int) -> None:
        await _until(began, "hold", "pack")
        calls.append("boom")
        raise RuntimeError(f"carrier down for {n}")

    @app.step(retry=ONCE)
    async def after(n: int) -> None:
        calls.append("after")

    @app.step
    async def unhold(n: int) -> None:
        calls.append("unhold")

    @app.step
    async def unpack(n: int) -> None:
        calls.append("unpack")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        async def holding() -> None:
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)  # its branch was cancelled meanwhile: never begun

        async with asyncio.TaskGroup() as group:
            group.create_task(holding())
            group.create_task(ctx.run(pack, n, compensate=unpack))
            group.create_task(ctx.run(boom, n))

    async with app:
        handle = await app.start(order, 1)
        with pytest.raises(WorkflowCompensated, match="RuntimeError: carrier down for 1"):
            await handle.result(timeout=10)
        history = await app.store.load_history(app.name, handle.run_id)
    assert calls[0] == "boom"
    assert sorted(calls[1:3]) == ["hold", "pack"]
    assert sorted(calls[3:]) == ["unhold", "unpack"]
    steps = _steps(history)
    assert sorted(steps[:3]) == [
        ("boom#1", "failed"),
        ("hold#1", "completed"),
        ("pack#1", "completed"),
    ]
    assert sorted(steps[3:]) == [
        ("compensate:unhold#1", "completed"),
        ("compensate:unpack#1", "completed"),
    ]
    assert _cancelled(history, "hold#1") and _cancelled(history, "pack#1")
    assert not _cancelled(history, "boom#1")


async def test_a_step_the_taskgroup_body_awaits_is_waited_for_when_a_branch_fails(
    sqlite_url: str,
) -> None:
    """The body of ``async with TaskGroup()`` runs in the run's own task, which the group
    cancels when a branch fails: the step it awaits ends first and is compensated."""
    calls: list[str] = []
    began: set[str] = set()
    app = make_app(sqlite_url)

    @app.step(retry=ONCE)
    async def hold(n: int) -> int:
        began.add("hold")
        await asyncio.sleep(0.4)
        calls.append("hold")
        return n

    @app.step(retry=ONCE)
    async def boom(n: int) -> None:
        await _until(began, "hold")
        calls.append("boom")
        raise RuntimeError("carrier down")

    @app.step(retry=ONCE)
    async def after(n: int) -> None:
        calls.append("after")

    @app.step
    async def unhold(n: int) -> None:
        calls.append("unhold")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(ctx.run(boom, n))
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)

    async with app:
        handle = await app.start(order, 1)
        with pytest.raises(WorkflowCompensated, match="carrier down"):
            await handle.result(timeout=10)
        history = await app.store.load_history(app.name, handle.run_id)
    assert calls == ["boom", "hold", "unhold"]
    assert _steps(history) == [
        ("hold#1", "completed"),
        ("boom#1", "failed"),
        ("compensate:unhold#1", "completed"),
    ]
    assert _cancelled(history, "hold#1")


async def test_a_timeout_in_the_workflows_code_takes_effect_once_the_step_has_ended(
    sqlite_url: str,
) -> None:
    """``asyncio.timeout`` or ``asyncio.wait_for`` around ``ctx.run``: the step is not cut
    (its effect would be unknown); the timeout is raised once it has ended, recorded. A
    timeout inside a step's body still cuts the body, as ever."""
    calls: list[str] = []
    app = make_app(sqlite_url)

    @app.step(retry=ONCE)
    async def hold(n: int) -> int:
        await asyncio.sleep(1.5)
        calls.append(f"hold {n}")
        return n

    @app.step(retry=ONCE)
    async def bounded(n: int) -> str:
        try:
            async with asyncio.timeout(0.05):  # the body's own: it cuts the body
                await asyncio.sleep(5)
        except TimeoutError:
            return "body timed out"
        return "never"

    @app.workflow
    async def scoped(ctx: WorkflowContext, n: int) -> list[str]:
        out = [await ctx.run(bounded, n)]
        try:
            async with asyncio.timeout(0.5):
                out.append(str(await ctx.run(hold, n)))
        except TimeoutError:
            out.append("timed out")
        return out

    @app.workflow
    async def waited(ctx: WorkflowContext, n: int) -> str:
        try:
            return str(await asyncio.wait_for(ctx.run(hold, n), 0.5))
        except TimeoutError:
            return "timed out"

    async with app:
        first = await app.start(scoped, 1)
        second = await app.start(waited, 2)
        since = time.monotonic()
        assert await first.result(timeout=10) == ["body timed out", "timed out"]
        assert await second.result(timeout=10) == "timed out"
        assert time.monotonic() - since >= 1.4  # the steps ended first
        histories = [await app.store.load_history(app.name, h.run_id) for h in (first, second)]
    assert sorted(calls) == ["hold 1", "hold 2"]
    assert _steps(histories[0]) == [("bounded#1", "completed"), ("hold#1", "completed")]
    assert _steps(histories[1]) == [("hold#1", "completed")]
    assert _cancelled(histories[0], "hold#1") and _cancelled(histories[1], "hold#1")


async def test_a_step_waiting_to_retry_in_a_cancelled_branch_is_not_attempted_again(
    sqlite_url: str,
) -> None:
    calls: list[str] = []
    began: set[str] = set()
    app = make_app(sqlite_url)

    @app.step(retry=Retry(max_attempts=3, initial_interval=3.0))
    async def flaky(n: int) -> None:
        calls.append("flaky")
        began.add("flaky")
        raise ConnectionError("db blip")

    @app.step(retry=ONCE)
    async def boom(n: int) -> None:
        await _until(began, "flaky")
        raise RuntimeError("carrier down")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(ctx.run(flaky, n))
            group.create_task(ctx.run(boom, n))

    async with app:
        handle = await app.start(order, 1)
        since = time.monotonic()
        with pytest.raises(WorkflowFailed, match="carrier down"):
            await handle.result(timeout=10)
        assert time.monotonic() - since < 2.5  # not after the 3 s backoff
        history = await app.store.load_history(app.name, handle.run_id)
    assert calls == ["flaky"]
    [entry] = [e for e in history if e.key == "flaky#1"]
    assert (entry.status, entry.attempts, entry.error_type) == ("failed", 1, "ConnectionError")
    assert "not attempted again" in (entry.error or "")
    assert _cancelled(history, "flaky#1")


async def test_a_cancel_or_the_deadline_meeting_taskgroup_branches_ends_the_run(
    sqlite_url: str,
) -> None:
    """A run cancel or its deadline is raised in the branches of a TaskGroup, which
    raises them as a group: the run ends cancelled (or failed past its deadline),
    compensated, not stuck on an error the engine does not know."""
    calls: list[str] = []
    app = make_app(sqlite_url)

    @app.step
    async def reserve(n: int) -> int:
        calls.append(f"reserve {n}")
        return n

    @app.step
    async def release(n: int) -> None:
        calls.append(f"release {n}")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        async def branch(k: int) -> None:
            await ctx.run(reserve, n * 10 + k, compensate=release)
            await ctx.sleep(30)

        async with asyncio.TaskGroup() as group:
            group.create_task(branch(1))
            group.create_task(branch(2))

    async with app:
        cancelled = await app.start(order, 1)
        late = await app.start(order, 2, deadline=0.5)
        await eventually(lambda: len(calls) == 4)
        await cancelled.cancel()
        with pytest.raises(WorkflowCancelled):
            await cancelled.result(timeout=10)
        with pytest.raises(WorkflowCompensated, match="DeadlineExceeded"):
            await late.result(timeout=10)
    assert sorted(calls[4:]) == ["release 11", "release 12", "release 21", "release 22"]


def _replay_app(sqlite_url: str, calls: list[str], block: asyncio.Event | None) -> App:
    app = make_app(sqlite_url)
    began: set[str] = set()

    @app.step(retry=ONCE)
    async def hold(n: int) -> int:
        began.add("hold")
        await asyncio.sleep(0.4)
        calls.append("hold")
        return n

    @app.step(retry=ONCE)
    async def boom(n: int) -> None:
        await _until(began, "hold")
        calls.append("boom")
        raise RuntimeError("carrier down")

    @app.step(retry=ONCE)
    async def after(n: int) -> None:
        calls.append("after")

    @app.step
    async def unhold(n: int) -> None:
        calls.append("unhold")
        if block is not None:
            await block.wait()  # the worker stops during this compensation

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        async def holding() -> None:
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)

        async with asyncio.TaskGroup() as group:
            group.create_task(holding())
            group.create_task(ctx.run(boom, n))

    return app


async def test_a_replay_meets_the_cancel_of_a_branch_where_the_first_execution_did(
    sqlite_url: str,
) -> None:
    """The worker stops while the run undoes a step whose branch the TaskGroup had
    cancelled; the worker resuming the run replays that branch: it gets the cancel
    after the step again, instead of going on to a step the run never began."""
    calls: list[str] = []
    first = _replay_app(sqlite_url, calls, asyncio.Event())
    async with first:
        handle = await first.start("order", 1)
        await eventually(lambda: "unhold" in calls)
        assert await handle.status() == RunStatus.COMPENSATING
    report = await _replay_report(sqlite_url, calls)
    assert (sum(report.checked.values()), report.problems) == (1, [])
    second = _replay_app(sqlite_url, calls, None)
    async with second:
        with pytest.raises(WorkflowCompensated, match="carrier down"):
            await second.get_handle(handle.run_id).result(timeout=10)
        history = await second.store.load_history(second.name, handle.run_id)
    assert calls == ["boom", "hold", "unhold", "unhold"]  # the compensation cut, again
    assert _steps(history) == [
        ("hold#1", "completed"),
        ("boom#1", "failed"),
        ("compensate:unhold#1", "completed"),
    ]


async def _replay_report(sqlite_url: str, calls: list[str]) -> Any:
    """``cantata check-replay`` of the live runs with the same code."""
    checker = _replay_app(sqlite_url, calls, None)
    async with checker.client():
        return await replay_report(checker)


def _unawaited_app(sqlite_url: str, calls: list[str], block: asyncio.Event | None) -> App:
    app = make_app(sqlite_url)

    @app.step(retry=ONCE)
    async def quick(n: int) -> int:
        # the branch's step has begun: the run returns (or raises) while it is in progress
        await eventually(lambda: "hold" in calls)
        calls.append("quick")
        return n

    @app.step(retry=ONCE)
    async def hold(n: int) -> int:
        calls.append("hold")
        if block is not None:
            await block.wait()  # the worker stops while it runs
        await asyncio.sleep(0.4)
        calls.append("held")
        return n

    @app.step(retry=ONCE)
    async def after(n: int) -> None:
        calls.append("after")

    @app.step
    async def unhold(n: int) -> None:
        calls.append("unhold")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        async def holding() -> None:
            await ctx.run(hold, n, compensate=unhold)
            await ctx.run(after, n)  # the run has returned by then: never begun

        asyncio.create_task(holding())  # noqa: RUF006 (the mistake this test is about)
        await ctx.run(quick, n)
        if n < 0:
            raise ValueError("negative order")
        return "placed"

    return app


async def test_a_run_ends_only_once_a_step_of_a_branch_it_did_not_await_has_ended(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A workflow that returns (or raises) while a task it started is in a step: the
    run waits for the step, records its outcome before the run's end, warns (a return)
    and compensates it (a failure); the branch begins nothing more."""
    calls: list[str] = []
    app = _unawaited_app(sqlite_url, calls, None)
    async with app:
        with caplog.at_level(logging.WARNING, logger="cantata.engine"):
            placed = await app.start("order", 1)
            assert await placed.result(timeout=10) == "placed"
        first, calls[:] = calls[:], []
        failed = await app.start("order", -1)
        with pytest.raises(WorkflowCompensated, match="negative order"):
            await failed.result(timeout=10)
        run = await placed.info()
        history = await app.store.load_history(app.name, placed.run_id)
        undone = await app.store.load_history(app.name, failed.run_id)
    assert first == ["hold", "quick", "held"]
    assert calls == ["hold", "quick", "held", "unhold"]
    assert sorted(_steps(history)) == [("hold#1", "completed"), ("quick#1", "completed")]
    assert all(e.ended_at is not None and e.ended_at <= run.updated_at for e in history)
    assert sorted(_steps(undone)) == [
        ("compensate:unhold#1", "completed"),
        ("hold#1", "completed"),
        ("quick#1", "completed"),
    ]
    [warning] = [r.getMessage() for r in caplog.records if "did not await" in r.getMessage()]
    assert f"workflow order (run {placed.run_id}) returned while step hold#1" in warning


async def test_a_replay_of_a_run_waiting_for_a_step_it_did_not_await_ends_the_same_way(
    sqlite_url: str,
) -> None:
    """The worker stops while the run, returned, waits for the step of a branch it did
    not await; the worker resuming the run replays it: the step in progress runs
    again (it had begun), and the run completes once it has, with nothing more begun."""
    calls: list[str] = []
    first = _unawaited_app(sqlite_url, calls, asyncio.Event())
    async with first:
        handle = await first.start("order", 1)
        await eventually(lambda: calls == ["hold", "quick"])
        await asyncio.sleep(0.2)
        assert await handle.status() == RunStatus.RUNNING  # returned, waiting for hold
    second = _unawaited_app(sqlite_url, calls, None)
    async with second:
        assert await second.get_handle(handle.run_id).result(timeout=10) == "placed"
        history = await second.store.load_history(second.name, handle.run_id)
    assert calls == ["hold", "quick", "hold", "held"]
    assert sorted(_steps(history)) == [("hold#1", "completed"), ("quick#1", "completed")]


def _timeout_app(sqlite_url: str, calls: list[str], *, cancels: bool) -> App:
    """``order`` runs ``hold`` under a timeout shorter than the step (``cancels``), then
    sleeps; the newer code (not ``cancels``) awaits ``hold`` without one."""
    app = make_app(sqlite_url)

    @app.step(retry=ONCE)
    async def hold(n: int) -> int:
        calls.append("hold")
        await asyncio.sleep(0.3)
        return n

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        if cancels:
            try:
                async with asyncio.timeout(0.05):
                    await ctx.run(hold, n)
            except TimeoutError:
                pass
        else:
            await ctx.run(hold, n)
        await ctx.sleep(60)
        return "placed"

    return app


async def test_a_replay_whose_code_no_longer_cancels_the_branch_is_non_determinism(
    sqlite_url: str,
) -> None:
    """History says the code's timeout cancelled the branch of ``hold#1``; code that now
    awaits ``hold`` to its end diverged from that history: the replay (and check-replay)
    says so, naming the step, instead of waiting at the step for good."""
    calls: list[str] = []
    first = _timeout_app(sqlite_url, calls, cancels=True)
    async with first:
        handle = await first.start("order", 1)
        await _entry_recorded(first, handle.run_id, "sleep#1")
        history = await first.store.load_history(first.name, handle.run_id)
    assert _cancelled(history, "hold#1")
    checker = _timeout_app(sqlite_url, calls, cancels=False)
    async with checker.client():
        report = await asyncio.wait_for(replay_report(checker), 10)
    [problem] = report.problems
    assert (problem.problem, problem.recorded) == ("non_determinism", "hold#1")
    assert "cancelled the branch of step 'hold#1'" in problem.detail
    second = _timeout_app(sqlite_url, calls, cancels=False)
    async with second:
        with pytest.raises(WorkflowFailed, match=r"NonDeterminismError.*cancelled the branch "
                                                 r"of step 'hold#1'.*now awaits its result"):
            await second.get_handle(handle.run_id).result(timeout=10)
        run = await second.get_handle(handle.run_id).info()
    assert run.flagged
    assert calls == ["hold"]  # replayed, never run again


async def _entry_recorded(app: App, run_id: str, key: str) -> None:
    async def check() -> bool:
        return any(e.key == key for e in await app.store.load_history(app.name, run_id))

    await eventually(check)


async def test_a_stopped_branch_it_did_not_await_logs_no_unretrieved_exception(
    sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The branch the run stopped (it returned, or failed, while the branch's step was in
    progress) ends with the engine's signal, which nobody awaits: asyncio must not log
    it as "Task exception was never retrieved". A branch's own error still is logged,
    and so is the warning naming the step the run waited for."""
    calls: list[str] = []
    app = _unawaited_app(sqlite_url, calls, None)

    @app.workflow
    async def buggy(ctx: WorkflowContext, n: int) -> str:
        async def holding() -> None:
            await ctx.run("hold", n)
            raise RuntimeError("a bug in the branch")

        asyncio.create_task(holding())  # noqa: RUF006 (the mistake this test is about)
        await ctx.run("quick", n)
        return "placed"

    async with app:
        with caplog.at_level(logging.WARNING):
            assert await (await app.start("order", 1)).result(timeout=10) == "placed"
            with pytest.raises(WorkflowCompensated, match="negative order"):
                await (await app.start("order", -1)).result(timeout=10)
            calls[:] = []
            assert await (await app.start(buggy, 2)).result(timeout=10) == "placed"
            await eventually(lambda: "held" in calls)
            for _ in range(3):
                await asyncio.sleep(0.05)
                gc.collect()  # (asyncio logs an unretrieved exception when its task goes)
    unretrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert [str(r.exc_info[1]) for r in unretrieved if r.exc_info] == ["a bug in the branch"]
    assert [r for r in caplog.records if "did not await" in r.getMessage()]
