"""A choreographed saga's run on its map (``GET /api/maps/workflows/{name}?run_id=``,
the run page's SVG): its steps are handlers, not calls of the run's history, and the
map colours them by what those handlers did, as the orchestrated run's map does by its
history (docs/console.md, "Maps"); on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cantata import Saga, Step, WorkflowCompensated
from cantata.engine.saga import Mode
from tests.helpers import make_app
from tests.server.conftest import make_tokens


@pytest.mark.parametrize("mode", ["choreographed", "orchestrated"])
async def test_a_saga_runs_steps_are_coloured_by_what_they_did(
    store_url: str, mode: Mode
) -> None:
    app = make_app(store_url, "post")

    @app.step
    def pack(order: dict[str, Any]) -> dict[str, Any]:
        return {"packed": order["id"]}

    @app.step
    def unpack(order: dict[str, Any]) -> None:
        return None

    @app.step
    def post(order: dict[str, Any]) -> dict[str, Any]:
        if order.get("lost"):
            raise RuntimeError("the carrier lost the parcel")
        return {"posted": order["id"]}

    app.include(Saga("delivery", Step(pack, compensate=unpack), Step(post), mode=mode))
    async with app:
        tokens, _ = await make_tokens(app)
        lost = await app.start("delivery", {"id": "D-1", "lost": True})
        with pytest.raises(WorkflowCompensated):
            await lost.result(timeout=20)
        fine = await app.start("delivery", {"id": "D-2"})
        await fine.result(timeout=20)
        transport = httpx.ASGITransport(app=app.asgi())
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            async def states(run_id: str) -> dict[str, str]:
                r = await client.get(f"/api/maps/workflows/delivery?run_id={run_id}",
                                     headers={"Authorization": f"Bearer {tokens['viewer']}"})
                assert r.status_code == 200, r.text
                return {f"{n['kind']}:{n['name']}": n["status"] for n in r.json()["nodes"]}

            assert await states(lost.run_id) == {
                "start:delivery": "completed", "step:pack": "completed",
                "step:post": "failed", "compensation:unpack": "completed",
                "end:completed": "not_reached", "end:compensated": "compensated"}
            assert await states(fine.run_id) == {
                "start:delivery": "completed", "step:pack": "completed",
                "step:post": "completed", "compensation:unpack": "not_reached",
                "end:completed": "completed", "end:compensated": "not_reached"}
