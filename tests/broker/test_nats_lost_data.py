"""Lost broker data: deliveries the store has pending are re-driven, nothing lost.

The store keeps every event and its pending deliveries; when NATS lost its streams
(deleted, or restarted with an empty store directory), the events some group still
has pending are published again from the store, automatically, and on request with
``cantata dlq redrive``.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, Event
from cantata.broker.nats_names import Names
from tests.broker.nats_support import Server, app_name, nats_broker, streams_removed
from tests.choreography.helpers import SETTLE, eventually

pytestmark = pytest.mark.nats


def shop(store: str, url: str, handled: list[str], name: str = "shop") -> App:
    app = App(name, store=store, broker=nats_broker(url), poll_interval=0.05)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    return app


async def publish_while_no_worker_runs(app: App, n: int) -> list[Event[Any]]:
    """Publish ``n`` events from a client, until the outbox relay sent them all."""
    async with app.client():
        events = [await app.publish("order.placed", {"n": i}) for i in range(n)]
        await eventually(
            lambda: _outbox_empty(app), what="the relay to publish every event"
        )
    return events


async def _outbox_empty(app: App) -> bool:
    return await app.store.unpublished_events(app.name, limit=1) == []


async def test_deliveries_pending_when_the_server_lost_its_data_are_redriven(
    own_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = own_server()
    store = f"sqlite:///{tmp_path}/shop.db"
    handled: list[str] = []
    events = await publish_while_no_worker_runs(shop(store, server.url, handled), 10)
    server.wipe()  # restarted with an empty store directory: the stream is gone
    async with shop(store, server.url, handled):
        await eventually(lambda: len(handled) >= 10, what="all 10 pending events handled")
        await asyncio.sleep(SETTLE)
    assert sorted(handled) == sorted(e.id for e in events)


async def test_a_running_worker_recovers_when_the_stream_is_lost_under_it(
    own_server: Callable[..., Server], tmp_path: Path
) -> None:
    server = own_server()
    store = f"sqlite:///{tmp_path}/shop.db"
    handled: list[str] = []
    release = asyncio.Event()
    app = App("shop", store=store, broker=nats_broker(server.url), poll_interval=0.05)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        if event.data["n"] >= 2:
            await release.wait()  # held: still pending when the data is lost
        handled.append(event.id)

    async with app:
        events = [await app.publish("order.placed", {"n": i}) for i in range(6)]
        await eventually(lambda: len(handled) == 2, what="the first 2 events handled")
        server.wipe()
        release.set()
        await eventually(lambda: len(set(handled)) == 6, timeout=20,
                         what="all 6 events handled after the stream was lost")
    assert set(handled) == {e.id for e in events}


async def test_a_deleted_stream_is_recreated_and_its_pending_events_redriven(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("lost")
    store = f"sqlite:///{tmp_path}/shop.db"
    handled: list[str] = []
    async with streams_removed(nats_url, name):
        events = await publish_while_no_worker_runs(shop(store, nats_url, handled, name), 5)
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().delete_stream(Names(name).stream)
        finally:
            await nc.close()
        async with shop(store, nats_url, handled, name):
            await eventually(lambda: len(handled) >= 5, what="all 5 pending events handled")
    assert sorted(handled) == sorted(e.id for e in events)


async def test_dlq_redrive_publishes_stuck_deliveries_again(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("stuck")
    store = f"sqlite:///{tmp_path}/shop.db"
    handled: list[str] = []
    async with streams_removed(nats_url, name):
        events = await publish_while_no_worker_runs(shop(store, nats_url, handled, name), 4)
        # Purged behind Cantata's back: the stream is there, its messages are not.
        nc = await nats.connect(nats_url)
        try:
            await nc.jetstream().purge_stream(Names(name).stream)
        finally:
            await nc.close()
        env = {**os.environ, "CANTATA_BROKER": nats_url}
        cmd = [sys.executable, "-m", "cantata", "dlq", "redrive", "--app", name,
               "--store", store, "--older-than", "0s"]
        out = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, env=env, timeout=60
        )
        assert out.returncode == 0, out.stderr
        assert "re-drove 4 event(s)" in out.stdout
        async with shop(store, nats_url, handled, name):
            await eventually(lambda: len(handled) >= 4, what="all 4 stuck events handled")
            await asyncio.sleep(SETTLE)
        # Nothing is pending any more: a second re-drive has nothing to do.
        again = await asyncio.to_thread(
            subprocess.run, cmd, capture_output=True, text=True, env=env, timeout=60
        )
        assert "nothing to re-drive" in again.stdout, again.stderr
    assert sorted(handled) == sorted(e.id for e in events)


async def test_a_deleted_consumer_is_made_again_while_the_worker_runs(
    nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # As `nats consumer rm` would: a pull on a consumer that no longer exists just
    # times out, so the group stopped silently until its worker restarted. (No hand-off:
    # on SQLite a worker would hand its own publishes to its handlers, not via NATS.)
    name = app_name("noconsumer")
    names = Names(name)
    handled: dict[str, list[str]] = {"billing": [], "inventory": []}
    app = App(name, store=f"sqlite:///{tmp_path}/shop.db",
              broker=nats_broker(nats_url, check_interval=0.5, hand_off=False),
              poll_interval=0.05)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled["billing"].append(event.id)

    @app.on("order.placed", group="inventory")
    async def reserve(event: Event[Any]) -> None:
        handled["inventory"].append(event.id)

    durable = names.consumer("inventory", "order.placed")
    async with streams_removed(nats_url, name), app:
        first = await app.publish("order.placed", {"n": 0})
        await eventually(lambda: first.id in handled["inventory"], what="the first event")
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.delete_consumer(names.stream, durable)
            caplog.clear()
            events = [await app.publish("order.placed", {"n": i}) for i in range(1, 6)]
            await eventually(lambda: len(set(handled["inventory"])) == 6, timeout=15,
                             what="inventory handles the events published after")
            assert (await js.consumer_info(names.stream, durable)).name == durable
        finally:
            await nc.close()
        await asyncio.sleep(SETTLE)
        assert await app.stalled(older_than=0) == []
    ids = [first.id] + [e.id for e in events]
    assert sorted(handled["inventory"]) == sorted(ids)
    assert sorted(handled["billing"]) == sorted(ids)
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len([line for line in lines if durable in line]) == 1, lines
