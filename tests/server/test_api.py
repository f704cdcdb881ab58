"""The JSON API against the shop app, on SQLite and on PostgreSQL (docs/console.md)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
from typing import Any
from urllib.parse import quote

import pydantic
import pytest

from cantata import App, ConfigurationError
from tests.helpers import eventually
from tests.server.conftest import Shop


class Order(pydantic.BaseModel):
    """A typed workflow argument (module level: the annotation is resolved here)."""

    id: int


async def finished(shop: Shop, run_id: str) -> dict[str, Any]:
    """The run once it has ended."""
    out: dict[str, Any] = {}

    async def done() -> bool:
        r = await shop.get(f"/api/runs/{run_id}")
        out.update(r.json())
        return out["status"] in ("completed", "compensated", "failed", "cancelled")

    await eventually(done)
    return out


async def start(shop: Shop, workflow: str, order: dict[str, Any], **kw: Any) -> str:
    r = await shop.post(f"/api/workflows/{workflow}/runs", json={"input": order, **kw})
    assert r.status_code == 201, r.text
    run_id: str = r.json()["run_id"]
    return run_id


async def test_health_needs_no_token(shop: Shop) -> None:
    r = await shop.client.get("/api/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}


async def test_a_compensated_order_shows_its_steps_attempts_and_compensation(shop: Shop) -> None:
    run_id = await start(shop, "place_order", {"id": "B-7", "card": "declined"},
                         idempotency_key="order-B-7")
    run = await finished(shop, run_id)
    assert run["status"] == "compensated" and run["compensated"] is True
    assert run["idempotency_key"] == "order-B-7" and run["correlation_id"] == run_id
    assert "card declined for order B-7" in run["error"] and run["result"] is None
    assert run["args"] == [{"id": "B-7", "card": "declined"}]
    for stamp in (run["created_at"], run["updated_at"]):
        assert stamp.endswith("Z") and dt.datetime.fromisoformat(stamp).tzinfo is not None
    steps = {s["key"]: s for s in run["steps"]}
    assert [s["name"] for s in run["steps"]] == ["reserve", "charge", "release"]
    charge = steps["charge#1"]
    assert charge["status"] == "failed" and not charge["compensation"]
    assert [a["attempt"] for a in charge["attempts"]] == [1, 2]
    assert all(a["error"].startswith("ValueError: card declined") for a in charge["attempts"])
    assert all(a["started_at"] and a["ended_at"] for a in charge["attempts"])
    release = steps["compensate:release#1"]
    assert release["compensation"] and release["status"] == "completed"
    assert release["kind"] == "compensation"


async def test_runs_filter_and_page_newest_first(shop: Shop) -> None:
    ids = [await start(shop, "place_order", {"id": f"A-{i}"}, idempotency_key=f"k-{i}")
           for i in range(5)]
    declined = await start(shop, "place_order", {"id": "D-1", "card": "declined"})
    for run_id in [*ids, declined]:
        await finished(shop, run_id)
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, "workflow": "place_order"}
        if cursor:
            params["cursor"] = cursor
        page = (await shop.get("/api/runs", params=params)).json()
        seen += [r["run_id"] for r in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [declined, *reversed(ids)]
    comp = (await shop.get("/api/runs", params={"status": "compensated"})).json()
    assert [r["run_id"] for r in comp["runs"]] == [declined]
    assert comp["next_cursor"] is None
    by_key = (await shop.get("/api/runs", params={"idempotency_key": "k-3"})).json()
    assert [r["run_id"] for r in by_key["runs"]] == [ids[3]]
    by_corr = (await shop.get("/api/runs", params={"correlation_id": ids[1]})).json()
    assert [r["run_id"] for r in by_corr["runs"]] == [ids[1]]
    first = (await shop.get(f"/api/runs/{ids[0]}")).json()["created_at"]
    last = (await shop.get(f"/api/runs/{declined}")).json()["created_at"]
    window = (await shop.get("/api/runs", params={"since": first, "until": last})).json()
    assert [r["run_id"] for r in window["runs"]] == list(reversed(ids))
    future = (await shop.get("/api/runs", params={"since": "2999-01-01T00:00:00Z"})).json()
    assert future == {"runs": [], "next_cursor": None}
    keys = set(window["runs"][0])
    assert keys == {"run_id", "workflow", "status", "created_at", "updated_at",
                    "idempotency_key", "correlation_id", "error", "result", "version"}
    assert window["runs"][0]["result"] == {"status": "shipped", "order": "A-4"}


async def test_runs_filter_by_the_code_version_they_are_pinned_to(shop: Shop) -> None:
    """`version=` lists the runs pinned to that version, as `cantata runs --version`
    does, alone and with the other filters; each run says its version."""
    mine = await start(shop, "place_order", {"id": "V-1"})
    await finished(shop, mine)
    # a run an older deployment ran (written as it stands: no worker of this code takes it)
    from cantata.model.status import RunStatus
    from cantata.testing.contract.support import new_run

    older = (await shop.app.store.create_run(new_run(
        "shop", "place_order", version="v-old 1", status=RunStatus.COMPLETED)))[0].run_id

    async def ids(**filters: Any) -> list[str]:
        r = await shop.get("/api/runs", params=filters)
        assert r.status_code == 200, r.text
        return [run["run_id"] for run in r.json()["runs"]]

    assert await ids(version="v-old 1") == [older]
    assert await ids(version=shop.app.version) == [mine]
    assert await ids(version=shop.app.version, status="completed") == [mine]
    assert await ids(version=shop.app.version, status="pending") == []
    assert await ids(version="v-old") == []  # exact, not a prefix
    assert await ids(version="v-old 1", limit=1, workflow="place_order") == [older]
    got = (await shop.get("/api/runs", params={"version": "v-old 1"})).json()["runs"]
    assert got[0]["version"] == "v-old 1"
    r = await shop.get("/api/runs", params={"version": "a\x00b"})
    assert (r.status_code, r.json()["error"]["field"]) == (400, "version")


async def test_cancel_a_waiting_run_then_409_once_it_ended(shop: Shop) -> None:
    run_id = await start(shop, "await_approval", {"id": "W-1"})

    async def waiting() -> bool:
        run = (await shop.get(f"/api/runs/{run_id}")).json()
        return any(s["kind"] == "wait" for s in run["steps"])

    await eventually(waiting)
    r = await shop.post(f"/api/runs/{run_id}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    run = await finished(shop, run_id)
    assert run["status"] == "cancelled"
    assert any(s["compensation"] and s["name"] == "release" for s in run["steps"])
    again = await shop.post(f"/api/runs/{run_id}/cancel")
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_final"
    missing = await shop.post("/api/runs/0123456789abcdef0123456789abcdef/cancel")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"


async def test_start_by_name_idempotency_and_unknown_workflow(shop: Shop) -> None:
    first = await shop.post("/api/workflows/place_order/runs",
                            json={"input": {"id": "I-1"}, "idempotency_key": "same"})
    again = await shop.post("/api/workflows/place_order/runs",
                            json={"input": {"id": "I-1"}, "idempotency_key": "same"})
    assert first.status_code == 201 and first.json()["created"] is True
    assert again.status_code == 200 and again.json()["created"] is False  # not started again
    assert again.json()["run_id"] == first.json()["run_id"]
    clash = await shop.post("/api/workflows/place_order/runs",
                            json={"input": {"id": "I-2"}, "idempotency_key": "same"})
    assert clash.status_code == 409 and clash.json()["error"]["code"] == "idempotency_conflict"
    unknown = await shop.post("/api/workflows/nope/runs", json={"input": 1})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "unknown_workflow"
    both = await shop.post("/api/workflows/place_order/runs", json={"input": 1, "args": [1]})
    assert both.status_code == 400 and both.json()["error"]["field"] == "args"
    by_args = await shop.post("/api/workflows/place_order/runs",
                              json={"args": [{"id": "I-3"}], "correlation_id": "tx-9"})
    assert by_args.status_code == 201
    run = await finished(shop, by_args.json()["run_id"])
    assert run["status"] == "completed" and run["correlation_id"] == "tx-9"


async def test_dead_letter_replayed_after_the_handler_is_fixed(shop: Shop) -> None:
    shop.state["emails_broken"] = True
    r = await shop.post("/api/events", json={"type": "order.placed", "data": {"order_id": "E-1"},
                                             "correlation_id": "order-E-1"})
    assert r.status_code == 201
    event_id = r.json()["id"]
    letters: list[dict[str, Any]] = []

    async def dead() -> bool:
        letters[:] = (await shop.get("/api/dead-letters", params={"group": "emails"})).json()
        return bool(letters)

    await eventually(dead)
    [letter] = letters
    assert letter["event"]["id"] == event_id and letter["group"] == "emails"
    assert letter["event"]["correlation_id"] == "order-E-1"
    assert letter["error"] == "RuntimeError: SMTP server refused the connection"
    assert (await shop.get("/api/dead-letters", params={"type": "other.type"})).json() == []
    shop.state["emails_broken"] = False
    replay = await shop.post(f"/api/dead-letters/{letter['id']}/replay")
    assert replay.status_code == 200 and replay.json()["id"] == letter["id"]

    async def handled() -> bool:
        trace = (await shop.get("/api/trace/order-E-1")).json()
        handlers = [n for n in trace["children"] if n["kind"] == "handler"]
        return bool(handlers) and handlers[0]["status"] == "completed"

    await eventually(handled)
    assert (await shop.get("/api/dead-letters")).json() == []
    again = await shop.post(f"/api/dead-letters/{letter['id']}/replay")
    assert again.status_code == 404


async def test_trace_where_and_stalled(shop: Shop) -> None:
    run_id = await start(shop, "place_order", {"id": "T-1", "card": "declined"})
    await finished(shop, run_id)
    trace = (await shop.get(f"/api/trace/{run_id}")).json()
    assert trace["kind"] == "run" and trace["name"] == "place_order"
    assert trace["status"] == "compensated" and trace["correlation_id"] == run_id
    assert trace["where"].startswith("compensated") and "\n" not in trace["where"]
    kinds = [(c["kind"], c["name"]) for c in trace["children"]]
    assert ("compensation", "release") in kinds
    waiting = await start(shop, "await_approval", {"id": "T-2"})

    async def stalled() -> bool:
        # older_than=0: the run is stalled from the start, first on its step (pending_step)
        # then on its wait; what is checked here is the wait
        found = (await shop.get("/api/stalled", params={"older_than": 0})).json()
        return any(s["correlation_id"] == waiting and s["reason"] == "waiting_event"
                   for s in found)

    await eventually(stalled)
    found = (await shop.get("/api/stalled", params={"older_than": 0})).json()
    stall = next(s for s in found if s["correlation_id"] == waiting)
    assert stall["reason"] == "waiting_event" and stall["node"]["kind"] == "wait"
    assert (await shop.get("/api/stalled")).json() == []  # default: 5 minutes
    assert "waiting" in (await shop.get(f"/api/trace/{waiting}")).json()["where"]
    missing = await shop.get("/api/trace/no-such-transaction")
    assert missing.status_code == 404


async def test_maps(shop: Shop) -> None:
    run_id = await start(shop, "place_order", {"id": "M-1", "card": "declined"})
    await finished(shop, run_id)
    plain = (await shop.get("/api/maps/workflows/place_order")).json()
    assert plain["mermaid"].startswith("flowchart TD")
    names = {n["name"]: n for n in plain["nodes"]}
    assert names["refund"]["kind"] == "compensation" and names["charge"]["kind"] == "step"
    ids = {n["id"] for n in plain["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in plain["edges"])
    coloured = (await shop.get("/api/maps/workflows/place_order",
                               params={"run_id": run_id})).json()
    state = {n["name"]: n["status"] for n in coloured["nodes"]}
    assert state["reserve"] == "completed" and state["charge"] == "failed"
    assert state["ship"] == "not_reached" and state["release"] == "completed"
    assert state["refund"] == "not_reached"
    events = (await shop.get("/api/maps/events")).json()
    assert events["mermaid"].startswith("flowchart LR")
    by_id = {n["id"]: n for n in events["nodes"]}
    flows = {(by_id[e["source"]]["name"], by_id[e["target"]]["name"]): e["state"]
             for e in events["edges"]}
    assert flows[("invoice.approved", "await_approval")] == "dead"
    assert flows[("order.placed", "emails: send_email")] == "dead"
    assert (await shop.get("/api/maps/workflows/nope")).status_code == 404


async def test_operator_actions_are_audited_with_the_token_name(shop: Shop) -> None:
    run_id = await start(shop, "await_approval", {"id": "AU-1"})
    await shop.post(f"/api/runs/{run_id}/cancel")
    await shop.post("/api/events", json={"type": "invoice.approved", "data": {}})
    records = await audit_records(shop, page=3)
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    actor = f"token:{shop.names['operator']}"
    mine = {(r["action"], r["target"]) for r in records if r["actor"] == actor}
    assert ("run.started", run_id) in mine and ("run.cancel_requested", run_id) in mine
    assert any(a == "event.published" for a, _ in mine)
    text = str(records)
    assert all(token not in text for token in shop.tokens.values())
    report = (await shop.get("/api/audit/verify", "admin")).json()
    assert report["ok"] is True and report["records"] >= len(records)


async def test_metrics_count_runs_by_status(shop: Shop) -> None:
    run_id = await start(shop, "place_order", {"id": "P-1"})
    await finished(shop, run_id)
    r = await shop.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    assert 'cantata_runs{app="shop",status="completed"} 1' in r.text
    assert 'cantata_dead_letters{app="shop"} 0' in r.text


class Later:
    """The system clock, ``ahead`` seconds later: a console reading the store then."""

    def __init__(self, ahead: float) -> None:
        self.ahead = ahead

    def now(self) -> float:
        import time

        return time.time() + self.ahead

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


async def test_the_overview_counts_stalls_dead_letters_and_the_last_hours_failures(
    shop: Shop, store_url: str
) -> None:
    """`attention` counts what an operator looks at first: transactions stalled for 5
    minutes (as `GET /api/stalled` finds them), dead letters, runs that failed in the
    last hour (whenever created); each is the length of the list the dashboard links to."""
    import httpx

    # a run created two hours ago that failed a moment ago, and one that failed two hours
    # ago (written as they are: a running run of two hours ago, its worker gone, is the
    # live worker's to take over before this test could fail it)
    from cantata.model.status import RunStatus
    from cantata.testing.contract.support import new_run

    now_, two_hours_ago = shop.app.clock.now(), shop.app.clock.now() - 7200
    late, early = [(await shop.app.store.create_run(new_run(
        "shop", "invoice", created_at=two_hours_ago, updated_at=at, status=RunStatus.FAILED,
        error="E: lost")))[0] for at in (now_, two_hours_ago)]
    shop.state["billing_down"] = True
    failed = await start(shop, "invoice", {"id": "F-1"})
    assert (await finished(shop, failed))["status"] == "failed"
    waiting = await start(shop, "await_approval", {"id": "F-2"})
    shop.state["emails_broken"] = True
    assert (await shop.post("/api/events", json={"type": "order.placed",
                                                 "data": {"order_id": "F-3"}})).status_code == 201
    await eventually(lambda: _dead(shop))
    now = (await shop.get("/api/overview")).json()
    hour_ago = dt.datetime.fromisoformat(now["attention"]["failed_since"])
    assert abs(hour_ago.timestamp() - (shop.app.clock.now() - 3600)) < 60
    assert now["attention"] == {"stalled": 0, "stalled_more": False, "dead_letters": 1,
                                "failed_last_hour": 2,
                                "failed_since": now["attention"]["failed_since"]}
    assert now["dead_letters"] == 1
    assert now["counts"]["failed"] == 3
    for filters in ({"failed_since": now["attention"]["failed_since"]},
                    {"failed_since": now["attention"]["failed_since"], "status": "failed"}):
        listed = (await shop.get("/api/runs", params=filters)).json()["runs"]
        assert [r["run_id"] for r in listed] == [failed, late.run_id], filters
    assert early.run_id not in {r["run_id"] for r in listed}
    # ten minutes later: the waiting run and the dead letter's transaction made no
    # progress for 5 minutes; the failure is still within the hour
    later = App("shop", store=store_url, clock=Later(600))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=later.asgi()),
                                 base_url="http://later") as client:
        h = shop.auth("viewer")
        seen = (await client.get("/api/overview", headers=h)).json()
        stalls = (await client.get("/api/stalled", headers=h,
                                   params={"older_than": 300})).json()
        await later.close()
    assert seen["attention"]["stalled"] == len(stalls) >= 2
    assert any(s["correlation_id"] == waiting for s in stalls)
    assert (seen["attention"]["dead_letters"], seen["attention"]["failed_last_hour"]) == (1, 2)
    # seventy minutes later: the failure is older than an hour
    later = App("shop", store=store_url, clock=Later(4200))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=later.asgi()),
                                 base_url="http://later") as client:
        seen = (await client.get("/api/overview", headers=shop.auth("viewer"))).json()
        await later.close()
    assert seen["attention"]["failed_last_hour"] == 0


async def _dead(shop: Shop) -> bool:
    return len((await shop.get("/api/dead-letters")).json()) == 1


async def test_the_console_works_from_the_store_alone(shop: Shop, store_url: str) -> None:
    """No code: a bare App(name, store) lists, shows, maps from history and starts by name
    (the run waits in the store for the shop's workers, which take it)."""
    import httpx

    done = await start(shop, "place_order", {"id": "S-1", "card": "declined"})
    await finished(shop, done)
    bare = App("shop", store=store_url)
    api = bare.asgi()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                 base_url="http://bare") as client:
        h = shop.auth("operator")
        listed = (await client.get("/api/runs", headers=h)).json()["runs"]
        assert done in [r["run_id"] for r in listed]
        m = (await client.get("/api/maps/workflows/place_order", headers=h,
                              params={"run_id": done})).json()
        assert {n["name"]: n["status"] for n in m["nodes"]}["release"] == "completed"
        r = await client.post("/api/workflows/place_order/runs", headers=h,
                              json={"input": {"id": "S-2"}})
        assert r.status_code == 201
        run = await finished(shop, r.json()["run_id"])  # executed by the shop's worker
        assert run["status"] == "completed"
        assert (await client.get("/api/workflows", headers=h)).json() == [
            "await_approval", "invoice", "place_order"]
    await bare.close()


