"""The choreography map (``GET /api/maps/events``) does not call "seen, not declared"
what the app declares: the events a workflow emits with ``ctx.emit``, also in a
console that serves the store without the code (the store keeps each workflow's map),
and the start event a choreographed saga's workflow emits (docs/console.md, "Maps");
on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx

from cantata import App, Event, Saga, Step
from tests.helpers import make_app
from tests.server.conftest import make_tokens


def billing(store_url: str) -> App:
    app = make_app(store_url, "billing")

    @app.workflow
    async def invoice(ctx: Any, n: int) -> int:
        await ctx.emit("invoice.sent", {"n": n})
        return n

    @app.on("invoice.sent", group="ledger")
    async def book(event: Event[Any]) -> None:
        return None

    @app.step
    def pack(n: int) -> int:
        return n

    @app.step
    def post(n: int) -> int:
        return n

    app.include(Saga("delivery", Step(pack), Step(post), mode="choreographed"))
    return app


async def edges(app: App, token: str) -> dict[tuple[str, str], str]:
    transport = httpx.ASGITransport(app=app.asgi())
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
        r = await client.get("/api/maps/events", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    names = {n["id"]: n["name"] for n in r.json()["nodes"]}
    return {(names[e["source"]], names[e["target"]]): e["state"] for e in r.json()["edges"]}


async def test_what_workflows_emit_is_declared_with_or_without_the_code(store_url: str) -> None:
    app = billing(store_url)
    async with app:
        tokens, _ = await make_tokens(app)
        await (await app.start("invoice", 1)).result(timeout=10)
        await (await app.start("delivery", 2)).result(timeout=10)
        with_code = await edges(app, tokens["viewer"])
    async with App("billing", store=store_url).client() as console:  # the store alone
        without_code = await edges(console, tokens["viewer"])
    for seen in (with_code, without_code):
        assert seen[("invoice", "invoice.sent")] == "active", seen
        assert seen[("delivery", "delivery.started")] == "active", seen
        assert "undeclared" not in seen.values(), seen
