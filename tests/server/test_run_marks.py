"""What the console's API and the CLI say of runs no worker serves (the overview's
``served``), of a cancel asked while a run waited in a queue (not its place in the
queue), and of a step whose branch the workflow's own code cancelled (``cancelled``),
on SQLite and on PostgreSQL (docs/console.md, docs/operating.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from cantata import App, Retry, WorkflowContext
from cantata.cli import common
from tests.server.conftest import Shop, make_tokens
from tests.server.shop import make_shop
from tests.server.test_api import finished
from tests.server.test_cli_json import api_json, cli_json
from tests.server.test_flow_api import cli_text, with_flow

ONCE = Retry(max_attempts=1)


def with_split(app: App) -> App:
    """The shop plus an order packed and labelled in a TaskGroup: the label fails while
    the packing is in progress, so the group cancels the packing's branch."""
    began = asyncio.Event()

    @app.step(retry=ONCE)
    async def pack(order: dict[str, Any]) -> str:
        began.set()
        # Ends as it will: the branch's cancel waits for it. Long enough for the label's
        # failure to be committed and its branch cancelled first under a loaded suite
        # (0.3 s was not once, on SQLite at six test processes: pack ended unmarked).
        await asyncio.sleep(2.0)
        return "packed"

    @app.step(retry=ONCE)
    async def label(order: dict[str, Any]) -> None:
        await asyncio.wait_for(began.wait(), 10)
        raise RuntimeError(f"the label printer is jammed (order {order['id']})")

    @app.workflow
    async def split_order(ctx: WorkflowContext, order: dict[str, Any]) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(ctx.run(pack, order))
            group.create_task(ctx.run(label, order))

    return app


@asynccontextmanager
async def console(app: App) -> AsyncIterator[Shop]:
    """A console client of the open ``app``, with a token per role."""
    tokens, names = await make_tokens(app)
    transport = httpx.ASGITransport(app=app.asgi(stream_interval=0.05))
    async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
        yield Shop(app, {}, client, tokens, names)


async def test_the_overview_says_when_no_worker_serves_the_live_runs(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs count as stalled after 5 minutes; before that, with no live worker, the
    overview's `served` is false (its panel says no worker serves the runs waiting) and
    `cantata stalled` says so instead of only "no stalled transactions"."""
    monkeypatch.setattr(common.console, "_width", 250)
    app = make_shop(store_url)
    async with app.client(), console(app) as shop:
        for i in range(2):
            await app.start("place_order", {"id": f"U-{i}"})
        overview = await api_json(shop, "/api/overview")
        assert overview["served"] is False
        assert overview["counts"].get("pending") == 2 and overview["stalled"] == []
        said = " ".join((await cli_text(capsys, app, "stalled")).split())
        assert "no stalled transactions" in said
        assert (f"no worker is serving app {app.name!r} (no live worker heartbeat): 2 live "
                "run(s) make no progress until a worker runs") in said
        worker = make_shop(store_url)
        async with worker:
            assert (await api_json(shop, "/api/overview"))["served"] is True
            assert "no worker" not in await cli_text(capsys, app, "stalled")


async def test_a_run_cancelled_while_it_waits_in_a_queue_says_its_cancel_is_pending(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its trace (API, CLI) says the cancel is requested and waits for a worker, not a
    place in the queue; the run behind it moves up."""
    monkeypatch.setattr(common.console, "_width", 250)
    app = with_flow(make_shop(store_url))
    async with app.client(), console(app) as shop:
        first = await app.start("await_approval", {"id": "C-1"}, queue="fragile")
        second = await app.start("await_approval", {"id": "C-2"}, queue="fragile")
        trace = await api_json(shop, f"/api/trace/{first.run_id}")
        assert trace["detail"] == "queued in 'fragile' behind 0 run(s)"  # (as before)
        await first.cancel()

        trace = await api_json(shop, f"/api/trace/{first.run_id}")
        assert trace["status"] == "pending"
        assert trace["detail"] == ("cancel requested while queued in 'fragile': it ends "
                                   "cancelled, without beginning, once a worker takes it")
        assert "cancel requested while queued" in trace["where"]
        assert "behind" not in trace["where"]
        [stall] = [s for s in await api_json(shop, "/api/stalled", older_than=0)
                   if s["correlation_id"] == first.run_id]
        assert stall["reason"] == "pending_step"
        assert stall["node"]["detail"] == trace["detail"]
        text = " ".join((await cli_text(capsys, app, "trace", first.run_id)).split())
        assert "cancel requested while queued in 'fragile'" in text
        assert "behind" not in text
        behind = await api_json(shop, f"/api/trace/{second.run_id}")
        assert behind["detail"] == "queued in 'fragile' behind 0 run(s)"


async def test_a_step_whose_branch_the_workflow_cancelled_is_marked_cancelled(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The step ran to its end and is `completed`; the run's detail and its trace say its
    branch was cancelled meanwhile (`cancelled: true`), as `cantata trace` and `cantata
    run` do; the CLI's --json is the API's."""
    monkeypatch.setattr(common.console, "_width", 250)
    app = with_split(make_shop(store_url))
    async with app, console(app) as shop:
        run_id = (await app.start("split_order", {"id": "S-1"})).run_id
        assert (await finished(shop, run_id))["status"] == "failed"
        detail = await api_json(shop, f"/api/runs/{run_id}")
        steps = {s["key"]: s for s in detail["steps"]}
        assert steps["pack#1"]["status"] == "completed" and steps["pack#1"]["cancelled"] is True
        assert steps["label#1"]["status"] == "failed" and steps["label#1"]["cancelled"] is False

        trace = await api_json(shop, f"/api/trace/{run_id}")
        nodes = {n["ref"]: n for n in trace["children"]}
        assert nodes["pack#1"]["cancelled"] is True and nodes["label#1"]["cancelled"] is False
        assert trace["cancelled"] is False

        text = await cli_text(capsys, app, "trace", run_id)
        [pack] = [line for line in text.splitlines() if "✓ step pack" in line]
        assert "completed" in pack and "branch cancelled while it ran" in pack
        [lab] = [line for line in text.splitlines() if "✗ step label" in line]
        assert "branch cancelled" not in lab
        shown = await cli_text(capsys, app, "run", run_id)
        [pack] = [line for line in shown.splitlines() if "pack#1" in line]
        assert "branch cancelled while it ran" in pack
        run = await cli_json(capsys, shop, "run", run_id)
        run.pop("superseded")
        assert run == detail
        cli_trace = await cli_json(capsys, shop, "trace", run_id)
        assert cli_trace.pop("where") == trace.pop("where")
        assert cli_trace == trace
