"""``GET /api/groups`` and ``POST /api/groups/{name}/retire``: the console lists the
handler groups with their backlog and who serves them, and an operator retires one no
live worker serves (``app.groups`` and ``app.retire_group``), audited with the token;
on SQLite and on PostgreSQL (docs/console.md, docs/operating.md "Retiring a group")."""

from __future__ import annotations

import time
from typing import Any

from cantata import App, Event
from cantata.model.records import RETIRED_MARK
from tests.helpers import eventually, make_app
from tests.server.conftest import Shop
from tests.server.test_api import audit_records
from tests.server.test_flow_api import parse


def ledger_worker(store_url: str) -> App:
    """A worker of another service of the shop: its ``ledger`` group reacts to
    ``order.placed`` (as the shop's ``emails`` does). Its lease is long: "live" is
    what the tests check, and a 1 s lease lapses on a loaded machine (a heartbeat held
    back past it: the group then reads as served by nobody); its stop, not its lease,
    ends its service."""
    app = make_app(store_url, "shop", broker="embedded", lease=30.0)

    @app.on("order.placed", group="ledger")
    async def book(event: Event[Any]) -> None:
        return None

    return app


async def listed(shop: Shop) -> dict[str, dict[str, Any]]:
    r = await shop.get("/api/groups", "viewer")
    assert r.status_code == 200, r.text
    return {g["group"]: g for g in r.json()}


async def retire(shop: Shop, name: str, role: str | None = "operator") -> Any:
    headers = shop.auth(role) if role else {}
    return await shop.client.post(f"/api/groups/{name}/retire", headers=headers)


async def group_records(shop: Shop) -> list[tuple[str, str, dict[str, Any]]]:
    return [(x["actor"], x["target"], x["data"]) for x in await audit_records(shop)
            if x["action"] == "group.retired"]


async def test_a_group_whose_worker_stopped_shows_its_backlog_and_is_retired_once(
    shop: Shop, store_url: str
) -> None:
    ledger = ledger_worker(store_url)
    async with ledger:
        worker = ledger.engine.worker_id

        async def ledger_served() -> dict[str, Any] | None:
            g = (await listed(shop)).get("ledger")
            return g if g and g["served"] else None

        g = await eventually(ledger_served, timeout=15, what="the ledger served")
        assert (g["kind"], g["patterns"], g["served_by"]) == ("handler", ["order.placed"],
                                                              [worker])
        # while its worker is live the group cannot be retired: 409 naming the worker
        r = await retire(shop, "ledger")
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "group_in_use"
        assert worker in error["message"] and "deploy code without it" in error["message"]
        assert "GET /api/groups" in error["message"]
    assert await group_records(shop) == []

    # the ledger's worker is gone; its declaration stays, so events wait for it
    before = time.time()
    events = [await shop.app.publish("order.placed", {"order_id": n}) for n in (1, 2)]

    async def backlog() -> dict[str, Any] | None:
        g = (await listed(shop))["ledger"]
        return g if g["pending"] == 2 and g["served"] is False else None

    g = await eventually(backlog, timeout=15, what="two deliveries waiting for the ledger")
    assert (g["kind"], g["patterns"], g["served_by"], g["in_progress"], g["dead_letters"]) \
        == ("handler", ["order.placed"], [], 0, 0)
    assert g["oldest_pending_at"].endswith("Z")  # RFC 3339 UTC, as every time of the API
    assert before - 1 <= parse(g["oldest_pending_at"]).timestamp() <= time.time() + 1
    assert 0 <= g["oldest_pending_age"] < 60
    emails = (await listed(shop))["emails"]  # the shop serves its own group
    assert emails["served"] is True and emails["served_by"] == [shop.app.engine.worker_id]

    # a viewer may not retire it; nor may a caller without a token
    assert (await retire(shop, "ledger", "viewer")).status_code == 403
    assert (await retire(shop, "ledger", None)).status_code == 401
    assert (await listed(shop))["ledger"]["pending"] == 2

    r = await retire(shop, "ledger")
    assert r.status_code == 200, r.text
    assert r.json() == {"group": "ledger", "retired": True,
                        "declarations_removed": [{"kind": "handler",
                                                  "pattern": "order.placed"}],
                        "ended": 2, "held": 0, "dead_letters": 0}
    assert "ledger" not in await listed(shop)
    token = f"token:{shop.names['operator']}"
    for e in events:
        [d] = [d for d in await shop.app.store.deliveries(shop.app.name, e.id)
               if d.group == "ledger"]
        assert str(d.status) == "done"
        assert d.error is not None and d.error.startswith(f"{RETIRED_MARK} by {token}")

    # a second retire changes nothing, and says so
    again = await retire(shop, "ledger")
    assert again.status_code == 200, again.text
    assert again.json() == {"group": "ledger", "retired": False, "declarations_removed": [],
                            "ended": 0, "held": 0, "dead_letters": 0}
    [(actor, target, data)] = await group_records(shop)
    assert (actor, target, data["ended"]) == (token, "ledger", 2)


async def test_a_group_name_is_sent_percent_encoded_and_one_with_a_nul_is_refused(
    shop: Shop,
) -> None:
    async def started() -> bool:  # (until then a retire cannot tell who serves what)
        return bool((await listed(shop))["emails"]["served"])

    await eventually(started, timeout=15, what="the shop's worker to say its groups")
    # any text is a group's name: one no group has is nothing to retire
    for sent, name in (("billing%2Feu%20west", "billing/eu west"),
                       ("start%3Areport%0A", "start:report\n")):
        r = await retire(shop, sent)
        assert r.status_code == 200, r.text
        assert (r.json()["group"], r.json()["retired"]) == (name, False)
    r = await retire(shop, "led%00ger")
    assert r.status_code == 400, r.text
    assert (r.json()["error"]["field"], r.json()["error"]["code"]) == ("name", "invalid_input")
    assert "NUL" in r.json()["error"]["message"]
    assert await group_records(shop) == []
