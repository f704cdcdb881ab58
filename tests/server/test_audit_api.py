"""``GET /api/audit``: the token behind a start, and a tampered log (docs/console.md,
docs/security.md)."""

from __future__ import annotations

import sqlite3

from cantata.store.postgres import PostgresStore
from tests.server.conftest import Shop
from tests.server.test_api import audit_records, finished, start
from tests.store.tamper import pg_tamper, record, sqlite_tamper


async def forge_past_head(shop: Shop, store_url: str) -> int:
    """Insert a record after the chain's last one, behind the store's back (as the store
    contract's ``tamper(how="forge")`` does); returns its ``seq``."""
    store, app = shop.app.store, shop.app.name
    head = await store.audit_head_seq(app)
    rec = await record(store, app, head)
    if isinstance(store, PostgresStore):
        await pg_tamper(store_url.split("?")[0], store._db.schema, app, rec, "forge")
    else:
        conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
        try:
            sqlite_tamper(conn, app, rec, "forge")
        finally:
            conn.close()
    return head + 1


async def test_a_record_forged_past_the_head_is_marked_not_served_as_chained(
    shop: Shop, store_url: str
) -> None:
    await finished(shop, await start(shop, "place_order", {"id": "F-1"}))
    forged = await forge_past_head(shop, store_url)
    records = await audit_records(shop, page=2)
    assert [r["seq"] for r in records] == list(range(1, forged + 1))
    *chained, last = records
    assert last["seq"] == forged and last["past_head"] is True
    assert (last["actor"], last["action"]) == ("token:admin", "run.retried")  # the forgery
    assert all(r["past_head"] is False for r in chained)
    report = (await shop.get("/api/audit/verify", "admin")).json()
    assert report["ok"] is False and report["first_bad_seq"] == forged


async def test_a_run_the_api_starts_is_created_by_the_token(shop: Shop) -> None:
    run_id = await start(shop, "place_order", {"id": "T-1"})
    await shop.post("/api/events", json={"type": "invoice.approved", "data": {}, "id": "e-T1"})
    token = f"token:{shop.names['operator']}"
    mine = [(r["action"], r["target"]) for r in await audit_records(shop)
            if r["actor"] == token]
    # run.created in the transaction that made the run, then the API's own run.started
    assert mine == [("run.created", run_id), ("run.started", run_id),
                    ("event.published", "e-T1")]
