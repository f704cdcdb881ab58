"""Events from outside on NATS carry a correlation id (DESIGN.md §5).

A service not written with Cantata puts a structured CloudEvent on the app's subject:
an event that carries no correlation id gets its own id as one, so ``app.trace`` of
its id finds it, ``app.stalled`` reports its dead letters, and a ``start_on`` run
started by it has it as the root of its trace.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client

from cantata import App, Event, Retry, WorkflowContext
from cantata.broker.nats import NatsBroker
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually
from tests.helpers import drop_schema

pytestmark = pytest.mark.nats

Publish = Callable[..., Awaitable[None]]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db"
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"cantata_fresh_{uuid.uuid4().hex[:10]}"
    yield f"{url}?schema={schema}"
    await drop_schema(url, schema)


@pytest.fixture
async def outside(nats_url: str) -> AsyncIterator[Client]:
    """A NATS client of another system (not Cantata)."""
    nc = await nats.connect(nats_url)
    yield nc
    await nc.close()


def cloudevent(type_: str, data: Any, id_: str, **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": id_, "source": "billing-legacy", "type": type_,
            "datacontenttype": "application/json", "data": data, **extra}


async def put(nc: Client, broker: NatsBroker, app: str, ce: dict[str, Any],
              **headers: str) -> None:
    """Publish a structured CloudEvent where ``app``'s events of its type travel."""
    import json

    names = broker.names(app)
    await nc.jetstream().publish(
        names.event(ce["type"]), json.dumps(ce).encode(), stream=names.stream,
        headers={"Content-Type": "application/cloudevents+json", **headers},
    )


async def test_outside_events_have_their_id_as_correlation_id(
    store: str, nats_url: str, outside: Client
) -> None:
    name = app_name("corr")
    broker = nats_broker(nats_url)
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    started: list[str] = []

    @app.on("invoice.approved", group="ledger", retry=Retry(max_attempts=1))
    async def ledger(event: Event[Any]) -> None:
        raise RuntimeError("ledger down")

    @app.workflow
    async def ship(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        started.append(ctx.run_id)
        return "shipped"

    app.start_on("order.placed", ship)

    async with streams_removed(nats_url, name), app:
        await put(outside, broker, name,
                  cloudevent("invoice.approved", {"order_id": "x9"}, "ext-appr-9"))
        await put(outside, broker, name, cloudevent("order.placed", {"id": 1}, "ext-order-1"))
        # an outside event's own correlation id is kept
        await put(outside, broker, name,
                  cloudevent("order.placed", {"id": 2}, "ext-order-2", correlationid="tx-7"))

        async def dead() -> list[Any]:
            return await app.dead_letters()

        [letter] = await eventually(dead, timeout=15, what="the ledger's dead letter")
        assert letter.event.correlation_id == "ext-appr-9"
        stalls = await app.stalled(older_than=0)
        assert ("ext-appr-9", "dead_letter", "ledger") in [
            (s.correlation_id, s.reason, s.node.group) for s in stalls
        ]
        trace = await app.trace("ext-appr-9")
        assert (trace.kind, trace.name) == ("event", "invoice.approved")
        assert [(c.kind, c.group) for c in trace.children] == [("handler", "ledger")]

        await eventually(lambda: len(started) == 2, timeout=15, what="two runs started")
        root = await app.trace("ext-order-1")
        assert (root.kind, root.name) == ("event", "order.placed")
        assert [c.kind for c in root.children] == ["run"]
        joined = await app.trace("tx-7")
        assert (joined.kind, joined.name) == ("event", "order.placed")
        assert (await app.store.get_event(name, "ext-order-2")).correlation_id == "tx-7"
