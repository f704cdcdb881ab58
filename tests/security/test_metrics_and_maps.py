"""Every published, emitted and relayed event is counted; wildcard edges are observed."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import generate_latest

from cantata import App, Event, HandlerContext
from cantata.observability.eventmap import choreography_mermaid
from cantata.observability.metrics import PrometheusHook
from tests.choreography.helpers import eventually, make_app


def sample(hook: PrometheusHook, name: str, **labels: str) -> float:
    value = hook.registry.get_sample_value(name, labels)
    return value or 0.0


def shop(store: str) -> tuple[App, PrometheusHook, list[str]]:
    app = make_app(store)
    hook = PrometheusHook()
    app.add_hook(hook)
    seen: list[str] = []

    @app.workflow
    async def place(ctx: Any, order: dict[str, Any]) -> None:
        await ctx.emit("order.placed", order)

    @app.on("order.placed", group="shipping")
    async def ship(event: Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("shipment.created", event.data)

    @app.on("shipment.*", group="notifications")
    async def tell(event: Event[Any]) -> None:
        seen.append(event.type)

    return app, hook, seen


async def test_every_event_is_counted_by_origin(store_url: str) -> None:
    app, hook, seen = shop(store_url)
    async with app:
        await (await app.start("place", {"id": 1})).result(timeout=20)
        await app.publish("order.placed", {"id": 2})
        await eventually(lambda: len(seen) == 2, what="both shipments told", timeout=20)
    total = "cantata_events_published_total"
    assert sample(hook, total, app="shop", type="order.placed", origin="workflow") == 1
    assert sample(hook, total, app="shop", type="order.placed", origin="publish") == 1
    assert sample(hook, total, app="shop", type="shipment.created", origin="handler") == 2
    relayed = sample(hook, "cantata_events_relayed_total", app="shop", type="shipment.created")
    if store_url.startswith("postgresql"):  # NATS: the relay hands each event over
        assert relayed == 2
    else:
        assert relayed == 0
    assert b"cantata_events_published_total" in generate_latest(hook.registry)


@pytest.mark.parametrize("published", [True, False])
async def test_a_wildcard_handler_is_seen_in_the_map(sqlite_url: str, published: bool) -> None:
    app, _, seen = shop(sqlite_url)
    async with app:
        if published:
            await app.publish("shipment.created", {"id": 3})
            await eventually(lambda: seen, what="told")
        text = await choreography_mermaid(app.router, app.name, app.store)
    ids = {line.split("(")[0].split("[")[0].strip(): line for line in text.splitlines()
           if '"shipment.*"' in line or '"notifications: tell"' in line}
    event_id = next(k for k, v in ids.items() if "shipment.*" in v)
    handler_id = next(k for k, v in ids.items() if "notifications" in v)
    [edge] = [line.strip() for line in text.splitlines()
              if line.strip().startswith(event_id + " ") and line.strip().endswith(handler_id)]
    if published:
        assert edge == f"{event_id} --> {handler_id}", text
    else:
        assert "never seen" in edge, text
