"""A step's end, deferred to share the run's next commit, is committed on its own once
the run's own task yields to the event loop without a write (engine/checkpoint.py,
``FlushAtYield``; a branch's task: tests/engine/test_crash.py)."""

from __future__ import annotations

import asyncio

from cantata import WorkflowContext

from .helpers import eventually, make_app


async def _completed(app: object, run_id: str, name: str) -> bool:
    history = await app.store.load_history(app.name, run_id)  # type: ignore[attr-defined]
    return any(e.name == name and e.status == "completed" for e in history)


async def test_a_step_end_is_durable_while_the_run_awaits_something_else(
    store_url: str,
) -> None:
    """The workflow runs a step in its own task, then awaits what no write follows (an
    event of the process): the step's result is stored meanwhile, not held until the
    run's next write (a crash then would run the step again)."""
    app = make_app(store_url)
    release = asyncio.Event()

    @app.step
    async def reserve(n: int) -> int:
        return n + 1

    @app.step
    async def ship(n: int) -> int:
        return n * 10

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        a = int(await ctx.run(reserve, n))
        await release.wait()  # not durable: reserve's end must be stored by now
        return int(await ctx.run(ship, a))

    async with app:
        h = await app.start(order, 4)
        try:
            await eventually(lambda: _completed(app, h.run_id, "reserve"), timeout=5)
        finally:
            release.set()
        assert await h.result(timeout=5) == 50
