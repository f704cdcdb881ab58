"""Retry and fork: a bug fixed, its failed runs continued; a run forked from a step."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from cantata import (
    App,
    Retry,
    RunInProgress,
    RunNotRetryable,
    RunStatus,
    StepNotInHistory,
    WorkflowCompensated,
    WorkflowContext,
    WorkflowFailed,
)
from tests.engine.helpers import eventually, make_app

ONCE = Retry(max_attempts=1)


def order_app(url: str, calls: Counter[str], *, fixed: bool, name: str = "shop") -> App:
    """reserve → charge → ship; before the fix, ``charge`` has a bug."""
    app = make_app(url, name)

    @app.step(retry=ONCE)
    async def reserve(order: dict[str, Any]) -> str:
        calls["reserve"] += 1
        return f"r-{order['id']}"

    @app.step(retry=ONCE)
    async def charge(order: dict[str, Any]) -> int:
        calls["charge"] += 1
        if not fixed:
            raise KeyError("amount")  # the bug
        return int(order["total"]) * 100

    @app.step(retry=ONCE)
    async def release(order: dict[str, Any]) -> None:
        calls["release"] += 1

    @app.step(retry=ONCE)
    async def ship(order: dict[str, Any], cents: int) -> str:
        calls["ship"] += 1
        return f"shipped {order['id']} for {cents}"

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        ctx.set_attributes(customer_id=order["customer"])
        compensate = release if order.get("saga") else None
        await ctx.run(reserve, order, compensate=compensate)
        cents = await ctx.run(charge, order)
        return str(await ctx.run(ship, order, cents))

    return app


async def test_a_fixed_bug_retries_failed_runs_without_repeating_completed_steps(
    shared_url: str,
) -> None:
    calls: Counter[str] = Counter()
    old = order_app(shared_url, calls, fixed=False)
    async with old:
        handles = [await old.start("place_order", {"id": i, "total": i, "customer": 7})
                   for i in range(3)]
        for h in handles:
            with pytest.raises(WorkflowFailed, match="KeyError"):
                await h.result(timeout=10)
    assert calls == Counter(reserve=3, charge=3)

    new = order_app(shared_url, calls, fixed=True)
    async with new:
        failed = await new.find_runs(status="failed", attributes={"customer_id": 7})
        assert {r.run_id for r in failed} == {h.run_id for h in handles}
        for info in failed:
            await new.get_handle(info.run_id).retry(actor="ops:ann")
        results = [await new.get_handle(h.run_id).result(timeout=10) for h in handles]
        assert results == [f"shipped {i} for {i * 100}" for i in range(3)]
        # reserve ran once per run, before the fix; charge once more each, with the fix
        assert calls == Counter(reserve=3, charge=6, ship=3)
        run = await new.get_handle(handles[0].run_id).info()
        assert (run.status, run.epoch, run.version) == (RunStatus.COMPLETED, 1, new.version)
        old_entries = await new.store.superseded_history(new.name, run.run_id)
        assert [(epoch, e.key, e.status) for epoch, e in old_entries] == [
            (1, "charge#1", "failed")
        ]
        keys = [e.key for e in await new.store.load_history(new.name, run.run_id)]
        assert keys == ["set_attributes#1", "reserve#1", "charge#1", "ship#1"]
        records = await new.store.audit_records(new.name)
        assert ("ops:ann", "run.retried", run.run_id) in {
            (r.actor, r.action, r.target) for r in records
        }
        assert (await new.store.verify_audit(new.name)).ok


async def test_a_compensated_run_is_retried_only_when_asked(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    old = order_app(sqlite_url, calls, fixed=False)
    async with old:
        h = await old.start("place_order", {"id": 1, "total": 2, "customer": 1, "saga": True})
        with pytest.raises(WorkflowCompensated):
            await h.result(timeout=10)
    new = order_app(sqlite_url, calls, fixed=True)
    async with new:
        handle = new.get_handle(h.run_id)
        before = await new.store.audit_records(new.name)
        with pytest.raises(RunNotRetryable, match="include_compensated"):
            await handle.retry()
        assert await new.store.audit_records(new.name) == before
        await handle.retry(include_compensated=True)
        assert await handle.result(timeout=10) == "shipped 1 for 200"
    assert calls == Counter(reserve=1, charge=2, release=1, ship=1)


async def test_retry_refuses_a_live_or_completed_run_and_changes_nothing(
    sqlite_url: str,
) -> None:
    app = make_app(sqlite_url)

    @app.workflow
    async def parked(ctx: WorkflowContext) -> str:
        await ctx.sleep(3600)
        return "done"

    @app.workflow
    async def quick(ctx: WorkflowContext) -> str:
        return "done"

    async with app:
        live = await app.start(parked)
        await eventually(lambda: _has_sleep(app, live.run_id))
        ended = await app.start(quick)
        await ended.result(timeout=5)
        for h, error in ((live, RunInProgress), (ended, RunNotRetryable)):
            before = (await h.info(), await app.store.load_history(app.name, h.run_id),
                      len(await app.store.audit_records(app.name)))
            with pytest.raises(error, match=h.run_id):
                await h.retry()
            after = (await h.info(), await app.store.load_history(app.name, h.run_id),
                     len(await app.store.audit_records(app.name)))
            assert after == before


async def _has_sleep(app: App, run_id: str) -> bool:
    return any(e.kind == "sleep" for e in await app.store.load_history(app.name, run_id))


async def test_fork_from_a_middle_step_reuses_what_came_before(shared_url: str) -> None:
    calls: Counter[str] = Counter()
    app = order_app(shared_url, calls, fixed=True)
    async with app:
        source = await app.start("place_order", {"id": 5, "total": 1, "customer": 3})
        assert await source.result(timeout=10) == "shipped 5 for 100"
        forked = await app.fork(source.run_id, from_step="charge#1", actor="ops:bo")
        assert forked.run_id != source.run_id
        assert await forked.result(timeout=10) == "shipped 5 for 100"
        # reserve's recorded result was reused; charge and ship ran again
        assert calls == Counter(reserve=1, charge=2, ship=2)
        history = await app.store.load_history(app.name, forked.run_id)
        assert [e.key for e in history] == [
            "set_attributes#1", "reserve#1", "charge#1", "ship#1"
        ]
        found = await app.find_runs(attributes={"customer_id": 3})
        assert {r.run_id for r in found} == {source.run_id, forked.run_id}
        fork_rec = await forked.info()
        assert fork_rec.causation_id == source.run_id
        actions = {(r.actor, r.action, r.target) for r in await app.store.audit_records(app.name)}
        assert ("ops:bo", "run.forked", forked.run_id) in actions


async def test_fork_refuses_a_step_never_reached_and_a_live_run(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    app = order_app(sqlite_url, calls, fixed=False)

    @app.workflow
    async def parked(ctx: WorkflowContext) -> None:
        await ctx.sleep(3600)

    async with app:
        h = await app.start("place_order", {"id": 1, "total": 1, "customer": 1})
        with pytest.raises(WorkflowFailed):
            await h.result(timeout=10)
        live = await app.start(parked)
        await eventually(lambda: _has_sleep(app, live.run_id))
        count = len(await app.find_runs())
        with pytest.raises(StepNotInHistory, match="ship#1") as info:
            await app.fork(h.run_id, from_step="ship")
        assert "reserve#1" in str(info.value)  # names the calls it did reach
        assert "set_attributes#1" not in str(info.value)  # (its steps)
        for internal in ("set_attributes#1", "set_attributes"):  # recorded, not a step
            with pytest.raises(StepNotInHistory, match="not a step") as info:
                await app.fork(h.run_id, from_step=internal)
            assert "reserve#1" in str(info.value)
        with pytest.raises(RunInProgress):
            await app.fork(live.run_id, from_step="sleep#1")
        assert len(await app.find_runs()) == count
