"""The outbox relay: committed events reach an external broker, at least once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import nats
import nats.js.errors
import pytest

from cantata.broker.base import BrokerMessage
from cantata.broker.nats import NatsBroker, stream_name
from cantata.choreography.relay import OutboxRelay, relay_once
from cantata.errors import BrokerError
from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import Declaration
from cantata.store.base import Store
from cantata.store.factory import store_from_url
from tests.helpers import eventually, with_schema

APP = "shop"


def events(n: int, event_type: str = "order.placed") -> list[Event[Any]]:
    return [Event(type=event_type, data={"n": i}) for i in range(n)]


class RecordingBroker:
    """An external broker that only records what it is given (and can be down)."""

    url = "recording://"
    relays_outbox = True

    def __init__(self) -> None:
        self.published: list[str] = []
        self.down = False

    async def publish(self, app: str, evs: Sequence[Event[Any]]) -> None:
        if self.down:
            raise BrokerError("recording broker is down")
        self.published.extend(e.id for e in evs)


class CrashBeforeMark:
    """A store whose process "dies" between publishing and marking published."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        raise RuntimeError("killed before marking")


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s = store_from_url("memory://")
    await s.open()
    yield s
    await s.close()


# -- without a server -----------------------------------------------------------------


async def test_relay_once_publishes_in_order_and_marks(store: Store) -> None:
    broker = RecordingBroker()
    sent = events(5)
    await store.append_events(APP, sent)
    assert await relay_once(store, broker, APP, limit=3) == 3  # type: ignore[arg-type]
    assert await relay_once(store, broker, APP, limit=3) == 2  # type: ignore[arg-type]
    assert await relay_once(store, broker, APP, limit=3) == 0  # type: ignore[arg-type]
    assert broker.published == [e.id for e in sent]
    assert await store.unpublished_events(APP, limit=10) == []


async def test_relay_once_marks_nothing_when_the_broker_fails(store: Store) -> None:
    broker = RecordingBroker()
    broker.down = True
    await store.append_events(APP, events(2))
    with pytest.raises(BrokerError):
        await relay_once(store, broker, APP)  # type: ignore[arg-type]
    assert len(await store.unpublished_events(APP, limit=10)) == 2


async def test_relay_is_woken_by_new_events_and_survives_an_outage(store: Store) -> None:
    broker = RecordingBroker()
    relay = OutboxRelay(store, broker, APP, poll_interval=30)  # type: ignore[arg-type]
    await relay.start()
    try:
        [first] = events(1)
        await store.append_events(APP, [first])
        await eventually(lambda: broker.published == [first.id], 5.0, "the store's notification")
        broker.down = True
        [second] = events(1)
        await store.append_events(APP, [second])
        await asyncio.sleep(0.1)
        broker.down = False
        relay.wake()
        await eventually(lambda: broker.published == [first.id, second.id], 5.0, "the retry")
    finally:
        await relay.stop()
    assert await store.unpublished_events(APP, limit=10) == []


class HoldingBroker(RecordingBroker):
    """A recording broker whose worker held every delivery of the events in ``local``."""

    def __init__(self, local: set[str]) -> None:
        super().__init__()
        self.local = local
        self.times: dict[str, float] = {}

    def held_here(self, event_id: str) -> bool:
        return event_id in self.local

    async def publish(self, app: str, evs: Sequence[Event[Any]]) -> None:
        await super().publish(app, evs)
        for e in evs:
            self.times[e.id] = time.monotonic()


async def test_offered_events_held_here_are_published_a_moment_later_in_a_batch(
    store: Store,
) -> None:
    held, other = events(2)
    broker = HoldingBroker({held.id})
    relay = OutboxRelay(store, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        offer_delay=0.2, read_delay=0.0)
    await relay.start()
    try:
        await store.append_events(APP, [held, other])
        offered = time.monotonic()
        relay.offer([held, other])
        # the other one at once (and the outbox read leaves the held one for later)
        await eventually(lambda: other.id in broker.published, 5.0, "the other event")
        assert held.id not in broker.published
        await eventually(lambda: held.id in broker.published, 5.0, "the held event")
        assert broker.times[held.id] - offered >= 0.15
    finally:
        await relay.stop()
    assert broker.published.count(held.id) == 1
    assert await store.unpublished_events(APP, limit=10) == []


