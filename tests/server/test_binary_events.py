"""An event whose data is bytes (a CloudEvent's ``data_base64`` from another system) is
shown by the API and the dashboard as its base64 text: never a 500."""

from __future__ import annotations

import base64

from cantata import Event
from cantata.store.base import Settlement
from tests.server.conftest import Shop

RAW = b"\xff\xfe\x00binary"


async def test_a_binary_dead_letter_is_listed_traced_and_shown(shop: Shop) -> None:
    app = shop.app
    event = Event.from_cloudevent({
        "specversion": "1.0", "id": "scan-1", "source": "https://scanner.example",
        "correlationid": "scan-1",
        "type": "scan.done", "datacontenttype": "application/octet-stream",
        "data_base64": base64.b64encode(RAW).decode(),
    })
    await app.store.append_events(app.name, [event])
    await app.store.settle_delivery(app.name, "archive", event.id,
                                    Settlement("dead", 1, error="RuntimeError: down"))
    r = await shop.get("/api/dead-letters")
    assert r.status_code == 200, r.text
    [letter] = [d for d in r.json() if d["event"]["id"] == "scan-1"]
    assert base64.b64decode(letter["event"]["data"]) == RAW
    for path in ("/api/trace/scan-1", "/api/stalled?older_than=0", "/dead-letters",
                 "/trace/scan-1"):
        assert (await shop.get(path)).status_code == 200, path
