"""The local hand-off (docs/performance.md): an event a handler emits goes at once to
this process's handler of the next group, and nothing is given up for it: the effect
stays exactly once (the broker's own copy is dropped), a failed hand-off waits for its
retry delay, and a worker killed in the middle of one has the event delivered again.
Embedded: always on; NATS: on unless ``?handoff=0`` (see the last test); several
workers: tests/faults/test_handoff.py."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

import cantata
from cantata import Retry
from cantata.broker.factory import broker_from_url
from cantata.broker.nats import NatsBroker
from cantata.errors import ConfigurationError, StoreUnavailable
from cantata.model.records import DELIVERY_DONE
from cantata.store.base import Settlement, Store
from cantata.store.factory import store_from_url
from tests.choreography.handoff_worker import build_app, spy_on_hand_off
from tests.choreography.helpers import SETTLE, events_of_type, eventually, make_app

SCRIPT = Path(__file__).with_name("handoff_worker.py")


@pytest.fixture(params=["embedded", pytest.param("nats", marks=pytest.mark.nats)])
def backends(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """(store URL, broker URL): a SQLite file with the embedded broker or with NATS (a
    name space of its own on the server)."""
    store = f"sqlite:///{tmp_path}/handoff.db"
    if request.param == "embedded":
        return store, "embedded"
    url = request.getfixturevalue("nats_url")
    return store, f"{url}?prefix=h{uuid.uuid4().hex[:10]}"


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


async def _broker_copy_acked(app: cantata.App, group: str, pattern: str) -> bool:
    """Whether NATS delivered the group's copy and it was acked (nothing outstanding)."""
    broker = app._broker
    assert isinstance(broker, NatsBroker)
    names = broker.names(app.name)
    nc = await nats.connect(broker.url.split("?")[0])
    try:
        info = await nc.jetstream().consumer_info(names.stream, names.consumer(group, pattern))
    finally:
        await nc.close()
    return bool(info.delivered.stream_seq and not info.num_pending
                and not info.num_ack_pending)


async def test_a_handed_off_event_is_handled_once_and_the_broker_copy_changes_nothing(
    backends: tuple[str, str], markers: Path
) -> None:
    store, broker = backends
    charged: list[cantata.Event[Any]] = []
    app = build_app(store, broker, markers, hang=False, on_charge=charged.append)
    async with app:
        spy_on_hand_off(app, markers)
        await app.publish("order.placed", {"order_id": 1})
        await eventually(lambda: charged, what="the hand-off to charge")
        if broker != "embedded":
            await eventually(
                lambda: _broker_copy_acked(app, "payment", "inventory.reserved"),
                what="NATS's own copy delivered and acked",
            )
        await asyncio.sleep(SETTLE)
        logged = await events_of_type(app, "payment.charged")
        rows = await app.store.deliveries(app.name, charged[0].id)

    assert (markers / "handed-off").exists(), "the event was not handed off"
    assert len(charged) == 1  # the broker's copy did not run the handler again
    assert [e.data["order_id"] for e in logged] == [1]
    [row] = [r for r in rows if r.group == "payment"]
    assert (row.status, row.attempts) == (DELIVERY_DONE, 1)


async def test_a_published_event_is_held_and_handed_off_to_its_first_group(
    backends: tuple[str, str],
) -> None:
    store, broker = backends
    app = make_app(store, broker=broker)
    reserved: list[cantata.Event[Any]] = []
    handed: list[tuple[str, str]] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None:
        reserved.append(event)

    async with app:
        real = app._broker.handed  # type: ignore[union-attr]

        def spy(by: Any, events: Any, held: Any, **kw: Any) -> None:
            handed.extend(held)
            real(by, events, held, **kw)

        app._broker.handed = spy  # type: ignore[union-attr]
        placed = await app.publish("order.placed", {"order_id": 5})
        await eventually(lambda: reserved, what="the hand-off to reserve")
        if broker != "embedded":
            await eventually(
                lambda: _broker_copy_acked(app, "inventory", "order.placed"),
                what="NATS's own copy delivered and acked",
            )
        await asyncio.sleep(SETTLE)
        [row] = await app.store.deliveries(app.name, placed.id)

    assert handed == [("inventory", placed.id)], "the published event was not held"
    assert len(reserved) == 1
    assert (row.status, row.attempts) == (DELIVERY_DONE, 1)


async def test_a_failed_hand_off_is_retried_after_its_delay_not_by_the_broker_copy(
    backends: tuple[str, str],
) -> None:
    store, broker = backends
    app = make_app(store, broker=broker)
    calls: list[float] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {})

    @app.on("inventory.reserved", group="payment",
            retry=Retry(max_attempts=3, initial_interval=0.8, backoff=1.0))
    async def charge(event: cantata.Event[Any]) -> None:
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise RuntimeError("gateway down")

    async with app:
        await app.publish("order.placed", {})
        await eventually(lambda: len(calls) >= 2, what="the retry")
        await asyncio.sleep(SETTLE)

    assert len(calls) == 2
    assert calls[1] - calls[0] >= 0.7, f"retried after {calls[1] - calls[0]:.2f} s, not 0.8 s"


