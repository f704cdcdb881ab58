"""Operator actions reach the hash-chained audit log with their actor."""

from __future__ import annotations

import asyncio
from typing import Any

import cantata
from cantata import Retry

from .helpers import make_app


async def test_cancel_and_replay_are_audited_with_their_actor() -> None:
    app = make_app("memory://")

    @app.workflow
    async def slow(ctx: cantata.WorkflowContext) -> None:
        await ctx.sleep(3600)

    @app.on("order.placed", group="billing", retry=Retry(max_attempts=1))
    async def bill(event: cantata.Event[Any]) -> None:
        raise RuntimeError("billing down")

    async with app:
        handle = await app.start(slow)
        await asyncio.sleep(0.1)
        await handle.cancel(actor="alice")
        await app.publish("order.placed", {})
        for _ in range(200):
            letters = await app.dead_letters()
            if letters:
                break
            await asyncio.sleep(0.01)
        await app.replay(letters[0].id, actor="bob")
        records = await app.store.audit_records(app.name)
        report = await app.store.verify_audit(app.name)
    actions = {(r.action, r.actor) for r in records}
    assert ("run.cancel_requested", "alice") in actions or any(
        r.actor == "alice" and "cancel" in r.action for r in records)
    assert any(r.actor == "bob" and "replay" in r.action for r in records)
    assert report.ok
