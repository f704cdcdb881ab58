"""A store slower than its driver's timeouts, met in a run's own task, is waited out.

A timeout that ends by cancelling the task it runs in (``asyncio.timeout``, asyncpg's
connect timeout) must never be taken for the workflow's code cancelling a step's
branch (engine/branches.py): the run goes on and completes; the workflow's code sees
no ``CancelledError``, no step runs twice, no attempt is charged ``WorkerLost``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest

from cantata import (
    App,
    Event,
    HandlerContext,
    Hook,
    Retry,
    StoreUnavailable,
    Tx,
    WorkflowCompensated,
    WorkflowContext,
)
from cantata.choreography import orphans
from cantata.engine.branches import RunTask
from cantata.model.records import EntryKind, RunWrite
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from tests.helpers import eventually, with_schema
from tests.stall_proxy import stall_proxy

T = TypeVar("T")

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
    postgres_url: str, pooled_schema: str
) -> None:
    seen: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema),
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
    postgres_url: str, pooled_schema: str
) -> None:
    seen: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema),
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

    async def _once(self, method: str, call: Coroutine[Any, Any, T], *,
                    any_task: bool = False) -> T:
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
        ran.append(f"emitter {kind}")  # (again if the run restarts from its history)
        try:
            event = await ctx.emit(kind, {"n": 1})
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            return "gave up"
        return f"emitted {event.type}"

    @app.transaction
    async def record(tx: Tx, kind: str) -> str:
        ran.append(f"record {kind}")
        await tx.execute("CREATE TABLE IF NOT EXISTS parcels (kind TEXT)")
        await tx.execute("INSERT INTO parcels (kind) VALUES (?)", kind)
        await app.publish(kind, {"n": 1}, tx=tx)
        return kind

    @app.workflow
    async def recorder(ctx: WorkflowContext, kind: str) -> str:
        try:
            return f"recorded {await ctx.run(record, kind)}"
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            return "gave up"

    @app.on("parcel.handed", group="relay")
    async def relay(event: Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit(str(event.data["kind"]), {"n": 1})

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


ORPHAN_READ_FAILED = "checking emitted events for orphans failed"


@pytest.fixture
def brief_declarations_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store's declarations are cached 0.2 s, not 2 s: a test that makes their next
    read fail waits out the cache of the read made at the app's start in 0.3 s."""
    monkeypatch.setattr(orphans, "_CACHE_SECONDS", 0.2)


def orphan_read_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if ORPHAN_READ_FAILED in r.getMessage()]


async def test_a_store_error_met_by_an_emits_orphan_check_neither_fails_nor_restarts_the_run(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, brief_declarations_cache: None,
) -> None:
    # The orphan count is a diagnostic: its read failing leaves the emit (stored with
    # its checkpoint) and the run alone; the event is checked with the next emit.
    seen: list[str] = []
    ran: list[str] = []
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, seen, ran)
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(0.3)  # past the cache of the declarations read when it opened
            for kind in ("parcel.sent", "parcel.lost"):  # (two failures: one warning)
                store.failed.clear()
                store.arm("declarations")  # read for the orphan count of a type none declares
                handle = await app.start("emitter", kind)
                assert await handle.result(timeout=10) == f"emitted {kind}", seen
                assert store.failed.is_set()
                await no_worker_lost(app, handle.run_id)
            assert seen == []
            assert ran == ["emitter parcel.sent", "emitter parcel.lost"], "a run restarted"
            assert app.metrics.orphans == {}  # not known yet
            assert len(orphan_read_failures(caplog)) == 1, orphan_read_failures(caplog)
            handle = await app.start("emitter", "parcel.found")  # the store answers again
            assert await handle.result(timeout=10) == "emitted parcel.found", seen
            assert app.metrics.orphans == {"parcel.sent": 1, "parcel.lost": 1,
                                           "parcel.found": 1}
            for kind in ("parcel.sent", "parcel.lost", "parcel.found"):
                events = await app.store.find_events(app.name, kind, since=0, exclude=[],
                                                      limit=10)
                assert len(events) == 1, events
    assert len(orphan_read_failures(caplog)) == 1, orphan_read_failures(caplog)


