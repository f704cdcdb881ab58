"""A run's state is freed by reference counting once its run ends, not left in
reference cycles for the garbage collector (docs/performance.md, round nineteen): in a
burst of sagas the collector then has less to walk, less often. The cycles were the
execution and its task, the execution and its journal, and each step's guard and the
context its body ran in."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App
from cantata.testing.wait import eventually


async def test_an_ended_runs_execution_is_freed_without_the_garbage_collector(
    tmp_path: Path,
) -> None:
    app = App("freed", store=f"sqlite:///{tmp_path}/freed.db", broker="embedded")
    go = asyncio.Event()

    @app.step
    async def reserve(n: int) -> int:
        await go.wait()
        return n

    @app.step
    async def charge(n: int) -> int:
        cantata.heartbeat({"n": n})
        return n + 1

    @app.workflow
    async def order(ctx: Any, n: int) -> int:
        await ctx.run(reserve, n)
        return int(await ctx.run(charge, n))

    async with app, _no_collector():
        handle, gone = await _started(app, order, go)
        assert await handle.result(timeout=20) == 2
        await _freed(app, handle, gone)


async def test_a_compensated_runs_execution_is_freed_without_the_garbage_collector(
    tmp_path: Path,
) -> None:
    """A step that failed for good (its ``StepFailed`` kept in a frame its traceback
    holds) and the outcome raised by ``result()`` leave no cycle either."""
    app = App("freed", store=f"sqlite:///{tmp_path}/freed.db", broker="embedded")
    go = asyncio.Event()
    undone: list[int] = []

    @app.step
    async def reserve(n: int) -> int:
        await go.wait()
        return n

    @app.step
    async def release(n: int) -> None:
        undone.append(n)

    @app.step(retry=cantata.Retry(max_attempts=1))
    async def charge(n: int) -> int:
        raise ValueError(f"card {n} declined")

    @app.workflow
    async def order(ctx: Any, n: int) -> int:
        await ctx.run(reserve, n, compensate=release)
        return int(await ctx.run(charge, n))

    async with app, _no_collector():
        handle, gone = await _started(app, order, go)
        with pytest.raises(cantata.WorkflowCompensated, match="card 1 declined") as info:
            await handle.result(timeout=20)
        del info  # the outcome raised is freed with it: result() kept no cycle
        assert not [o for o in gc.get_objects()
                    if isinstance(o, cantata.WorkflowCompensated) and handle.run_id in str(o)]
        assert undone == [1]
        await _freed(app, handle, gone)


@contextlib.asynccontextmanager
async def _no_collector() -> AsyncIterator[None]:
    """The garbage collector off: what is freed is freed by reference counting."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


async def _started(app: App, order: Any, go: asyncio.Event) -> tuple[Any, weakref.ref[Any]]:
    """A run of ``order`` started, a weak reference to its execution, then let go on."""
    handle = await app.start(order, 1)
    await eventually(lambda: handle.run_id in app.engine.executions)
    gone = weakref.ref(app.engine.executions[handle.run_id])
    go.set()
    return handle, gone


async def _freed(app: App, handle: Any, gone: weakref.ref[Any]) -> None:
    """The run's execution is gone from the engine and freed."""
    await eventually(lambda: handle.run_id not in app.engine.executions)
    await asyncio.sleep(0.05)  # (the run's task's last callbacks)
    assert gone() is None, _holders(gone())


def _holders(obj: object) -> list[str]:
    """What refers to ``obj``, frames by their function's name (the message of a failure)."""
    return [f"frame {r.f_code.co_qualname}" if hasattr(r, "f_code") else type(r).__name__
            for r in gc.get_referrers(obj)]
