"""The hybrid's edges: what a triggered run's wait sees, several triggers for one type,
and concurrent waits of one run."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import cantata
from cantata import App, HandlerContext, StoreUnavailable, WaitTimeout, WorkflowContext
from cantata.store.sqlite import SQLiteStore
from tests.choreography.helpers import SETTLE, eventually, make_app


async def _ended(app: App, workflow: str, n: int) -> list[cantata.RunInfo]:
    runs = await app.list_runs(workflow=workflow)
    done = [r for r in runs if r.status.is_final]
    return done if len(done) == n and len(runs) == n else []


# -- a triggered run's waits see what followed its trigger ------------------------------


def approval_app(store: str) -> App:
    app = make_app(store)

    @app.workflow
    async def approve(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        ev = await ctx.wait_for_event(
            "invoice.approved", match={"order_id": order["order_id"]}, timeout=3
        )
        return str(ev.data["by"])

    app.start_on("order.placed", approve)
    return app


async def test_a_triggered_run_sees_a_reply_stored_before_the_run_was(
    shared_store: str,
) -> None:
    """The trigger and its answer are both published while no worker runs: the run,
    created only when a worker comes, started logically with its trigger."""
    client = approval_app(shared_store)
    async with client.client():
        await client.publish("invoice.approved", {"order_id": 1, "by": "too early"})
        await client.publish("order.placed", {"order_id": 1})
        await client.publish("invoice.approved", {"order_id": 1, "by": "ada"})
    worker = approval_app(shared_store)
    async with worker:
        [run] = await eventually(lambda: _ended(worker, "approve", 1), what="the run to end")
        assert await worker.get_handle(run.run_id).result(timeout=5) == "ada"


async def test_a_triggered_run_waiting_for_its_own_type_gets_the_next_one(
    shared_store: str,
) -> None:
    """A wait of a run started by an event never takes that event, and takes the next
    one of its type even if it came before the run was created."""

    def build() -> App:
        app = make_app(shared_store)

        @app.workflow
        async def pair(ctx: WorkflowContext, tick: dict[str, Any]) -> int | None:
            try:
                ev = await ctx.wait_for_event("tick", timeout=1)
            except WaitTimeout:
                return None
            return int(ev.data["n"])

        app.start_on("tick", pair)
        return app

    client = build()
    async with client.client():
        await client.publish("tick", {"n": 1}, id="tick-1")
        await client.publish("tick", {"n": 2}, id="tick-2")
    worker = build()
    async with worker:
        runs = await eventually(lambda: _ended(worker, "pair", 2), what="both runs to end")
        got = {r.idempotency_key: await worker.get_handle(r.run_id).result(timeout=5)
               for r in runs}
    assert got == {"event:tick-1": 2, "event:tick-2": None}


def fanout_app(store: str, services: list[str] | None = None) -> App:
    """One order.placed goes to the inventory handler and starts ``fulfil``, which waits
    for the handler's answer."""
    app = make_app(store, services=services)

    @app.on("order.placed", group="inventory", emits=["stock.reserved"])
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("stock.reserved", {"order_id": event.data["order_id"]})

    @app.workflow(service="orders")
    async def fulfil(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        ev = await ctx.wait_for_event(
            "stock.reserved", match={"order_id": order["order_id"]}, timeout=3
        )
        return f"reserved {ev.data['order_id']}"

    app.start_on("order.placed", fulfil)
    return app


async def test_a_handler_answers_the_trigger_while_the_workflow_worker_is_down(
    shared_store: str,
) -> None:
    """The fan-out: the handler group reacts to the trigger event (and answers) before
    any worker of the workflow's service has taken the trigger."""
    client = fanout_app(shared_store)
    async with client.client():
        placed = [await client.publish("order.placed", {"order_id": n}) for n in range(3)]
    inventory = fanout_app(shared_store, services=["inventory"])
    async with inventory:
        async def answered() -> bool:
            found = await inventory.store.find_events(
                inventory.name, "stock.reserved", since=0.0, exclude=[], limit=10)
            return len(found) == 3
        await eventually(answered, what="the inventory group to answer every order")
        assert await inventory.list_runs(workflow="fulfil") == []
    worker = fanout_app(shared_store)
    async with worker:
        runs = await eventually(lambda: _ended(worker, "fulfil", 3), what="three runs to end")
        results = sorted([await worker.get_handle(r.run_id).result(timeout=5) for r in runs])
        assert {r.correlation_id for r in runs} == {p.id for p in placed}
    assert results == ["reserved 0", "reserved 1", "reserved 2"]


# -- several workflows started by one event type --------------------------------------


def two_trigger_app(store: str, *, second: bool = True) -> App:
    """``order.placed`` starts ``bill`` and (with ``second``) ``pack``."""
    app = make_app(store)

    @app.workflow
    async def bill(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        return f"billed {order['order_id']}"

    app.start_on("order.placed", bill)
    if second:
        @app.workflow
        async def pack(ctx: WorkflowContext, order: dict[str, Any]) -> str:
            return f"packed {order['order_id']}"

        app.start_on("order.*", pack)
    return app


async def _results(app: App, workflow: str) -> dict[str | None, Any]:
    return {r.idempotency_key: await app.get_handle(r.run_id).result(timeout=5)
            for r in await app.list_runs(workflow=workflow)}


async def test_each_workflow_an_event_starts_gets_one_run_per_event(store_url: str) -> None:
    app = two_trigger_app(store_url)
    async with app:
        placed = await app.publish("order.placed", {"order_id": 7}, id="order-7")
        await eventually(lambda: _ended(app, "bill", 1), what="bill to run")
        await eventually(lambda: _ended(app, "pack", 1), what="pack to run")
        await app.publish("order.placed", {"order_id": 7}, id="order-7")  # again: nothing new
        await asyncio.sleep(SETTLE)
        billed, packed = await _results(app, "bill"), await _results(app, "pack")
        assert await app.dead_letters() == []
        for r in await app.list_runs():
            assert r.correlation_id == placed.id
    # one of them has the event's own key (the first to start), the other its own
    keys = {*billed, *packed}
    assert len(keys) == 2 and keys & {"event:order-7"}
    assert keys - {"event:order-7"} <= {"event:bill:order-7", "event:pack:order-7"}
    assert list(billed.values()) == ["billed 7"] and list(packed.values()) == ["packed 7"]


async def test_a_run_started_before_a_second_trigger_was_added_is_not_started_again(
    shared_store: str,
) -> None:
    """A version with one trigger stored its run under the event's own key, and its
    worker stopped before settling the delivery: after the deploy that adds a second
    trigger, the redelivery finds that run."""
    old = two_trigger_app(shared_store, second=False)
    async with old.client():
        await old.publish("order.placed", {"order_id": 8}, id="order-8")
        # what the old worker did before it was stopped: the run, under the old key
        first = await old.start("bill", {"order_id": 8}, idempotency_key="event:order-8")
    new = two_trigger_app(shared_store)
    async with new:
        await eventually(lambda: _ended(new, "bill", 1), what="bill to run")
        await new.publish("order.placed", {"order_id": 9}, id="order-9")
        await eventually(lambda: _ended(new, "bill", 2), what="bill to run for order 9")
        await eventually(lambda: _ended(new, "pack", 1), what="pack to run for order 9")
        await asyncio.sleep(SETTLE)
        billed = await _results(new, "bill")
        packed = await _results(new, "pack")
        assert await new.dead_letters() == []
    assert billed["event:order-8"] == "billed 8"
    assert first.run_id in [r.run_id for r in await _runs_of(shared_store, "bill")]
    assert len(billed) == 2 and len(packed) == 1  # no second run for order 8
    assert {*billed, *packed} - {"event:order-8"} in (
        {"event:order-9", "event:pack:order-9"}, {"event:bill:order-9", "event:order-9"})


async def _runs_of(store: str, workflow: str) -> list[cantata.RunInfo]:
    reader = make_app(store)
    async with reader.client():
        return await reader.list_runs(workflow=workflow)


# -- concurrent waits of one run ----------------------------------------------------------


def gather_app(store: str, gate: asyncio.Event | None = None, timeout: float = 1.0) -> App:
    """A run that waits for two ``ping`` events at once (after ``gate``, if given)."""
    app = make_app(store)

    @app.step
    async def hold() -> None:
        if gate is not None:
            await gate.wait()

    @app.workflow
    async def both(ctx: WorkflowContext) -> list[str | None]:
        await ctx.run(hold)

        async def one() -> str | None:
            try:
                return (await ctx.wait_for_event("ping", timeout=timeout)).id
            except WaitTimeout:
                return None

        return list(await asyncio.gather(one(), one()))

    return app


async def _waits(app: App, run_id: str) -> list[str]:
    history = await app.store.load_history(app.name, run_id)
    return [e.status for e in history if e.kind == "wait"]


async def test_two_waits_at_once_never_take_the_same_event(store_url: str) -> None:
    app = gather_app(store_url)
    async with app:
        handle = await app.start("both")
        await eventually(lambda: _both_waiting(app, handle.run_id), what="both waits")
        await app.publish("ping", {}, id="only-one")
        got = await handle.result(timeout=10)
    assert sorted(got, key=str) == [None, "only-one"]


async def test_two_waits_at_once_share_events_published_before_they_began(
    store_url: str,
) -> None:
    gate = asyncio.Event()
    app = gather_app(store_url, gate)
    async with app:
        handle = await app.start("both")
        await eventually(lambda: _status_is(app, handle.run_id, "running"))
        await app.publish("ping", {}, id="ping-1")
        await app.publish("ping", {}, id="ping-2")
        await app.publish("ping", {}, id="ping-3")
        gate.set()
        got = await handle.result(timeout=10)
    assert sorted(got, key=str) == ["ping-1", "ping-2"]  # the oldest two, once each


async def test_what_each_concurrent_wait_took_is_kept_on_replay(shared_store: str) -> None:
    first = gather_app(shared_store, timeout=30)
    async with first:
        handle = await first.start("both")
        await eventually(lambda: _both_waiting(first, handle.run_id), what="both waits")
        await first.publish("ping", {}, id="ping-1")
        await eventually(lambda: _one_done(first, handle.run_id), what="a wait to take it")
    # the worker stopped with one wait done and one open; the run replays both
    second = gather_app(shared_store, timeout=30)
    async with second:
        await second.publish("ping", {}, id="ping-2")
        got = await second.get_handle(handle.run_id).result(timeout=15)
        history = await second.store.load_history(second.name, handle.run_id)
    recorded = sorted(str(e.result) for e in history if e.kind == "wait")
    assert sorted(got) == ["ping-1", "ping-2"]
    assert [("ping-1" in r, "ping-2" in r) for r in recorded] in (
        [(True, False), (False, True)], [(False, True), (True, False)])


async def _both_waiting(app: App, run_id: str) -> bool:
    return await _waits(app, run_id) == ["waiting", "waiting"]


async def _one_done(app: App, run_id: str) -> bool:
    return sorted(await _waits(app, run_id)) == ["completed", "waiting"]


async def _status_is(app: App, run_id: str, status: str) -> bool:
    return str(await app.get_handle(run_id).status()) == status


# -- a store outage while a trigger creates its run is not an attempt -------------------


class CreationsFail(SQLiteStore):
    """A SQLite store whose creations of runs are lost to an outage until ``fail_until``
    (a ``time.monotonic()``); ``failed`` counts them."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.fail_until = 0.0
        self.failed = 0

    async def create_run(self, run: Any, *args: Any, **kwargs: Any) -> Any:
        if time.monotonic() < self.fail_until:
            self.failed += 1
            await asyncio.sleep(0.01)
            raise StoreUnavailable("the store did not answer (a test's outage)")
        return await super().create_run(run, *args, **kwargs)


async def test_a_store_outage_while_a_trigger_creates_its_run_uses_no_attempt(
    tmp_path: Any,
) -> None:
    """The run's creation is keyed by the event, so the trigger waits out an outage
    longer than a lease (for a lease a failed creation finds out by itself whether it
    was stored): before, each lease of outage was charged to the trigger as a handler's
    failed attempt, and five such dead-lettered the event."""
    store = CreationsFail(str(tmp_path / "outage.db"))
    app = App("outage", store=store, poll_interval=0.05, lease=0.2)

    @app.workflow
    async def fulfil(ctx: WorkflowContext, order: dict[str, Any]) -> int:
        return int(order["id"])

    app.start_on("order.placed", fulfil)
    async with app:
        store.fail_until = time.monotonic() + 1.0  # five leases
        await app.publish("order.placed", {"id": 7})
        [run] = await eventually(lambda: _ended(app, "fulfil", 1), what="the run to end")
        assert await app.get_handle(run.run_id).result(timeout=5) == 7
        assert await app.dead_letters() == []
        assert (app.metrics.handler_failures, app.metrics.retries) == (0, 0)
    assert store.failed > 0
