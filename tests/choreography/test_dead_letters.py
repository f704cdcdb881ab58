"""Retries, the dead-letter queue, and replay to the failing group only."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import Counter
from typing import Any

import pytest

import cantata
from cantata import DeadLetter, DeadLetterNotFound, HandlerContext, Retry
from tests.choreography.helpers import FAST, SETTLE, eventually, make_app


async def test_a_handler_that_always_fails_is_retried_then_dead_lettered(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[str] = []

    @app.on("order.placed", group="billing", retry=FAST)
    async def bill(event: cantata.Event[Any]) -> None:
        calls.append(event.id)
        raise RuntimeError(f"card declined for {event.data['order_id']}")

    async with app:
        before = dt.datetime.now(dt.UTC)
        ev = await app.publish("order.placed", {"order_id": 5})
        dead = await eventually(app.dead_letters, what="a dead letter")
        await asyncio.sleep(SETTLE)
        assert len(await app.dead_letters()) == 1

    assert calls == [ev.id] * FAST.max_attempts
    [dl] = dead
    assert isinstance(dl, DeadLetter)
    assert dl.group == "billing"
    assert dl.event.id == ev.id
    assert dl.event.type == "order.placed"
    assert dl.event.data == {"order_id": 5}
    assert dl.error == "RuntimeError: card declined for 5"
    assert dl.attempts == FAST.max_attempts
    assert isinstance(dl.failed_at, dt.datetime)
    assert before - dt.timedelta(seconds=1) <= dl.failed_at <= dt.datetime.now(dt.UTC)
    assert isinstance(dl.id, str) and dl.id


async def test_non_retryable_errors_dead_letter_at_once(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[int] = []

    retry = Retry(max_attempts=5, initial_interval=0.01, non_retryable=(KeyError,))

    @app.on("order.placed", group="billing", retry=retry)
    async def bill(event: cantata.Event[Any]) -> None:
        calls.append(1)
        raise KeyError("customer")

    async with app:
        await app.publish("order.placed", {})
        [dl] = await eventually(app.dead_letters)
        await asyncio.sleep(SETTLE)

    assert calls == [1]
    assert dl.attempts == 1
    assert dl.error == "KeyError: 'customer'"


async def test_a_failure_recovers_within_its_retries(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[int] = []
    done: list[int] = []

    @app.on("order.placed", group="billing", retry=FAST)
    async def bill(event: cantata.Event[Any]) -> None:
        calls.append(1)
        if len(calls) < FAST.max_attempts:
            raise ConnectionError("gateway timeout")
        done.append(1)

    async with app:
        await app.publish("order.placed", {})
        await eventually(lambda: done)
        await asyncio.sleep(SETTLE)
        assert await app.dead_letters() == []
    assert len(calls) == FAST.max_attempts


async def test_replay_redelivers_to_that_group_only(store_url: str) -> None:
    app = make_app(store_url)
    fixed = False
    seen: Counter[str] = Counter()
    billing_events: list[cantata.Event[Any]] = []
    receipts: list[cantata.Event[Any]] = []

    @app.on("order.placed", group="billing", retry=FAST)
    async def bill(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        seen["billing"] += 1
        billing_events.append(event)
        if not fixed:
            raise RuntimeError("bug in billing")
        await ctx.emit("billing.receipt", {"order_id": event.data["order_id"]})

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None:
        seen["inventory"] += 1

    @app.on("order.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None:
        seen["audit"] += 1

    @app.on("billing.receipt", group="mail")
    async def mail(event: cantata.Event[Any]) -> None:
        receipts.append(event)

    async with app:
        ev = await app.publish("order.placed", {"order_id": 8}, correlation_id="tx-8")
        [dl] = await eventually(app.dead_letters)
        await eventually(lambda: seen["inventory"] and seen["audit"])
        assert seen == {"billing": FAST.max_attempts, "inventory": 1, "audit": 1}

        fixed = True  # deploy the fix, then replay
        replayed = await app.replay(dl.id)
        assert replayed.id == dl.id
        assert replayed.group == "billing"
        await eventually(lambda: receipts, what="the replayed handler's emit")
        await asyncio.sleep(SETTLE)
        assert await app.dead_letters() == []
        with pytest.raises(DeadLetterNotFound):
            await app.replay(dl.id)  # it is off the list: a second replay is refused

    assert seen == {"billing": FAST.max_attempts + 1, "inventory": 1, "audit": 1}
    replayed_event = billing_events[-1]
    assert replayed_event.id == ev.id
    assert replayed_event.correlation_id == "tx-8"
    [receipt] = receipts
    assert receipt.correlation_id == "tx-8"
    assert receipt.causation_id == ev.id


async def test_a_replayed_dead_letter_comes_back_if_it_fails_again(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[int] = []

    @app.on("order.placed", group="billing", retry=FAST)
    async def bill(event: cantata.Event[Any]) -> None:
        calls.append(1)
        raise RuntimeError(f"still broken ({len(calls)})")

    async with app:
        ev = await app.publish("order.placed", {})
        [first] = await eventually(app.dead_letters)
        await app.replay(first.id)
        await eventually(lambda: len(calls) == 2 * FAST.max_attempts)
        [again] = await eventually(
            lambda: _dead_letters_other_than(app, first.id), what="the dead letter to come back"
        )
        await asyncio.sleep(SETTLE)
        assert len(await app.dead_letters()) == 1

    assert again.event.id == ev.id
    assert again.group == "billing"
    assert again.attempts == FAST.max_attempts  # attempts counted afresh after a replay
    assert again.error == f"RuntimeError: still broken ({2 * FAST.max_attempts})"


async def _dead_letters_other_than(app: cantata.App, dl_id: str) -> list[DeadLetter]:
    return [d for d in await app.dead_letters() if d.id != dl_id]


async def test_replaying_an_unknown_dead_letter_raises(store_url: str) -> None:
    app = make_app(store_url)
    async with app.client():
        with pytest.raises(DeadLetterNotFound, match="nope"):
            await app.replay("nope")


async def test_each_group_dead_letters_separately(store_url: str) -> None:
    app = make_app(store_url)

    @app.on("order.placed", group="billing", retry=Retry(max_attempts=1))
    async def bill(event: cantata.Event[Any]) -> None:
        raise RuntimeError("billing broke")

    @app.on("order.placed", group="shipping", retry=Retry(max_attempts=2, initial_interval=0.01))
    async def ship(event: cantata.Event[Any]) -> None:
        raise TimeoutError("carrier api")

    async with app:
        ev = await app.publish("order.placed", {})
        dls = await eventually(
            lambda: _when_count(app, 2), what="one dead letter per failing group"
        )

    by_group = {d.group: d for d in dls}
    assert by_group["billing"].error == "RuntimeError: billing broke"
    assert by_group["billing"].attempts == 1
    assert by_group["shipping"].error == "TimeoutError: carrier api"
    assert by_group["shipping"].attempts == 2
    assert {d.event.id for d in dls} == {ev.id}
    assert len({d.id for d in dls}) == 2


async def _when_count(app: cantata.App, n: int) -> list[DeadLetter]:
    dls = await app.dead_letters()
    return dls if len(dls) == n else []


async def test_dead_letters_filtered_by_group_and_type_before_the_limit(store_url: str) -> None:
    """``dead_letters(group=, type=)`` finds a group's letters however many older ones
    other groups have (the limit counts the matching ones, not all)."""
    app = make_app(store_url)

    @app.on("order.*", group="billing", retry=Retry(max_attempts=1))
    async def bill(event: cantata.Event[Any]) -> None:
        raise RuntimeError("billing broke")

    @app.on("order.refunded", group="shipping", retry=Retry(max_attempts=1))
    async def ship(event: cantata.Event[Any]) -> None:
        raise RuntimeError("shipping broke")

    async with app:
        for n in range(3):
            await app.publish("order.placed", {"n": n})
        await eventually(lambda: _when_count(app, 3), what="billing's three letters")
        last = await app.publish("order.refunded", {"n": 3})
        await eventually(lambda: _when_count(app, 5), what="both groups' letters of it")
        [shipping] = await app.dead_letters(limit=1, group="shipping")
        [refunded] = await app.dead_letters(limit=1, type="order.refunded")
        [both] = await app.dead_letters(limit=2, group="billing", type="order.refunded")
        placed = await app.dead_letters(limit=10, type="order.placed")
        assert await app.dead_letters(group="nobody") == []

    assert (shipping.group, shipping.event.id) == ("shipping", last.id)
    assert refunded.event.id == last.id
    assert (both.group, both.event.id) == ("billing", last.id)
    assert sorted(d.event.data["n"] for d in placed) == [0, 1, 2]
    assert {d.group for d in placed} == {"billing"}