@pytest.mark.nats
async def test_a_broker_copy_that_comes_before_the_hand_off_starts_is_the_first_attempt(
    nats_url: str, tmp_path: Path
) -> None:
    """The relay may publish an event, and NATS deliver it here, between the commit that
    held its delivery for this worker and the hand-off's start: that copy (or the
    hand-off, whichever runs) is the first attempt. Counted as a second, a handler
    allowed one attempt was dead-lettered as "cut short by a crash" without running."""
    broker = f"{nats_url}?prefix=h{uuid.uuid4().hex[:10]}"
    app = make_app(f"sqlite:///{tmp_path}/early.db", broker=broker)
    attempts: list[int] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {})

    @app.on("inventory.reserved", group="payment", retry=Retry(max_attempts=1))
    async def charge(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        attempts.append(ctx.attempt)

    async with app:
        nats_broker = app._broker
        assert isinstance(nats_broker, NatsBroker)
        real = nats_broker.handed

        def late(*args: Any, **kw: Any) -> None:  # the relay's copy comes first
            asyncio.get_running_loop().call_later(1.0, lambda: real(*args, **kw))

        nats_broker.handed = late  # type: ignore[method-assign]
        await app.publish("order.placed", {})
        await eventually(lambda: attempts, what="charge")
        await asyncio.sleep(1.5)
        [reserved] = await events_of_type(app, "inventory.reserved")
        [row] = [r for r in await app.store.deliveries(app.name, reserved.id)
                 if r.group == "payment"]
        dead = await app.store.dead_letters(app.name)

    assert attempts == [1]
    assert (row.status, row.attempts) == (DELIVERY_DONE, 1)
    assert not dead


class Worker:
    """The subprocess, so a failing test never leaves it running."""

    def __init__(self, store: str, broker: str, markers: Path, log: Path) -> None:
        self.markers = markers
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), store, broker, str(markers)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    async def wait_for(self, marker: str, timeout: float = 30.0) -> str:
        path = self.markers / marker

        def ready() -> bool:
            if self.proc.poll() is not None:
                self.log.flush()
                raise AssertionError(f"worker exited with {self.proc.returncode}: "
                                     f"{Path(self.log.name).read_text(errors='replace')}")
            return path.exists()

        await eventually(ready, timeout=timeout, what=f"marker {marker}")
        return path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def worker(backends: tuple[str, str], markers: Path, tmp_path: Path) -> Iterator[Worker]:
    w = Worker(*backends, markers, tmp_path / "worker.log")
    yield w
    w.kill()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")
async def test_a_worker_killed_between_the_hand_off_and_its_commit_gets_it_again(
    backends: tuple[str, str], markers: Path, worker: Worker
) -> None:
    store, broker = backends
    await worker.wait_for("ready")
    api = build_app(store, broker, markers, hang=False)
    async with api.client():
        placed = await api.publish("order.placed", {"order_id": 7})
    reserved_id = await worker.wait_for(f"in-charge-{worker.proc.pid}")
    assert (markers / "handed-off").exists(), "charge did not start from the hand-off"
    worker.kill()  # after the hand-off, before charge's commit: nothing was committed

    charged: list[cantata.Event[Any]] = []
    fresh = build_app(store, broker, markers, hang=False, on_charge=charged.append)
    async with fresh:
        await eventually(lambda: charged, timeout=30, what="the event delivered again")
        await asyncio.sleep(SETTLE + 0.5)
        logged = await events_of_type(fresh, "payment.charged")

    [event] = charged
    assert event.id == reserved_id and event.correlation_id == placed.id
    # exactly one effect, the fresh worker's: the killed worker's emit never landed
    assert [e.data for e in logged] == [{"order_id": 7, "pid": os.getpid()}]


