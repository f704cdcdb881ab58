"""Waiting for a step's slot on PostgreSQL: the waiters sleep until the release's
notification (no fast polling: each asks the store once per ``poll_interval`` x 5 to
keep its place, the safety net for a lost notification), the next one begins at once
when the slot is freed, and a run whose remote step waits for a slot ends as soon as
it is cancelled or past its deadline (docs/flow-control.md).

Two worker Apps share one store (each its own worker id and listener, as two
processes would).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import cantata
from cantata import App, WorkflowContext
from tests.flow.helpers import until
from tests.helpers import with_schema

POLL = 0.2  # the default: a waiter's asking period (its safety poll) is 1 s


@pytest.fixture
def pg_url(postgres_url: str, pooled_schema: str) -> str:
    return with_schema(postgres_url, pooled_schema)


class Asks:
    """Counts the slot requests of the given Apps' stores, with their times."""

    def __init__(self, *apps: App) -> None:
        self.times: list[float] = []
        self.answered = 0  # requests the store has answered (a waiter: registered)
        for app in apps:
            self._wrap(app.store)

    def _wrap(self, store: Any) -> None:
        acquire = store.acquire_slot

        async def counted(*args: Any, **kw: Any) -> Any:
            self.times.append(time.monotonic())
            try:
                return await acquire(*args, **kw)
            finally:
                self.answered += 1

        store.acquire_slot = counted

    def since(self, t: float) -> int:
        return sum(1 for x in self.times if x >= t)


def worker(url: str, begins: list[tuple[str, float]], hold: asyncio.Event) -> App:
    """A worker of app ``wake``: step ``pay`` (one at a time across the cluster) notes
    each begin; the run keyed ``holder`` keeps its slot until ``hold`` is set."""
    app = App("wake", store=url, broker="embedded", poll_interval=POLL, shutdown_grace=1.0)

    @app.step(concurrency=1)
    async def pay(key: str) -> str:
        begins.append((key, time.monotonic()))
        if key == "holder":
            await hold.wait()
        return key

    @app.workflow
    async def order(ctx: WorkflowContext, key: str) -> str:
        return str(await ctx.run(pay, key))

    return app


def waiting(app: App) -> int:
    assert app.engine.flow is not None
    return len(app.engine.flow.slot_waiters)


async def _two_waiting(first: App, second: App, begins: list[tuple[str, float]]
                       ) -> list[cantata.RunHandle]:
    """The holder in ``first``, two waiters in ``second`` (the first two in line)."""
    handles = [await first.start("order", "holder")]
    await until(lambda: [k for k, _ in begins] == ["holder"])
    handles.append(await second.start("order", "next"))
    await until(lambda: waiting(second) == 1)
    handles.append(await second.start("order", "after"))
    await until(lambda: waiting(second) == 2)
    return handles


@pytest.mark.postgres
async def test_waiters_sleep_until_the_release_then_the_next_begins_at_once(
    pg_url: str,
) -> None:
    begins: list[tuple[str, float]] = []
    hold = asyncio.Event()
    first, second = worker(pg_url, begins, hold), worker(pg_url, begins, hold)
    async with first, second:
        asks = Asks(first, second)
        handles = await _two_waiting(first, second, begins)
        t0 = time.monotonic()
        await asyncio.sleep(3.0)
        asked = asks.since(t0)
        released: list[float] = []
        release = first.store.release_slot

        async def noted(*args: Any, **kw: Any) -> None:
            await release(*args, **kw)
            released.append(time.monotonic())

        first.store.release_slot = noted  # type: ignore[method-assign]
        hold.set()
        assert [await h.result(timeout=30) for h in handles] == ["holder", "next", "after"]
    # Two waiters, each asking once a second (1 s = POLL x 5) to keep its place, not the
    # first two in line 5 times a second each (30 requests in 3 s).
    assert asked <= 9, f"the 2 waiters asked {asked} times in 3 s: they poll fast"
    woke = dict(begins)["next"] - released[0]
    assert woke < 0.5, f"the next waiter began {woke:.2f} s after the release"


