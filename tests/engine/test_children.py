"""Child workflows: ``ctx.call`` and ``ctx.start_child``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata import (
    App,
    RunStatus,
    WorkflowCallError,
    WorkflowCancelled,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.engine.branches import RunTask
from cantata.store.sqlite import SQLiteStore
from tests.helpers import with_schema

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


# -- a child never exists in the store without its parent ---------------------------------

# Each creation of a run that names a parent, in the store's own database: whether its
# parent was stored at that moment (a trigger, so every path of the store is seen).
_SQLITE_PROBE = """
CREATE TABLE IF NOT EXISTS child_probe (child TEXT, parent TEXT, parent_stored INTEGER);
CREATE TRIGGER IF NOT EXISTS child_probe_insert BEFORE INSERT ON runs
WHEN NEW.parent_run_id IS NOT NULL
BEGIN
    INSERT INTO child_probe VALUES (NEW.run_id, NEW.parent_run_id, EXISTS (
        SELECT 1 FROM runs WHERE app = NEW.app AND run_id = NEW.parent_run_id));
END;
"""

_PG_PROBE = """
CREATE TABLE "{s}".child_probe (child text, parent text, parent_stored boolean);
CREATE FUNCTION "{s}".child_probe() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO "{s}".child_probe VALUES (NEW.run_id, NEW.parent_run_id, EXISTS (
        SELECT 1 FROM "{s}".runs WHERE app = NEW.app AND run_id = NEW.parent_run_id));
    RETURN NEW;
END $$;
CREATE TRIGGER child_probe BEFORE INSERT ON "{s}".runs FOR EACH ROW
WHEN (NEW.parent_run_id IS NOT NULL) EXECUTE FUNCTION "{s}".child_probe();
"""


class ChildProbe:
    """The ``child_probe`` rows of a store's database, read apart from the store."""

    def __init__(self, url: str, schema: str | None) -> None:
        self.url, self.schema = url, schema

    def _sqlite(self) -> Any:
        import sqlite3

        return sqlite3.connect(self.url.removeprefix("sqlite:///"))

    async def install(self) -> None:
        if self.schema is None:
            with contextlib.closing(self._sqlite()) as db:
                db.executescript(_SQLITE_PROBE)
            return
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(_PG_PROBE.format(s=self.schema))
        finally:
            await conn.close()

    async def rows(self) -> list[tuple[str, str, bool]]:
        if self.schema is None:
            with contextlib.closing(self._sqlite()) as db:
                found = db.execute("SELECT child, parent, parent_stored FROM child_probe")
                return [(c, p, bool(s)) for c, p, s in found.fetchall()]
        import asyncpg

        conn = await asyncpg.connect(self.url)
        try:
            rows = await conn.fetch(
                f'SELECT child, parent, parent_stored FROM "{self.schema}".child_probe')
        finally:
            await conn.close()
        return [(r[0], r[1], bool(r[2])) for r in rows]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def probed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, ChildProbe]]:
    """A store URL, and the probe of child creations its database will hold."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/cantata.db"
        yield url, ChildProbe(url, None)
        return
    server: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")
    yield with_schema(server, schema), ChildProbe(server, schema)


@pytest.mark.parametrize("parent", [
    "calls_first", "starts_first", "yields_then_calls", "calls_queued_first", "runs_then_calls",
])
async def test_a_parent_is_stored_before_its_child_is_created(
    probed: tuple[str, ChildProbe], parent: str,
) -> None:
    """A run started here is stored with its first checkpoint: when that is a child's
    creation, the parent is stored first (a crash between the two writes, or a lost
    answer, would leave a child whose parent never existed)."""
    url, probe = probed
    app = make_app(url)
    app.queue("kids", concurrency=4)

    @app.workflow
    async def kid(ctx: WorkflowContext, n: int) -> int:
        return n * 10

    @app.workflow(queue="kids")
    async def queued_kid(ctx: WorkflowContext, n: int) -> int:
        return n * 100

    @app.step
    async def before(n: int) -> int:
        return n

    @app.workflow
    async def calls_first(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call(kid, n))

    @app.workflow
    async def starts_first(ctx: WorkflowContext, n: int) -> str:
        return await ctx.start_child(kid, n)

    @app.workflow
    async def yields_then_calls(ctx: WorkflowContext, n: int) -> int:
        await asyncio.sleep(0)  # (its creation is under way meanwhile)
        return int(await ctx.call(kid, n))

    @app.workflow
    async def calls_queued_first(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call(queued_kid, n))

    @app.workflow
    async def runs_then_calls(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call(kid, await ctx.run(before, n)))

    async with app:
        await probe.install()
        handles = [await app.start(parent, n) for n in range(1, 4)]
        for h in handles:
            await h.result(timeout=10)
        children = [c for h in handles for c in await app.store.child_runs(app.name, h.run_id)]
        probed_rows = await probe.rows()
    assert len(children) == 3, children
    assert sorted(child for child, _, _ in probed_rows) == sorted(c.run_id for c in children)
    orphans = [(child, p) for child, p, stored in probed_rows if not stored]
    assert orphans == [], f"children created before their parent was stored: {orphans}"


class EndsDuringTheLook(SQLiteStore):
    """A store whose answer to a parent's look at its child (``get_run`` in the
    parent's task) is read before the child ends and given once it has ended (a slow
    read): the child's end arrives while the look is in flight."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.ended = asyncio.Event()
        self.held = 0

    async def commit_run(self, app: str, run_id: str, fence: int, write: Any) -> None:
        await super().commit_run(app, run_id, fence, write)
        if write.wake is not None and write.status is not None and write.status.is_final:
            self.ended.set()  # a child's final checkpoint (it wakes its parent)

    async def get_run(self, app: str, run_id: str) -> Any:
        run = await super().get_run(app, run_id)
        if (run is not None and run.parent_run_id is not None and not run.status.is_final
                and isinstance(asyncio.current_task(), RunTask) and not self.ended.is_set()):
            self.held += 1
            await asyncio.wait_for(self.ended.wait(), 10)
            await asyncio.sleep(0.05)  # its news delivered meanwhile
        return run


async def test_a_childs_end_during_its_parents_look_wakes_the_parent(tmp_path: Path) -> None:
    store = EndsDuringTheLook(str(tmp_path / "look.db"))
    # A wait in ctx.call is woken by news; without any, it looks every 10 s only.
    app = App("look", store=store, lease=30, poll_interval=10, shutdown_grace=0.2)

    @app.workflow
    async def kid(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep(0.3)  # (ends once its parent looks at it)
        return n * 10

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call(kid, n))

    async with app:
        handle = await app.start(parent, 4)
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await handle.result(timeout=20) == 40
        took = loop.time() - began
    assert store.held == 1, "the child ended before its parent looked at it"
    assert took < 3, f"the parent took {took:.1f} s to see its child's end: it missed the news"
