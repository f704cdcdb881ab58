"""Events from outside on NATS reach the workflows that wait for them, and carry a
correlation id (docs/guide.md §4).

A service not written with Cantata puts a structured CloudEvent on the app's subject:
a ``ctx.wait_for_event`` for its type sees it although no handler group takes the type
(a worker serving the waiting workflow stores it, once, however often it arrives);
an event that carries no correlation id gets its own id as one, so ``app.trace`` of
its id finds it, ``app.stalled`` reports its dead letters, and a ``start_on`` run
started by it has it as the root of its trace.
"""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from cantata import App, Event, Retry, WorkflowContext
from cantata.broker.nats import NatsBroker
from cantata.broker.nats_names import OUTBOX_HEADER
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats

Publish = Callable[..., Awaitable[None]]


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


async def test_a_wait_sees_an_outside_event_no_group_takes_stored_once(
    store: str, nats_url: str, outside: Client
) -> None:
    name = app_name("waits")
    broker = nats_broker(nats_url)
    app = App(name, store=store, broker=broker, poll_interval=0.05)

    @app.workflow
    async def approval(ctx: WorkflowContext, order: dict[str, str]) -> Any:
        ev = await ctx.wait_for_event("invoice.approved", match={"order_id": order["id"]},
                                      timeout=20)
        return [ev.id, ev.correlation_id, ev.data]

    async with streams_removed(nats_url, name), app:
        run = await app.start(approval, {"id": "x1"})
        ce = cloudevent("invoice.approved", {"order_id": "x1"}, "ext-a-1")
        await put(outside, broker, name, ce)
        assert await run.result(timeout=15) == ["ext-a-1", "ext-a-1", {"order_id": "x1"}]
        # the same message again (another system retrying): nothing stored twice
        await put(outside, broker, name, ce, **{"Nats-Msg-Id": "retry-1"})
        # a Cantata event of the type goes through the outbox: the relay's copy says so
        second = await app.start(approval, {"id": "x2"})
        mine = await app.publish("invoice.approved", {"order_id": "x2"})
        names = broker.names(name)

        async def relayed() -> Any:
            try:
                last = await outside.jetstream().get_last_msg(
                    names.stream, names.event("invoice.approved"))
            except Exception:
                return None
            return last if mine.id.encode() in (last.data or b"") else None

        copy = await eventually(relayed, what="the relay's copy")
        assert copy.headers is not None, copy
        assert copy.headers.get(OUTBOX_HEADER) == broker.outbox_mark(name), copy  # its store
        assert (await second.result(timeout=15))[0] == mine.id

        async def kept() -> list[Event[Any]]:
            found = await app.store.find_events(name, "invoice.approved", since=0.0,
                                                exclude=[], limit=10)
            return found if len(found) == 2 else []

        events = await eventually(kept, what="both events stored")
        stored = {e.id: e for e in events}
        assert set(stored) == {"ext-a-1", mine.id}
        assert stored["ext-a-1"].correlation_id == "ext-a-1"
        assert stored["ext-a-1"].source == "billing-legacy"
        # outside events are never sent back to the stream (the relay marks its own)
        async def relay_done() -> bool:
            return await app.store.unpublished_events(name, limit=10) == []

        await eventually(relay_done, what="the outbox empty")
        info = await outside.jetstream().stream_info(names.stream)
        assert info.state.messages == 3  # the outside event twice, and the relay's copy
        trace = await app.trace("ext-a-1")
        assert (trace.kind, trace.name) == ("event", "invoice.approved")