async def test_a_keyed_audit_chain_verifies_with_the_apps_key(store_url: str) -> None:
    import httpx

    from tests.server.conftest import make_tokens
    from tests.server.shop import make_shop

    app = make_shop(store_url, audit_key="console-test-audit-key-0123456789")
    async with app:
        tokens, _ = await make_tokens(app)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.asgi()),
                                     base_url="http://c") as c:
            h = {"Authorization": f"Bearer {tokens['admin']}"}
            r = await c.post("/api/workflows/place_order/runs", headers=h,
                             json={"input": {"id": "K-1"}})
            assert r.status_code == 201
            report = (await c.get("/api/audit/verify", headers=h)).json()
    assert report["ok"] is True, report


async def test_an_unknown_workflow_lists_what_get_workflows_lists(
        shop: Shop, store_url: str) -> None:
    """With the code loaded and from the store alone (a bare App), the 404 names the
    workflows GET /api/workflows lists."""
    import httpx

    bare = App("shop", store=store_url)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare.asgi()),
                                 base_url="http://bare") as client:
        for c in (shop.client, client):
            h = shop.auth("operator")
            listed = (await c.get("/api/workflows", headers=h)).json()
            assert listed == ["await_approval", "invoice", "place_order"]
            r = await c.post("/api/workflows/nope/runs", headers=h, json={"input": 1})
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_workflow"
            assert f"(known: {', '.join(listed)})" in r.json()["error"]["message"]
            r = await c.get("/api/maps/workflows/nope", headers=h)
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_workflow"
            assert r.json()["error"]["message"] == (
                f"no workflow named 'nope' in app 'shop' (known: {', '.join(listed)}); "
                "GET /api/workflows lists them")
    await bare.close()


