"""@app.query: read-only answers from a run's recorded state, by any process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, QueryFailed, RunState, RunStatus, WorkflowContext

from .helpers import eventually, make_app, other_process


async def _waiting(app: App, run_id: str) -> bool:
    return any(e.kind == "wait" for e in await app.store.load_history(app.name, run_id))


def _declare(app: App, asked: list[str]) -> None:
    @app.step
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": order["qty"]}

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        await ctx.run(reserve, order)
        await ctx.set_value("stage", "awaiting payment")
        await ctx.wait_for_event("payment.done", match={"order": order["id"]})
        await ctx.set_value("stage", "paid")
        return "shipped"

    @app.query(workflow=place_order)
    def summary(state: RunState) -> dict[str, Any]:
        asked.append(state.run_id)
        return {"stage": state.value("stage"), "status": str(state.status),
                "reserved": state.step("reserve"), "order": state.args[0]["id"]}

    @app.query(workflow=place_order, name="broken")
    async def broken(state: RunState) -> Any:
        return state.values["missing"]


async def test_a_query_answers_from_recorded_state_without_waking_the_run(
    store_url: str,
) -> None:
    asked: list[str] = []
    app = make_app(store_url)
    _declare(app, asked)
    async with app:
        handle = await app.start("place_order", {"id": 7, "qty": 2})
        await eventually(lambda: _waiting(app, handle.run_id))
        answer = await handle.query("summary")
        assert answer == {"stage": "awaiting payment", "status": "running",
                          "reserved": {"reserved": 2}, "order": 7}
        history = await app.store.load_history(app.name, handle.run_id)
        async with other_process(store_url) as other:
            if other is not None:  # a process that only queries (it declares the query)
                _declare(other, asked)
                theirs = await other.get_handle(handle.run_id).query("summary")
                assert theirs["stage"] == "awaiting payment"
        # Asking wrote nothing and woke nothing: the run still waits where it was.
        assert await app.store.load_history(app.name, handle.run_id) == history
        assert await handle.status() == RunStatus.RUNNING
        await app.publish("payment.done", {"order": 7})
        assert await handle.result(timeout=20) == "shipped"
        final = await handle.query("summary")
        assert final["stage"] == "paid" and final["status"] == "completed"


async def test_a_query_that_raises_or_is_unknown_names_the_run_and_the_query(
    store_url: str,
) -> None:
    app = make_app(store_url)
    _declare(app, [])
    async with app:
        handle = await app.start("place_order", {"id": 1, "qty": 1})
        await handle.get_value("stage", wait=10)
        with pytest.raises(QueryFailed) as info:
            await handle.query("broken")
        text = str(info.value)
        assert handle.run_id in text and "'broken'" in text and "KeyError" in text
        assert isinstance(info.value.__cause__, KeyError)
        with pytest.raises(QueryFailed, match=r"no query named 'nope'.*known: broken, summary"):
            await handle.query("nope")
        await handle.cancel()


def test_the_blocking_facade_reads_values_and_queries(tmp_path: Path) -> None:
    from cantata import sync

    app = make_app(f"sqlite:///{tmp_path}/cantata.db")
    _declare(app, [])
    with sync.connect(app, serve=True) as shop:
        handle = shop.start("place_order", {"id": 3, "qty": 1})
        assert handle.get_value("stage", wait=10) == "awaiting payment"
        assert handle.query("summary")["order"] == 3
        handle.cancel()


def test_a_query_without_its_workflow_says_how_to_name_it() -> None:
    app = make_app("memory://")
    router = cantata.Router()

    def stage(state: RunState) -> Any:
        return state.values.get("stage")

    for bare, register in ((True, lambda: app.query(stage)),
                           (False, lambda: app.query()(stage)),
                           (True, lambda: router.query(stage)),
                           (False, lambda: router.query()(stage))):
        with pytest.raises(cantata.RegistrationError, match=(
            r"@app.query needs the workflow it answers for: "
            r"@app.query\(workflow=place_order\)"
        )) as info:
            register()
        assert ("query stage" in str(info.value)) is bare