class LostAfterCommit:
    """A real store whose first settlement that holds deliveries commits, then reports a
    lost connection (as a PostgreSQL connection dropped after COMMIT would)."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.url = inner.url
        self.lost = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        done = await self._inner.settle_delivery(app, group, event_id, settlement)
        if settlement.hold and not self.lost:
            self.lost += 1
            raise StoreUnavailable("connection lost after COMMIT (injected)")
        return done


async def test_deliveries_held_by_a_settlement_that_seemed_to_fail_are_not_stranded(
    backends: tuple[str, str], markers: Path
) -> None:
    url, broker = backends
    store = LostAfterCommit(store_from_url(url))
    charged: list[cantata.Event[Any]] = []
    app = cantata.App("shop", store=store, broker=broker,
                      lease=30.0, poll_interval=0.05)
    app.include(_router(charged))
    async with app:
        await app.publish("order.placed", {"order_id": 3})
        # The worker lives on (lease 30 s): the held delivery is found and handled now.
        await eventually(lambda: charged, timeout=5, what="the held delivery handled")
        await asyncio.sleep(SETTLE)
        logged = await events_of_type(app, "payment.charged")
    assert store.lost == 1
    assert len(charged) == 1
    assert [e.data["order_id"] for e in logged] == [3]


def _router(charged: list[cantata.Event[Any]]) -> cantata.Router:
    router = cantata.Router()

    @router.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})

    @router.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        charged.append(event)
        await ctx.emit("payment.charged", {"order_id": event.data["order_id"]})

    return router


def test_the_nats_hand_off_is_on_unless_turned_off() -> None:
    # On by default: the settlement holds the deliveries it hands off for this worker,
    # so NATS's copy reaching another worker waits (tests/faults/test_handoff.py).
    assert broker_from_url("nats://127.0.0.1:4222").local_hand_off is True  # type: ignore[attr-defined]
    off = broker_from_url("nats://127.0.0.1:4222?prefix=p&handoff=0")
    assert off.local_hand_off is False  # type: ignore[attr-defined]
    with pytest.raises(ConfigurationError, match="handoff must be 0 or 1"):
        broker_from_url("nats://127.0.0.1:4222?handoff=yes")


def _counting_claims(app: cantata.App) -> list[str]:
    """The groups of every claim the embedded broker makes from now on."""
    store = app.store
    real = store.claim_deliveries
    claims: list[str] = []

    async def claim(app_name: str, worker_id: str, groups: Any, **kw: Any) -> Any:
        claims.extend(groups)
        return await real(app_name, worker_id, groups, **kw)

    store.claim_deliveries = claim  # type: ignore[method-assign, assignment]
    return claims


async def test_a_chain_handed_off_in_the_process_makes_no_claim(tmp_path: Path) -> None:
    """Every hop's settlement holds the next hop's delivery for this worker and hands
    it off: the commit does not wake the consumers to look for work in the store (a
    claim that would find nothing, and delay the next commit)."""
    app = make_app(f"sqlite:///{tmp_path}/quiet.db", lease=60, poll_interval=30)
    shipped: list[float] = []

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {})

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any], ctx: cantata.HandlerContext) -> None:
        await ctx.emit("payment.charged", {})

    @app.on("payment.charged", group="shipping")
    async def ship(event: cantata.Event[Any]) -> None:
        shipped.append(time.monotonic())

    async with app:
        await asyncio.sleep(0.3)  # the consumers' first looks are done
        claims = _counting_claims(app)
        began = time.monotonic()
        for _ in range(3):
            await app.publish("order.placed", {})
        await eventually(lambda: len(shipped) == 3, what="three orders shipped")
        await asyncio.sleep(0.2)

    assert claims == []
    assert shipped[-1] - began < 5, "the chain waited for a poll"


async def test_deliveries_not_held_here_still_wake_the_consumers(tmp_path: Path) -> None:
    """With a poll every 30 s, what the hand-off does not hold is claimed at once: an
    event a workflow emits, and events published while the group had no room (one
    handler at a time), claimed as the handler before them ends."""
    app = make_app(f"sqlite:///{tmp_path}/wake.db", lease=60, poll_interval=30,
                   concurrency=1)
    seen: list[str] = []
    gate = asyncio.Event()

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any]) -> None:
        await gate.wait()
        seen.append(event.type)

    @app.on("invoice.sent", group="billing")
    async def bill(event: cantata.Event[Any]) -> None:
        seen.append(event.type)

    @app.workflow
    async def invoice(ctx: cantata.WorkflowContext) -> None:
        await ctx.emit("invoice.sent", {})

    async with app:
        await asyncio.sleep(0.3)
        began = time.monotonic()
        await app.start("invoice")
        await eventually(lambda: seen, timeout=10, what="the workflow's event handled")
        emitted = time.monotonic() - began
        for i in range(4):  # the first is held and handed off; it waits for the gate
            await app.publish("order.placed", {"n": i})
        await asyncio.sleep(0.2)
        began = time.monotonic()
        gate.set()
        await eventually(lambda: len(seen) == 5, timeout=10, what="all four orders handled")
        placed = time.monotonic() - began

    assert seen == ["invoice.sent"] + ["order.placed"] * 4
    assert emitted < 5, f"the workflow's event took {emitted:.1f} s: it waited for the poll"
    assert placed < 5, f"the orders took {placed:.1f} s: they waited for the poll"