async def test_arguments_that_do_not_fit_a_loaded_workflow_are_refused(
        store_url: str) -> None:
    """A workflow whose code the console has: a missing or extra argument is a 422 naming
    the parameter (no run is written); the store alone cannot tell, so it starts the run."""
    import httpx

    from tests.server.conftest import make_tokens

    app = App("adder", store=store_url, broker="embedded", poll_interval=0.05)

    @app.workflow
    async def add(ctx: Any, a: int, b: int, c: int = 0) -> int:
        return a + b + c

    @app.workflow
    async def echo(ctx: Any, x: Any) -> Any:
        return x

    async with app:
        tokens, _ = await make_tokens(app)
        h = {"Authorization": f"Bearer {tokens['operator']}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.asgi()),
                                     base_url="http://c") as c:
            for path, body, field, says in [
                ("add", {}, "args", "is missing arguments 'a', 'b' (its parameters: a, b, c)"),
                ("add", {"input": 1}, "input", "is missing argument 'b'"),
                ("add", {"args": [1]}, "args", "is missing argument 'b'"),
                ("add", {"args": [1, 2, 3, 4]}, "args", "takes 3 argument(s), got 4"),
                ("echo", {}, "input", "is missing argument 'x'"),
                ("echo", {"args": []}, "args", "is missing argument 'x'"),
            ]:
                r = await c.post(f"/api/workflows/{path}/runs", headers=h, json=body)
                assert r.status_code == 422, (path, body, r.text)
                error = r.json()["error"]
                assert error["code"] == "invalid_arguments" and error["field"] == field, error
                assert f"workflow {path!r} {says}" in error["message"], error
            empty = await c.post("/api/workflows/echo/runs", headers=h)  # no body at all
            assert empty.status_code == 422 and empty.json()["error"]["field"] == "input"
            assert await app.find_runs() == []
            for path, body, result in [("add", {"args": [1, 2]}, 3),
                                       ("add", {"args": [1, 2, 3]}, 6),
                                       ("echo", {"input": None}, None)]:
                r = await c.post(f"/api/workflows/{path}/runs", headers=h, json=body)
                assert r.status_code == 201, r.text
                assert await app.get_handle(r.json()["run_id"]).result(timeout=10) == result
        bare = App("adder", store=store_url)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=bare.asgi()),
                                     base_url="http://bare") as c:
            r = await c.post("/api/workflows/add/runs", headers=h, json={})
            assert r.status_code == 201, r.text
        await bare.close()


