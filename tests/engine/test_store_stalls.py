"""A store slower than its driver's timeouts, met in a run's own task, is waited out.

A timeout that ends by cancelling the task it runs in (``asyncio.timeout``, asyncpg's
connect timeout) must never be taken for the workflow's code cancelling a step's
branch (engine/branches.py): the run goes on and completes; the workflow's code sees
no ``CancelledError``, no step runs twice, no attempt is charged ``WorkerLost``.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cantata import App, StoreUnavailable, WorkflowContext
from cantata.engine.branches import RunTask
from cantata.model.records import EntryKind
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from tests.helpers import eventually, with_schema
from tests.stall_proxy import stall_proxy

STALL = 2.5  # seconds: longer than the store's timeout (1 s)


def stall_app(store: Any, gate: asyncio.Event, entered: asyncio.Event,
              seen: list[str]) -> App:
    """Step ``first`` waits for ``gate``; then the limited step ``second`` asks the
    store for its slot, in the run's own task."""
    app = App("stall", store=store, lease=10, poll_interval=0.05, shutdown_grace=1)

    @app.step
    async def first() -> int:
        seen.append("first")
        entered.set()
        await gate.wait()
        return 1

    @app.step(concurrency=1)
    async def second(n: int) -> int:
        return n + 1

    @app.workflow
    async def flow(ctx: WorkflowContext) -> int:
        a = await ctx.run(first)
        try:
            return int(await ctx.run(second, a))
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    return app


async def connects_stalled(proxy: Any, gate: asyncio.Event) -> None:
    """Every pooled connection is lost and connecting takes longer than its timeout
    while the workflow goes on past ``gate``; then the store answers again."""
    proxy.cut()  # every pooled connection is lost: the next use connects...
    proxy.stall()  # ...and connecting takes longer than its timeout
    await asyncio.sleep(0.2)
    gate.set()
    await asyncio.sleep(STALL)
    assert proxy.held, "nothing tried to connect during the stall"
    proxy.resume()


async def check_run(app: App, run_id: str, seen: list[str]) -> None:
    attempts = await app.store.load_attempts(app.name, run_id)
    history = await app.store.load_history(app.name, run_id)
    assert seen == ["first"], f"the workflow's code saw {seen}"
    assert [(a.key, a.error_type) for a in attempts] == [
        ("first#1", None), ("second#1", None)], attempts
    assert all("cancelled" not in (e.detail or "") for e in history), history


@pytest.mark.postgres
async def test_a_connect_slower_than_its_timeout_for_a_steps_slot_is_waited_out(
    postgres_url: str, fresh_schema: str
) -> None:
    seen: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), fresh_schema),
                              connect_timeout=1.0)
        app = stall_app(store, gate, entered, seen)
        async with app:
            handle = await app.start("flow")
            await asyncio.wait_for(entered.wait(), 10)
            await connects_stalled(proxy, gate)
            assert await handle.result(timeout=20) == 2
            await check_run(app, handle.run_id, seen)