class CountingReads:
    """A store that counts the relay's outbox reads."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        self.reads += 1
        return await self._store.unpublished_events(app, limit=limit)


async def test_commits_of_held_offered_events_do_not_each_read_the_outbox(
    store: Store,
) -> None:
    # A chain of hops handed off here: each commit wakes the relay, and what it stored
    # was offered (held: published a moment later). The outbox read (for what else the
    # commit stored) waits mark_delay after a read that found nothing new, as it does
    # after events published at once: not one read per hop.
    chain = events(10)
    broker = HoldingBroker({e.id for e in chain})
    counting = CountingReads(store)
    relay = OutboxRelay(counting, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        offer_delay=0.05, mark_delay=2.0)
    await relay.start()
    try:
        await asyncio.sleep(0.05)  # the first pass's read
        before = counting.reads
        for e in chain:
            await store.append_events(APP, [e])
            relay.offer([e])
            await asyncio.sleep(0.01)
        await eventually(lambda: len(broker.published) == len(chain), 5.0, "the held events")
        assert counting.reads - before <= 1
    finally:
        await relay.stop()
    assert sorted(broker.published) == sorted(e.id for e in chain)
    assert await store.unpublished_events(APP, limit=10) == []


class CountingPasses(OutboxRelay):
    """A relay that counts its passes (each a turn of its task)."""

    passes = 0

    async def _pass(self) -> int:
        self.passes += 1
        return await super()._pass()


async def test_commits_of_held_offered_events_wake_no_pass_of_the_relay_each(
    store: Store,
) -> None:
    # A chain of hops handed off here: each commit is heard, and what it stored is
    # offered (held: published a moment later) as its committer resumes. Nothing is to
    # be done before then but the outbox read already put off: no pass of the relay's
    # task per hop (it ran between a hop's commit and the next hop's handler).
    chain = events(10)
    broker = HoldingBroker({e.id for e in chain})
    # (the held events are due offer_delay after their offer: long enough that the ten
    # commits of a loaded machine all come before, when a pass is right to run)
    relay = CountingPasses(store, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                           offer_delay=3.0, mark_delay=6.0)
    await relay.start()
    try:
        await eventually(lambda: relay.passes == 1, 5.0, "the first pass")
        await asyncio.sleep(0.01)
        began = asyncio.get_running_loop().time()
        for e in chain:
            await store.append_events(APP, [e])
            relay.offer([e])
            await asyncio.sleep(0.01)
        assert asyncio.get_running_loop().time() - began < 3.0, "too slow to tell"
        assert relay.passes == 1
        await eventually(lambda: len(broker.published) == len(chain), 10.0, "the held events")
    finally:
        await relay.stop()
    assert sorted(broker.published) == sorted(e.id for e in chain)
    assert await store.unpublished_events(APP, limit=10) == []


async def test_an_event_not_offered_after_held_hops_is_read_at_once(store: Store) -> None:
    # Hops whose events were offered and held put the outbox read off (mark_delay here);
    # a later commit whose event nobody offers (a workflow's, say) is read at once all
    # the same, not when the put-off read is due.
    chain = events(3)
    [lost] = events(1, "order.lost")
    broker = HoldingBroker({e.id for e in chain})
    relay = OutboxRelay(store, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        offer_delay=5.0, mark_delay=5.0)
    await relay.start()
    try:
        await asyncio.sleep(0.05)  # (its first read, of an empty outbox)
        for e in chain:
            await store.append_events(APP, [e])
            relay.offer([e])
            await asyncio.sleep(0.01)
        await store.append_events(APP, [lost])
        await eventually(lambda: lost.id in broker.published, 1.0, "the event not offered")
        assert not set(broker.published) & {e.id for e in chain}  # (held back still)
    finally:
        await relay.stop()


async def test_held_events_published_before_their_delay_wake_no_later_outbox_read(
    store: Store,
) -> None:
    # A full batch of held events goes out at once, before offer_delay has passed: the
    # moment they were due then wakes nothing (it used to wake a pass that found nothing
    # offered and read the outbox; under load the same happened when the wait for them
    # ended a loop turn before that wake-up).
    chain = events(5)
    broker = HoldingBroker({e.id for e in chain})
    counting = CountingReads(store)
    relay = OutboxRelay(counting, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        batch=5, offer_delay=0.2, mark_delay=5.0)
    await relay.start()
    try:
        await eventually(lambda: counting.reads == 1, 5.0, "the first pass's read")
        for e in chain:
            await store.append_events(APP, [e])
            relay.offer([e])
        await eventually(lambda: len(broker.published) == len(chain), 5.0, "the full batch")
        # (the moment the first was due comes before this sleep ends: asyncio runs the
        # earlier timer first, whatever the load)
        await asyncio.sleep(0.3)
        assert counting.reads == 1
    finally:
        await relay.stop()
    assert sorted(broker.published) == sorted(e.id for e in chain)


class GatedBroker(HoldingBroker):
    """A holding broker whose publish waits until the test opens its gate."""

    def __init__(self, local: set[str]) -> None:
        super().__init__(local)
        self.gate = asyncio.Event()
        self.waiting = False

    async def publish(self, app: str, evs: Sequence[Event[Any]]) -> None:
        self.waiting = True
        await self.gate.wait()
        self.waiting = False
        await super().publish(app, evs)


async def test_a_commit_heard_while_the_relay_runs_is_offered_before_it_reads(
    store: Store,
) -> None:
    # A hop commits while the relay is publishing held events (as under load): the
    # commit's notification comes before the committer resumes to offer what it stored,
    # and the relay, already running, would have read the outbox for those events.
    first, hop = events(2)
    broker = GatedBroker({first.id, hop.id})
    counting = CountingReads(store)
    relay = OutboxRelay(counting, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        offer_delay=0.05, mark_delay=5.0)
    await relay.start()
    try:
        await eventually(lambda: counting.reads == 1, 5.0, "the first pass's read")
        await store.append_events(APP, [first])
        relay.offer([first])
        await eventually(lambda: broker.waiting, 5.0, "the held event's publish")

        async def commit_and_offer() -> None:  # a hop: commit, then offer what it stored
            await store.append_events(APP, [hop])
            relay.offer([hop])

        committer = asyncio.create_task(commit_and_offer())
        await asyncio.sleep(0)  # (its write is submitted: committed in the next turn)
        broker.gate.set()  # the relay runs on in the same turn as the commit
        await committer
        await eventually(lambda: len(broker.published) == 2, 5.0, "both events")
        assert counting.reads == 1
    finally:
        await relay.stop()
    assert sorted(broker.published) == sorted([first.id, hop.id])


@pytest.mark.parametrize("held", [False, True], ids=["at-once", "held-here"])
async def test_an_event_read_from_the_outbox_before_its_offer_is_published_once(
    store: Store, held: bool,
) -> None:
    # Under load a hop's committer resumes to offer what it stored well after the
    # commit's notification: the relay has read the event from the outbox, published
    # it and marked it by then. The late offer must not publish it a second time (each
    # event counted twice in cantata_events_relayed_total, a publish for nothing).
    [hop] = events(1)
    broker = HoldingBroker({hop.id} if held else set())
    relay = OutboxRelay(store, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        mark_delay=0.01, offer_delay=0.01, read_delay=0.0)
    await relay.start()
    try:
        await store.append_events(APP, [hop])  # heard: read, published, then marked
        await eventually(lambda: broker.published == [hop.id], 5.0, "the outbox read")
        for _ in range(500):  # (marked mark_delay after the publish)
            if not await store.unpublished_events(APP, limit=10):
                break
            await asyncio.sleep(0.01)
        assert await store.unpublished_events(APP, limit=10) == []
        relay.offer([hop])  # its committer resumes at last
        await asyncio.sleep(0.1)  # (ten offer_delays: a second publish comes before)
    finally:
        await relay.stop()
    assert broker.published == [hop.id]


class Unheard:
    """A store whose commits do not wake the relay (it reads on offers and polls)."""

    def __init__(self, store: Store) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    def add_listener(self, listener: Any) -> None:
        pass


async def test_an_event_not_offered_behind_a_batch_of_offered_ones_is_published_all_the_same(
    store: Store,
) -> None:
    # The outbox read returns the oldest `batch` rows only: here all of them offered
    # (published and not yet marked, or held back). The one behind them, committed in
    # this process but never offered (say its offer was lost), is found once they
    # left the outbox.
    at_once, held = events(3), events(4)
    [lost] = events(1, "order.lost")
    broker = HoldingBroker({e.id for e in held})
    relay = OutboxRelay(Unheard(store), broker, APP,  # type: ignore[arg-type]
                        poll_interval=0.05, batch=5, offer_delay=0.3, mark_delay=0.3)
    await relay.start()
    try:
        await asyncio.sleep(0.05)  # (its first read, of an empty outbox)
        await store.append_events(APP, [*at_once, *held, lost])
        relay.offer([*at_once, *held])
        await asyncio.sleep(0.15)  # reads every 0.05 s, of the first 5 rows
        assert sorted(broker.published) == sorted(e.id for e in at_once)  # (not seen yet)
        await eventually(lambda: len(broker.published) == 8, 5.0, "the event not offered")
    finally:
        await relay.stop()
    assert sorted(broker.published) == sorted(e.id for e in [*at_once, *held, lost])
    assert await store.unpublished_events(APP, limit=20) == []


async def test_a_relay_stopped_before_the_delay_publishes_what_it_held_back(
    store: Store,
) -> None:
    [held] = events(1)
    broker = HoldingBroker({held.id})
    relay = OutboxRelay(store, broker, APP, poll_interval=30,  # type: ignore[arg-type]
                        offer_delay=30.0)
    await relay.start()
    await store.append_events(APP, [held])
    relay.offer([held])
    await relay.stop()
    assert broker.published == [held.id]
    assert await store.unpublished_events(APP, limit=10) == []


async def test_a_relay_stopped_before_its_first_pass_on_an_unreached_nats_says_nothing(
    store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that publishes and exits at once (its relay stopped before its first
    pass, as under load) while NATS is unreachable: the broker's open said so once, the
    event waits in the outbox, and stopping the relay adds no second warning."""
    broker = NatsBroker("nats://127.0.0.1:1", connect_attempts=1, reconnect_time_wait=30.0)
    await broker.open(store)
    try:
        relay = OutboxRelay(store, broker, APP, poll_interval=30)
        [event] = events(1)
        await store.append_events(APP, [event])
        caplog.clear()
        await relay.start()
        await relay.stop()  # (before the relay's task ran a pass)
        assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
        assert [e.id for e in await store.unpublished_events(APP, limit=10)] == [event.id]
    finally:
        await broker.close()


