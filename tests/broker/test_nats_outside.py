"""Events from outside the store stay where they came from.

An outside event (published to the stream by another system) that a group
dead-letters is stored to list its dead letter, but the outbox relay never sends it
back to the stream; the stand-in stored for a payload that is not an event never
goes on the stream either.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, Event, Retry, WorkflowContext
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_consumer import INVALID_TYPE
from cantata.store.sqlite import SQLiteStore
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


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_an_outside_event_with_text_no_store_keeps_is_dead_lettered(
    backend: str, nats_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A NUL or a lone surrogate in an id, a subject or a source: PostgreSQL refuses such
    text and SQLite cuts it, so the event is dead-lettered as a payload that is not a
    valid event (its stand-in), not retried for ever against the store."""
    if backend == "sqlite":
        store = f"sqlite:///{tmp_path}/a.db"
    else:  # a schema of its own, migrated ahead (pooled_schema, tests/conftest.py)
        schema = request.getfixturevalue("pooled_schema")
        store = f"{request.getfixturevalue('postgres_url')}?schema={schema}"
    name = app_name("outside")
    broker = nats_broker(nats_url)
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    handled: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    async with streams_removed(nats_url, name), app:
        names = broker.names(name)
        bad: list[Event[dict[str, Any]]] = [Event(type="order.placed", data={}, id="a\x00b"),
               Event(type="order.placed", data={}, subject="s\x00"),
               Event(type="order.placed", data={}, source="\ud800")]
        good = Event(type="order.placed", data={"ok": True})
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for e in [*bad, good]:
                # (json escapes a lone surrogate as another system's encoder may)
                payload = json.dumps(e.to_cloudevent()).encode()
                await js.publish(names.event(e.type), payload, stream=names.stream)

            async def all_dead() -> bool:
                return len(await app.dead_letters()) == 3

            await eventually(all_dead, what="the 3 events dead-lettered")
            await eventually(lambda: handled == [good.id], what="the good event handled")
        finally:
            await nc.close()
        letters = await app.dead_letters()
        assert {d.event.type for d in letters} == {INVALID_TYPE}
        assert all("NUL" in d.error or "surrogate" in d.error for d in letters), letters


@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
async def test_an_outside_event_with_an_attribute_too_long_to_index_is_dead_lettered(
    backend: str, nats_url: str, tmp_path: Path, request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An id, type or correlation id of 10,000 characters (random: PostgreSQL would
    compress a repeated one under its index limit) is refused as not a valid event,
    as app.publish refuses it: dead-lettered once, no handler run, no traceback."""
    if backend == "sqlite":
        store = f"sqlite:///{tmp_path}/a.db"
    else:  # a schema of its own, migrated ahead (pooled_schema, tests/conftest.py)
        schema = request.getfixturevalue("pooled_schema")
        store = f"{request.getfixturevalue('postgres_url')}?schema={schema}"
    name = app_name("outside")
    broker = nats_broker(nats_url)
    app = App(name, store=store, broker=broker, poll_interval=0.05)
    handled: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    long = secrets.token_hex(5000)  # 10,000 characters that do not compress
    async with streams_removed(nats_url, name), app:
        names = broker.names(name)
        bad: list[Event[dict[str, Any]]] = [Event(type="order.placed", data={}, id=long),
               Event(type=f"order.{long}", data={}),
               Event(type="order.placed", data={}, correlation_id=long)]
        good = Event(type="order.placed", data={"ok": True})
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            for e in [*bad, good]:  # all on the subject of order.placed
                await js.publish(names.event("order.placed"), e.to_json(),
                                 stream=names.stream)

            async def all_dead() -> bool:
                return len(await app.dead_letters()) == 3

            await eventually(all_dead, what="the 3 events dead-lettered")
            await eventually(lambda: handled == [good.id], what="the good event handled")
            await asyncio.sleep(SETTLE)
        finally:
            await nc.close()
        letters = await app.dead_letters()
    assert {d.event.type for d in letters} == {INVALID_TYPE}
    assert sorted(d.error.split("'")[1] for d in letters) == [
        "correlation_id", "id", "type"], [d.error for d in letters]
    assert all("characters long" in d.error and "at most 500" in d.error
               for d in letters)
    assert handled == [good.id]
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


class FaultyStore(SQLiteStore):
    """A store that cannot keep the events whose id starts with ``poison-`` (as
    PostgreSQL could not index one too long): an error that is not a storage fault."""

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        if any(e.id.startswith("poison-") for e in events):
            raise RuntimeError("index row requires 10032 bytes, maximum size is 8191")
        return await super().append_external(app, events)


async def test_a_message_the_store_cannot_keep_is_given_up_quietly(
    nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Not delivered for ever with a traceback each time: a few deliveries, one warning
    line, then one error line, and NATS no longer delivers it (for a group, and for
    the consumer that keeps outside events for waits)."""
    name = app_name("outside")
    broker = nats_broker(nats_url)
    app = App(name, store=FaultyStore(str(tmp_path / "a.db")), broker=broker,
              poll_interval=0.05)
    handled: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        handled.append(event.id)

    @app.workflow
    async def approval(ctx: WorkflowContext, order_id: str) -> Any:
        return (await ctx.wait_for_event("invoice.approved", timeout=60)).data

    async with streams_removed(nats_url, name), app:
        names = broker.names(name)
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            e: Event[Any]
            for e in (Event(type="order.placed", data={}, id="poison-1"),
                      Event(type="invoice.approved", data={}, id="poison-2"),
                      Event(type="order.placed", data={"ok": True}, id="good-1")):
                await js.publish(names.event(e.type), e.to_json(), stream=names.stream)
            await eventually(lambda: handled == ["good-1"], what="the good event handled")

            def given_up() -> list[str]:
                lines = [r.getMessage() for r in caplog.records
                         if r.levelno == logging.ERROR and "gave up" in r.getMessage()]
                return lines if len(lines) == 2 else []

            lines = await eventually(given_up, timeout=30, what="both messages given up")

            async def nothing_left() -> bool:
                infos = [i async for i in _consumers(js, names.stream)]
                return all(i.num_ack_pending == 0 and i.num_pending == 0 for i in infos)

            await eventually(nothing_left, what="NATS no longer delivers them")
        finally:
            await nc.close()
    assert sorted("billing" in line for line in lines) == [False, True], lines
    assert all("RuntimeError: index row requires" in line for line in lines), lines
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.INFO]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING
                and "failed (RuntimeError" in r.getMessage()]
    assert 1 <= len(warnings) <= 2, [r.getMessage() for r in warnings]  # one per consumer
    assert handled == ["good-1"]