class SlowSlots(SQLiteStore):
    """A store whose slot requests go through a timeout of its own
    (``asyncio.timeout``), as a store backend of another package may write them; while
    ``answering`` is clear, an answer takes longer than that timeout."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.answering = asyncio.Event()
        self.answering.set()

    async def acquire_slot(self, *args: Any, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(1.0):
                await self.answering.wait()
                return await super().acquire_slot(*args, **kwargs)
        except TimeoutError:
            raise StoreUnavailable("the store did not answer within 1 s") from None


async def test_a_store_timeout_in_a_runs_task_is_not_a_cancel_of_the_step(
    tmp_path: Any,
) -> None:
    seen: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    store = SlowSlots(str(tmp_path / "slow.db"))
    app = stall_app(store, gate, entered, seen)
    async with app:
        handle = await app.start("flow")
        await asyncio.wait_for(entered.wait(), 10)
        store.answering.clear()
        gate.set()
        await asyncio.sleep(STALL)
        store.answering.set()
        assert await handle.result(timeout=20) == 2
        await check_run(app, handle.run_id, seen)


async def waits_for_child(app: App, run_id: str) -> bool:
    """The run has recorded its call of a child and waits for it."""
    history = await app.store.load_history(app.name, run_id)
    return any(e.kind == EntryKind.CHILD for e in history)


@pytest.mark.postgres
async def test_a_store_error_met_by_a_waits_look_is_not_raised_in_the_workflows_code(
    postgres_url: str, fresh_schema: str
) -> None:
    seen: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), fresh_schema),
                              connect_timeout=1.0)
        app = App("stall", store=store, lease=10, poll_interval=0.05, shutdown_grace=1)

        @app.step
        async def slow() -> int:
            entered.set()
            await gate.wait()
            return 7

        @app.workflow
        async def child(ctx: WorkflowContext) -> int:
            return int(await ctx.run(slow))

        @app.workflow
        async def parent(ctx: WorkflowContext) -> str:
            try:  # (a workflow that takes any error of its child for the child's failure)
                return f"child said {await ctx.call(child)}"
            except Exception as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
                return "gave up"

        async with app:
            handle = await app.start("parent")
            await asyncio.wait_for(entered.wait(), 10)
            await eventually(lambda: waits_for_child(app, handle.run_id), what="the call recorded")
            proxy.cut()  # the parent's wait looks at its child in the store meanwhile
            proxy.stall()
            await asyncio.sleep(STALL)
            assert proxy.held, "nothing tried to connect during the stall"
            proxy.resume()
            gate.set()
            assert await handle.result(timeout=20) == "child said 7", seen
        assert seen == []


# -- store errors met by the engine's code behind a ``ctx`` call --------------------------


class FailsOnce(SQLiteStore):
    """A store one of whose calls fails once, as in an outage, when ``arm`` asked for it:
    ``declare`` of a wait, ``create_run`` of a child (``after``: once stored, its answer
    lost), or ``declarations`` (read by ``ctx.emit`` for its orphan count), in a run's
    own task (``declarations``: in any task)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.armed: dict[str, bool] = {}  # method -> fail after doing it
        self.failed = asyncio.Event()

    def arm(self, method: str, after: bool = False) -> None:
        self.armed[method] = after

    async def _once(self, method: str, call: Any, *, any_task: bool = False) -> Any:
        if method not in self.armed or not (
                any_task or isinstance(asyncio.current_task(), RunTask)):
            return await call
        after = self.armed.pop(method)
        if after:
            await call
        else:
            call.close()
        self.failed.set()
        raise StoreUnavailable(f"the store failed {method} (a test's outage)")

    async def declare(self, app: str, declarations: Any) -> None:
        if any(d.kind == "wait" for d in declarations):
            return await self._once("declare", super().declare(app, declarations))
        return await super().declare(app, declarations)

    async def create_run(self, run: Any, *args: Any, **kwargs: Any) -> Any:
        if run.parent_run_id is not None:
            return await self._once("create_run", super().create_run(run, *args, **kwargs))
        return await super().create_run(run, *args, **kwargs)

    async def declarations(self, app: str) -> Any:
        # (any task: a burst of orphan checks shares one read, made in a task of its
        # own, choreography/orphans.py; its failure reaches every check waiting for it)
        return await self._once("declarations", super().declarations(app), any_task=True)


def add_child(app: App, ran: list[str]) -> tuple[Any, Any]:
    """A step ``work`` (noted in ``ran`` each time it runs) and a workflow ``child`` of
    that one step."""

    @app.step
    async def work(n: int) -> int:
        ran.append(f"work {n}")
        return n * 10

    @app.workflow
    async def child(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(work, n))

    return work, child


def outage_app(store: FailsOnce, seen: list[str], ran: list[str]) -> App:
    """Workflows that take any error of a ``ctx`` call for a business failure."""
    app = App("outage", store=store, lease=3, poll_interval=0.05, shutdown_grace=1)

    work, child = add_child(app, ran)

    @app.workflow
    async def waiter(ctx: WorkflowContext, kind: str) -> str:
        try:  # (the type is not a literal: no worker declared this wait when it opened)
            event = await ctx.wait_for_event(kind)
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            return "gave up"
        return f"got {event.data}"

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(work, 0)  # (stored already: the outage meets the child's creation)
        try:
            return f"child said {await ctx.call(child, n)}"
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            return "gave up"

    @app.workflow
    async def emitter(ctx: WorkflowContext, kind: str) -> str:
        try:
            event = await ctx.emit(kind, {"n": 1})
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            return "gave up"
        return f"emitted {event.type}"

    return app


async def no_worker_lost(app: App, run_id: str) -> None:
    attempts = await app.store.load_attempts(app.name, run_id)
    assert all(a.error_type != "WorkerLost" for a in attempts), attempts


async def test_a_store_error_declaring_a_wait_is_an_outage_and_the_wait_is_declared(
    tmp_path: Any,
) -> None:
    seen: list[str] = []
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, seen, [])
    async with app:
        store.arm("declare")
        handle = await app.start("waiter", "order.paid")
        await asyncio.wait_for(store.failed.wait(), 10)

        async def declared() -> bool:
            return any(d.kind == "wait" and d.name == "waiter" and d.pattern == "order.paid"
                       for d in await app.store.declarations(app.name))

        # The run goes on from its history and declares its wait again.
        await eventually(declared, timeout=10, what="the wait declared after the outage")
        await app.publish("order.paid", {"id": 7})
        assert await handle.result(timeout=10) == "got {'id': 7}", seen
        assert seen == []
        await no_worker_lost(app, handle.run_id)


@pytest.mark.parametrize("after", [False, True], ids=["refused", "answer-lost"])
async def test_a_store_error_starting_a_child_is_an_outage_and_the_child_starts_once(
    tmp_path: Any, after: bool,
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, seen, ran)
    async with app:
        store.arm("create_run", after=after)
        handle = await app.start("parent", 4)
        assert await handle.result(timeout=12) == "child said 40", seen
        assert store.failed.is_set()
        assert seen == []
        children = await app.find_runs(workflow="child")
        assert len(children) == 1, children
        assert ran == ["work 0", "work 4"]
        await no_worker_lost(app, handle.run_id)