async def test_relay_polls_for_events_of_other_processes(tmp_path: Any) -> None:
    url = f"sqlite:///{tmp_path / 'cantata.db'}"
    mine, theirs = store_from_url(url), store_from_url(url)
    await mine.open()
    await theirs.open()
    broker = RecordingBroker()
    relay = OutboxRelay(mine, broker, APP, poll_interval=0.05)  # type: ignore[arg-type]
    await relay.start()
    try:
        [event] = events(1)
        await theirs.append_events(APP, [event])  # no notification reaches `mine`
        await eventually(lambda: broker.published == [event.id], 5.0, "the poll")
    finally:
        await relay.stop()
        await mine.close()
        await theirs.close()


@pytest.mark.postgres
async def test_a_listening_relay_reads_the_outbox_when_told(
    postgres_url: str, pooled_schema: str
) -> None:
    """On PostgreSQL another process's commit of events is heard: the relay reads the
    outbox then, not every poll interval while nothing happens (docs/performance.md,
    "Idle workers")."""
    url = with_schema(postgres_url, pooled_schema)
    mine, theirs = store_from_url(url), store_from_url(url)
    await mine.open()
    await theirs.open()
    broker = RecordingBroker()
    counting = CountingReads(mine)
    relay = OutboxRelay(counting, broker, APP, poll_interval=0.2)  # type: ignore[arg-type]
    await relay.start()
    try:
        await eventually(lambda: counting.reads == 1, 5.0, "the first pass's read")
        await asyncio.sleep(3.0)
        assert counting.reads == 1  # (15 more at the poll interval)
        [event] = events(1)
        committed = time.monotonic()
        await theirs.append_events(APP, [event])  # not offered to this relay
        await eventually(lambda: event.id in broker.published, 5.0, "the notification")
        assert time.monotonic() - committed < 0.5
    finally:
        await relay.stop()
        await mine.close()
        await theirs.close()


