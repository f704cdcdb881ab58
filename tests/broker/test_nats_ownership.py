"""A NATS stream belongs to one app in one store.

Two stores (two environments) with one app name on one server must never take each
other's events: the second refuses to start, naming both, unless each broker URL
has its own ``?prefix=``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest

from cantata import App, BrokerError, ConfigurationError, Event
from cantata.broker.factory import broker_from_url
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_names import REPLAY, Names
from cantata.model.event import RESERVED_FIRST_TOKENS
from cantata.store.factory import store_from_url
from tests.broker.nats_support import app_name, streams_removed
from tests.choreography.helpers import SETTLE, eventually
from tests.helpers import drop_schema, with_schema

pytestmark = pytest.mark.nats


def shop(name: str, store: str, broker: str, handled: list[str]) -> App:
    app = App(name, store=store, broker=broker, poll_interval=0.05)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    return app


async def test_a_second_store_with_the_same_app_name_refuses_to_start(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("owned")
    handled_a: list[str] = []
    a = shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, handled_a)
    b = shop(name, f"sqlite:///{tmp_path}/staging.db", nats_url, [])
    async with streams_removed(nats_url, name), a:
        with pytest.raises(BrokerError) as info:
            async with b:
                pass
        message = str(info.value)
        assert f"{tmp_path}/prod.db" in message and f"{tmp_path}/staging.db" in message
        assert "?prefix=" in message
        # ... and A is untouched: its events are still all its own.
        events = [await a.publish("order.placed", {"n": i}) for i in range(6)]
        await eventually(lambda: len(handled_a) == 6, what="A handles its 6 events")
        # A client (query commands) of B refuses too: it would relay into A's stream.
        with pytest.raises(BrokerError, match="two stores must not share a stream"):
            async with b.client():
                pass
    assert sorted(handled_a) == sorted(e.id for e in events)


async def test_prefixes_give_two_stores_their_own_streams(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("owned")
    handled_a: list[str] = []
    handled_b: list[str] = []
    a = shop(name, f"sqlite:///{tmp_path}/prod.db", f"{nats_url}?prefix=prod", handled_a)
    b = shop(name, f"sqlite:///{tmp_path}/staging.db", f"{nats_url}?prefix=staging",
             handled_b)
    async with streams_removed(nats_url, name), a, b:
        from_a = [await a.publish("order.placed", {"n": i}) for i in range(6)]
        await eventually(lambda: len(handled_a) == 6, what="A handles its 6 events")
        from_b = [await b.publish("order.placed", {"n": i}) for i in range(2)]
        await eventually(lambda: len(handled_b) == 2, what="B handles its 2 events")
        await asyncio.sleep(SETTLE)
        assert sorted(handled_a) == sorted(e.id for e in from_a)
        assert sorted(handled_b) == sorted(e.id for e in from_b)
        assert await a.stalled(older_than=0) == []
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            streams = {s.config.name: s for s in await js.streams_info()}
        finally:
            await nc.close()
    prod, staging = Names(name, "prod"), Names(name, "staging")
    assert streams[prod.stream].state.messages == 6
    assert streams[staging.stream].state.messages == 2
    assert streams[prod.stream].config.subjects == [f"prod.cantata.{name}.>"]
    assert prod.consumer("billing", "order.placed") != staging.consumer(
        "billing", "order.placed"
    )


def test_prefix_changes_stream_subject_and_consumer_names() -> None:
    plain, staged = Names("shop"), Names("shop", "staging")
    assert (plain.stream, staged.stream) == ("CANTATA_shop", "CANTATA-staging_shop")
    assert staged.event("order.placed") == "staging.cantata.shop.order.placed"
    assert staged.replay("billing") == "staging.cantata.shop._replay.billing"
    # no event type may start with the replays' token: no event travels there
    assert REPLAY in RESERVED_FIRST_TOKENS
    assert staged.consumer("billing", "order.*").startswith("staging_billing-")
    broker = broker_from_url("nats://127.0.0.1:4222?prefix=staging&replicas=1")
    assert isinstance(broker, NatsBroker)
    assert broker.prefix == "staging" and broker.url == "nats://127.0.0.1:4222"


@pytest.mark.parametrize("url", [
    "nats://127.0.0.1:4222?prefix=",
    "nats://127.0.0.1:4222?prefix=a.b",
    "nats://127.0.0.1:4222?prefix=a_b",
    "nats://127.0.0.1:4222?prefix=cantata",
    "nats://127.0.0.1:4222?prefixes=x",
])
def test_bad_prefixes_are_configuration_errors(url: str) -> None:
    with pytest.raises(ConfigurationError, match="prefix"):
        broker_from_url(url)


async def test_a_stream_made_before_owners_were_recorded_is_adopted(
    nats_url: str, tmp_path: Path
) -> None:
    from nats.js.api import StreamConfig

    name = app_name("legacy")
    names = Names(name)
    handled: list[str] = []
    async with streams_removed(nats_url, name):
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.add_stream(StreamConfig(name=names.stream, subjects=[f"{names.subjects}.>"]))
            app = shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, handled)
            async with app:
                event = await app.publish("order.placed", {"n": 1})
                await eventually(lambda: handled == [event.id], what="the event handled")
                store_id = await app.store.identity()
            info = await js.stream_info(names.stream)
        finally:
            await nc.close()
    assert info.config.description is not None
    assert store_id in info.config.description and '"complete": true' in info.config.description


def copy_sqlite(source: Path, target: Path) -> None:
    """A copy of a store file, as a backup or a cloned environment makes it."""
    src, dst = sqlite3.connect(source), sqlite3.connect(target)
    try:
        src.backup(dst)
    finally:
        dst.close()
        src.close()


async def test_a_copy_of_the_store_refuses_to_start_on_its_originals_stream(
    nats_url: str, tmp_path: Path
) -> None:
    # Staging cloned from production: the copy holds production's store id, and took
    # about half of production's events, acking them.
    name = app_name("copied")
    handled_a: list[str] = []
    prod = f"sqlite:///{tmp_path}/prod.db"
    async with streams_removed(nats_url, name):
        async with shop(name, prod, nats_url, handled_a) as a:
            await a.publish("order.placed", {"n": 0})
            await eventually(lambda: len(handled_a) == 1, what="A handles its event")
        copy_sqlite(tmp_path / "prod.db", tmp_path / "staging.db")
        ids = set()
        for db in ("prod.db", "staging.db"):
            with contextlib.closing(sqlite3.connect(tmp_path / db)) as conn:
                ids.add(conn.execute("SELECT id FROM store_identity").fetchone()[0])
        assert len(ids) == 1  # the copy carries the original's store id
        b = shop(name, f"sqlite:///{tmp_path}/staging.db", nats_url, [])
        async with shop(name, prod, nats_url, handled_a) as a:
            for opening in (b, b.client()):
                with pytest.raises(BrokerError) as info:
                    async with opening:
                        pass
                message = str(info.value)
                assert "\n" not in message
                assert f"{tmp_path}/prod.db" in message and f"{tmp_path}/staging.db" in message
                assert "copy" in message and "?prefix=" in message
            events = [await a.publish("order.placed", {"n": i}) for i in range(1, 7)]
            await eventually(lambda: len(handled_a) == 7, what="A handles all its events")
            await asyncio.sleep(SETTLE)
            assert await a.stalled(older_than=0) == []
        assert set(e.id for e in events) <= set(handled_a)
        # With its own prefix the copy is an environment of its own.
        handled_b: list[str] = []
        b = shop(name, f"sqlite:///{tmp_path}/staging.db", f"{nats_url}?prefix=staging",
                 handled_b)
        async with b:
            event = await b.publish("order.placed", {"n": 99})
            await eventually(lambda: event.id in handled_b, what="the copy handles its own")


async def test_the_store_opened_by_another_path_to_its_file_is_the_same_store(
    nats_url: str, tmp_path: Path
) -> None:
    # (a container mounting the store's folder elsewhere sees the same file)
    name = app_name("linked")
    (tmp_path / "elsewhere").mkdir()
    handled: list[str] = []
    async with streams_removed(nats_url, name):
        async with shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, handled) as a:
            await a.publish("order.placed", {"n": 0})
            await eventually(lambda: len(handled) == 1, what="A handles its event")
        os.link(tmp_path / "prod.db", tmp_path / "elsewhere" / "prod.db")
        b = shop(name, f"sqlite:///{tmp_path}/elsewhere/prod.db", nats_url, handled)
        async with b:
            await b.publish("order.placed", {"n": 1})
            await eventually(lambda: len(handled) == 2, what="B handles its event")


@pytest.mark.postgres
async def test_a_restored_copy_of_a_postgres_store_refuses_to_start(
    nats_url: str, postgres_url: str, fresh_schema: str
) -> None:
    # pg_dump | pg_restore into another database or schema carries store_identity along:
    # the copy's id is the original's (what the restore writes is imitated here).
    name = app_name("restored")
    prod = with_schema(postgres_url, f"{fresh_schema}_p")
    staging = with_schema(postgres_url, f"{fresh_schema}_s")
    try:
        async with streams_removed(nats_url, name), shop(name, prod, nats_url, []) as a:
            copy = store_from_url(staging)
            await copy.open()  # (made, then given the original's id as a restore does)
            await copy.close()
            conn = await asyncpg.connect(postgres_url)
            try:
                await conn.execute(
                    f'UPDATE "{fresh_schema}_s".store_identity SET id = $1',
                    await a.store.identity(),
                )
            finally:
                await conn.close()
            b = shop(name, staging, nats_url, [])
            with pytest.raises(BrokerError) as info:
                async with b:
                    pass
            message = str(info.value)
            assert f"{fresh_schema}_p" in message and f"{fresh_schema}_s" in message
            assert "copy" in message and "?prefix=" in message
    finally:
        await drop_schema(postgres_url, f"{fresh_schema}_p")
        await drop_schema(postgres_url, f"{fresh_schema}_s")


async def test_a_stream_owner_recorded_without_a_location_gets_one(
    nats_url: str, tmp_path: Path
) -> None:
    # (made by a version that did not record where the store lives: adopted by its store)
    name = app_name("noloc")
    names = Names(name)
    async with streams_removed(nats_url, name):
        async with shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, []) as a:
            store_id = await a.store.identity()
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            info = await js.stream_info(names.stream)
            config: Any = info.config
            config.description = json.dumps({
                "cantata": 1, "app": name, "prefix": "", "store": store_id,
                "store_url": f"sqlite:///{tmp_path}/prod.db", "complete": True,
            })
            await js.update_stream(config)
            async with shop(name, f"sqlite:///{tmp_path}/prod.db", nats_url, []):
                pass
            info = await js.stream_info(names.stream)
            assert info.config.description is not None
            described = json.loads(info.config.description)
        finally:
            await nc.close()
        assert f"path:{tmp_path}/prod.db" in described["location"]
        copy_sqlite(tmp_path / "prod.db", tmp_path / "staging.db")
        with pytest.raises(BrokerError, match="copy"):
            async with shop(name, f"sqlite:///{tmp_path}/staging.db", nats_url, []):
                pass