async def test_a_wait_of_a_type_known_only_at_run_time_sees_outside_events(
    nats_url: str, tmp_path: Path, outside: Client
) -> None:
    name = app_name("waits")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)

    @app.workflow
    async def dynamic(ctx: WorkflowContext, kind: str) -> Any:
        ev = await ctx.wait_for_event(f"{kind}.approved", timeout=20)  # not a literal
        return ev.data

    async with streams_removed(nats_url, name), app:
        run = await app.start(dynamic, "refund")
        # published before the run reaches its wait (no consumer of the type yet)
        await put(outside, broker, name, cloudevent("refund.approved", {"ok": 1}, "r-1"))
        assert await run.result(timeout=15) == {"ok": 1}


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

        async def settled() -> Any:
            # (until the trigger's delivery is settled, the trace shows the start in
            # progress as a handler node beside the run: the run may begin first)
            root = await app.trace("ext-order-1")
            return root if root.status != "pending" else None

        root = await eventually(settled, timeout=15, what="the trigger's delivery settled")
        assert (root.kind, root.name) == ("event", "order.placed")
        assert [c.kind for c in root.children] == ["run"]
        joined = await app.trace("tx-7")
        assert (joined.kind, joined.name) == ("event", "order.placed")
        stored = await app.store.get_event(name, "ext-order-2")
        assert stored is not None and stored.correlation_id == "tx-7"


async def test_the_consumer_keeping_events_for_waits_starts_at_the_oldest_live_run(
    nats_url: str, tmp_path: Path, outside: Client
) -> None:
    """Made for the first time, the consumer that keeps a waited-for type's events
    from outside does not read the stream from its start (millions of old messages,
    and old events a wait would take for new ones): it starts at the oldest run not
    final (less the clocks' skew), so an event published after that run started and
    before any wait began (before any worker ran) is still seen, and an older one is
    not read at all."""
    name = app_name("waits")
    broker = nats_broker(nats_url, clock_skew=0.5)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)

    @app.workflow
    async def approval(ctx: WorkflowContext, order_id: str) -> Any:
        ev = await ctx.wait_for_event("invoice.approved", match={"order_id": order_id}, timeout=20)
        return ev.id

    names = broker.names(name)
    async with streams_removed(nats_url, name):
        async with app.client():  # no worker yet: nothing keeps invoice.approved
            await put(
                outside, broker, name, cloudevent("invoice.approved", {"order_id": "o1"}, "old-1")
            )
            await asyncio.sleep(1.0)  # older than any run by more than the skew
            run = await app.start(approval, "o1")
            await put(
                outside, broker, name, cloudevent("invoice.approved", {"order_id": "o1"}, "new-1")
            )
        async with app:  # the worker: the consumer is made now
            assert await run.result(timeout=15) == "new-1"
            info = await outside.jetstream().consumer_info(
                names.stream, names.outside("invoice.approved")
            )
            assert info.config.deliver_policy == DeliverPolicy.BY_START_TIME
            assert info.delivered.stream_seq == 2  # new-1 only (old-1 is 1)
            assert await app.store.get_event(name, "old-1") is None


async def test_a_consumer_made_meanwhile_by_another_worker_with_its_own_start_is_used(
    nats_url: str, tmp_path: Path, outside: Client
) -> None:
    """Two workers make a type's consumer at once, each with the start it worked out
    (a moment apart): the server refuses the second ("start time can not be updated"),
    which then uses the first's rather than failing its pull loop."""
    name = app_name("waits")
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)
    names = broker.names(name)
    durable = names.outside("invoice.approved")
    subject = names.event("invoice.approved")
    first = time.time() - 5.0

    async def made_meanwhile() -> float:
        """The other worker makes it while this one works out its start."""
        await outside.jetstream().add_consumer(names.stream, ConsumerConfig(
            name=durable, durable_name=durable, filter_subject=subject,
            ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.BY_START_TIME,
            opt_start_time=datetime.datetime.fromtimestamp(first, datetime.UTC)))
        return first + 1.0

    async with streams_removed(nats_url, name), app.client():
        assert await broker._consumer(name, durable, subject, made_meanwhile) == names.stream
        info = await outside.jetstream().consumer_info(names.stream, durable)
    assert info.config.opt_start_time is not None
    assert abs(info.config.opt_start_time.timestamp() - first) < 0.01