async def test_a_store_error_met_by_a_transactional_steps_orphan_check_is_no_failure(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, brief_declarations_cache: None,
) -> None:
    # The step's writes, checkpoint and event are committed: the failed check neither
    # fails the attempt nor runs the step (its SQL) again.
    seen: list[str] = []
    ran: list[str] = []
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, seen, ran)
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(0.3)  # past the cache of the declarations read when it opened
            store.arm("declarations")
            handle = await app.start("recorder", "parcel.sent")
            assert await handle.result(timeout=10) == "recorded parcel.sent", seen
            assert store.failed.is_set()
            assert seen == [] and ran == ["record parcel.sent"], (seen, ran)
            attempts = await app.store.load_attempts(app.name, handle.run_id)
            assert [(a.key, a.error_type) for a in attempts] == [("record#1", None)], attempts
            handle = await app.start("emitter", "parcel.found")  # the store answers again
            assert await handle.result(timeout=10) == "emitted parcel.found", seen
            assert app.metrics.orphans == {"parcel.sent": 1, "parcel.found": 1}
    assert len(orphan_read_failures(caplog)) == 1, orphan_read_failures(caplog)


async def test_a_store_error_met_by_a_handlers_orphan_check_is_reported_as_a_workflows(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, brief_declarations_cache: None,
) -> None:
    # The same for an emit of a handler: its delivery is settled, the warning
    # rate-limited, the events checked with the next emit.
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, [], [])
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(0.3)  # past the cache of the declarations read when it opened
            for n, kind in enumerate(("parcel.sent", "parcel.lost"), 1):
                store.failed.clear()
                store.arm("declarations")
                await app.publish("parcel.handed", {"kind": kind})

                def settled(n: int = n) -> bool:
                    return store.failed.is_set() and app.metrics.handled == n

                await eventually(settled, timeout=10,
                                 what=f"delivery {n} settled, its orphan check failed")
            await asyncio.sleep(0.2)  # (the report after the delivery's settlement)
            assert app.metrics.orphans == {}
            await app.publish("parcel.handed", {"kind": "parcel.found"})
            await eventually(lambda: len(app.metrics.orphans) == 3, timeout=10,
                             what="the orphans counted")
            assert app.metrics.orphans == {"parcel.sent": 1, "parcel.lost": 1,
                                           "parcel.found": 1}
            assert app.metrics.handled == 3
    assert len(orphan_read_failures(caplog)) == 1, orphan_read_failures(caplog)


@pytest.mark.postgres
async def test_a_connect_slower_than_its_timeout_for_a_childs_creation_is_an_outage(
    postgres_url: str, pooled_schema: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    gate, entered = asyncio.Event(), asyncio.Event()
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema),
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


async def test_a_store_error_met_by_a_publishs_orphan_check_is_no_failed_publish(
    tmp_path: Any, caplog: pytest.LogCaptureFixture, brief_declarations_cache: None,
) -> None:
    # The event is stored when its orphan check reads the declarations: a failed read
    # raised from app.publish would have the caller publish it again (a new id, a
    # second event). It is logged, and the event checked with the next emit.
    store = FailsOnce(str(tmp_path / "outage.db"))
    app = outage_app(store, [], [])
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            await asyncio.sleep(0.3)  # past the cache of the declarations read when it opened
            store.arm("declarations")
            event = await app.publish("parcel.misrouted", {"n": 1})
            assert store.failed.is_set()
            assert app.metrics.orphans == {}  # not known yet
            assert len(orphan_read_failures(caplog)) == 1, orphan_read_failures(caplog)
            again = await app.publish("parcel.misrouted", {"n": 2})  # the store answers
            assert app.metrics.orphans == {"parcel.misrouted": 2}
            events = await app.store.find_events(app.name, "parcel.misrouted", since=0,
                                                  exclude=[], limit=10)
            assert sorted(e.id for e in events) == sorted([event.id, again.id])