async def test_arguments_that_do_not_fit_a_loaded_workflows_types_are_refused(
        store_url: str) -> None:
    """A workflow whose code the console has takes a pydantic model: an input that is
    not one is a 400 invalid_input naming the workflow, the argument and the field, in
    one line (no run is written), as the worker would have failed the run."""
    import httpx

    from tests.server.conftest import make_tokens

    app = App("typed", store=store_url, broker="embedded", poll_interval=0.05)

    @app.workflow
    async def wf(ctx: Any, order: Order) -> int:
        return order.id

    async with app:
        tokens, _ = await make_tokens(app)
        h = {"Authorization": f"Bearer {tokens['operator']}"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.asgi()),
                                     base_url="http://c") as c:
            for body, field in [({"input": {"id": "bad"}}, "input"),
                                ({"args": [{"id": "bad"}]}, "args")]:
                r = await c.post("/api/workflows/wf/runs", headers=h, json=body)
                assert r.status_code == 400, r.text
                error = r.json()["error"]
                assert error["code"] == "invalid_input" and error["field"] == field, error
                assert "\n" not in error["message"], error
                assert error["message"].startswith(
                    "workflow 'wf' argument 1 (order) does not match its declared type "
                    "Order: id: Input should be a valid integer"), error
            assert await app.find_runs() == []
            r = await c.post("/api/workflows/wf/runs", headers=h, json={"input": {"id": 4}})
            assert r.status_code == 201, r.text
            assert await app.get_handle(r.json()["run_id"]).result(timeout=10) == 4


