"""The console redelivers through the broker the app's workers record, or refuses
(``503 broker_mismatch``) where a replay would reach none of them; the record itself."""

from __future__ import annotations

from typing import Any

from cantata.broker import binding
from cantata.model import codec
from cantata.model.records import Declaration
from tests.helpers import eventually
from tests.server.conftest import Shop

NATS = "nats://nats.example:4222?prefix=prod"


async def dead_letter(shop: Shop) -> dict[str, Any]:
    shop.state["emails_broken"] = True
    r = await shop.post("/api/events", json={"type": "order.placed", "data": {"order_id": 1}})
    assert r.status_code == 201
    letters: list[dict[str, Any]] = []

    async def dead() -> bool:
        letters[:] = (await shop.get("/api/dead-letters")).json()
        return bool(letters)

    await eventually(dead)
    shop.state["emails_broken"] = False
    return letters[0]


async def test_a_serving_worker_records_its_broker(shop: Shop) -> None:
    recorded = await binding.recorded(shop.app.store, shop.app.name)
    assert recorded == binding.Binding("embedded", "embedded", False)


async def test_the_console_refuses_to_replay_through_another_broker(shop: Shop) -> None:
    letter = await dead_letter(shop)
    # as if the app's workers took its events through NATS
    await shop.app.store.declare(shop.app.name, [Declaration(
        binding.KIND, binding.NAME, detail=codec.dumps(
            {"key": "nats?prefix=prod", "shown": NATS, "relays_outbox": True}))])
    r = await shop.post(f"/api/dead-letters/{letter['id']}/replay")
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "broker_mismatch"
    assert error["message"].startswith(f"the workers of app 'shop' take its events through "
                                       f"broker {NATS}, not embedded: pass --broker {NATS}")
    assert [d["id"] for d in (await shop.get("/api/dead-letters")).json()] == [letter["id"]]
    # a publish waits in the outbox, which those workers' relay sends on
    r = await shop.post("/api/events", json={"type": "order.placed", "data": {}})
    assert r.status_code == 201, r.text