async def test_a_store_error_met_by_an_emit_is_an_outage_and_the_event_is_emitted_once(
    tmp_path: Any,
) -> None:
    seen: list[str] = []
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, seen, [])
    async with app:
        await asyncio.sleep(2.1)  # past the cache of the declarations read when it opened
        store.arm("declarations")  # read for the orphan count of a type none declares
        handle = await app.start("emitter", "parcel.sent")
        assert await handle.result(timeout=10) == "emitted parcel.sent", seen
        assert store.failed.is_set()
        assert seen == []
        events = await app.store.find_events(app.name, "parcel.sent", since=0,
                                              exclude=[], limit=10)
        assert len(events) == 1, events
        await no_worker_lost(app, handle.run_id)


@pytest.mark.postgres
async def test_a_connect_slower_than_its_timeout_for_a_childs_creation_is_an_outage(
    postgres_url: str, fresh_schema: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), fresh_schema),
                              connect_timeout=1.0)
        app = App("stall", store=store, lease=10, poll_interval=0.05, shutdown_grace=1)

        @app.step
        async def first() -> int:
            ran.append("first")
            entered.set()
            await gate.wait()
            return 3

        _, child = add_child(app, ran)

        @app.workflow
        async def parent(ctx: WorkflowContext) -> str:
            n = await ctx.run(first)
            try:  # (its first store call after the step: the child's creation)
                return f"child said {await ctx.call(child, n)}"
            except Exception as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
                return "gave up"

        async with app:
            handle = await app.start("parent")
            await asyncio.wait_for(entered.wait(), 10)
            await connects_stalled(proxy, gate)
            assert await handle.result(timeout=20) == "child said 30", seen
            assert seen == []
            assert ran == ["first", "work 3"], "a step ran twice"
            assert len(await app.find_runs(workflow="child")) == 1
            await no_worker_lost(app, handle.run_id)


async def stored_runs(server_url: str, schema: str, workflow: str) -> list[tuple[str, str]]:
    """(run_id, parent_run_id) of the runs of ``workflow`` committed in the server, read
    apart from the store under test (not through the proxy)."""
    import asyncpg

    conn = await asyncpg.connect(server_url)
    try:
        rows = await conn.fetch(
            f'SELECT run_id, parent_run_id FROM "{schema}".runs WHERE workflow=$1', workflow)
    finally:
        await conn.close()
    return [(r[0], r[1]) for r in rows]


@pytest.mark.postgres
async def test_a_childs_creation_whose_answer_is_lost_leaves_no_child_without_its_parent(
    postgres_url: str, fresh_schema: str
) -> None:
    """A run started here is stored with its first checkpoint. When its first store call
    is its child's creation and the connection is cut once that creation reached the
    server (its answer lost: an outage), the parent must be stored already: else the
    starter is told to start it again, and a child whose parent never existed runs
    anyway, its result delivered to nobody."""
    marker = "lost-answer-child-3f9c"  # (the child's argument: in its creation only)
    seen: list[str] = []
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), fresh_schema),
                              connect_timeout=1.0)
        app = App("stall", store=store, lease=3, poll_interval=0.05, shutdown_grace=1)

        @app.step
        async def work(tag: str) -> str:
            ran.append(tag)
            return "done"

        @app.workflow
        async def kid(ctx: WorkflowContext, tag: str) -> str:
            return str(await ctx.run(work, tag))

        @app.workflow
        async def parent(ctx: WorkflowContext) -> str:
            try:  # (its first store call: its child's creation)
                return f"child said {await ctx.call(kid, marker)}"
            except Exception as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
                return "gave up"

        async with app:
            proxy.stall_after(marker.encode())
            start = asyncio.ensure_future(app.start(parent))
            await asyncio.wait_for(proxy.marked.wait(), 10)
            await eventually(lambda: stored_runs(postgres_url, fresh_schema, "kid"),
                             what="the child's creation committed in the server")
            proxy.cut()  # its answer, held, is lost with the connection
            await asyncio.sleep(STALL)  # connecting again takes longer than its timeout
            proxy.resume()
            try:
                handle, start_failed = await start, None
            except Exception as exc:
                start_failed = exc
            kids = await stored_runs(postgres_url, fresh_schema, "kid")
            parents = {r for r, _ in await stored_runs(postgres_url, fresh_schema, "parent")}
            for child_id, parent_id in kids:
                assert parent_id in parents, (
                    f"child {child_id} exists, but its parent {parent_id} was never stored "
                    f"(its starter was told: {start_failed!r})")
            assert start_failed is None
            assert await handle.result(timeout=20) == "child said done", seen
            assert seen == []
            assert len(await stored_runs(postgres_url, fresh_schema, "kid")) == 1
            assert ran == [marker], "the child ran more than once"
            await no_worker_lost(app, handle.run_id)