async def test_dead_letters_of_a_group_the_app_never_had_is_a_404_naming_the_known_ones(
        shop: Shop) -> None:
    """As `cantata dlq list --group nope`: a group no code has and no service declared
    is a typo, a 404 naming the known groups, not an empty list; a known group without
    letters is an empty list."""
    r = await shop.get("/api/dead-letters", params={"group": "nope"})
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert error["code"] == "unknown_group" and error["field"] == "group", error
    groups = sorted(g["group"] for g in (await shop.get("/api/groups")).json() if g["kind"])
    assert "emails" in groups
    assert error["message"] == (f"no handler group 'nope' in app {shop.app.name!r} (known: "
                                f"{', '.join(groups)}); GET /api/groups lists them"), error
    r = await shop.get("/api/dead-letters", params={"group": "emails"})
    assert (r.status_code, r.json()) == (200, [])


async def test_publishing_a_type_nothing_listens_to_says_it_is_an_orphan(shop: Shop) -> None:
    typo = await shop.post("/api/events", json={"type": "order.plcaed", "data": {}})
    assert typo.status_code == 201 and typo.json()["orphan"] is True
    assert typo.json()["id"]  # stored all the same
    heard = await shop.post("/api/events", json={"type": "order.placed", "data": {}})
    assert heard.status_code == 201 and heard.json()["orphan"] is False


