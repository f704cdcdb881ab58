"""A handler longer than ``ack_wait`` is not delivered again while it runs; the
default ``ack_wait`` is the app's lease."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Event
from cantata.broker.nats import NatsBroker
from tests.broker.nats_support import app_name, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats


async def test_a_long_handler_is_not_delivered_twice(nats_url: str, tmp_path: Path) -> None:
    name = app_name("keep")
    store = f"sqlite:///{tmp_path}/a.db"
    runs: list[str] = []
    done: list[str] = []

    def worker() -> App:
        app = App(name, store=store, broker=NatsBroker(nats_url, ack_wait=1.0,
                                                       fetch_timeout=0.25),
                  poll_interval=0.05)

        @app.on("file.uploaded", group="scanner")
        async def scan(event: Event[Any]) -> None:
            runs.append(event.id)
            await asyncio.sleep(3.5)  # over three times ack_wait
            done.append(event.id)

        return app

    first, second = worker(), worker()
    async with streams_removed(nats_url, name), first, second:
        await first.publish("file.uploaded", {"name": "big.iso"})
        await eventually(lambda: done, what="the scan done", timeout=20)
        await asyncio.sleep(1.5)
    assert len(runs) == 1 and len(done) == 1


def test_ack_wait_follows_the_lease_unless_given() -> None:
    default = NatsBroker("nats://127.0.0.1:4222")
    default.adopt_timing(lease=4.0, poll_interval=0.2)
    assert default.ack_wait == 4.0
    given = NatsBroker("nats://127.0.0.1:4222", ack_wait=30.0)
    given.adopt_timing(lease=4.0, poll_interval=0.2)
    assert given.ack_wait == 30.0
