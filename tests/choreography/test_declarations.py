"""The declarations a serving worker leaves of its handlers: the app's own rows
(declare/records.py: service, handler, emitted types), on every backend. No broker's
subscribe writes one (docs/architecture.md): a row it wrote bare would replace them."""

from __future__ import annotations

from typing import Any

import cantata
from cantata import Router
from cantata.declare.records import declaration_records
from tests.choreography.helpers import make_app


async def test_a_serving_worker_keeps_its_handlers_full_declarations(store_url: str) -> None:
    app = make_app(store_url)
    router = Router(service="billing")

    @router.on("order.placed", group="invoicing", emits=["invoice.sent"])
    async def invoice(event: cantata.Event[Any]) -> None:
        pass

    @app.on("order.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None:
        pass

    app.include(router)
    async with app:
        rows = await app.store.declarations(app.name)
    handlers = sorted((d for d in rows if d.kind == "handler"), key=lambda d: d.name)
    assert handlers == sorted((d for d in declaration_records(app.router)
                               if d.kind == "handler"), key=lambda d: d.name)
    assert [(d.name, d.service) for d in handlers] == [("audit", None),
                                                        ("invoicing", "billing")]
    assert all(d.detail for d in handlers)
