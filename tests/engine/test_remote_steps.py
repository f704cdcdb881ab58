"""Steps in other services: tasks in the store, served by that service's workers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, Retry, RunStatus
from cantata.cli.main import main
from cantata.model.records import RunWrite, branch_cancelled
from cantata.store.factory import store_from_url

from .helpers import eventually, make_app


def orders_app(url: str) -> App:
    app = make_app(url, services=["orders"])

    @app.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        reserved = await ctx.run("inventory.reserve", order, compensate="inventory.release")
        charged = await ctx.run(app.remote_step("payments.charge"), order)
        return {"reserved": reserved, "charged": charged}

    return app


def inventory_app(url: str, log: list[Any]) -> App:
    app = make_app(url, services=["inventory"])

    @app.step(service="inventory")
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        info = cantata.step_info()
        log.append(("reserve", info.attempt, info.idempotency_key))
        if order.get("flaky") and info.attempt == 1:
            raise ConnectionError("db blip")
        return {"sku": order["sku"]}

    @app.step(service="inventory")
    def release(order: dict[str, Any]) -> None:
        log.append(("release",))

    return app


def payments_app(url: str, log: list[Any]) -> App:
    app = make_app(url, services=["payments"])

    @app.step(service="payments", retry=Retry(max_attempts=2, initial_interval=0.01,
                                              non_retryable=(ValueError,)))
    async def charge(order: dict[str, Any]) -> str:
        log.append(("charge", cantata.step_info().attempt))
        if order.get("decline"):
            raise ValueError("card declined")
        return "ch_1"

    return app


@pytest.fixture
def url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/shop.db"


async def test_a_workflow_runs_steps_of_two_other_services(url: str) -> None:
    log: list[Any] = []
    orders, inventory, payments = orders_app(url), inventory_app(url, log), payments_app(url, log)
    async with inventory, payments, orders:
        handle = await orders.start("place_order", {"sku": "A", "flaky": True})
        assert await handle.result(timeout=10) == {"reserved": {"sku": "A"}, "charged": "ch_1"}
        attempts = await orders.store.load_attempts(orders.name, handle.run_id)
        history = await orders.store.load_history(orders.name, handle.run_id)
    assert [x[:2] for x in log] == [("reserve", 1), ("reserve", 2), ("charge", 1)]
    assert log[0][2] == log[1][2] == f"{handle.run_id}:inventory.reserve#1"
    assert [(a.key, a.attempt, a.error_type) for a in attempts][:2] == [
        ("inventory.reserve#1", 1, "ConnectionError"), ("inventory.reserve#1", 2, None)]
    assert [(e.key, e.status, e.attempts) for e in history] == [
        ("inventory.reserve#1", "completed", 2), ("payments.charge#1", "completed", 1)]


async def test_remote_failure_compensates_through_the_other_service(url: str) -> None:
    log: list[Any] = []
    orders, inventory, payments = orders_app(url), inventory_app(url, log), payments_app(url, log)
    async with inventory, payments, orders:
        handle = await orders.start("place_order", {"sku": "B", "decline": True})
        with pytest.raises(cantata.WorkflowCompensated, match="ValueError: card declined"):
            await handle.result(timeout=10)
    assert [x[0] for x in log] == ["reserve", "charge", "release"]


async def test_a_service_that_is_down_leaves_the_task_pending_then_it_runs(url: str) -> None:
    log: list[Any] = []
    orders, inventory = orders_app(url), inventory_app(url, log)
    async with inventory.client():  # declares inventory's steps, serves nothing
        pass
    async with orders:
        handle = await orders.start("place_order", {"sku": "C"})
        await asyncio.sleep(0.5)
        assert log == [] and await handle.status() == "running"
        tasks = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert [(t.service, t.status) for t in tasks] == [("inventory", "pending")]
        payments = payments_app(url, log)
        async with inventory, payments:
            assert await handle.result(timeout=10) == {"reserved": {"sku": "C"},
                                                       "charged": "ch_1"}


async def test_calling_a_step_nobody_declared_is_a_clear_error(url: str) -> None:
    app = make_app(url)

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> None:
        await ctx.run("warehouse.pick", {})

    async with app:
        handle = await app.start(wf)
        with pytest.raises(cantata.WorkflowFailed, match=r"UnknownStep.*warehouse\.pick"):
            await handle.result(timeout=5)


async def test_a_stub_can_wait_for_a_service_that_never_started(url: str) -> None:
    app = make_app(url)
    pick = app.remote_step("warehouse.pick", wait_for_service=True)

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> Any:
        return await ctx.run(pick, {"sku": "D"})

    async with app:
        handle = await app.start(wf)
        await eventually(lambda: _pending(app, handle.run_id))
        warehouse = make_app(url, services=["warehouse"])

        @warehouse.step(service="warehouse", name="pick")
        async def pick_impl(order: dict[str, Any]) -> str:
            return "picked"

        async with warehouse:
            assert await handle.result(timeout=10) == "picked"


async def test_a_stub_waiting_for_its_service_calls_the_service_that_declares_the_step(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Called before any service declared it, a stub without service= does not guess
    the service from the step's name: the task waits for whichever service declares
    the step (here inventory, for a step named stock.reserve)."""
    orders = make_app(url, services=["orders"])
    reserve = orders.remote_step("stock.reserve", wait_for_service=True)

    @orders.workflow(service="orders")
    async def place(ctx: cantata.WorkflowContext, n: int) -> int:
        return int(await ctx.run(reserve, n))

    async with orders:
        handle = await orders.start(place, 1)
        await eventually(lambda: _pending(orders, handle.run_id))
        [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert (task.service, task.status) == ("", "pending")  # no service known yet
        code = await asyncio.to_thread(main, ["stalled", "--older-than", "0s", "--app",
                                              orders.name, "--store", url, "--json"])
        [stall] = json.loads(capsys.readouterr().out)
        assert code == 0
        assert "the service that declares this step" in stall["node"]["detail"]
        inventory = make_app(url, services=["inventory"])

        @inventory.step(name="stock.reserve", service="inventory")
        async def reserve_impl(n: int) -> int:
            return n + 1

        async with inventory:
            assert await handle.result(timeout=10) == 2
        [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert (task.service, task.status) == ("inventory", "done")
        tree = await orders.trace(handle.run_id)
        [step] = [n for n in tree.children if n.kind == "step"]
        assert (step.group, step.detail) == ("inventory", "task for service inventory")


async def _failed(app: App, run_id: str, key: str) -> bool:
    history = await app.store.load_history(app.name, run_id)
    return any(e.key == key and e.status == "failed" for e in history)


async def _pending(app: App, run_id: str) -> bool:
    return bool(await app.store.tasks_of_run(app.name, run_id))


async def test_a_run_that_ends_first_withdraws_its_task_no_worker_ever_runs_it(
    url: str,
) -> None:
    log: list[Any] = []
    orders, inventory = orders_app(url), inventory_app(url, log)
    async with inventory.client():  # declares inventory's steps, serves nothing
        pass
    async with orders:
        cancelled = await orders.start("place_order", {"sku": "C"})
        late = await orders.start("place_order", {"sku": "D"}, deadline=0.5)
        await eventually(lambda: _pending(orders, cancelled.run_id))
        await cancelled.cancel()
        with pytest.raises(cantata.WorkflowCancelled):
            await cancelled.result(timeout=10)
        with pytest.raises(cantata.WorkflowFailed, match="DeadlineExceeded"):
            await late.result(timeout=10)
        async with inventory:  # inventory comes up: nothing of those runs is left to do
            await asyncio.sleep(0.5)
        for handle in (cancelled, late):
            [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
            assert (task.status, task.error_type, task.attempts) == ("failed", "Withdrawn", 0)
            history = await orders.store.load_history(orders.name, handle.run_id)
            assert [(e.key, e.status, e.error_type) for e in history if e.kind == "step"] == [
                ("inventory.reserve#1", "failed", "Withdrawn")]
    assert log == []


async def test_a_remote_step_in_progress_at_cancel_ends_and_is_compensated(url: str) -> None:
    log: list[Any] = []
    go = asyncio.Event()
    orders = orders_app(url)
    inventory = make_app(url, services=["inventory"])

    @inventory.step(service="inventory")
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        log.append("reserve")
        await go.wait()
        return {"sku": order["sku"]}

    @inventory.step(service="inventory")
    def release(order: dict[str, Any]) -> None:
        log.append("release")

    async with payments_app(url, log).client():  # declared, never served here
        pass
    async with inventory, orders:
        handle = await orders.start("place_order", {"sku": "E"})
        await eventually(lambda: log == ["reserve"])
        await handle.cancel()
        await asyncio.sleep(0.3)  # the run waits for the step in progress, as for a local one
        assert await handle.status() == "running"
        go.set()
        with pytest.raises(cantata.WorkflowCancelled):
            await handle.result(timeout=10)
        history = await orders.store.load_history(orders.name, handle.run_id)
    assert log == ["reserve", "release"]  # its effect undone, charge never called
    assert [(e.key, e.status) for e in history if e.kind in ("step", "compensation")][:1] == [
        ("inventory.reserve#1", "completed")]


async def test_a_remote_step_that_completes_in_a_parallel_branch_after_a_failure_is_compensated(
    url: str,
) -> None:
    """Branches of an asyncio.gather: the charge is declined while the reservation, a
    step of another service, is still running. The run waits for it and undoes it."""
    log: list[Any] = []
    go = asyncio.Event()
    orders = make_app(url, services=["orders"])

    @orders.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        return await asyncio.gather(
            ctx.run("inventory.reserve", order, compensate="inventory.release"),
            ctx.run(orders.remote_step("payments.charge"), order))

    inventory = make_app(url, services=["inventory"])

    @inventory.step(service="inventory")
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        log.append(("reserve",))
        await go.wait()
        return {"sku": order["sku"]}

    @inventory.step(service="inventory")
    def release(order: dict[str, Any]) -> None:
        log.append(("release",))

    async with inventory, payments_app(url, log), orders:
        handle = await orders.start(place_order, {"sku": "G", "decline": True})
        await eventually(lambda: _failed(orders, handle.run_id, "payments.charge#1"))
        await asyncio.sleep(0.3)
        assert ("reserve",) in log
        assert await handle.status() == "running"  # waiting for the reservation
        go.set()
        with pytest.raises(cantata.WorkflowCompensated, match="ValueError: card declined"):
            await handle.result(timeout=10)
        history = await orders.store.load_history(orders.name, handle.run_id)
    assert sorted(x[0] for x in log[:2]) == ["charge", "reserve"]
    assert log[2:] == [("release",)]
    assert [(e.key, e.status) for e in history] == [
        ("inventory.reserve#1", "completed"), ("payments.charge#1", "failed"),
        ("compensate:inventory.release#1", "completed")]


async def test_a_parallel_branch_whose_service_is_down_is_withdrawn_when_the_run_fails(
    url: str,
) -> None:
    log: list[Any] = []
    orders = make_app(url, services=["orders"])

    @orders.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        return await asyncio.gather(
            ctx.run("inventory.reserve", order, compensate="inventory.release"),
            ctx.run(orders.remote_step("payments.charge"), order))

    async with inventory_app(url, log).client():  # declared, not served
        pass
    async with payments_app(url, log), orders:
        handle = await orders.start(place_order, {"sku": "H", "decline": True})
        with pytest.raises(cantata.WorkflowFailed, match="ValueError: card declined"):
            await handle.result(timeout=10)
        tasks = {t.step: t for t in await orders.store.tasks_of_run(orders.name, handle.run_id)}
    reserve = tasks["inventory.reserve"]
    assert (reserve.status, reserve.error_type, reserve.attempts) == ("failed", "Withdrawn", 0)
    assert f"run {handle.run_id} failed before a worker of service 'inventory'" in (
        reserve.error or "")
    assert log == [("charge", 1)]


async def test_the_task_of_an_ended_run_left_by_its_worker_is_withdrawn(url: str) -> None:
    """A run ended while a worker held the task of one of its steps, and that worker
    went away without finishing it. The next worker of the service withdraws the task
    instead of leaving it pending for good (or running it for a run that is over).

    The engine no longer ends a run before its steps in progress have ended (a timeout
    in the workflow's code around the step takes effect once it has: test_branches.py),
    so the run is ended here as an older version or an outside write could leave it."""
    log: list[Any] = []
    orders = make_app(url, services=["orders"])

    @orders.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        return await ctx.run("inventory.reserve", order)

    stuck = make_app(url, services=["inventory"])

    @stuck.step(service="inventory")
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        log.append("stuck reserve")
        await asyncio.Event().wait()  # until its worker goes
        return {}

    async with stuck:
        async with orders:
            handle = await orders.start(place_order, {"sku": "I"})
            await eventually(lambda: _held_by(orders, handle.run_id, stuck.engine.worker_id))
            # and the step begun: a claim is not yet the body (its attempt is loaded and
            # written first; on a loaded machine the worker stopped before the body ran)
            await eventually(lambda: log == ["stuck reserve"], what="the step begun")
        run = await stuck.store.get_run(stuck.name, handle.run_id)
        assert run is not None
        await stuck.store.commit_run(stuck.name, run.run_id, run.fence, RunWrite(
            status=RunStatus.FAILED, error="RuntimeError: ended elsewhere", release=True))
    async with orders.client():
        # its worker stopped (past its grace): the task of the ended run is left over
        [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert (task.status, task.owner) == ("pending", None)
        async with inventory_app(url, log):
            await eventually(lambda: _withdrawn(orders, handle.run_id))
    assert log == ["stuck reserve"]  # not run again


async def _held_by(app: App, run_id: str, worker: str) -> bool:
    return [t.owner for t in await app.store.tasks_of_run(app.name, run_id)] == [worker]


async def _withdrawn(app: App, run_id: str) -> bool:
    return [(t.status, t.error_type) for t in await app.store.tasks_of_run(app.name, run_id)
            ] == [("failed", "Withdrawn")]


async def test_a_remote_step_cut_by_a_graceful_stop_is_interrupted_not_an_attempt(
    url: str,
) -> None:
    """As a local step's (docs/leases.md): the attempt a stopping worker cut past its
    grace is recorded Interrupted, does not count, and the next worker's attempt takes
    its number, so a step with one attempt still runs."""
    log: list[Any] = []
    orders = orders_app(url)
    once = Retry(max_attempts=1)
    first = make_app(url, services=["inventory"])

    @first.step(service="inventory", retry=once)
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        log.append(("first", cantata.step_info().attempt))
        await asyncio.Event().wait()  # longer than the stop's grace
        return {}

    second = make_app(url, services=["inventory"])

    @second.step(service="inventory", retry=once, name="reserve")
    async def reserve_again(order: dict[str, Any]) -> dict[str, Any]:
        log.append(("second", cantata.step_info().attempt))
        return {"sku": order["sku"]}

    @second.step(service="inventory")
    def release(order: dict[str, Any]) -> None: ...

    async with payments_app(url, log).client(), second.client():  # declare their steps
        pass
    async with orders:
        async with first:
            engine = first.engine
            handle = await orders.start("place_order", {"sku": "J"})
            await eventually(lambda: log == [("first", 1)])
        assert engine.cut_short == 1  # (cantata worker exits 3: work was released)
        [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert (task.status, task.owner, task.attempts) == ("pending", None, 0)
        [cut] = await orders.store.load_attempts(orders.name, handle.run_id)
        assert (cut.attempt, cut.error_type) == (1, "Interrupted")
        async with second:
            await eventually(lambda: _reserved(orders, handle.run_id))
            attempts = await orders.store.load_attempts(orders.name, handle.run_id)
    assert log == [("first", 1), ("second", 1)]
    assert [(a.key, a.attempt, a.error_type) for a in attempts] == [
        ("inventory.reserve#1", 1, None)]  # the next attempt took its number


async def _reserved(app: App, run_id: str) -> bool:
    """The run recorded inventory.reserve#1 completed after one attempt."""
    history = await app.store.load_history(app.name, run_id)
    return [(e.key, e.status, e.attempts) for e in history][:1] == [
        ("inventory.reserve#1", "completed", 1)]


async def test_a_remote_step_held_in_a_branch_a_taskgroup_cancels_is_awaited_and_undone(
    url: str,
) -> None:
    """An asyncio.TaskGroup cancels the reservation's branch when the charge is
    declined; the reservation, a step another service's worker is running, still
    completes there. The run waits for it and undoes it through that service."""
    log: list[Any] = []
    go = asyncio.Event()
    orders = make_app(url, services=["orders"])

    @orders.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        async with asyncio.TaskGroup() as group:
            group.create_task(
                ctx.run("inventory.reserve", order, compensate="inventory.release"))
            group.create_task(ctx.run(orders.remote_step("payments.charge"), order))

    inventory = make_app(url, services=["inventory"])

    @inventory.step(service="inventory")
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        log.append(("reserve",))
        await go.wait()
        return {"sku": order["sku"]}

    @inventory.step(service="inventory")
    def release(order: dict[str, Any]) -> None:
        log.append(("release",))

    async with inventory, payments_app(url, log), orders:
        handle = await orders.start(place_order, {"sku": "J", "decline": True})
        await eventually(lambda: _failed(orders, handle.run_id, "payments.charge#1"))
        await asyncio.sleep(0.3)
        assert ("reserve",) in log
        assert await handle.status() == "running"  # waiting for the reservation
        go.set()
        with pytest.raises(cantata.WorkflowCompensated, match="ValueError: card declined"):
            await handle.result(timeout=10)
        history = await orders.store.load_history(orders.name, handle.run_id)
    assert sorted(x[0] for x in log[:2]) == ["charge", "reserve"]
    assert log[2:] == [("release",)]
    assert [(e.key, e.status) for e in history] == [
        ("inventory.reserve#1", "completed"), ("payments.charge#1", "failed"),
        ("compensate:inventory.release#1", "completed")]
    assert json.loads(history[0].detail or "{}")["cancelled"] is True


async def test_a_remote_step_no_worker_holds_in_a_cancelled_taskgroup_branch_is_withdrawn(
    url: str,
) -> None:
    log: list[Any] = []
    orders = make_app(url, services=["orders"])

    @orders.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        async with asyncio.TaskGroup() as group:
            group.create_task(
                ctx.run("inventory.reserve", order, compensate="inventory.release"))
            group.create_task(ctx.run(orders.remote_step("payments.charge"), order))

    async with inventory_app(url, log).client():  # declared, not served
        pass
    async with payments_app(url, log), orders:
        handle = await orders.start(place_order, {"sku": "K", "decline": True})
        with pytest.raises(cantata.WorkflowFailed, match="ValueError: card declined"):
            await handle.result(timeout=10)
        tasks = {t.step: t for t in await orders.store.tasks_of_run(orders.name, handle.run_id)}
    reserve = tasks["inventory.reserve"]
    assert (reserve.status, reserve.error_type, reserve.attempts) == ("failed", "Withdrawn", 0)
    assert (f"run {handle.run_id} cancelled the branch of this step before a worker of "
            "service 'inventory'") in (reserve.error or "")
    assert log == [("charge", 1)]


class OutcomeWatch:
    """A real store that notes, for every ``commit_run`` carrying history entry
    ``key`` in a final state, whether the entry was marked cancelled."""

    def __init__(self, url: str, key: str) -> None:
        self._inner = store_from_url(url)
        self.url = url
        self.key = key
        self.marks: list[tuple[str, bool]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        await self._inner.commit_run(app, run_id, fence, write)
        self.marks += [(str(e.status), branch_cancelled(e)) for e in write.entries
                       if e.key == self.key and e.status in ("completed", "failed")]


@pytest.mark.parametrize("served", [True, False], ids=["completed", "withdrawn"])
async def test_a_remote_steps_outcome_in_a_cancelled_branch_is_committed_with_the_mark(
    url: str, served: bool
) -> None:
    """The TaskGroup cancels the reservation's branch while its task is held by a
    worker of inventory (it completes) or by none (it is withdrawn): the entry's
    outcome is committed with the branch's cancelled mark, never before it (a crash
    in between would leave a recovered run going on in the cancelled branch)."""
    log: list[Any] = []
    go = asyncio.Event()
    watch = OutcomeWatch(url, "inventory.reserve#1")
    orders = make_app(watch, services=["orders"])  # type: ignore[arg-type]

    @orders.workflow(service="orders")
    async def place_order(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        async with asyncio.TaskGroup() as group:
            group.create_task(
                ctx.run("inventory.reserve", order, compensate="inventory.release"))
            group.create_task(ctx.run(orders.remote_step("payments.charge"), order))

    inventory = make_app(url, services=["inventory"])

    @inventory.step(service="inventory")
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        log.append(("reserve",))
        await go.wait()
        return {"sku": order["sku"]}

    @inventory.step(service="inventory")
    def release(order: dict[str, Any]) -> None:
        log.append(("release",))

    async with contextlib.AsyncExitStack() as stack:
        if served:
            await stack.enter_async_context(inventory)
        else:
            async with inventory.client():  # declared, not served
                pass
        await stack.enter_async_context(payments_app(url, log))
        await stack.enter_async_context(orders)
        handle = await orders.start(place_order, {"sku": "M", "decline": True})
        if served:
            await eventually(lambda: _failed(orders, handle.run_id, "payments.charge#1"))
            go.set()
        with pytest.raises(cantata.WorkflowError, match="ValueError: card declined"):
            await handle.result(timeout=10)
    assert watch.marks[0] == ("completed" if served else "failed", True), watch.marks


async def test_a_worker_without_the_step_leaves_its_task_to_one_that_has_it(url: str) -> None:
    log: list[Any] = []
    orders, inventory = orders_app(url), inventory_app(url, log)
    async with inventory.client():  # the new code declared inventory.reserve once
        pass
    old = make_app(url, services=["inventory"])  # an older inventory: release only

    @old.step(service="inventory")
    def release(order: dict[str, Any]) -> None:
        log.append(("old release",))

    async with old, orders:
        handle = await orders.start("place_order", {"sku": "F", "flaky": True})
        await eventually(lambda: _pending(orders, handle.run_id))
        await asyncio.sleep(0.5)  # the old worker polls for tasks meanwhile
        [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert (task.status, task.owner, task.attempts) == ("pending", None, 0)
        payments = payments_app(url, log)
        async with inventory, payments:
            assert (await handle.result(timeout=10))["reserved"] == {"sku": "F"}
    # the new worker had all its attempts: the flaky first one is retried
    assert [x[:2] for x in log if x[0] == "reserve"] == [("reserve", 1), ("reserve", 2)]


async def test_a_step_concurrency_limit_holds_for_calls_from_another_service(
    url: str,
) -> None:
    running: list[int] = []
    peak = 0
    orders = make_app(url, services=["orders"])
    inventory = make_app(url, services=["inventory"])

    @inventory.step(service="inventory", concurrency=1)
    async def reserve(n: int) -> int:
        nonlocal peak
        running.append(n)
        peak = max(peak, len(running))
        await asyncio.sleep(0.2)
        running.remove(n)
        return n

    @orders.workflow(service="orders")
    async def place(ctx: cantata.WorkflowContext, n: int) -> int:
        return int(await ctx.run("inventory.reserve", n))

    async with inventory, orders:
        handles = [await orders.start(place, n) for n in range(4)]
        assert [await h.result(timeout=20) for h in handles] == [0, 1, 2, 3]
        attempts = [a for h in handles
                    for a in await orders.store.load_attempts(orders.name, h.run_id)]
    assert peak == 1
    assert sorted(a.attempt for a in attempts) == [1, 1, 1, 1]  # waiting was no attempt


async def test_a_stub_calls_the_service_that_declared_the_step(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inventory = make_app(url, services=["inventory"])

    @inventory.step(name="stock.reserve", service="inventory")
    async def reserve(n: int) -> int:
        return n + 1

    orders = make_app(url, services=["orders"])
    stub = orders.remote_step("stock.reserve")  # its name does not begin with its service
    wrong = orders.remote_step("stock.reserve", service="stock")

    @orders.workflow(service="orders")
    async def place(ctx: cantata.WorkflowContext, n: int) -> int:
        return int(await ctx.run(stub, n))

    @orders.workflow(service="orders")
    async def misplaced(ctx: cantata.WorkflowContext, n: int) -> int:
        return int(await ctx.run(wrong, n))

    async with inventory.client():  # declares stock.reserve, served by inventory
        pass
    async with orders:
        handle = await orders.start(place, 1)
        await eventually(lambda: _pending(orders, handle.run_id))
        [task] = await orders.store.tasks_of_run(orders.name, handle.run_id)
        assert task.service == "inventory"
        code = await asyncio.to_thread(main, ["stalled", "--older-than", "0s", "--app",
                                              orders.name, "--store", url, "--json"])
        [stall] = json.loads(capsys.readouterr().out)
        assert code == 0 and "inventory" in stall["node"]["detail"]
        bad = await orders.start(misplaced, 1)
        with pytest.raises(cantata.WorkflowFailed,
                           match=r"UnknownStep.*service 'stock'.*service 'inventory'"):
            await bad.result(timeout=10)
        async with inventory:
            assert await handle.result(timeout=10) == 2


@pytest.mark.parametrize(("declare", "message"), [
    (lambda app: app.remote_step(123), "remote_step needs the step's full name.*123"),
    (lambda app: app.remote_step("inv.reserve", service="in ventory"),
     "service 'in ventory' is invalid"),
    (lambda app: app.remote_step("in*v.reserve"), "service 'in\\*v' is invalid"),
    (lambda app: app.include(42), "app.include needs a cantata.Router, an App or a Saga, got 42"),
    (lambda app: app.step(service=123)(lambda: None), "@step: service 123 is invalid"),
    (lambda app: app.step(service="")(lambda: None), "@step: service '' is invalid"),
    (lambda app: app.step(service="a.b")(lambda: None), "service 'a.b' is invalid"),
    (lambda app: cantata.Router(service="inv*"), "Router.*service 'inv\\*' is invalid"),
    (lambda app: app.workflow(service="in ventory"), "@workflow: service 'in ventory'"),
])
def test_a_bad_service_or_stub_is_refused_where_it_is_declared(
    url: str, declare: Any, message: str
) -> None:
    with pytest.raises(cantata.RegistrationError, match=message):
        declare(make_app(url))


async def test_a_stop_that_meets_a_wakeup_still_stops_the_task_loop(url: str) -> None:
    """A stop that comes with news of a task (a withdrawal: a run cancelled just before
    the app closes) ends the loop that claims tasks. Python 3.11's asyncio.wait_for
    lost that cancel and the close hung for good (seen with an orchestrating service
    that serves no step: its loop never reaches the store)."""
    orders = orders_app(url)
    async with orders:
        server = orders.engine.task_server
        assert server is not None and server._loop is not None
        loop_task = server._loop
        await asyncio.sleep(0.02)  # the loop waits for news
        server.wakeup.set()  # the news, in the same turn of the loop as the stop
        stopping = asyncio.ensure_future(server.stop())
        done, _ = await asyncio.wait([stopping], timeout=5)
        if not done:
            loop_task.cancel()  # a second cancel ends it: the first one was lost
            await stopping
            pytest.fail("the task loop went on after its stop")


@pytest.mark.parametrize("stop", ["cancel", "deadline"])
async def test_a_cancel_or_deadline_ends_a_run_whose_remote_step_waits_for_a_slot(
    url: str, stop: str
) -> None:
    """The task of a limited step waits at its service's worker for the step's slot:
    the run's cancel (or deadline) ends that wait at once, the task is withdrawn and
    never runs, and the run's completed steps are undone; not once the slot is free."""
    calls: list[str] = []
    hold = asyncio.Event()
    orders = make_app(url, services=["orders"])
    inventory = make_app(url, services=["inventory"])

    @inventory.step(service="inventory", concurrency=1)
    async def reserve(key: str) -> str:
        calls.append(f"reserve {key}")
        if key == "holder":
            await hold.wait()
        return key

    @orders.step
    async def book(key: str) -> None:
        calls.append(f"book {key}")

    @orders.step
    async def unbook(key: str) -> None:
        calls.append(f"unbook {key}")

    @orders.workflow(service="orders")
    async def place(ctx: cantata.WorkflowContext, key: str) -> str:
        await ctx.run(book, key, compensate=unbook)
        return str(await ctx.run("inventory.reserve", key))

    async with inventory, orders:
        holder = await orders.start(place, "holder")
        await eventually(lambda: "reserve holder" in calls)
        deadline: dict[str, Any] = {"deadline": 0.5} if stop == "deadline" else {}
        doomed = await orders.start(place, "doomed", **deadline)
        await eventually(lambda: "book doomed" in calls)
        await asyncio.sleep(0.3)  # its task was claimed and waits for the slot
        if stop == "cancel":
            await doomed.cancel()
        with pytest.raises(cantata.WorkflowError,
                           match="cancelled" if stop == "cancel" else "DeadlineExceeded"):
            await doomed.result(timeout=5)
        [task] = await orders.store.tasks_of_run(orders.name, doomed.run_id)
        hold.set()
        assert await holder.result(timeout=10) == "holder"
    assert (task.status, task.error_type) == ("failed", "Withdrawn")
    assert "reserve doomed" not in calls and "unbook doomed" in calls
