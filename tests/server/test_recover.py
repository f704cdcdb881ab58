"""Fixing flows from the console: retry a failed run, fork a run from a step, discard a
dead letter, find runs by search attribute (docs/console.md), on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

from tests.helpers import eventually
from tests.server.conftest import Shop
from tests.server.test_api import audit_records, finished, start

UNKNOWN = "0123456789abcdef0123456789abcdef"


async def audit(shop: Shop) -> list[dict[str, Any]]:
    """Every audit record of the app, in chain order."""
    return await audit_records(shop)


async def failed_invoice(shop: Shop, order: str, **extra: Any) -> str:
    """An invoice run that failed while billing was down (billing is up again after)."""
    shop.state["billing_down"] = True
    try:
        run_id = await start(shop, "invoice", {"id": order, **extra})
        run = await finished(shop, run_id)
    finally:
        shop.state["billing_down"] = False
    assert run["status"] == "failed", run
    return run_id


async def waiting_run(shop: Shop, order: str) -> str:
    run_id = await start(shop, "await_approval", {"id": order})

    async def waiting() -> bool:
        run = (await shop.get(f"/api/runs/{run_id}")).json()
        return any(s["kind"] == "wait" for s in run["steps"])

    await eventually(waiting)
    return run_id


async def test_retry_a_failed_run_once_the_fix_is_deployed(shop: Shop) -> None:
    run_id = await failed_invoice(shop, "R-1")
    before = (await shop.get(f"/api/runs/{run_id}")).json()
    assert "the billing service is down" in before["error"]
    denied = await shop.post(f"/api/runs/{run_id}/retry", "viewer")
    assert denied.status_code == 403 and denied.json()["error"]["code"] == "forbidden"
    r = await shop.post(f"/api/runs/{run_id}/retry")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["run_id"] == run_id and out["status"] in ("pending", "running", "completed")
    assert set(out) == set(before)  # the shape of GET /api/runs/{run_id}
    assert out["error"] is None
    run = await finished(shop, run_id)
    assert run["status"] == "completed" and run["result"] == {"status": "invoiced",
                                                              "order": "R-1"}
    reserve = [s for s in run["steps"] if s["name"] == "reserve"]
    assert len(reserve) == 1 and len(reserve[0]["attempts"]) == 1  # not run again
    again = await shop.post(f"/api/runs/{run_id}/retry")
    assert again.status_code == 409 and again.json()["error"]["code"] == "run_not_retryable"
    assert "ended completed" in again.json()["error"]["message"]
    actor = f"token:{shop.names['operator']}"
    retried = [r for r in await audit(shop) if r["action"] == "run.retried"]
    assert [(r["actor"], r["target"]) for r in retried] == [(actor, run_id)]
    assert retried[0]["data"]["from_status"] == "failed"


async def test_retry_refuses_live_unknown_and_compensated_runs(shop: Shop) -> None:
    live = await waiting_run(shop, "R-2")
    r = await shop.post(f"/api/runs/{live}/retry")
    assert r.status_code == 409 and r.json()["error"]["code"] == "run_in_progress"
    assert "still" in r.json()["error"]["message"]
    missing = await shop.post(f"/api/runs/{UNKNOWN}/retry")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
    declined = await start(shop, "place_order", {"id": "R-3", "card": "declined"})
    assert (await finished(shop, declined))["status"] == "compensated"
    plain = await shop.post(f"/api/runs/{declined}/retry", json={})
    assert plain.status_code == 409
    error = plain.json()["error"]
    assert error["code"] == "run_not_retryable" and error["field"] == "include_compensated"
    assert '{"include_compensated": true}' in error["message"]
    bad = await shop.post(f"/api/runs/{declined}/retry", json={"include_compensated": "yes"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "include_compensated"
    ok = await shop.post(f"/api/runs/{declined}/retry", json={"include_compensated": True})
    assert ok.status_code == 200, ok.text
    assert ok.json()["status"] in ("pending", "running", "compensating", "compensated")
    retried = [r for r in await audit(shop) if r["action"] == "run.retried"]
    assert [r["data"]["from_status"] for r in retried] == ["compensated"]
    assert retried[0]["actor"] == f"token:{shop.names['operator']}"


async def test_fork_a_run_from_a_step(shop: Shop) -> None:
    source = await failed_invoice(shop, "F-1", customer="acme")
    denied = await shop.post(f"/api/runs/{source}/fork", "viewer", json={"from_step": "bill#1"})
    assert denied.status_code == 403
    r = await shop.post(f"/api/runs/{source}/fork", json={"from_step": "bill#1"})
    assert r.status_code == 201, r.text
    new_id = r.json()["run_id"]
    assert set(r.json()) == {"run_id"} and new_id != source
    run = await finished(shop, new_id)
    assert run["status"] == "completed" and run["workflow"] == "invoice"
    assert run["causation_id"] == source
    src = (await shop.get(f"/api/runs/{source}")).json()
    assert src["status"] == "failed"  # the source run is left as it was
    reused = {s["key"]: s["started_at"] for s in src["steps"]}
    forked = {s["key"]: s["started_at"] for s in run["steps"]}
    assert forked["reserve#1"] == reused["reserve#1"]  # recorded, not run again
    assert run["attributes"] == {"customer": "acme", "order": "F-1"}
    actor = f"token:{shop.names['operator']}"
    forks = [r for r in await audit(shop) if r["action"] == "run.forked"]
    assert [(r["actor"], r["target"], r["data"]) for r in forks] == [
        (actor, new_id, {"from_run": source, "from_step": "bill#1"})]


async def test_fork_refusals_name_what_was_wrong(shop: Shop) -> None:
    source = await failed_invoice(shop, "F-2")
    r = await shop.post(f"/api/runs/{source}/fork", json={"from_step": "ship#1"})
    assert r.status_code == 422
    error = r.json()["error"]
    assert error["code"] == "step_not_in_history" and error["field"] == "from_step"
    assert "reserve#1" in error["message"] and "bill#1" in error["message"]
    assert "set_attributes#1" not in error["message"]  # not a step: not offered
    # a recorded call that is not a step (the run's attributes) is no place to fork from
    r = await shop.post(f"/api/runs/{source}/fork", json={"from_step": "set_attributes#1"})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "step_not_in_history" and error["field"] == "from_step"
    assert "not a step" in error["message"] and "reserve#1" in error["message"]
    for body in ({}, {"from_step": ""}, {"from_step": 3}):
        bad = await shop.post(f"/api/runs/{source}/fork", json=body)
        assert bad.status_code in (400, 422), (body, bad.text)
        assert bad.json()["error"]["field"] == "from_step", (body, bad.text)
    missing = await shop.post(f"/api/runs/{UNKNOWN}/fork", json={"from_step": "bill#1"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "run_not_found"
    live = await waiting_run(shop, "F-3")
    busy = await shop.post(f"/api/runs/{live}/fork", json={"from_step": "reserve#1"})
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "run_in_progress"


async def test_discard_a_dead_letter(shop: Shop) -> None:
    shop.state["emails_broken"] = True
    await shop.post("/api/events", json={"type": "order.placed", "data": {"order_id": "D-1"}})
    letters: list[dict[str, Any]] = []

    async def dead() -> bool:
        letters[:] = (await shop.get("/api/dead-letters")).json()
        return bool(letters)

    await eventually(dead)
    [letter] = letters
    path = f"/api/dead-letters/{letter['id']}/discard"
    denied = await shop.post(path, "viewer")
    assert denied.status_code == 403
    r = await shop.post(path)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == letter["id"] and r.json()["event"] == letter["event"]
    assert (await shop.get("/api/dead-letters")).json() == []
    again = await shop.post(path)  # gone for good, as app.discard says: DeadLetterNotFound
    assert again.status_code == 404 and again.json()["error"]["code"] == "dead_letter_not_found"
    assert "replayed or discarded already?" in again.json()["error"]["message"]
    unknown = await shop.post(f"/api/dead-letters/{UNKNOWN}/discard")
    assert unknown.status_code == 404
    actor = f"token:{shop.names['operator']}"
    gone = [r for r in await audit(shop) if r["action"] == "dead_letter.discarded"]
    assert [(r["actor"], r["data"]["dead_letter_id"]) for r in gone] == [(actor, letter["id"])]


async def test_runs_found_by_search_attributes(shop: Shop) -> None:
    ids = {}
    for order, customer in [("A-1", "acme"), ("A-2", "acme"), ("A-3", "globex")]:
        ids[order] = await start(shop, "invoice", {"id": order, "customer": customer})
        await finished(shop, ids[order])
    plain = await start(shop, "place_order", {"id": "A-4"})
    await finished(shop, plain)

    async def found(*attrs: str, **more: Any) -> list[str]:
        r = await shop.get("/api/runs", params={"attr": list(attrs), **more})
        assert r.status_code == 200, r.text
        return [run["run_id"] for run in r.json()["runs"]]

    assert await found("customer=acme") == [ids["A-2"], ids["A-1"]]
    assert await found("customer=acme", "order=A-1") == [ids["A-1"]]  # all of them
    assert await found("customer=acme", "order=A-3") == []
    assert await found("customer=globex", status="completed") == [ids["A-3"]]
    assert await found("customer=acme", workflow="place_order") == []
    first = (await shop.get("/api/runs", params={"attr": "customer=acme", "limit": 1})).json()
    assert [r["run_id"] for r in first["runs"]] == [ids["A-2"]] and first["next_cursor"]
    assert await found("customer=acme", limit=1, cursor=first["next_cursor"]) == [ids["A-1"]]
    detail = (await shop.get(f"/api/runs/{ids['A-3']}")).json()
    assert detail["attributes"] == {"customer": "globex", "order": "A-3"}
    assert (await shop.get(f"/api/runs/{plain}")).json()["attributes"] == {}
    for bad in ("customer", "=acme", "9lives=1", "customer=a\x00b"):
        r = await shop.get("/api/runs", params={"attr": bad})
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"]["field"] == "attr", (bad, r.text)
    typo = await shop.get("/api/runs", params={"attr": "custmer=acme"})
    assert typo.status_code == 422 and typo.json()["error"]["code"] == "unknown_attribute"
    assert "known: customer, order" in typo.json()["error"]["message"]


async def test_the_session_cookie_needs_the_csrf_header_for_the_new_actions(
        shop: Shop) -> None:
    run_id = await failed_invoice(shop, "C-1")
    c = shop.client
    assert (await c.post("/api/session", json={"token": shop.tokens["operator"]})).is_success
    for path, body in [(f"/api/runs/{run_id}/retry", None),
                       (f"/api/runs/{run_id}/fork", {"from_step": "bill#1"}),
                       (f"/api/dead-letters/{UNKNOWN}/discard", None)]:
        r = await c.post(path, json=body)
        assert r.status_code == 403 and "x-cantata-csrf" in r.json()["error"]["message"]
    r = await c.post(f"/api/runs/{run_id}/retry", headers={"X-Cantata-CSRF": "1"})
    assert r.status_code == 200, r.text
    c.cookies.clear()


async def test_retry_refuses_a_history_the_consoles_code_does_not_replay(shop: Shop) -> None:
    """A console served with the app's code checks that this code replays what a retry
    keeps of the run's history (here a call of other code recorded first): 409
    ``history_not_replayable`` naming the call, unless ``force``."""
    from cantata.model.records import EntryKind, EntryStatus, HistoryEntry, RunWrite

    run_id = await failed_invoice(shop, "R-9")
    app = shop.app
    history = await app.store.load_history(app.name, run_id)
    run = await app.store.get_run(app.name, run_id)
    assert run is not None
    # other code called audit#1 first: this code does not
    await app.store.commit_run(app.name, run_id, run.fence, RunWrite(entries=[
        HistoryEntry("audit#1", EntryKind.STEP, "audit", EntryStatus.COMPLETED,
                     seq=min(e.seq for e in history) - 1, result="null"),
    ]))
    r = await shop.post(f"/api/runs/{run_id}/retry")
    assert r.status_code == 409, r.text
    error = r.json()["error"]
    assert error["code"] == "history_not_replayable"
    assert "call 1: history recorded 'audit#1' but the code now calls 'set_attributes#1'" \
        in error["message"]
    assert '"force": true' not in error["message"] and "force=True" in error["message"]
    assert (await shop.get(f"/api/runs/{run_id}")).json()["status"] == "failed"
    forced = await shop.post(f"/api/runs/{run_id}/retry", json={"force": True})
    assert forced.status_code == 200, forced.text
