"""The CLI's ``--json`` is the HTTP API's JSON for the same objects (docs/operating.md):
a run, runs, a trace, stalls and dead letters, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from cantata.cli.main import main
from cantata.observability import timeline
from tests.helpers import eventually
from tests.server.conftest import Shop
from tests.server.test_api import finished, start


async def cli_json(capsys: pytest.CaptureFixture[str], shop: Shop, *args: str) -> Any:
    store = shop.app._store_spec
    assert isinstance(store, str)
    code = await asyncio.get_running_loop().run_in_executor(
        None, main, [*args, "--json", "--app", shop.app.name, "--store", store])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


async def api_json(shop: Shop, path: str, **params: Any) -> Any:
    r = await shop.get(path, params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_the_clis_json_is_the_apis(
    shop: Shop, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A live item reads "in progress" for RECENT seconds, then "stalled": read by the
    # CLI and then the API, either side of that moment (a loaded CI machine took 5 s to
    # get here), the two `where`s differ by the clock alone. Kept "in progress" here.
    monkeypatch.setattr(timeline, "RECENT", 3600.0)
    compensated = await start(shop, "place_order", {"id": "J-1", "card": "declined"},
                              idempotency_key="order-J-1")
    await finished(shop, compensated)
    waiting = await start(shop, "await_approval", {"id": "J-2"})
    shop.state["emails_broken"] = True
    r = await shop.post("/api/events", json={"type": "order.placed",
                                             "data": {"order_id": "J-3"}})
    assert r.status_code == 201

    async def settled() -> bool:
        stalls = await api_json(shop, "/api/stalled", older_than=0)
        return {s["reason"] for s in stalls} >= {"waiting_event", "dead_letter"}

    await eventually(settled)

    run = await cli_json(capsys, shop, "run", compensated)
    assert run.pop("superseded") == []  # the CLI's one addition (documented)
    assert run == await api_json(shop, f"/api/runs/{compensated}")
    assert await cli_json(capsys, shop, "runs") == (await api_json(shop, "/api/runs"))["runs"]
    for ref in (compensated, waiting):
        cli_trace = await cli_json(capsys, shop, "trace", ref)
        api_trace = await api_json(shop, f"/api/trace/{ref}")
        # (a live item's `where` ends with how long it has waited, read at each call)
        wheres = [t.pop("where").rsplit(" (", 1)[0] for t in (cli_trace, api_trace)]
        assert cli_trace == api_trace and wheres[0] == wheres[1]
    assert (await cli_json(capsys, shop, "stalled", "--older-than", "0s")
            == await api_json(shop, "/api/stalled", older_than=0))
    letters = await cli_json(capsys, shop, "dlq", "list")
    assert letters == await api_json(shop, "/api/dead-letters")
    assert letters[0]["event"]["data"] == {"order_id": "J-3"}


async def test_retry_and_fork_print_the_run_as_run_json_does(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    shop.state["billing_down"] = True
    failed = await start(shop, "invoice", {"id": "J-4", "customer": "c-1"})
    await finished(shop, failed)
    shop.state["billing_down"] = False
    detail = set(await api_json(shop, f"/api/runs/{failed}"))
    forked = await cli_json(capsys, shop, "fork", failed, "--from-step", "bill#1")
    assert set(forked) == detail | {"superseded"}
    assert forked["attributes"] == {"customer": "c-1", "order": "J-4"}
    retried = await cli_json(capsys, shop, "retry", failed)
    assert set(retried) == detail | {"superseded"}
    assert [s["key"] for s in retried["superseded"]] == ["bill#1"]
    assert retried["superseded"][0]["epoch"] == 1
    assert retried["superseded"][0]["attempts"][0]["error"].startswith("RuntimeError: the "
                                                                       "billing service")