# -- with NATS ------------------------------------------------------------------------


@pytest.fixture
async def nats_broker(nats_url: str, store: Store) -> AsyncIterator[tuple[NatsBroker, str]]:
    broker = NatsBroker(nats_url, fetch_timeout=0.25)
    await broker.open(store)
    app = f"relay{new_id()[-10:]}"
    try:
        yield broker, app
    finally:
        await broker.close()  # stops the pull loops first: they would recreate the stream
        nc = await nats.connect(nats_url)
        try:
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await nc.jetstream().delete_stream(stream_name(app))
        finally:
            await nc.close()


class Counter:
    def __init__(self) -> None:
        self.calls: list[str] = []
        self.handled: list[str] = []

    async def __call__(self, msg: BrokerMessage) -> None:
        assert msg.event is not None
        self.calls.append(msg.event.id)
        if await msg.complete():
            self.handled.append(msg.event.id)


@pytest.mark.nats
async def test_committed_events_reach_nats_subscribers_through_the_relay(
    store: Store, nats_broker: tuple[NatsBroker, str]
) -> None:
    broker, app = nats_broker
    billing, shipping = Counter(), Counter()
    await store.declare(app, [Declaration("handler", "billing", "order.placed"),
                              Declaration("handler", "shipping", "order.*")])
    await broker.subscribe(app, "billing", ["order.placed"], billing, worker_id="w1")
    await broker.subscribe(app, "shipping", ["order.*"], shipping, worker_id="w1")
    relay = OutboxRelay(store, broker, app, poll_interval=0.05)
    await relay.start()
    try:
        sent = events(4)
        await store.append_events(app, sent)  # committed only: the relay does the rest
        ids = [e.id for e in sent]
        await eventually(lambda: sorted(billing.handled) == sorted(ids), 5.0, "billing")
        await eventually(lambda: sorted(shipping.handled) == sorted(ids), 5.0, "shipping")
    finally:
        await relay.stop()
    assert await store.unpublished_events(app, limit=10) == []


