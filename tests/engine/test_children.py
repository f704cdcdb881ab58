"""Child workflows: ``ctx.call`` and ``ctx.start_child``."""

from __future__ import annotations

import pytest

from cantata import (
    App,
    RunStatus,
    WorkflowCallError,
    WorkflowCancelled,
    WorkflowContext,
    WorkflowFailed,
)

from .helpers import eventually, make_app


def family(url: str, calls: list[str]) -> App:
    app = make_app(url)

    @app.step
    async def reserve(n: int) -> None:
        calls.append(f"reserve {n}")

    @app.step
    async def release(n: int) -> None:
        calls.append(f"release {n}")

    @app.workflow
    async def child(ctx: WorkflowContext, n: int) -> dict[str, object]:
        await ctx.run(reserve, n, compensate=release)
        return {"n": n, "correlation_id": ctx.correlation_id, "run_id": ctx.run_id}

    @app.workflow
    async def failing_child(ctx: WorkflowContext, n: int) -> None:
        raise RuntimeError(f"child {n} broke")

    @app.workflow
    async def sleepy_child(ctx: WorkflowContext, n: int) -> None:
        await ctx.run(reserve, n, compensate=release)
        await ctx.sleep(30)

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> dict[str, object]:
        out = await ctx.call(child, n)
        return {"child": out, "correlation_id": ctx.correlation_id, "run_id": ctx.run_id}

    @app.workflow
    async def parent_of_failure(ctx: WorkflowContext, n: int) -> str:
        try:
            await ctx.call("failing_child", n)
        except WorkflowCallError as exc:
            return f"caught: {exc}"
        return "?"

    @app.workflow
    async def parent_uncaught(ctx: WorkflowContext, n: int) -> None:
        await ctx.call(failing_child, n)

    @app.workflow
    async def fire_and_forget(ctx: WorkflowContext, n: int) -> str:
        return await ctx.start_child(child, n)

    @app.workflow
    async def parent_of_sleeper(ctx: WorkflowContext, n: int) -> None:
        await ctx.start_child(sleepy_child, n)
        await ctx.call(sleepy_child, n + 1)

    return app


async def test_call_returns_the_child_result_and_shares_the_correlation_id(
    store_url: str,
) -> None:
    app = family(store_url, [])
    async with app:
        h = await app.start("parent", 1, correlation_id="order-1")
        out = await h.result(timeout=5)
        children = await app.store.child_runs(app.name, h.run_id)
        parent_info = await h.info()
    assert out["correlation_id"] == "order-1"
    assert out["child"]["correlation_id"] == "order-1"
    assert out["child"]["n"] == 1
    assert [c.run_id for c in children] == [out["child"]["run_id"]]
    assert children[0].parent_run_id == h.run_id
    assert children[0].workflow == "child"
    assert children[0].status == RunStatus.COMPLETED
    assert parent_info.correlation_id == "order-1"


async def test_correlation_id_defaults_to_the_root_run(store_url: str) -> None:
    app = family(store_url, [])
    async with app:
        h = await app.start("parent", 2)
        out = await h.result(timeout=5)
    assert out["correlation_id"] == h.run_id
    assert out["child"]["correlation_id"] == h.run_id


async def test_start_child_does_not_wait(store_url: str) -> None:
    calls: list[str] = []
    app = family(store_url, calls)
    async with app:
        h = await app.start("fire_and_forget", 3)
        child_id = await h.result(timeout=5)
        child = app.get_handle(child_id)
        out = await child.result(timeout=5)
        assert (await child.info()).correlation_id == h.run_id
    assert out["n"] == 3
    assert calls == ["reserve 3"]


async def test_child_failure_raises_workflow_call_error(store_url: str) -> None:
    app = family(store_url, [])
    async with app:
        h = await app.start("parent_of_failure", 4)
        out = await h.result(timeout=5)
        assert out.startswith("caught:") and "child 4 broke" in out and "failed" in out
        h2 = await app.start("parent_uncaught", 5)
        with pytest.raises(WorkflowFailed) as info:
            await h2.result(timeout=5)
    assert (info.value.error or "").startswith("WorkflowCallError")


async def test_cancelling_the_parent_cancels_its_children(store_url: str) -> None:
    calls: list[str] = []
    app = family(store_url, calls)
    async with app:
        h = await app.start("parent_of_sleeper", 10)

        async def both_asleep() -> bool:
            kids = await app.store.child_runs(app.name, h.run_id)
            if len(kids) != 2:
                return False
            for kid in kids:
                history = await app.store.load_history(app.name, kid.run_id)
                if not any(e.kind == "sleep" for e in history):
                    return False
            return True

        await eventually(both_asleep)
        await h.cancel()
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=5)
        kids = await app.store.child_runs(app.name, h.run_id)
        for kid in kids:
            with pytest.raises(WorkflowCancelled):
                await app.get_handle(kid.run_id).result(timeout=5)
    assert sorted(calls) == ["release 10", "release 11", "reserve 10", "reserve 11"]


async def test_call_survives_a_restart_without_a_second_child(sqlite_url: str) -> None:
    calls: list[str] = []
    app = make_app(sqlite_url)

    @app.step
    async def note(x: str) -> None:
        calls.append(x)

    @app.workflow
    async def slow_child(ctx: WorkflowContext, n: int) -> int:
        await ctx.run(note, f"child {n}")
        await ctx.sleep(0.5)
        return n * 3

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> int:
        await ctx.run(note, "parent")
        return int(await ctx.call(slow_child, n)) + 1

    async with app:
        h = await app.start(parent, 5)

        async def child_asleep() -> bool:
            kids = await app.store.child_runs(app.name, h.run_id)
            return bool(kids) and any(
                e.kind == "sleep" for e in await app.store.load_history(app.name, kids[0].run_id)
            )

        await eventually(child_asleep)
    async with app:  # reopen the same app object on the same file
        assert await app.get_handle(h.run_id).result(timeout=5) == 16
        kids = await app.store.child_runs(app.name, h.run_id)
    assert len(kids) == 1
    assert calls == ["parent", "child 5"]
