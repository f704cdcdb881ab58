"""A keyed audit chain stays keyed through every operator action and transaction step:
retry, fork, discard, replay, cancel, schedule changes and an ``@app.transaction`` step
on each store."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

import cantata
from cantata import App, Event, Retry, WorkflowContext
from tests.helpers import eventually

KEY = "0123456789abcdef0123456789abcdef"


async def test_operator_actions_keep_a_keyed_chain_intact(store_url: str) -> None:
    app = App("keyed", store=store_url, audit_key=KEY, poll_interval=0.05)
    broken = [True]

    @app.step(retry=Retry(max_attempts=1))
    async def charge(n: int) -> int:
        if broken[0]:
            raise RuntimeError("card API down")
        return n

    @app.workflow
    async def pay(ctx: WorkflowContext, n: int) -> int:
        result: int = await ctx.run(charge, n)
        return result

    @app.on("order.placed", group="ledger", retry=Retry(max_attempts=1))
    async def book(event: Event[Any]) -> None:
        raise RuntimeError("ledger down")

    @app.workflow
    async def ticked(ctx: WorkflowContext, tick: dt.datetime) -> int:
        return 4

    transactional = not store_url.startswith("memory:")
    if transactional:
        @app.transaction
        async def note(tx: cantata.Tx, n: int) -> int:
            await tx.execute("SELECT 1")
            return n

        @app.workflow
        async def noted(ctx: WorkflowContext, n: int) -> int:
            result: int = await ctx.run(note, n)
            return result

    async with app:
        h = await app.start(pay, 1)
        with pytest.raises(cantata.WorkflowFailed):
            await h.result(timeout=10)
        broken[0] = False
        await h.retry(actor="ops:ann")
        assert await h.result(timeout=10) == 1
        forked = await app.fork(h.run_id, "charge#1", actor="ops:ann")
        assert await forked.result(timeout=10) == 1
        for _ in range(2):
            await app.publish("order.placed", {})
        await eventually(lambda: _letters(app, 2))
        first, second = await app.dead_letters()
        await app.discard(first.id, actor="ops:ann")
        await app.replay(second.id, actor="ops:ann")
        parked = await app.start(pay, 2)
        await parked.cancel(actor="ops:ann")
        if transactional:
            assert await (await app.start("noted", 3)).result(timeout=10) == 3
        await app.schedules.create("hourly", "0 * * * *", ticked, actor="ops:ann")
        await app.schedules.pause("hourly", actor="ops:ann")
        await app.schedules.resume("hourly", actor="ops:ann")
        assert await (await app.schedules.trigger("hourly", actor="ops:ann")).result(
            timeout=10) == 4
        await app.schedules.delete("hourly", actor="ops:ann")
        report = await app.store.verify_audit(app.name, key=app.audit_key)
        records = await app.store.audit_records(app.name, after_seq=0, limit=1000)
    assert report.ok, (report, [(r.seq, r.actor, r.action) for r in records])


async def _letters(app: App, n: int) -> bool:
    return len(await app.dead_letters()) >= n
