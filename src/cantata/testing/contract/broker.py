"""The executable definition of the :class:`~cantata.broker.base.Broker` protocol.

A backend's test module subclasses :class:`BrokerContract` (no ``Test`` prefix, so it
is only collected through its subclasses) and overrides :meth:`create_broker`, and
:meth:`create_store` when it needs another store. Brokers that carry payloads from
outside (``external = True``) also implement :meth:`publish_raw`.

Each test gets a fresh app name; events are committed to the store and then handed
to ``broker.publish`` as the app does; for brokers that relay the outbox an
:class:`~cantata.choreography.relay.OutboxRelay` runs too, so emitted events travel.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from cantata.broker.base import Broker, BrokerMessage, Handler, Subscription
from cantata.choreography.relay import OutboxRelay
from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import DELIVERY_DONE, Declaration
from cantata.model.signing import Signer
from cantata.store.base import Settlement, Store
from cantata.store.factory import store_from_url
from cantata.testing.contract.support import LEASE
from cantata.testing.wait import eventually

Action = Callable[[BrokerMessage], Awaitable[Any]]


async def complete(msg: BrokerMessage) -> Any:
    return await msg.complete()


@dataclass
class Seen:
    """One call of a recorded handler."""

    worker: str
    msg: BrokerMessage
    at: float
    result: Any = None  # what the action returned (complete()'s bool)
    finished: bool = False


@dataclass
class Env:
    """One test's store, broker and app, plus helpers to publish and watch."""

    store: Store
    broker: Broker
    app: str
    timeout: float
    quiet_time: float
    seen: list[Seen] = field(default_factory=list)
    subs: list[Subscription] = field(default_factory=list)

    def handler(self, worker: str = "w1", action: Action = complete) -> Handler:
        async def handle(msg: BrokerMessage) -> None:
            record = Seen(worker, msg, time.monotonic())
            self.seen.append(record)
            record.result = await action(msg)
            record.finished = True

        return handle

    async def subscribe(
        self,
        group: str,
        patterns: list[str],
        action: Action = complete,
        *,
        worker: str = "w1",
        concurrency: int = 64,
    ) -> Subscription:
        # What the app does before it subscribes: the group is declared (the store
        # addresses new events to it) and the worker's row is alive (it owns what it
        # claims); the broker does neither (docs/architecture.md).
        await self.store.declare(self.app, [Declaration("handler", group, p) for p in patterns])
        await self.store.heartbeat(self.app, worker, time.time(), None, lease=LEASE)
        sub = await self.broker.subscribe(
            self.app, group, patterns, self.handler(worker, action),
            worker_id=worker, concurrency=concurrency,
        )
        self.subs.append(sub)
        return sub

    async def publish(self, *events: Event[Any]) -> list[Event[Any]]:
        """Commit events to the store, then hand them to the broker (as the app does)."""
        await self.store.append_events(self.app, events)
        await self.broker.publish(self.app, events)
        return list(events)

    def got(self, group: str, event_id: str | None = None) -> list[Seen]:
        """Deliveries to ``group`` (of ``event_id``) so far, finished or not."""
        return [
            s for s in self.seen
            if s.msg.group == group
            and (event_id is None or (s.msg.event is not None and s.msg.event.id == event_id))
        ]

    def handled(self, group: str) -> list[str]:
        """Event ids whose ``complete()`` returned True for ``group``."""
        return [
            s.msg.event.id for s in self.got(group)
            if s.finished and s.result is True and s.msg.event is not None
        ]

    async def until(self, what: str, check: Callable[[], bool]) -> None:
        await eventually(check, self.timeout, what)

    async def until_async(self, what: str, check: Callable[[], Awaitable[bool]]) -> None:
        await eventually(check, self.timeout, what, interval=0.02)

    async def quiet(self) -> None:
        """Give a wrong delivery the time to show up."""
        await asyncio.sleep(self.quiet_time)


def ev(event_type: str, n: int = 0, **kw: Any) -> Event[Any]:
    return Event(type=event_type, data={"n": n}, **kw)


