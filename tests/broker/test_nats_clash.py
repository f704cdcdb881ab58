"""A message reusing a stored event's id with other content never replaces it.

docs/security.md: an id reused with other content is refused, a dead letter when it
arrives from the broker. The stored event is the truth: when the forged copy reaches
a group before the real one (the relay has not published yet, NATS lost the real
copy, or the forger's message id made the server drop the relay's), the group
handles the stored content and the forged message is dead-lettered as itself.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, Event
from cantata.broker.nats_consumer import INVALID_TYPE
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually
from tests.helpers import drop_schema

pytestmark = pytest.mark.nats


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db"
        return
    url = request.getfixturevalue("postgres_url")
    schema = f"cantata_fresh_{uuid.uuid4().hex[:10]}"
    yield f"{url}?schema={schema}"
    await drop_schema(url, schema)


async def test_a_forged_copy_first_is_dead_lettered_and_the_stored_event_handled(
    store: str, nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    name = app_name("clash")
    broker = nats_broker(nats_url)
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    seen: list[tuple[str, Any]] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: Event[Any]) -> None:
        seen.append(("inventory", event.data))

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        seen.append(("billing", event.data))

    names = broker.names(name)
    async with streams_removed(nats_url, name):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            async with app.client():  # stored, both deliveries pending
                real = await app.publish("order.placed", {"amount": 10})

                async def relayed() -> bool:
                    info = await js.stream_info(names.stream)
                    return info.state.messages == 1

                await eventually(relayed, what="the relay's copy")
            # the real copy is lost (or not relayed yet); another system reuses the id
            await js.purge_stream(names.stream)
            forged = dict(json.loads(real.to_json()), data={"amount": 999999})
            await js.publish(names.event(real.type), json.dumps(forged).encode(),
                             stream=names.stream)
            async with app:
                await eventually(lambda: len(seen) == 2, what="both groups handled it")

                async def two_letters() -> list[Any]:
                    letters = await app.dead_letters()
                    return letters if len(letters) == 2 else []

                letters = await eventually(two_letters, what="the forged copy dead-lettered")
                await asyncio.sleep(0.5)  # nothing more comes
                states = {d.group: d.status for d in await app.store.deliveries(name, real.id)}
        finally:
            await nc.close()
    assert sorted(seen) == [("billing", {"amount": 10}), ("inventory", {"amount": 10})]
    assert states == {"inventory": "done", "billing": "done"}
    assert sorted(d.group for d in letters) == ["billing", "inventory"]
    for letter in letters:
        assert letter.event.type == INVALID_TYPE
        assert letter.error.startswith(f"DuplicateEventId: event id {real.id}")
        assert "999999" in letter.event.data["payload"]
    assert f"refused a message reusing event id {real.id}" in caplog.text