# -- a transactional step's own transaction (engine/transaction.py) -----------------------


class FailsTxOnce(FailsOnce):
    """:class:`FailsOnce` whose ``run_transaction`` (a transactional step's transaction)
    fails once when armed: refused before it began, or (``after``) committed, its
    answer lost, as when the connection is lost at its COMMIT."""

    async def run_transaction(self, *args: Any, **kwargs: Any) -> Any:
        return await self._once("run_transaction", super().run_transaction(*args, **kwargs))


def tx_app(store: Any, seen: list[str], ran: list[str], in_step: Any = None,
           lease: float = 10) -> App:
    """A workflow that reserves (compensated by ``undo``), then records a booking in a
    transactional step of one attempt (``in_step(tx)`` runs in it after the insert)
    and takes any error of it for a business failure."""
    app = App("txstall", store=store, lease=lease, poll_interval=0.05, shutdown_grace=1)

    @app.step
    async def reserve() -> int:
        ran.append("reserve")
        return 1

    @app.step
    async def undo() -> None:
        ran.append("undo")

    @app.transaction(retry=Retry(max_attempts=1))
    async def book(tx: Tx, n: int) -> int:
        ran.append("book")
        await tx.execute("CREATE TABLE IF NOT EXISTS bookings (n INTEGER)")
        await tx.execute("INSERT INTO bookings (n) VALUES (?)", n)
        if in_step is not None:
            await in_step(tx)
        row = await tx.fetchone("SELECT count(*) FROM bookings")
        assert row is not None
        return int(row[0])

    @app.workflow
    async def booking(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(reserve, compensate=undo)
        try:
            return f"booked, {await ctx.run(book, n)} booking(s)"
        except Exception as exc:
            seen.append(f"{type(exc).__name__}: {exc}")
            raise

    return app


async def check_booked(app: App, run_id: str, seen: list[str], ran: list[str],
                       booked: int = 1, attempts: bool = True) -> None:
    """The booking committed once, nothing undone, and (``attempts``) its one attempt
    never charged."""
    assert seen == []
    assert "undo" not in ran, ran
    if attempts:
        tried = await app.store.load_attempts(app.name, run_id)
        assert [(a.key, a.error_type) for a in tried] == [
            ("reserve#1", None), ("book#1", None)], tried
    run = await app.store.get_run(app.name, run_id)
    assert run is not None

    async def rows(tx: Tx) -> tuple[RunWrite, Any]:
        return RunWrite(), await tx.fetch("SELECT n FROM bookings")

    tx_store: Any = app.store
    assert await tx_store.run_transaction(app.name, run_id, run.fence, rows) == [(booked,)]


@pytest.mark.parametrize("after", [False, True], ids=["refused", "answer-lost"])
async def test_a_store_error_of_a_transactional_steps_transaction_is_an_outage(
    tmp_path: Any, after: bool,
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    store = FailsTxOnce(str(tmp_path / "outage.db"))
    app = tx_app(store, seen, ran)
    async with app:
        store.arm("run_transaction", after=after)
        handle = await app.start("booking", 5)
        assert await handle.result(timeout=12) == "booked, 1 booking(s)", seen
        assert store.failed.is_set()
        # refused: the step runs again once the store answers; its answer lost: the
        # resumed run finds the step's completion in history (committed with it)
        assert ran == ["reserve", "book"], ran
        await check_booked(app, handle.run_id, seen, ran, booked=5)


class StallAtStep(Hook):
    """Cuts every connection to the store and stalls new ones for ``STALL`` seconds as
    step ``name``'s first attempt begins (before its transaction has a connection)."""

    def __init__(self, proxy: Any, name: str) -> None:
        self.proxy, self.name = proxy, name
        self.began, self.over = asyncio.Event(), asyncio.Event()

    def step(self, run: Any, name: str, key: str, attempt: int, kind: Any) -> None:
        if name == self.name and not self.began.is_set():
            self.began.set()
            self.proxy.cut()
            self.proxy.stall()
            asyncio.get_running_loop().call_later(STALL, self.resume)

    def resume(self) -> None:
        self.proxy.resume()
        self.over.set()


@pytest.mark.postgres
async def test_a_store_stall_as_a_transactional_step_connects_is_waited_out(
    postgres_url: str, pooled_schema: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:
        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema),
                              connect_timeout=1.0)
        app = tx_app(store, seen, ran)
        stall = StallAtStep(proxy, "book")
        app.add_hook(stall)
        async with app:
            handle = await app.start("booking", 3)
            await asyncio.wait_for(stall.over.wait(), 10)  # (the handle's reads: after it)
            assert proxy.held, "nothing tried to connect during the stall"
            assert await handle.result(timeout=20) == "booked, 1 booking(s)", seen
            await check_booked(app, handle.run_id, seen, ran, booked=3)
            assert ran == ["reserve", "book"], "the step's body began before its transaction"


@pytest.mark.postgres
async def test_a_connection_lost_under_a_transactional_steps_code_is_an_outage(
    postgres_url: str, pooled_schema: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:

        async def cut_once(tx: Tx) -> None:
            if ran.count("book") == 1:
                proxy.cut()  # the step's next statement meets a lost connection

        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema),
                              connect_timeout=1.0)
        app = tx_app(store, seen, ran, in_step=cut_once)
        async with app:
            handle = await app.start("booking", 4)
            assert await handle.result(timeout=20) == "booked, 1 booking(s)", seen
            # run again once the store answered: the lost transaction left nothing
            assert ran == ["reserve", "book", "book"], ran
            await check_booked(app, handle.run_id, seen, ran, booked=4)


