"""``GET /api/audit?order=newest``: the audit log from its latest record back, by
cursor, as the console's Audit page reads it (docs/console.md); a record forged past
the head comes first, marked."""

from __future__ import annotations

from typing import Any

from tests.server.conftest import Shop
from tests.server.test_api import audit_records, finished, start
from tests.server.test_audit_api import forge_past_head


async def newest(shop: Shop, limit: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cursor = None
    while True:
        q = f"/api/audit?order=newest&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        r = await shop.get(q, "admin")
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["records"]) <= limit
        out += page["records"]
        cursor = page["next_cursor"]
        if cursor is None:
            return out


async def test_the_newest_first_pages_are_the_log_read_backwards(
    shop: Shop, store_url: str
) -> None:
    for n in range(3):
        await finished(shop, await start(shop, "place_order", {"id": f"N-{n}"}))
    oldest_first = await audit_records(shop)
    assert len(oldest_first) > 10
    for limit in (1, 4, 500):
        assert await newest(shop, limit) == oldest_first[::-1]
    # the latest record is the first one an admin sees
    r = await shop.get("/api/audit?order=newest&limit=1", "admin")
    assert r.json()["records"][0]["seq"] == oldest_first[-1]["seq"]

    forged = await forge_past_head(shop, store_url)
    [first, second] = (await shop.get("/api/audit?order=newest&limit=2", "admin")).json()["records"]
    assert (first["seq"], first["past_head"]) == (forged, True)
    assert (second["seq"], second["past_head"]) == (forged - 1, False)


async def test_an_unknown_order_is_refused_and_viewers_may_not_read(shop: Shop) -> None:
    r = await shop.get("/api/audit?order=latest", "admin")
    assert r.status_code == 400, r.text
    assert r.json()["error"]["field"] == "order"
    assert (await shop.get("/api/audit?order=newest", "operator")).status_code == 403