async def _consumers(js: Any, stream: str) -> Any:
    for info in await js.consumers_info(stream):
        yield info


async def test_an_outside_event_on_another_types_subject_is_refused_for_handlers_and_waits(
    nats_url: str, tmp_path: Path
) -> None:
    """The subject of an event is made from its type: an ``order.cancelled`` put on
    the subject of ``order.placed`` would reach the groups of ``order.placed`` while the
    store addressed it to those of ``order.cancelled``, whose consumers never see it. It
    is refused: a stand-in dead letter naming both for each group of the subject; it is
    not stored, so no handler, no other group and no wait takes it."""
    name = app_name("misrouted")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)
    seen: list[tuple[str, str]] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        seen.append(("billing", event.id))

    @app.on("order.*", group="audit")
    async def audit(event: Event[Any]) -> None:
        seen.append(("audit", event.id))

    @app.on("order.cancelled", group="refunds")
    async def refund(event: Event[Any]) -> None:
        seen.append(("refunds", event.id))

    @app.workflow
    async def cancellation(ctx: WorkflowContext, order_id: str) -> Any:
        ev = await ctx.wait_for_event("order.cancelled", match={"order_id": order_id}, timeout=30)
        return ev.id

    async with streams_removed(nats_url, name), app:
        run = await app.start(cancellation, "o-1")
        names = broker.names(name)
        wrong = Event(
            type="order.cancelled", data={"order_id": "o-1"}, id="ext-wrong", source="legacy"
        )
        right = Event(
            type="order.cancelled", data={"order_id": "o-1"}, id="ext-right", source="legacy"
        )
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(names.event("order.placed"), wrong.to_json(), stream=names.stream)

            async def two_letters() -> list[Any]:
                letters = await app.dead_letters()
                return letters if len(letters) == 2 else []

            letters = await eventually(two_letters, what="both groups of the subject refuse it")
            await js.publish(names.event(right.type), right.to_json(), stream=names.stream)
            assert await run.result(timeout=15) == "ext-right"
            await eventually(
                lambda: sorted(seen) == [("audit", "ext-right"), ("refunds", "ext-right")],
                what="the well-routed event handled",
            )
            await asyncio.sleep(SETTLE)
        finally:
            await nc.close()
        assert await app.store.get_event(name, "ext-wrong") is None
        assert await app.store.deliveries(name, "ext-wrong") == []
        assert len(await app.dead_letters()) == 2
    assert sorted(d.group for d in letters) == ["audit", "billing"]
    for letter in letters:
        assert letter.event.type == INVALID_TYPE
        assert "ext-wrong" in letter.event.data["payload"]
        assert "'order.cancelled'" in letter.error, letter.error
        assert names.event("order.placed") in letter.error, letter.error
        assert names.event("order.cancelled") in letter.error, letter.error
    assert sorted(seen) == [("audit", "ext-right"), ("refunds", "ext-right")]


async def test_an_outside_event_on_another_types_subject_is_not_kept_for_waits(
    nats_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A type only workflows wait for (no group takes it): the consumer keeping its
    events from outside for waits refuses one of another type on its subject with one
    warning naming both (it used to drop it without a word), and keeps the next."""
    name = app_name("misrouted")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)

    @app.workflow
    async def verdict(ctx: WorkflowContext, order_id: str) -> Any:
        ev = await ctx.wait_for_event("invoice.approved", match={"order_id": order_id}, timeout=30)
        return ev.id

    async with streams_removed(nats_url, name), app:
        run = await app.start(verdict, "o-2")
        names = broker.names(name)
        wrong = Event(
            type="invoice.rejected", data={"order_id": "o-2"}, id="ext-wrong", source="legacy"
        )
        right = Event(
            type="invoice.approved", data={"order_id": "o-2"}, id="ext-right", source="legacy"
        )
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await js.publish(names.event("invoice.approved"), wrong.to_json(), stream=names.stream)

            def warned() -> bool:
                return any(
                    "ext-wrong" in r.getMessage()
                    for r in caplog.records
                    if r.levelno == logging.WARNING
                )

            await eventually(warned, what="the keeper's warning")
            await js.publish(names.event(right.type), right.to_json(), stream=names.stream)
            assert await run.result(timeout=15) == "ext-right"
        finally:
            await nc.close()
        assert await app.store.get_event(name, "ext-wrong") is None
    [line] = [r.getMessage() for r in caplog.records if "ext-wrong" in r.getMessage()]
    assert "'invoice.rejected'" in line and names.event("invoice.approved") in line, line
    assert names.event("invoice.rejected") in line, line
