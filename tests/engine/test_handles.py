"""Handles: start by name, get_handle, status, list_runs, result timeouts and outcomes."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum

import pytest

from cantata import (
    ConfigurationError,
    ResultTimeout,
    RunHandle,
    RunInfo,
    RunNotFound,
    RunStatus,
    StoreUnavailable,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowContext,
    WorkflowError,
    WorkflowFailed,
)

from .helpers import make_app


def test_run_status_is_a_str_enum() -> None:
    assert issubclass(RunStatus, enum.StrEnum)
    assert [str(s) for s in RunStatus] == [
        "pending", "running", "compensating", "completed", "compensated", "failed", "cancelled",
    ]
    assert RunStatus.COMPLETED == "completed"  # type: ignore[comparison-overlap]  # on purpose
    assert f"{RunStatus.FAILED}" == "failed"
    assert {s for s in RunStatus if s.is_final} == {
        RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.FAILED, RunStatus.CANCELLED,
    }


async def test_start_by_name_and_get_handle(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow(name="greet")
    async def greeting(ctx: WorkflowContext, who: str, punct: str) -> str:
        return f"hello {who}{punct}"

    async with app:
        h = await app.start("greet", "ada", "!")
        assert isinstance(h, RunHandle)
        assert await h.result(timeout=5) == "hello ada!"
        same = app.get_handle(h.run_id)
        status = await same.status()
        assert isinstance(status, RunStatus)
        assert status == RunStatus.COMPLETED
        assert str(status) == "completed"
        assert await same.result() == "hello ada!"
        info = await same.info()
        assert info.workflow == "greet" and info.run_id == h.run_id
        assert same.workflow == "greet"
        with pytest.raises(RunNotFound):
            await app.get_handle("no-such-run").status()
        with pytest.raises(RunNotFound):
            await app.get_handle("no-such-run").result(timeout=1)
        with pytest.raises(RunNotFound):
            await app.get_handle("no-such-run").cancel()
    with pytest.raises(ConfigurationError, match="not open"):
        await app.start("greet", "x", "y")


async def test_result_timeout_leaves_the_run_going(store_url: str) -> None:
    app = make_app(store_url)
    release = asyncio.Event()

    @app.step
    async def wait_for_release() -> str:
        await release.wait()
        return "released"

    @app.workflow
    async def slow(ctx: WorkflowContext) -> str:
        return str(await ctx.run(wait_for_release))

    async with app:
        h = await app.start(slow)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        with pytest.raises(ResultTimeout) as info:
            await h.result(timeout=0.2)
        assert 0.15 <= loop.time() - t0 < 1.0
        assert h.run_id in str(info.value)
        assert await h.status() == RunStatus.RUNNING
        release.set()
        assert await h.result(timeout=5) == "released"


async def test_result_raises_per_final_status(store_url: str) -> None:
    app = make_app(store_url)

    @app.step
    async def reserve() -> None:
        return None

    @app.step
    async def release() -> None:
        return None

    @app.workflow
    async def fails(ctx: WorkflowContext) -> None:
        raise RuntimeError("plain failure")

    @app.workflow
    async def compensates(ctx: WorkflowContext) -> None:
        await ctx.run(reserve, compensate=release)
        raise RuntimeError("undo it")

    @app.workflow
    async def sleeps(ctx: WorkflowContext) -> None:
        await ctx.sleep(30)

    async with app:
        h1 = await app.start(fails)
        with pytest.raises(WorkflowFailed) as f:
            await h1.result(timeout=5)
        h2 = await app.start(compensates)
        with pytest.raises(WorkflowCompensated) as c:
            await h2.result(timeout=5)
        h3 = await app.start(sleeps)
        await h3.cancel()
        with pytest.raises(WorkflowCancelled) as x:
            await h3.result(timeout=5)
    for exc, status in ((f, "failed"), (c, "compensated"), (x, "cancelled")):
        assert isinstance(exc.value, WorkflowError)
        assert exc.value.status == status
    assert f.value.error == "RuntimeError: plain failure"
    assert "RuntimeError: undo it" in (c.value.error or "")
    assert "Cancelled" in (x.value.error or "")


async def test_list_runs_filters(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def ok(ctx: WorkflowContext, n: int) -> int:
        return n

    @app.workflow
    async def bad(ctx: WorkflowContext, n: int) -> int:
        raise ValueError(f"bad {n}")

    async with app:
        oks = [await app.start(ok, n) for n in range(4)]
        bads = [await app.start(bad, n) for n in range(2)]
        for h in oks:
            await h.result(timeout=5)
        for h in bads:
            with pytest.raises(WorkflowFailed):
                await h.result(timeout=5)

        every = await app.list_runs()
        assert len(every) == 6
        assert all(isinstance(r, RunInfo) for r in every)
        failed = await app.list_runs(status="failed")
        assert {r.run_id for r in failed} == {h.run_id for h in bads}
        assert all(r.error and r.error.startswith("ValueError: bad") for r in failed)
        assert all(r.workflow == "bad" and r.status == RunStatus.FAILED for r in failed)
        done = await app.list_runs(status=RunStatus.COMPLETED, workflow="ok")
        assert {r.run_id for r in done} == {h.run_id for h in oks}
        assert await app.list_runs(status="completed", workflow="bad") == []
        assert len(await app.list_runs(workflow="ok", limit=2)) == 2
        assert await app.list_runs(limit=0) == []
        for limit in (-5, 2.5, True):
            with pytest.raises(ConfigurationError, match=r"limit=\.\.\.\) must be a whole"):
                await app.list_runs(limit=limit)  # type: ignore[arg-type]
        first = every[0]
        assert isinstance(first.created_at, dt.datetime) and first.created_at.tzinfo is not None
        assert first.updated_at >= first.created_at
        # newest first
        assert [r.created_at for r in every] == sorted((r.created_at for r in every),
                                                        reverse=True)
        with pytest.raises(ConfigurationError, match="unknown run status"):
            await app.list_runs(status="done")


async def test_client_process_starts_and_follows_runs_served_elsewhere(sqlite_url: str) -> None:
    worker = make_app(sqlite_url)

    @worker.workflow
    async def double(ctx: WorkflowContext, n: int) -> int:
        return n * 2

    client = make_app(sqlite_url)  # declares nothing: knows the workflow from the store
    async with worker, client.client():
        h = await client.start("double", 21, idempotency_key="d-21")
        assert await h.result(timeout=5) == 42
        assert await client.get_handle(h.run_id).status() == RunStatus.COMPLETED
        assert [r.run_id for r in await client.list_runs(workflow="double")] == [h.run_id]


async def test_a_run_that_ended_here_answers_result_without_a_read(store_url: str) -> None:
    """result() asked for after the run ended in this process: its final record, from
    memory (the throughput of many starts then many results needs no read per run)."""
    app = make_app(store_url)

    @app.workflow
    async def double(ctx: WorkflowContext, n: int) -> int:
        return 2 * n

    async with app:
        handles = await asyncio.gather(*(app.start(double, n) for n in range(5)))
        await asyncio.gather(*(h.result(timeout=5) for h in handles))
        assert app._engine is not None
        store = app._engine.store
        reads: list[str] = []
        get_run = store.get_run

        async def counted(app_name: str, run_id: str) -> object:
            reads.append(run_id)
            return await get_run(app_name, run_id)

        store.get_run = counted  # type: ignore[method-assign, assignment]
        assert [await h.result(timeout=5) for h in handles] == [0, 2, 4, 6, 8]
        assert reads == []
        assert await app.get_handle(handles[0].run_id).status() == RunStatus.COMPLETED
        assert reads == [handles[0].run_id]  # status() still reads the store


async def test_cancelled_callers_leave_the_run_and_other_waiters_alone(store_url: str) -> None:
    """A start() cancelled while its run is being stored, and a result() cancelled while
    it waits, touch neither the run nor another caller waiting for the same run (each
    waits on a future of its own)."""
    app = make_app(store_url)
    release = asyncio.Event()

    @app.step
    async def wait_for_release() -> str:
        await release.wait()
        return "released"

    @app.workflow(name="held")
    async def held(ctx: WorkflowContext) -> str:
        return str(await ctx.run(wait_for_release))

    async with app:
        starting = asyncio.ensure_future(app.start(held))
        await asyncio.sleep(0)  # inside create_run, the run not stored yet
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        h = await app.start(held)
        for _ in range(50):  # the cancelled start's run is stored and runs all the same
            runs = await app.list_runs(workflow="held")
            if len(runs) == 2:
                break
            await asyncio.sleep(0.02)
        assert len(runs) == 2
        cancelled = asyncio.ensure_future(h.result(timeout=5))
        waiting = asyncio.ensure_future(h.result(timeout=5))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        release.set()
        assert await waiting == "released"
        assert await h.result(timeout=5) == "released"
        others = [r.run_id for r in runs if r.run_id != h.run_id]
        assert await app.get_handle(others[0]).result(timeout=5) == "released"


async def test_a_result_timeout_that_is_no_number_is_refused_naming_it(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def echo(ctx: WorkflowContext, n: int) -> int:
        return n

    async with app:
        h = await app.start(echo, 1)
        for timeout in ("x", True, -1):
            with pytest.raises(ConfigurationError, match=rf"result timeout must be .*{timeout!r}"):
                await h.result(timeout=timeout)  # type: ignore[arg-type]
        assert await h.result(timeout=5) == 1


async def test_a_handle_outlives_the_block_it_was_made_in(sqlite_url: str) -> None:
    """A handle from an earlier `async with app.client():` works once the app is open
    again (it takes the app's new connections); while the app is closed it says so."""
    app = make_app(sqlite_url)

    @app.workflow
    async def echo(ctx: WorkflowContext, n: int) -> int:
        return n

    async with app.client():
        h = await app.start(echo, 5)
        assert await h.status() == RunStatus.PENDING
    with pytest.raises(StoreUnavailable, match="is not open: use `async with app:` first"):
        await h.status()
    async with app:
        assert await h.result(timeout=5) == 5
        assert (await h.info()).status == RunStatus.COMPLETED
    async with app.client():
        assert await h.status() == RunStatus.COMPLETED
