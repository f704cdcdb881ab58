"""A saga's run taken by code of another version keeps its version, whether it is
claimed outside a queue or begins in one (docs/operating.md, versions)."""

from __future__ import annotations

from typing import Any

from cantata import App, Saga, Step, WorkflowContext
from tests.engine.helpers import make_app


def shop(url: str, version: str) -> App:
    """A saga and a plain workflow, each started in the queue ``q`` or outside it."""
    app = make_app(url, version=version)
    app.queue("q")

    @app.step
    async def reserve(data: dict[str, Any]) -> str:
        return "reserved"

    @app.step
    async def release(data: dict[str, Any]) -> None: ...

    @app.workflow
    async def plain(ctx: WorkflowContext, data: dict[str, Any]) -> str:
        return str(await ctx.run(reserve, data))

    app.include(Saga("order", Step(reserve, compensate=release)))
    return app


async def test_a_saga_run_of_another_version_keeps_it_in_and_out_of_a_queue(
    sqlite_url: str,
) -> None:
    """A client of v1 (a version no worker serves) starts runs; a v2 worker takes them.
    The plain workflow's runs are pinned to v2, in a queue or not; the saga's keep v1
    either way: its calls are its map's."""
    old, new = shop(sqlite_url, "v1"), shop(sqlite_url, "v2")
    async with old.client():
        runs = {(wf, queue): (await old.start(wf, {"id": 1}, queue=queue)).run_id
                for wf in ("order", "plain") for queue in ("q", None)}
    async with new:
        for run_id in runs.values():
            await new.get_handle(run_id).result(timeout=20)
        versions = {key: (await new.get_handle(run_id).info()).version
                    for key, run_id in runs.items()}
    assert versions == {("order", "q"): "v1", ("order", None): "v1",
                        ("plain", "q"): "v2", ("plain", None): "v2"}
