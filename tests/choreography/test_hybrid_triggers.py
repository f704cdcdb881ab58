"""The hybrid's edges: several triggers for one type."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, WorkflowContext
from tests.choreography.helpers import SETTLE, eventually, make_app


@pytest.fixture(params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                      pytest.mark.nats])])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store several apps open in turn (with PostgreSQL, NATS as their broker)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shop.db"
    url: str = request.getfixturevalue("distributed_url")
    return url


async def _ended(app: App, workflow: str, n: int) -> list[cantata.RunInfo]:
    runs = await app.list_runs(workflow=workflow)
    done = [r for r in runs if r.status.is_final]
    return done if len(done) == n and len(runs) == n else []


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