@pytest.mark.nats
async def test_relay_restarted_after_a_crash_before_marking_does_not_double_handle(
    store: Store, nats_broker: tuple[NatsBroker, str]
) -> None:
    broker, app = nats_broker
    billing = Counter()
    await store.declare(app, [Declaration("handler", "billing", "order.placed")])
    await broker.subscribe(app, "billing", ["order.placed"], billing, worker_id="w1")
    sent = events(3)
    ids = [e.id for e in sent]
    await store.append_events(app, sent)
    with pytest.raises(RuntimeError, match="killed"):
        await relay_once(CrashBeforeMark(store), broker, app)
    await eventually(lambda: sorted(billing.handled) == sorted(ids), 5.0, "the first publication")
    assert len(await store.unpublished_events(app, limit=10)) == 3  # never marked
    relay = OutboxRelay(store, broker, app, poll_interval=0.05)  # the restarted process
    await relay.start()
    try:
        async def all_marked() -> bool:
            return await store.unpublished_events(app, limit=10) == []

        deadline = time.monotonic() + 5
        while not await all_marked():
            assert time.monotonic() < deadline, "the restarted relay did not republish"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.5)  # a duplicate would arrive now
    finally:
        await relay.stop()
    assert sorted(billing.handled) == sorted(ids)
    assert sorted(billing.calls) == sorted(ids), "JetStream should drop the republished ids"
