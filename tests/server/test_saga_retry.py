"""A choreographed saga run that failed is not "retried" into the same end: its steps
ran as handlers, so a retry would replay its recorded end and run nothing. The retry is
refused (``409 run_not_retryable``) saying to fork it from its start, a fork from its
wait (which would run no step and wait forever) is refused naming the start, and the
fork from its start runs its steps again with the fixed code (docs/console.md, "Fixing
flows")."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from cantata import Saga, Step, WorkflowCompensated
from tests.helpers import eventually, make_app
from tests.server.conftest import make_tokens


async def test_a_failed_choreographed_run_is_forked_from_its_start_not_retried(
    store_url: str
) -> None:
    app = make_app(store_url, "post")
    carrier = {"down": True}

    @app.step
    def pack(order: dict[str, Any]) -> dict[str, Any]:
        return {"packed": order["id"]}

    @app.step
    def unpack(order: dict[str, Any]) -> None:
        return None

    @app.step
    def post(order: dict[str, Any]) -> dict[str, Any]:
        if carrier["down"]:
            raise RuntimeError("the carrier is down")
        return {"posted": order["id"]}

    app.include(Saga("delivery", Step(pack, compensate=unpack), Step(post),
                     mode="choreographed"))
    async with app:
        tokens, _ = await make_tokens(app)
        run = await app.start("delivery", {"id": "D-1"})
        with pytest.raises(WorkflowCompensated):
            await run.result(timeout=20)
        carrier["down"] = False  # the fix
        transport = httpx.ASGITransport(app=app.asgi())
        auth = {"Authorization": f"Bearer {tokens['operator']}"}
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            r = await client.post(f"/api/runs/{run.run_id}/retry", headers=auth,
                                  json={"include_compensated": True})
            assert r.status_code == 409, r.text
            error = r.json()["error"]
            assert error["code"] == "run_not_retryable"
            assert "choreographed saga" in error["message"]
            assert "emit:delivery.started#1" in error["message"]
            assert str(await run.status()) == "compensated"  # left as it was

            # from its wait, a fork would reuse its start, run no hop and wait forever
            r = await client.post(f"/api/runs/{run.run_id}/fork", headers=auth,
                                  json={"from_step": "wait:delivery.finished#1"})
            assert r.status_code == 422, r.text
            error = r.json()["error"]
            assert (error["code"], error["field"]) == ("step_not_in_history", "from_step")
            assert "emit:delivery.started#1" in error["message"]

            r = await client.post(f"/api/runs/{run.run_id}/fork", headers=auth,
                                  json={"from_step": "emit:delivery.started#1"})
            assert r.status_code == 201, r.text
            forked = app.get_handle(r.json()["run_id"])
            assert await forked.result(timeout=20) == {"pack": {"packed": "D-1"},
                                                       "post": {"posted": "D-1"}}

            async def posted() -> bool:  # its trace shows post handled, for this run
                trace = (await client.get(f"/api/trace/{forked.run_id}", headers=auth)).json()
                return "post" in str(trace)

            await eventually(posted, timeout=10, what="the forked run's post")
