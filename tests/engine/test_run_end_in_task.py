"""What the engine does at a run's end (``Engine.launch``'s ``done``: the run leaves
``executions``, its local ``result()`` waiters are answered) is done by the run's task
itself as its last act (``RunExecution.execute``), not by a loop callback one pass
later; a task that never gets there (cancelled before its first step) still has it
done, by the task's done callback (docs/performance.md, round twenty-seven)."""

from __future__ import annotations

import asyncio
from typing import Any

from cantata import WorkflowContext

from .helpers import eventually, make_app


async def test_result_is_answered_in_the_pass_the_run_ends(store_url: str) -> None:
    """The caller of ``result()`` is woken by the run's task itself: it runs before
    the callbacks the task's end schedules (it ran after them when a done callback
    answered it)."""
    app = make_app(store_url)

    @app.step
    async def reserve(n: int) -> int:
        return n + 1

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(reserve, n))

    order_seen: list[str] = []
    async with app:
        for n in range(3):
            order_seen.clear()
            h = await app.start(order, n)
            execution = app.engine.executions[h.run_id]
            assert execution.task is not None
            execution.task.add_done_callback(lambda _t: order_seen.append("task ended"))
            assert await h.result(timeout=10) == n + 1
            order_seen.append("result")
            assert h.run_id not in app.engine.executions
            assert execution.task is None and execution.on_end is None
            await asyncio.sleep(0)
            assert order_seen == ["result", "task ended"], order_seen


async def test_a_run_task_cancelled_before_its_first_step_still_ends_in_the_engine(
    sqlite_url: str,
) -> None:
    """A run's task cancelled before its coroutine ever ran (so ``execute`` never gets
    to its end): the task's done callback does the engine's end of it, and the run is
    resumed from the store (its flush stored it) and completes."""
    app = make_app(sqlite_url)

    @app.step
    async def reserve(n: int) -> int:
        return n + 1

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(reserve, n))

    async with app:
        engine = app.engine
        launch = engine.launch
        first: list[Any] = []

        def cancelled_at_once(*args: Any, **kwargs: Any) -> Any:
            execution = launch(*args, **kwargs)
            if not first:  # the first execution: its task is cancelled before it begins
                first.append(execution)
                execution.let_go()
            return execution

        engine.launch = cancelled_at_once  # type: ignore[method-assign]
        h = await app.start(order, 4)
        x = first[0]

        async def ended_in_engine() -> bool:
            return x.task is None and engine.executions.get(h.run_id) is not x

        await eventually(ended_in_engine, timeout=10)
        assert x.on_end is None
        assert await h.result(timeout=20) == 5


async def test_a_new_run_whose_code_yields_before_its_first_write_is_stored(
    store_url: str,
) -> None:
    """A run started here is stored with its first commit; if its code first awaits
    something else (an event of the process), the run is stored when its task yields
    (checkpoint.expect_creation, through FlushAtYield): ``start()`` returns meanwhile."""
    app = make_app(store_url)
    release = asyncio.Event()

    @app.step
    async def reserve(n: int) -> int:
        return n + 1

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        await release.wait()  # no write before this
        return int(await ctx.run(reserve, n))

    async with app:
        try:
            h = await asyncio.wait_for(app.start(order, 4), timeout=5)
            assert (await app.store.get_run(app.name, h.run_id)) is not None
        finally:
            release.set()
        assert await h.result(timeout=10) == 5
