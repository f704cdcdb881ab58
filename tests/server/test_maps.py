"""A run's map ends where the run ended, drawn from the app's code or from the store
alone (``GET /api/maps/workflows/{name}?run_id=``; docs/console.md)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from cantata import App, Retry, WorkflowContext
from cantata.model.records import Declaration
from tests.helpers import eventually
from tests.server.conftest import make_tokens


def make_orders(store: str) -> App:
    """Orders that complete, compensate (card declined), fail (nothing to undo) or wait
    for an approval (to cancel, or to stay live)."""
    app = App("mapshop", store=store, broker="embedded", poll_interval=0.05, lease=5.0)

    @app.step
    async def reserve(order: dict[str, Any]) -> dict[str, Any]:
        return {"reserved": order["id"]}

    @app.step
    async def release(order: dict[str, Any]) -> None:
        return None

    @app.step(retry=Retry(max_attempts=1))
    async def charge(order: dict[str, Any]) -> dict[str, Any]:
        if order.get("card") == "declined":
            raise ValueError(f"card declined for order {order['id']}")
        return {"charged": order["id"]}

    @app.step
    async def ship(order: dict[str, Any]) -> dict[str, Any]:
        return {"shipped": order["id"]}

    @app.step(retry=Retry(max_attempts=1))
    async def explode(order: dict[str, Any]) -> None:
        raise RuntimeError(f"boom on order {order['id']}")

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
        await ctx.run(reserve, order, compensate=release)
        await ctx.run(charge, order)
        return dict(await ctx.run(ship, order))

    @app.workflow
    async def broken(ctx: WorkflowContext, order: dict[str, Any]) -> None:
        await ctx.run(explode, order)
        await ctx.run(ship, order)

    @app.workflow
    async def await_approval(ctx: WorkflowContext, order: dict[str, Any]) -> None:
        await ctx.run(reserve, order, compensate=release)
        await ctx.wait_for_event("invoice.approved", match={"order_id": order["id"]},
                                 timeout=3600)
        await ctx.run(ship, order)

    return app


@dataclass
class Runs:
    """The serving app, one run per way of ending, and a viewer's token."""

    app: App
    store_url: str
    ids: dict[str, tuple[str, str]]  # how it ended -> (workflow, run id)
    token: str


async def ended(app: App, run_id: str, status: str) -> None:
    async def done() -> bool:
        run = await app.store.get_run(app.name, run_id)
        return run is not None and str(run.status) == status

    await eventually(done)


async def waiting(app: App, run_id: str) -> bool:
    history = await app.store.load_history(app.name, run_id)
    return any(e.key.startswith("wait:") for e in history)


@pytest.fixture
async def runs(store_url: str) -> AsyncIterator[Runs]:
    app = make_orders(store_url)
    async with app:
        ids: dict[str, tuple[str, str]] = {}
        for status, workflow, order in (
            ("completed", "place_order", {"id": "O-1"}),
            ("compensated", "place_order", {"id": "O-2", "card": "declined"}),
            ("failed", "broken", {"id": "O-3"}),
            ("cancelled", "await_approval", {"id": "O-4"}),
            ("running", "await_approval", {"id": "O-5"}),
        ):
            handle = await app.start(workflow, order)
            ids[status] = (workflow, handle.run_id)
            if status == "cancelled":
                await eventually(functools.partial(waiting, app, handle.run_id))
                await handle.cancel()
        for status, (_, run_id) in ids.items():
            if status != "running":
                await ended(app, run_id, status)
        await eventually(functools.partial(waiting, app, ids["running"][1]))
        tokens, _ = await make_tokens(app)
        yield Runs(app, store_url, ids, tokens["viewer"])