class BrokerContract:
    """Behaviour every broker must have. Subclass and override :meth:`create_broker`."""

    #: True for brokers that carry payloads from outside (they implement publish_raw).
    external = False
    #: seconds to wait for an expected delivery / to watch for an unexpected one
    timeout = 5.0
    quiet_time = 0.4

    # -- hooks ----------------------------------------------------------------------

    def create_broker(self) -> Broker:
        raise NotImplementedError

    def create_store(self, tmp_path: Path) -> Store:
        return store_from_url("memory://")

    async def publish_raw(self, env: Env, event_type: str, payload: bytes) -> None:
        """Put ``payload`` where events of ``event_type`` travel, bypassing Cantata."""
        pytest.skip(f"{type(self).__name__} carries only events Cantata stored")

    async def dispose(self, env: Env) -> None:
        """Remove what the test left on the server (called before the broker closes)."""

    # -- fixture --------------------------------------------------------------------

    @pytest.fixture
    async def env(self, tmp_path: Path) -> AsyncIterator[Env]:
        store = self.create_store(tmp_path)
        await store.open()
        broker = self.create_broker()
        await broker.open(store)
        env = Env(store, broker, f"t{new_id()[-12:]}", self.timeout, self.quiet_time)
        relay = OutboxRelay(store, broker, env.app, poll_interval=0.05)
        if broker.relays_outbox:
            await relay.start()
        try:
            yield env
        finally:
            await asyncio.gather(*(sub.stop() for sub in env.subs))
            await relay.stop()
            try:
                await self.dispose(env)
            finally:
                await broker.close()
                await store.close()

    # -- delivery -------------------------------------------------------------------

    async def test_protocols_are_implemented(self, env: Env) -> None:
        assert isinstance(env.broker, Broker)
        sub = await env.subscribe("g", ["order.placed"])
        assert isinstance(sub, Subscription)
        await env.publish(ev("order.placed"))
        await env.until("a delivery", lambda: len(env.handled("g")) == 1)
        assert isinstance(env.seen[0].msg, BrokerMessage)

    async def test_message_carries_the_event(self, env: Env) -> None:
        async def extend_then_complete(msg: BrokerMessage) -> Any:
            await msg.extend()
            return await msg.complete()

        await env.subscribe("billing", ["order.placed"], extend_then_complete)
        [sent] = await env.publish(
            Event(type="order.placed", data={"order_id": 42, "items": ["a"]}, subject="order-42",
                  correlation_id="corr-1", causation_id="cause-1", traceparent="00-abc-def-01")
        )
        await env.until("the delivery", lambda: len(env.handled("billing")) == 1)
        msg = env.seen[0].msg
        assert msg.group == "billing"
        assert msg.event == sent
        assert msg.error is None
        assert msg.attempt == 1
        assert Event.from_json(msg.raw) == sent

    async def test_message_carries_binary_data_as_bytes_signed(self, env: Env) -> None:
        """Bytes data (a CloudEvent's ``data_base64``) arrives as the same bytes, and a
        signature made before it was stored verifies (docs/security.md)."""
        signer = Signer({"k1": "contract-secret-0123456789"}, app=env.app)
        await env.subscribe("archive", ["scan.done"])
        raw = bytes(range(256))
        [sent] = await env.publish(signer.sign(Event(type="scan.done", data=raw)))
        await env.until("the delivery", lambda: len(env.handled("archive")) == 1)
        msg = env.seen[0].msg
        assert msg.event == sent and msg.event.data == raw
        assert signer.problem(msg.event, required=True) is None
        assert Event.from_json(msg.raw).data == raw

    async def test_every_group_receives_each_matching_event_once(self, env: Env) -> None:
        await env.subscribe("billing", ["order.placed"])
        await env.subscribe("shipping", ["order.*"])
        await env.subscribe("audit", ["payment.made", "order.cancelled"])
        orders = await env.publish(*(ev("order.placed", i) for i in range(3)))
        [payment] = await env.publish(ev("payment.made"))
        order_ids = {e.id for e in orders}
        await env.until(
            "every group's deliveries",
            lambda: len(env.handled("billing")) == 3 and len(env.handled("shipping")) == 3
            and len(env.handled("audit")) == 1,
        )
        await env.quiet()
        assert sorted(env.handled("billing")) == sorted(order_ids)
        assert sorted(env.handled("shipping")) == sorted(order_ids)
        assert env.handled("audit") == [payment.id]
        assert len(env.seen) == 7
        rows = await env.store.deliveries(env.app, orders[0].id)
        assert {(r.group, r.status) for r in rows} == {
            ("billing", DELIVERY_DONE), ("shipping", DELIVERY_DONE)
        }

    async def test_group_whose_patterns_do_not_match_gets_nothing(self, env: Env) -> None:
        await env.subscribe("mail", ["invoice.sent", "customer.*"])
        await env.subscribe("billing", ["order.placed"])
        await env.publish(ev("order.placed"), ev("invoice.paid"), ev("customer.vip.added"))
        await env.until("billing's delivery", lambda: len(env.handled("billing")) == 1)
        await env.quiet()
        assert env.got("mail") == []

    async def test_wildcard_stands_for_exactly_one_token(self, env: Env) -> None:
        await env.subscribe("shipping", ["order.*"])
        await env.publish(ev("order.placed.x"), ev("order"), ev("orders.placed"))
        [placed] = await env.publish(ev("order.placed"))
        await env.until("order.placed", lambda: len(env.handled("shipping")) == 1)
        await env.quiet()
        assert [s.msg.event.id for s in env.got("shipping") if s.msg.event] == [placed.id]

    async def test_patterns_of_the_reserved_first_token_are_refused(self, env: Env) -> None:
        # (a NATS broker's dead-letter replays travel on <app subjects>._replay.<group>)
        from cantata.errors import CantataError

        for pattern in ("_replay.billing", "_replay.*"):
            with pytest.raises(CantataError, match="'_replay' is reserved"):
                await env.broker.subscribe(
                    env.app, "ops", [pattern], env.handler(), worker_id="w1"
                )

    async def test_event_matching_two_patterns_of_a_group_is_handled_once(self, env: Env) -> None:
        await env.subscribe("billing", ["order.placed", "order.*"])
        [sent] = await env.publish(ev("order.placed"))
        await env.until("the delivery", lambda: len(env.handled("billing")) == 1)
        await env.quiet()
        assert env.handled("billing") == [sent.id]
        # A broker may deliver it once per pattern; the second complete() says False.
        assert all(s.result is False for s in env.got("billing") if s.result is not True)

    async def test_competing_subscribers_split_the_events(self, env: Env) -> None:
        async def slow(msg: BrokerMessage) -> Any:
            await asyncio.sleep(0.05)
            return await msg.complete()

        await env.subscribe("work", ["job.*"], slow, worker="w1", concurrency=2)
        await env.subscribe("work", ["job.*"], slow, worker="w2", concurrency=2)
        jobs = await env.publish(*(ev("job.queued", i) for i in range(16)))
        await env.until("every job", lambda: len(env.handled("work")) == 16)
        await env.quiet()
        by_worker = {
            w: {s.msg.event.id for s in env.got("work") if s.worker == w and s.msg.event}
            for w in ("w1", "w2")
        }
        assert by_worker["w1"] and by_worker["w2"], "both subscribers should get work"
        assert not by_worker["w1"] & by_worker["w2"], "an event was handled by both"
        assert by_worker["w1"] | by_worker["w2"] == {j.id for j in jobs}
        assert sorted(env.handled("work")) == sorted(j.id for j in jobs)

    async def test_publishing_an_event_twice_delivers_it_once_per_group(self, env: Env) -> None:
        await env.subscribe("billing", ["order.placed"])
        await env.subscribe("shipping", ["order.*"])
        [sent] = await env.publish(ev("order.placed"))
        await env.broker.publish(env.app, [sent])
        await env.publish(sent)
        await env.until(
            "both groups",
            lambda: len(env.handled("billing")) == 1 and len(env.handled("shipping")) == 1,
        )
        await env.quiet()
        assert len(env.got("billing")) == 1
        assert len(env.got("shipping")) == 1

    async def test_stop_stops_delivery_and_a_new_subscriber_gets_the_rest(
        self, env: Env
    ) -> None:
        sub = await env.subscribe("billing", ["order.placed"])
        [first] = await env.publish(ev("order.placed", 1))
        await env.until("the first event", lambda: len(env.handled("billing")) == 1)
        await sub.stop()
        [second] = await env.publish(ev("order.placed", 2))
        await env.quiet()
        assert env.handled("billing") == [first.id]
        await env.subscribe("billing", ["order.placed"])
        await env.until("the second event", lambda: len(env.handled("billing")) == 2)
        assert env.handled("billing") == [first.id, second.id]

    async def test_declared_group_gets_what_was_published_before_it_subscribed(
        self, env: Env
    ) -> None:
        # Another process declared the group (app.open does) and published; no
        # subscriber of the group has run yet.
        await env.store.declare(env.app, [Declaration("handler", "billing", "order.placed")])
        [early] = await env.publish(ev("order.placed"))
        await asyncio.sleep(0.1)
        await env.subscribe("billing", ["order.placed"])
        await env.until("the early event", lambda: env.handled("billing") == [early.id])

    async def test_group_gets_nothing_stored_before_it_was_declared(self, env: Env) -> None:
        await env.subscribe("shipping", ["order.placed"])
        [before] = await env.publish(ev("order.placed", 1))
        await env.until("shipping", lambda: env.handled("shipping") == [before.id])
        await env.subscribe("billing", ["order.placed"])
        [after] = await env.publish(ev("order.placed", 2))
        await env.until("billing", lambda: len(env.handled("billing")) == 1)
        await env.quiet()
        assert [s.msg.event.id for s in env.got("billing") if s.msg.event] == [after.id]

    # -- settling ---------------------------------------------------------------------

    async def test_retry_redelivers_after_the_delay_with_the_next_attempt(
        self, env: Env
    ) -> None:
        async def fail_once(msg: BrokerMessage) -> Any:
            if msg.attempt == 1:
                await msg.retry("RuntimeError: flaky", 0.5)
                return None
            return await msg.complete()

        await env.subscribe("billing", ["order.placed"], fail_once)
        [sent] = await env.publish(ev("order.placed"))
        await env.until("the second attempt", lambda: len(env.handled("billing")) == 1)
        got = env.got("billing")
        assert len(got) == 2, [(s.msg.attempt, s.at - got[0].at, s.result) for s in got]
        first, second = got
        assert (first.msg.attempt, second.msg.attempt) == (1, 2)
        assert second.msg.event == sent
        assert 0.4 <= second.at - first.at < 0.5 + 2.5
        await env.quiet()
        assert len(env.got("billing")) == 2
        [row] = await env.store.deliveries(env.app, sent.id)
        assert row.status == DELIVERY_DONE

    async def test_crashed_or_unsettled_delivery_comes_back(self, env: Env) -> None:
        async def crash_then_forget_then_complete(msg: BrokerMessage) -> Any:
            if msg.attempt == 1:
                raise RuntimeError("handler bug")
            if msg.attempt == 2:
                return None  # returns without settling: as good as a lost worker
            return await msg.complete()

        await env.subscribe("billing", ["order.placed"], crash_then_forget_then_complete)
        [sent] = await env.publish(ev("order.placed"))
        await env.until("the third attempt", lambda: len(env.handled("billing")) == 1)
        assert [s.msg.attempt for s in env.got("billing")] == [1, 2, 3]
        assert env.handled("billing") == [sent.id]

    async def test_dead_goes_to_the_dead_letters_and_is_not_redelivered(
        self, env: Env
    ) -> None:
        async def give_up(msg: BrokerMessage) -> Any:
            await msg.dead("ValueError: bad order")

        await env.subscribe("billing", ["order.placed"], give_up)
        [sent] = await env.publish(ev("order.placed"))

        async def dead_lettered() -> bool:
            return len(await env.store.dead_letters(env.app)) == 1

        await env.until_async("the dead letter", dead_lettered)
        [dl] = await env.store.dead_letters(env.app)
        assert (dl.group, dl.event.id, dl.error, dl.attempts) == (
            "billing", sent.id, "ValueError: bad order", 1
        )
        await env.quiet()
        assert len(env.got("billing")) == 1

    async def test_replayed_dead_letter_is_redelivered_to_its_group_only(
        self, env: Env
    ) -> None:
        async def fail_first(msg: BrokerMessage) -> Any:
            if len(env.got("billing")) == 1:
                await msg.dead("ValueError: bad order")
                return None
            return await msg.complete()

        await env.subscribe("billing", ["order.placed"], fail_first)
        await env.subscribe("shipping", ["order.placed"])
        await env.subscribe("spy", ["*.billing", "*.*.billing"])  # may see a replay's address
        [sent] = await env.publish(ev("order.placed", correlation_id="corr-7"))

        async def dead_lettered() -> bool:
            return len(await env.store.dead_letters(env.app)) == 1

        await env.until_async("the dead letter", dead_lettered)
        await env.until("shipping", lambda: len(env.handled("shipping")) == 1)
        [dl] = await env.store.dead_letters(env.app)
        replayed = await env.store.replay_dead_letter(env.app, dl.id, time.time())
        await env.broker.redeliver(env.app, replayed.group, replayed.event)
        await env.until("the replay", lambda: len(env.handled("billing")) == 1)
        await env.quiet()
        again = env.got("billing")[-1].msg
        assert again.event == sent and again.event.correlation_id == "corr-7"
        assert again.attempt == 1
        assert len(env.got("billing")) == 2
        assert len(env.got("shipping")) == 1
        assert env.got("spy") == []
        assert await env.store.dead_letters(env.app) == []

    async def test_duplicate_complete_returns_false_and_appends_nothing(self, env: Env) -> None:
        kept, dropped = ev("invoice.sent", 1), ev("invoice.sent", 2)

        async def complete_twice(msg: BrokerMessage) -> Any:
            first = await msg.complete([kept])
            second = await msg.complete([dropped])
            return (first, second)

        await env.subscribe("billing", ["order.placed"], complete_twice)
        await env.subscribe("mail", ["invoice.sent"])
        await env.publish(ev("order.placed"))
        await env.until("the emitted event", lambda: len(env.handled("mail")) == 1)
        await env.quiet()
        assert env.got("billing")[0].result == (True, False)
        assert env.handled("mail") == [kept.id]
        assert await env.store.get_event(env.app, dropped.id) is None

    async def test_delivery_handled_elsewhere_completes_false(self, env: Env) -> None:
        emitted = ev("invoice.sent")

        async def twin_was_faster(msg: BrokerMessage) -> Any:
            assert msg.event is not None
            # Another consumer handled this (group, event) meanwhile.
            assert await env.store.settle_delivery(
                env.app, msg.group, msg.event.id, Settlement("done", msg.attempt)
            )
            return await msg.complete([emitted])

        await env.subscribe("billing", ["order.placed"], twin_was_faster)
        await env.subscribe("mail", ["invoice.sent"])
        await env.publish(ev("order.placed"))
        await env.until("the handler", lambda: bool(env.got("billing")) and all(
            s.finished for s in env.got("billing")))
        await env.quiet()
        assert [s.result for s in env.got("billing")] == [False]
        assert await env.store.get_event(env.app, emitted.id) is None
        assert env.got("mail") == []

    async def test_emitted_events_reach_their_own_subscribers(self, env: Env) -> None:
        async def bill(msg: BrokerMessage) -> Any:
            assert msg.event is not None
            invoice = Event(
                type="invoice.sent", data={"order": msg.event.data["n"]},
                correlation_id=msg.event.correlation_id, causation_id=msg.event.id,
            )
            return await msg.complete([invoice])

        await env.subscribe("billing", ["order.placed"], bill)
        await env.subscribe("mail", ["invoice.*"])
        [order] = await env.publish(ev("order.placed", 5, correlation_id="corr-9"))
        await env.until("the invoice", lambda: len(env.handled("mail")) == 1)
        invoice = env.got("mail")[0].msg.event
        assert invoice is not None
        assert (invoice.type, invoice.data, invoice.correlation_id, invoice.causation_id) == (
            "invoice.sent", {"order": 5}, "corr-9", order.id
        )
        assert await env.store.get_event(env.app, invoice.id) == invoice
        await env.quiet()
        assert len(env.got("mail")) == 1
        assert len(env.got("billing")) == 1

    # -- payloads from outside ------------------------------------------------------------

    async def test_invalid_payloads_arrive_with_an_error_and_can_be_dead_lettered(
        self, env: Env
    ) -> None:
        async def dead_if_invalid(msg: BrokerMessage) -> Any:
            if msg.event is None:
                assert msg.error
                await msg.dead(f"InvalidEvent: {msg.error}")
                return None
            return await msg.complete()

        await env.subscribe("billing", ["order.*"], dead_if_invalid)
        await self.publish_raw(env, "order.placed", b"\xff\x00 not json")
        await self.publish_raw(
            env, "order.placed", b'{"specversion": "1.0", "id": "x1", "source": "elsewhere"}'
        )
        [valid] = await env.publish(ev("order.placed"))
        await env.until("the valid event", lambda: len(env.handled("billing")) == 1)
        await env.until("all three", lambda: len(env.got("billing")) == 3 and all(
            s.finished for s in env.got("billing")))
        await env.quiet()
        assert env.handled("billing") == [valid.id]
        invalid = [s.msg for s in env.got("billing") if s.msg.event is None]
        assert len(invalid) == 2
        errors = [m.error or "" for m in invalid]
        # handlers run concurrently: the two may settle in either order
        assert sorted("JSON" in e for e in errors) == [False, True]
        assert any("type" in e for e in errors if "JSON" not in e)
        assert b"\xff\x00 not json" in {m.raw for m in invalid}
        dls = await env.store.dead_letters(env.app)
        assert sorted(d.error for d in dls) == sorted(f"InvalidEvent: {e}" for e in errors)
        assert {d.group for d in dls} == {"billing"}
        assert len(env.got("billing")) == 3, "a dead-lettered payload was redelivered"

    async def test_event_from_outside_is_delivered_and_can_be_dead_lettered(
        self, env: Env
    ) -> None:
        async def refuse(msg: BrokerMessage) -> Any:
            await msg.dead("ValueError: unknown customer")

        await env.subscribe("billing", ["order.placed"], refuse)
        outside = Event(type="order.placed", data={"from": "legacy"}, source="legacy-shop")
        await self.publish_raw(env, "order.placed", outside.to_json())  # not in the store

        async def dead_lettered() -> bool:
            return len(await env.store.dead_letters(env.app)) == 1

        await env.until_async("the dead letter", dead_lettered)
        # stored as it arrived, its id taken as its correlation id (it carried none)
        arrived = replace(outside, correlation_id=outside.id)
        assert env.got("billing")[0].msg.event == arrived
        [dl] = await env.store.dead_letters(env.app)
        assert (dl.group, dl.event, dl.error) == (
            "billing", arrived, "ValueError: unknown customer"
        )
        await env.quiet()
        assert len(env.got("billing")) == 1
        # Stored to list its dead letter, as an event from outside: never sent back.
        assert await env.store.unpublished_events(env.app, limit=10) == []
        assert await env.store.redrive_events(
            env.app, stored_before=time.time() + 60, limit=10
        ) == []

    # -- what the broker refuses, re-drives ---------------------------------------------

    async def test_attach_is_repeatable_and_accepted_events_are_delivered(
        self, env: Env
    ) -> None:
        await env.broker.attach(env.app)
        await env.broker.attach(env.app)
        await env.subscribe("billing", ["order.placed"])
        event = ev("order.placed", subject="order-1")
        env.broker.check_event(env.app, event)  # a plain event is always accepted
        await env.publish(event)
        await env.until("the delivery", lambda: env.handled("billing") == [event.id])

    async def test_what_check_event_refuses_is_a_cantata_error(self, env: Env) -> None:
        from cantata.errors import CantataError

        huge = ev("order." + "x" * 10_000)
        try:
            env.broker.check_event(env.app, huge)
        except CantataError as exc:
            assert "10006" in str(exc) or "bytes" in str(exc)
        else:  # accepted: then it must travel like any other
            await env.subscribe("billing", ["order.*"])
            await env.publish(huge)
            await env.until("the long type", lambda: env.handled("billing") == [huge.id])

    async def test_publishing_again_does_not_handle_a_settled_delivery_twice(
        self, env: Env
    ) -> None:
        await env.subscribe("billing", ["order.placed"])
        [event] = await env.publish(ev("order.placed"))
        await env.until("the delivery", lambda: env.handled("billing") == [event.id])
        await env.broker.publish(env.app, [event], again=True)
        await env.quiet()
        assert env.handled("billing") == [event.id]

    async def test_publishing_again_delivers_a_pending_delivery(self, env: Env) -> None:
        calls: list[int] = []

        async def fail_first(msg: BrokerMessage) -> Any:
            calls.append(msg.attempt)
            if len(calls) == 1:
                await msg.retry("ValueError: later", 3600)  # parked for an hour
                return None
            return await msg.complete()

        await env.subscribe("billing", ["order.placed"], fail_first)
        [event] = await env.publish(ev("order.placed"))
        await env.until("the first attempt", lambda: len(calls) == 1)
        if not env.broker.relays_outbox:
            return  # the store holds the schedule: nothing to re-drive
        await env.broker.publish(env.app, [event], again=True)
        await env.until("the re-driven delivery", lambda: env.handled("billing") == [event.id])