async def test_a_limit_out_of_range_is_refused_with_the_range(shop: Shop) -> None:
    """`limit` is 1-500: out of it, a 422 that names `limit`, says the range and the
    value sent (not a page of another size); a page of runs is `limit` runs, the next
    ones by `next_cursor`, newest first with none twice (docs/console.md)."""
    for bad in ("0", "501", "-3"):
        r = await shop.get("/api/runs", params={"limit": bad})
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert (error["code"], error["field"]) == ("out_of_range", "limit")
        assert f"limit must be from 1 to 500 (got '{bad}')" in error["message"]
        assert "next_cursor" in error["message"]
    audit = await shop.get("/api/audit", "admin", params={"limit": "0"})
    assert audit.status_code == 422 and "from 1 to 500" in audit.json()["error"]["message"]
    for i in range(5):
        await shop.app.start("place_order", {"id": f"L-{i}", "total": 1})
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        page = (await shop.get("/api/runs", params=params)).json()
        assert len(page["runs"]) <= 2
        seen += page["runs"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(page["runs"]) == 2
    ids = [r["run_id"] for r in seen]
    assert len(ids) == len(set(ids)) >= 5
    order = [(r["created_at"], r["run_id"]) for r in seen]
    assert order == sorted(order, reverse=True)


async def audit_records(shop: Shop, page: int = 500) -> list[dict[str, Any]]:
    """Every audit record of the app, in chain order, read ``page`` at a time."""
    records: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": page}
        if cursor:
            params["cursor"] = cursor
        got = (await shop.get("/api/audit", "admin", params=params)).json()
        records += got["records"]
        cursor = got["next_cursor"]
        if cursor is None:
            return records


async def audit_of(shop: Shop, actor: str) -> list[tuple[str, str]]:
    """``(action, target)`` of every audit record by ``actor``, in chain order."""
    return [(r["action"], r["target"]) for r in await audit_records(shop)
            if r["actor"] == actor]


async def test_a_repeated_start_or_publish_says_so_and_is_not_audited_as_done_again(
        shop: Shop) -> None:
    """The run and the event exist once: the repeats answer 200 saying so, and the audit
    log records each repeat as what it was, never as a second start or publish."""
    body = {"input": {"id": "R-1"}, "idempotency_key": "order-R-1"}
    starts = [await shop.post("/api/workflows/place_order/runs", json=body) for _ in range(3)]
    assert [r.status_code for r in starts] == [201, 200, 200]
    assert [r.json()["created"] for r in starts] == [True, False, False]
    run_id = starts[0].json()["run_id"]
    assert {r.json()["run_id"] for r in starts} == {run_id}
    event = {"type": "nobody.listens", "data": {"a": 1}, "id": "evt-R-1"}
    published = [await shop.post("/api/events", json=event) for _ in range(2)]
    assert [r.status_code for r in published] == [201, 200]
    assert [r.json() for r in published] == [
        {"id": "evt-R-1", "orphan": True, "duplicate": False},
        {"id": "evt-R-1", "orphan": True, "duplicate": True},
    ]
    heard = {"type": "invoice.approved", "data": {}, "id": "evt-R-2"}
    twice = [await shop.post("/api/events", json=heard) for _ in range(2)]
    assert [r.json()["orphan"] for r in twice] == [False, False]
    assert twice[1].json()["duplicate"] is True
    mine = await audit_of(shop, f"token:{shop.names['operator']}")
    assert mine == [
        ("run.created", run_id), ("run.started", run_id), ("run.start_repeated", run_id),
        ("run.start_repeated", run_id),
        ("event.published", "evt-R-1"), ("event.publish_repeated", "evt-R-1"),
        ("event.published", "evt-R-2"), ("event.publish_repeated", "evt-R-2"),
    ]


async def test_simultaneous_first_starts_with_one_key_create_and_audit_one_run(
        shop: Shop) -> None:
    """Starts with one key that arrive together: exactly one answers 201 created (and is
    audited as the start); the others answer the same run, 200, as repeats."""
    body = {"input": {"id": "S-1"}, "idempotency_key": "order-S-1"}
    starts = await asyncio.gather(
        *(shop.post("/api/workflows/place_order/runs", json=body) for _ in range(6)))
    assert sorted(r.status_code for r in starts) == [200] * 5 + [201]
    assert sorted(r.json()["created"] for r in starts) == [False] * 5 + [True]
    run_ids = {r.json()["run_id"] for r in starts}
    assert len(run_ids) == 1
    mine = await audit_of(shop, f"token:{shop.names['operator']}")
    assert sorted(mine) == [("run.created", *run_ids)] + [
        ("run.start_repeated", *run_ids)] * 5 + [("run.started", *run_ids)]


async def test_an_error_caused_by_one_body_field_names_it(shop: Shop) -> None:
    json_body = {"Content-Type": "application/json"}
    start = "/api/workflows/place_order/runs"
    cases: list[tuple[str, bytes, int, str, str]] = [
        (start, b'{"input": NaN}', 400, "serialization", "input"),
        (start, b'{"input": {"total": [1, Infinity]}}', 400, "serialization", "input"),
        (start, b'{"args": [{"id": 1}, -Infinity]}', 400, "serialization", "args"),
        (start, b'{"input": "' + b"x" * 1_100_000 + b'"}', 413, "payload_too_large", "input"),
        (start, b'{"input": {"id": "F-1"}, "idempotency_key": "F"}', 201, "", ""),
        (start, b'{"input": {"id": "F-2"}, "idempotency_key": "F"}', 409,
         "idempotency_conflict", "idempotency_key"),
        ("/api/events", b'{"type": "a.b", "data": {"x": NaN}}', 400, "serialization", "data"),
        ("/api/events", b'{"type": "a.b", "data": "' + b"x" * 1_100_000 + b'"}', 413,
         "payload_too_large", "data"),
        ("/api/events", b'{"type": "a.b", "data": 1, "id": "e1"}', 201, "", ""),
        ("/api/events", b'{"type": "a.b", "data": 2, "id": "e1"}', 400,
         "duplicate_event_id", "id"),
    ]
    for path, content, status, code, field in cases:
        r = await shop.client.post(path, content=content,
                                   headers={**shop.auth("operator"), **json_body})
        assert r.status_code == status, (content[:60], r.text[:300])
        if status < 300:
            continue
        error = r.json()["error"]
        assert (error["code"], error["field"]) == (code, field), (content[:60], error)
        if code == "serialization":  # said for a JSON client: null, not Python's None
            assert f"{field} holds a NaN or infinite number" in error["message"], error
            assert "null" in error["message"] and "None" not in error["message"], error
    nan = await shop.client.post("/api/events",
                                 content=b'{"type": "a.b", "data": {"x": [0, NaN]}}',
                                 headers={**shop.auth("operator"), **json_body})
    assert "data holds a NaN or infinite number at ['x'][1]:" in nan.json()["error"]["message"]
    for content, says in [(b'{"input": NaN}', "input holds a NaN or infinite number:"),
                          (b'{"input": {"total": [1, Infinity]}}', "at ['total'][1]:"),
                          (b'{"args": [1, {"t": -Infinity}]}', "args holds a NaN or infinite "
                                                              "number at [1]['t']:")]:
        r = await shop.client.post(start, content=content,
                                   headers={**shop.auth("operator"), **json_body})
        assert says in r.json()["error"]["message"], (content, r.json())


async def test_a_cancelled_runs_open_wait_is_shown_cancelled_everywhere(shop: Shop) -> None:
    """The wait a cancel cut short is `cancelled` in the run's steps and its trace, as on
    its map; the calls a failed fork offers are the steps the run lists."""
    run_id = await start(shop, "await_approval", {"id": "C-1"})

    async def waiting() -> bool:
        run = (await shop.get(f"/api/runs/{run_id}")).json()
        return any(s["kind"] == "wait" and s["status"] == "waiting" for s in run["steps"])

    await eventually(waiting)
    await shop.post(f"/api/runs/{run_id}/cancel")
    run = await finished(shop, run_id)
    assert run["status"] == "cancelled"
    states = {s["key"]: s["status"] for s in run["steps"]}
    assert states["wait:invoice.approved#1"] == "cancelled", states
    assert "waiting" not in states.values() and "running" not in states.values()
    trace = (await shop.get(f"/api/trace/{run_id}")).json()
    waits = [n for n in trace["children"] if n["kind"] == "wait"]
    assert [w["status"] for w in waits] == ["cancelled"], trace["children"]
    m = (await shop.get("/api/maps/workflows/await_approval",
                        params={"run_id": run_id})).json()
    assert {n["name"]: n["status"] for n in m["nodes"]}["invoice.approved"] == "cancelled"
    fork = await shop.post(f"/api/runs/{run_id}/fork", json={"from_step": "nope"})
    assert fork.status_code == 422
    offered = fork.json()["error"]["message"].rsplit("(", 1)[1].rstrip(")").split(", ")
    assert offered == [s["key"] for s in run["steps"] if not s["compensation"]]


async def test_a_long_attr_is_cut_short_in_the_message(shop: Shop) -> None:
    for attr in ("customer_id=" + "x" * 5000, "y" * 5000, "bad name" + "z" * 5000 + "=1"):
        r = await shop.get("/api/runs", params={"attr": attr})
        assert r.status_code == 422 and r.json()["error"]["field"] == "attr", r.text[:200]
        message = r.json()["error"]["message"]
        assert len(message) < 400 and "…" in message, message[:500]


async def test_an_idempotency_key_longer_than_the_api_takes_is_refused_naming_it(
    shop: Shop,
) -> None:
    """The API takes the keys ``app.start`` takes, of at most 500 characters: a longer
    key, up to a body of ten million characters, is a 4xx naming the field, and no run
    is stored."""
    start = "/api/workflows/place_order/runs"
    for key in ("k" * 501, "k" * 10_000_000):
        r = await shop.post(start, json={"input": {"id": "L-1"}, "idempotency_key": key})
        assert 400 <= r.status_code < 500, (r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["field"] == "idempotency_key", error
        assert len(r.content) < 2000  # the key is not echoed back whole
    assert await shop.app.list_runs() == []
    ok = await shop.post(start, json={"input": {"id": "L-1"}, "idempotency_key": "k" * 500})
    assert ok.status_code == 201, ok.text


async def test_a_start_takes_exactly_the_keys_app_start_takes(shop: Shop) -> None:
    """``idempotency_key`` and ``correlation_id`` of a start are checked by
    ``app.start``'s own rule: any text (spaces at the ends, ``/``, letters outside
    ASCII) of up to 500 characters is taken and kept exactly; what ``app.start``
    refuses (a NUL, a lone surrogate, 501 characters, an empty key) is a 400 naming
    the field, and no run is stored."""
    start = "/api/workflows/place_order/runs"
    for field in ("idempotency_key", "correlation_id"):
        for value in ("  Bestellung Ä-12 / Kunde  ", "x" * 500, "\u65e5\u672c 注文"):
            r = await shop.post(start, json={"input": {"id": "K-1"}, field: value})
            assert r.status_code == 201, (field, value[:20], r.text[:300])
            run = (await shop.get(f"/api/runs/{r.json()['run_id']}")).json()
            assert run[field] == value
            found = await shop.get("/api/runs", params={field: value})
            assert r.json()["run_id"] in [x["run_id"] for x in found.json()["runs"]]
    runs = len(await shop.app.list_runs(limit=500))
    for field, value in (("idempotency_key", "a\x00b"), ("correlation_id", "a\x00b"),
                         ("idempotency_key", "x" * 501), ("correlation_id", "x" * 501),
                         ("idempotency_key", ""), ("idempotency_key", "a\ud800b")):
        given: dict[str, Any] = {field: value}
        with contextlib.suppress(ConfigurationError):  # (what app.start does with it)
            await shop.app.start("place_order", {"id": "K-2"}, **given)
            raise AssertionError(f"app.start took {field}={value[:20]!r}")
        body = json.dumps({"input": {"id": "K-2"}, field: value})  # (a lone surrogate too)
        r = await shop.client.post(start, content=body, headers={
            **shop.auth("operator"), "Content-Type": "application/json"})
        assert r.status_code == 400, (field, value[:20], r.text[:300])
        assert r.json()["error"]["field"] == field, r.text[:300]
    assert len(await shop.app.list_runs(limit=500)) == runs


async def test_a_filter_the_api_does_not_take_is_refused_not_ignored(shop: Shop) -> None:
    """A misspelt filter (``key=`` for ``idempotency_key=``, ``stauts=``) is a 400
    naming it and the ones the route takes: ignored, it would answer every run (or every
    dead letter), and a script acting on the answer would act on all of them."""
    run_id = await start(shop, "place_order", {"id": "F-1"}, idempotency_key="f-1")
    await finished(shop, run_id)
    for path, params, field in (
        ("/api/runs", {"key": "f-1"}, "key"),
        ("/api/runs", {"status": "completed", "stauts": "failed"}, "stauts"),
        ("/api/dead-letters", {"grp": "emails"}, "grp"),
        ("/api/stalled", {"older": "5"}, "older"),
        ("/api/schedules", {"name": "x"}, "name"),
    ):
        r = await shop.get(path, params=params)
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        error = r.json()["error"]
        assert error["code"] == "invalid_input" and error["field"] == field, error
        assert f"unknown query parameter {field!r}" in error["message"], error
    message = (await shop.get("/api/runs", params={"key": "f-1"})).json()["error"]["message"]
    assert "idempotency_key" in message and "attr" in message, message
    ok = await shop.get("/api/runs", params={"idempotency_key": "f-1", "limit": 5})
    assert [r["run_id"] for r in ok.json()["runs"]] == [run_id]


async def test_a_body_sent_as_a_form_says_to_send_json(shop: Shop) -> None:
    """``curl -d '{"from_step": ...}'`` sends the JSON as a form (its default
    Content-Type): the 400 says what to send, not "Input should be a valid dictionary"."""
    run_id = await start(shop, "place_order", {"id": "B-1"})
    await finished(shop, run_id)
    for path, text in ((f"/api/runs/{run_id}/fork", '{"from_step": "reserve#1"}'),
                       ("/api/workflows/place_order/runs", '{"input": {"id": "B-2"}}'),
                       ("/api/events", '{"type": "x.y", "data": {}}')):
        r = await shop.client.post(path, content=text, headers={
            **shop.auth("operator"), "Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 400, (path, r.status_code, r.text)
        error = r.json()["error"]
        assert error["field"] == "body", error
        assert "Content-Type: application/json" in error["message"], error
        assert "application/x-www-form-urlencoded" in error["message"], error


async def test_runs_and_traces_are_found_by_any_key_the_library_takes(shop: Shop) -> None:
    """An idempotency key or correlation id with spaces, a slash or letters outside
    ASCII (``app.start`` takes any text) is found by the runs filters and its trace,
    as the runs table shows it; a NUL (no key holds one) or a key longer than any is
    a 400 naming the filter."""
    key, corr = "Bestellung Ä-12 #3 / Kunde", "Kunde 42 / März"
    handle = await shop.app.start("place_order", {"id": "K-1"}, idempotency_key=key,
                                  correlation_id=corr)
    for name, value in (("idempotency_key", key), ("correlation_id", corr)):
        r = await shop.get("/api/runs", params={name: value})
        assert r.status_code == 200, r.text
        assert [run["run_id"] for run in r.json()["runs"]] == [handle.run_id]
    r = await shop.get("/api/trace/" + quote(corr, safe=""))
    assert r.status_code == 200, r.text
    assert r.json()["correlation_id"] == corr
    # a line break too (the library takes it): its trace, not a route that is not there
    lines = "Kunde 43\nZeile 2"
    await shop.app.start("place_order", {"id": "K-2"}, correlation_id=lines)
    r = await shop.get("/api/trace/" + quote(lines, safe=""))
    assert r.status_code == 200, r.text
    assert r.json()["correlation_id"] == lines
    for bad in ("a\x00b", "k" * 2001):
        r = await shop.get("/api/runs", params={"idempotency_key": bad})
        assert r.status_code == 400, r.text[:300]
        assert r.json()["error"]["field"] == "idempotency_key"
        assert len(r.content) < 2000


async def test_pages_of_runs_created_at_one_time_have_no_duplicate_nor_gap(
    shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs created at the very same time (a burst within one clock tick) are paged by
    their ids: whatever the page size, every page boundary inside the tie gives each
    run once, and none is skipped; other runs before and after the tie too."""
    engine = shop.app.engine
    made: list[str] = []
    for _ in range(2):  # (before the tie, on the real clock)
        made.append(await start(shop, "invoice", {"id": "T-0"}))
    tie = engine.clock.now()
    monkeypatch.setattr(engine.clock, "now", lambda: tie)
    for i in range(9):
        made.append(await start(shop, "invoice", {"id": f"T-{i}"}))
    monkeypatch.undo()
    made.append(await start(shop, "invoice", {"id": "T-9"}))
    listed = (await shop.get("/api/runs", params={"workflow": "invoice"})).json()["runs"]
    times = [r["created_at"] for r in listed]
    assert max(times.count(t) for t in times) == 9  # (the tie is real)
    for size in (1, 2, 3, 4, 8, 9, 12):
        seen: list[str] = []
        cursor: str | None = None
        while True:
            p: dict[str, Any] = {"workflow": "invoice", "limit": size}
            if cursor:
                p["cursor"] = cursor
            page = (await shop.get("/api/runs", params=p)).json()
            seen += [r["run_id"] for r in page["runs"]]
            cursor = page["next_cursor"]
            if cursor is None or len(seen) > 2 * len(made):  # (a cursor that never ends)
                break
        assert len(seen) == len(set(seen)), size
        assert sorted(seen) == sorted(made), size


async def test_a_publish_takes_exactly_the_attributes_app_publish_takes(shop: Shop) -> None:
    """An event's ``correlation_id``, ``subject`` and ``id`` are checked by
    ``app.publish``'s own rule: a transaction whose correlation id holds spaces or
    letters outside ASCII (as ``app.start`` took it) is joined by a published event,
    shown in its trace; what ``app.publish`` refuses (empty, a NUL, 501 characters) is
    a 400 naming the field."""
    corr = "  Kunde 42 / März  "
    await start(shop, "place_order", {"id": "P-1"}, correlation_id=corr)
    r = await shop.post("/api/events", json={"type": "order.placed", "data": {"order_id": "P-1"},
                                             "correlation_id": corr, "subject": "Bestellung 7",
                                             "id": "Ereignis Ä-1"})
    assert r.status_code == 201, r.text[:300]
    assert r.json()["id"] == "Ereignis Ä-1"
    trace = (await shop.get("/api/trace/" + quote(corr, safe=""))).json()
    assert trace["correlation_id"] == corr
    assert "Ereignis Ä-1" in json.dumps(trace, ensure_ascii=False)
    for field, value in (("correlation_id", ""), ("correlation_id", "a\x00b"),
                         ("id", "x" * 501), ("subject", ""), ("id", "a\ud800b")):
        r = await shop.client.post("/api/events", content=json.dumps(
            {"type": "order.placed", field: value}), headers={
            **shop.auth("operator"), "Content-Type": "application/json"})
        assert r.status_code == 400, (field, value[:20], r.text[:300])
        assert r.json()["error"]["field"] == field, r.text[:300]