@pytest.mark.postgres
async def test_a_release_whose_notification_is_lost_is_found_by_the_slow_poll(
    pg_url: str, postgres_url: str, pooled_schema: str
) -> None:
    """A slot freed with no notification (here: its row deleted behind the store's back)
    is taken by the next waiter at its next ask, within the asking period (1 s)."""
    begins: list[tuple[str, float]] = []
    hold = asyncio.Event()
    first, second = worker(pg_url, begins, hold), worker(pg_url, begins, hold)
    async with first, second:
        asks = Asks(first, second)
        handles = await _two_waiting(first, second, begins)
        t0 = time.monotonic()
        await asyncio.sleep(2.0)
        asked = asks.since(t0)
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'DELETE FROM "{pooled_schema}".flow_slots')  # no NOTIFY
        finally:
            await conn.close()
        freed = time.monotonic()
        await until(lambda: "next" in dict(begins), timeout=10)
        found = dict(begins)["next"] - freed
        hold.set()
        assert [await h.result(timeout=30) for h in handles] == ["holder", "next", "after"]
    # Slowly: one ask per waiter and second (a fast poll: 5 per second for each).
    assert asked <= 6, f"the 2 waiters asked {asked} times in 2 s: they poll fast"
    assert found < 1.5, f"the freed slot was found {found:.2f} s later"


@pytest.mark.postgres
@pytest.mark.parametrize("stop", ["cancel", "deadline"])
async def test_a_run_whose_remote_step_waits_for_a_slot_ends_promptly(
    pg_url: str, stop: str
) -> None:
    """The slot wait of a remote step (a task at its service's worker) ends when the
    run's cancel is notified, or at the run's deadline: the run ends well within a
    second, not at the worker's next periodic look at the run (every 5 s here:
    ``poll_interval`` 1 s x 5, for a waiter behind two others). (The two services'
    workers are as two processes: on SQLite neither would hear the other's cancel, nor
    the run its task given back, before their next poll.)"""
    hold = asyncio.Event()
    calls: list[str] = []
    opts: dict[str, Any] = {"poll_interval": 1.0, "lease": 20.0, "shutdown_grace": 0.2}
    orders = App("shop", store=pg_url, services=["orders"], **opts)
    inventory = App("shop", store=pg_url, services=["inventory"], **opts)

    @inventory.step(service="inventory", concurrency=1)
    async def reserve(key: str) -> str:
        calls.append(key)
        if key == "holder":
            await hold.wait()
        return key

    @orders.workflow(service="orders")
    async def place(ctx: WorkflowContext, key: str) -> str:
        return str(await ctx.run("inventory.reserve", key))

    async with inventory, orders:
        holder = await orders.start(place, "holder")
        await until(lambda: calls == ["holder"])
        asks = Asks(inventory)
        ahead: list[cantata.RunHandle] = []
        for i in range(2):  # one after the other: each waits behind the one before
            ahead.append(await orders.start(place, f"ahead-{i}"))
            await until(lambda: asks.answered >= len(ahead))  # its task waits in line
        deadline = 2.5 if stop == "deadline" else None
        doomed = await orders.start(place, "doomed", deadline=deadline)
        await until(lambda: asks.answered >= 3)  # its task waits too, third in line
        if stop == "cancel":
            await asyncio.sleep(0.3)
            stopped = time.monotonic()
            await doomed.cancel()
        else:
            assert doomed.run_id
            run = await orders.store.get_run(orders.name, doomed.run_id)
            assert run is not None and run.deadline_at is not None
            stopped = time.monotonic() + (run.deadline_at - time.time())
        with pytest.raises(cantata.WorkflowError,
                           match="cancelled" if stop == "cancel" else "DeadlineExceeded"):
            await doomed.result(timeout=20)
        ended = time.monotonic() - stopped
        hold.set()
        assert [await h.result(timeout=20) for h in [holder, *ahead]] == [
            "holder", "ahead-0", "ahead-1"]
    assert calls == ["holder", "ahead-0", "ahead-1"]
    assert ended < 1.0, f"the run ended {ended:.2f} s after its {stop}"