async def run_map(api: App, runs: Runs, status: str) -> dict[str, Any]:
    """The map of the run that ended ``status``, as ``api``'s console serves it."""
    workflow, run_id = runs.ids[status]
    transport = httpx.ASGITransport(app=api.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
        r = await client.get(f"/api/maps/workflows/{workflow}", params={"run_id": run_id},
                             headers={"Authorization": f"Bearer {runs.token}"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    ids = {n["id"] for n in out["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in out["edges"])
    return out


def ends(m: dict[str, Any]) -> dict[str, str | None]:
    """The map's end nodes: name -> state in the run."""
    return {n["name"]: n["status"] for n in m["nodes"] if n["kind"] == "end"}


def states(m: dict[str, Any]) -> dict[str, str | None]:
    """Each call's state in the run, by name."""
    return {n["name"]: n["status"] for n in m["nodes"] if n["kind"] not in ("start", "end")}


@pytest.fixture(params=["code", "store-only"])
async def console(request: pytest.FixtureRequest, runs: Runs) -> AsyncIterator[App]:
    """The console with the app's code, or with the store alone (``cantata serve
    --store URL --app mapshop``)."""
    if request.param == "code":
        yield runs.app
        return
    bare = App(runs.app.name, store=runs.store_url)
    async with bare.client():
        yield bare


async def test_a_completed_run_ends_completed(console: App, runs: Runs) -> None:
    m = await run_map(console, runs, "completed")
    reached = {k: v for k, v in ends(m).items() if v != "not_reached"}
    assert reached == {"completed": "completed"}
    assert states(m)["ship"] == "completed"
    assert 'finish(["completed"])' in m["mermaid"]


async def test_a_compensated_run_ends_compensated_and_never_completed(
    console: App, runs: Runs
) -> None:
    m = await run_map(console, runs, "compensated")
    reached = {k: v for k, v in ends(m).items() if v != "not_reached"}
    assert reached == {"compensated": "compensated"}
    assert states(m)["charge"] == "failed" and states(m)["release"] == "completed"
    assert 'undone(["compensated"])' in m["mermaid"]
    into_end = {e["source"] for e in m["edges"] if e["target"] == "undone"}
    by_id = {n["id"]: n for n in m["nodes"]}
    assert [by_id[s]["name"] for s in into_end] == ["release"]


async def test_a_failed_run_ends_failed(console: App, runs: Runs) -> None:
    m = await run_map(console, runs, "failed")
    assert ends(m) == {"failed": "failed"}
    assert states(m)["explode"] == "failed"
    assert 'finish(["failed"])' in m["mermaid"] and '"completed"' not in m["mermaid"]


async def test_a_cancelled_run_ends_cancelled(console: App, runs: Runs) -> None:
    m = await run_map(console, runs, "cancelled")
    reached = {k: v for k, v in ends(m).items() if v != "not_reached"}
    assert reached == {"cancelled": "cancelled"}
    assert states(m)["invoice.approved"] == "cancelled"
    assert states(m)["release"] == "completed"


async def test_a_live_run_has_reached_no_end(console: App, runs: Runs) -> None:
    m = await run_map(console, runs, "running")
    assert all(status == "not_reached" for status in ends(m).values())
    assert states(m)["invoice.approved"] == "waiting"


async def test_the_steps_a_run_never_reached_are_drawn(console: App, runs: Runs) -> None:
    """The store keeps the map the app's code declared: the console without the code
    draws it too."""
    m = await run_map(console, runs, "compensated")
    assert states(m)["ship"] == "not_reached"
    assert ends(m) == {"completed": "not_reached", "compensated": "compensated"}
    m = await run_map(console, runs, "failed")
    assert states(m) == {"explode": "failed", "ship": "not_reached"}


async def test_from_the_store_alone_a_run_map_is_the_one_drawn_from_the_code(
    runs: Runs
) -> None:
    bare = App(runs.app.name, store=runs.store_url)
    async with bare.client():
        for status in runs.ids:
            from_code = await run_map(runs.app, runs, status)
            from_store = await run_map(bare, runs, status)
            assert from_store["nodes"] == from_code["nodes"], status
            assert from_store["edges"] == from_code["edges"], status


async def test_without_a_declared_map_the_run_is_drawn_from_its_history(runs: Runs) -> None:
    """A store written by a version that kept no map: what the run did, and its end."""
    await runs.app.store.declare(runs.app.name, [Declaration("workflow", "place_order")])
    bare = App(runs.app.name, store=runs.store_url)
    async with bare.client():
        m = await run_map(bare, runs, "compensated")
    assert states(m) == {"reserve": "completed", "charge": "failed", "release": "completed"}
    assert ends(m) == {"compensated": "compensated"}
    assert 'undone(["compensated"])' in m["mermaid"] and '(["completed"])' not in m["mermaid"]