@pytest.mark.postgres
async def test_a_transactional_steps_own_connection_error_stays_its_failure(
    postgres_url: str, pooled_schema: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []

    async def refused(tx: Tx) -> None:  # (its own call to another service)
        raise ConnectionRefusedError("the payment API refused the connection")

    store = PostgresStore(with_schema(postgres_url, pooled_schema))
    app = tx_app(store, seen, ran, in_step=refused)
    async with app:
        handle = await app.start("booking", 2)
        with pytest.raises(WorkflowCompensated):
            await handle.result(timeout=20)
        assert len(seen) == 1 and seen[0].endswith(
            "ConnectionRefusedError: the payment API refused the connection"), seen
        assert ran == ["reserve", "book", "undo"], ran


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
    postgres_url: str, pooled_schema: str
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
        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema),
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
            await eventually(lambda: stored_runs(postgres_url, pooled_schema, "kid"),
                             what="the child's creation committed in the server")
            proxy.cut()  # its answer, held, is lost with the connection
            await asyncio.sleep(STALL)  # connecting again takes longer than its timeout
            proxy.resume()
            try:
                handle, start_failed = await start, None
            except Exception as exc:
                start_failed = exc
            kids = await stored_runs(postgres_url, pooled_schema, "kid")
            parents = {r for r, _ in await stored_runs(postgres_url, pooled_schema, "parent")}
            for child_id, parent_id in kids:
                assert parent_id in parents, (
                    f"child {child_id} exists, but its parent {parent_id} was never stored "
                    f"(its starter was told: {start_failed!r})")
            assert start_failed is None
            assert await handle.result(timeout=20) == "child said done", seen
            assert seen == []
            assert len(await stored_runs(postgres_url, pooled_schema, "kid")) == 1
            assert ran == [marker], "the child ran more than once"
            await no_worker_lost(app, handle.run_id)
