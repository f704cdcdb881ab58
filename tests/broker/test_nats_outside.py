"""Events from outside the store stay where they came from.

An outside event (published to the stream by another system) that a group
dead-letters is stored to list its dead letter, but the outbox relay never sends it
back to the stream; the stand-in stored for a payload that is not an event never
goes on the stream either.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, Event, Retry
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_consumer import INVALID_TYPE
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import SETTLE, eventually

pytestmark = pytest.mark.nats


async def test_dead_lettered_outside_events_and_stand_ins_never_go_back_on_the_stream(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("outside")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)
    audited: list[str] = []

    @app.on("order.placed", group="billing", retry=Retry(max_attempts=1))
    async def bill(event: Event[Any]) -> None:
        raise ValueError("unknown customer")

    @app.on("order.*", group="audit")
    async def audit(event: Event[Any]) -> None:
        audited.append(event.id)

    async with streams_removed(nats_url, name), app:
        names = broker.names(name)
        outside = [Event(type="order.placed", data={"n": i}, source="legacy")
                   for i in range(5)]
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for e in outside:
                await js.publish(names.event(e.type), e.to_json(), stream=names.stream)
            for garbage in (b"\xff not json", b'{"specversion": "1.0"}'):
                await js.publish(names.event("order.placed"), garbage, stream=names.stream)

            async def all_dead() -> bool:
                return len(await app.dead_letters()) == 9

            # the 5 events by billing; the 2 payloads by both groups
            await eventually(all_dead, what="5 outside events and 2 payloads dead-lettered")
            await eventually(lambda: len(audited) == 5, what="audit saw the 5 events")
            await asyncio.sleep(SETTLE + 0.5)  # the relay polls every 0.05 s meanwhile
            info = await js.stream_info(names.stream)
            assert info.state.messages == 7  # what was put there, nothing sent back
            assert await _count(js, names.stream, names.event(INVALID_TYPE)) == 0
        finally:
            await nc.close()
        assert sorted(audited) == sorted(e.id for e in outside)
        assert await app.store.unpublished_events(name, limit=10) == []
        letters = await app.dead_letters()
        assert sum(d.event.type == INVALID_TYPE for d in letters) == 4
    assert isinstance(broker, NatsBroker)


async def _count(js: Any, stream: str, subject: str) -> int:
    try:
        await js.get_last_msg(stream, subject)
    except Exception:
        return 0
    return 1
