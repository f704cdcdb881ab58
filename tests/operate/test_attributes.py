"""Search attributes and lookups from code: ctx.set_attributes and app.find_runs."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import (
    ConfigurationError,
    UnknownAttribute,
    WorkflowContext,
    WorkflowFailed,
)
from tests.engine.helpers import eventually, make_app


def crm(url: str) -> Any:
    app = make_app(url)

    @app.workflow
    async def onboard(ctx: WorkflowContext, customer: dict[str, Any]) -> str:
        ctx.set_attributes(customer_id=customer["id"], vip=customer["vip"], score=1.5)
        await ctx.sleep(0.05)
        await ctx.set_attributes(stage="welcomed")  # awaited: committed at once
        await ctx.wait_for_event("activated", match={"id": customer["id"]})
        ctx.set_attributes(stage="active")
        return "ok"

    @app.workflow
    async def bad(ctx: WorkflowContext) -> None:
        ctx.set_attributes(tags=["a", "b"])

    return app


async def _stage(app: Any, run_id: str, stage: str) -> bool:
    attrs = await app.store.run_attributes(app.name, [run_id])
    return bool(attrs.get(run_id, {}).get("stage") == stage)


async def test_find_runs_by_key_and_attributes(store_url: str) -> None:
    app = crm(store_url)
    async with app:
        a = await app.start("onboard", {"id": 42, "vip": True}, idempotency_key="cust-42")
        b = await app.start("onboard", {"id": 7, "vip": False}, idempotency_key="cust-7")
        for h in (a, b):
            await eventually(lambda h=h: _stage(app, h.run_id, "welcomed"), timeout=10)
        [by_key] = await app.find_runs(idempotency_key="cust-42")
        assert by_key.run_id == a.run_id and by_key.idempotency_key == "cust-42"
        assert by_key.attributes == {"customer_id": "42", "vip": "true", "score": "1.5",
                                     "stage": "welcomed"}
        assert [r.run_id for r in await app.find_runs(attributes={"customer_id": 42})] == [
            a.run_id
        ]
        assert [r.run_id for r in await app.find_runs(attributes={"customer_id": "42"})] == [
            a.run_id  # a number and its text are the same attribute value
        ]
        assert [r.run_id for r in await app.find_runs(attributes={"vip": False})] == [b.run_id]
        both = await app.find_runs(attributes={"stage": "welcomed"}, workflow="onboard",
                                   status="running")
        assert [r.run_id for r in both] == [b.run_id, a.run_id]  # newest first
        assert await app.find_runs(attributes={"customer_id": 42, "vip": False}) == []
        assert len(await app.find_runs(limit=1)) == 1
        await app.publish("activated", {"id": 42})
        assert await a.result(timeout=10) == "ok"
        [done] = await app.find_runs(attributes={"stage": "active"})
        assert done.run_id == a.run_id and done.status == "completed"
        history = [e.key for e in await app.store.load_history(app.name, a.run_id)
                   if e.kind == "attrs"]
        assert history == ["set_attributes#1", "set_attributes#2", "set_attributes#3"]


async def test_attributes_survive_a_restart_without_being_recorded_twice(
    sqlite_url: str,
) -> None:
    app = crm(sqlite_url)
    async with app:
        h = await app.start("onboard", {"id": 1, "vip": False})
        await eventually(lambda: _stage(app, h.run_id, "welcomed"), timeout=10)
    again = crm(sqlite_url)
    async with again:  # replays set_attributes from history
        await again.publish("activated", {"id": 1})
        assert await again.get_handle(h.run_id).result(timeout=10) == "ok"
        history = await again.store.load_history(again.name, h.run_id)
        assert [e.key for e in history if e.kind == "attrs"] == [
            "set_attributes#1", "set_attributes#2", "set_attributes#3"
        ]
        [info] = await again.find_runs(attributes={"customer_id": 1})
        assert info.attributes["stage"] == "active"


async def test_bad_attribute_names_and_values_are_clear_errors(store_url: str) -> None:
    app = crm(store_url)
    async with app:
        h = await app.start("bad")
        with pytest.raises(WorkflowFailed, match="attribute 'tags' has a list value"):
            await h.result(timeout=10)
        with pytest.raises(UnknownAttribute, match="no run of app 'shop' has set attribute "
                                                   "'customer'"):
            await app.find_runs(attributes={"customer": 1})
        with pytest.raises(UnknownAttribute, match="is invalid"):
            await app.find_runs(attributes={"bad name": 1})
        with pytest.raises(ConfigurationError, match="unknown run status"):
            await app.find_runs(status="stuck")
        assert await app.find_runs(idempotency_key="nope") == []
