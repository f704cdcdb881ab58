"""An idle worker on PostgreSQL waits for the store's notifications instead of polling
(docs/performance.md, "Idle workers"): it sends few statements, still takes work
started by another process at once, and when its listening connection is killed, or
goes silent without being closed, it takes work all the same and listens again."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import cantata
from cantata import App, Event, HandlerContext
from cantata.testing.wait import eventually
from tests.helpers import watch_claims, with_schema
from tests.stall_proxy import stall_proxy

pytestmark = pytest.mark.postgres

# Seconds from a start's commit to its run taken that count as "at once": woken by the
# notification, a claim's round trips and its 50 ms to coalesce a burst take far less on
# a quiet machine (tens of ms), but a loaded CI machine was seen holding one claim 0.45 s.
# A deaf listener shows as the safety-net look instead, 4 s at the soonest (SAFETY_NET).
AT_ONCE = 2.0

_SENT = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")


def idle_app(url: str, picked: dict[int, float], lease: float = 10.0) -> App:
    """An app with a workflow and a handler (so every loop that claims work runs)."""
    app = App("idle", store=url, broker="embedded", poll_interval=0.2, lease=lease)

    @app.workflow
    async def note(ctx: cantata.WorkflowContext, n: int) -> int:
        picked.setdefault(n, time.monotonic())
        return n

    @app.on("thing.done", group="things")
    async def on_thing(event: Event[Any], ctx: HandlerContext) -> None:
        return None

    return app


@pytest.fixture
async def worker_url(postgres_url: str, pooled_schema: str) -> AsyncIterator[str]:
    yield with_schema(postgres_url, pooled_schema)


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> collections.Counter[str]:
    """Every statement sent on any connection of this test's thread (the app's), by
    its text: not those of the schema pool's thread (tests/schema_pool.py), which
    migrates the next tests' schemas while this one measures."""
    counts: collections.Counter[str] = collections.Counter()
    here = threading.get_ident()
    for name in _SENT:
        original = getattr(asyncpg.connection.Connection, name)

        def counted(original: Any = original) -> Any:
            async def call(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
                if threading.get_ident() == here:
                    counts[" ".join(str(query).split())] += 1
                return await original(self, query, *args, **kwargs)
            return call

        monkeypatch.setattr(asyncpg.connection.Connection, name, counted())
    return counts


def _schedule_reads(sent: collections.Counter[str]) -> int:
    return sum(n for query, n in sent.items() if "FROM schedules" in query)


async def test_an_idle_worker_sends_few_statements(
    worker_url: str, sent: collections.Counter[str]
) -> None:
    async with idle_app(worker_url, {}):
        await asyncio.sleep(2.0)  # started: its first claims, declarations, plans
        before, started = sum(sent.values()), time.monotonic()
        reads = _schedule_reads(sent)
        await asyncio.sleep(6.0)
        rate = (sum(sent.values()) - before) / (time.monotonic() - started)
        reads = _schedule_reads(sent) - reads
    # ~23 a second when every loop polled; now the heartbeat and a look of each loop
    # every few seconds
    assert rate < 8.0, (rate, [(q[:50], n) for q, n in sent.most_common(8)])
    # the schedules too (once a second before: nothing tells of another process's)
    assert reads <= 2, reads


def ticking_app(url: str, ticks: list[tuple[float, float]]) -> App:
    """An app whose workflow notes each tick it is started for, and when it ran."""
    app = App("idle", store=url, broker="embedded", poll_interval=0.2, lease=10)

    @app.workflow
    async def ticked(ctx: cantata.WorkflowContext, tick: dt.datetime) -> None:
        ticks.append((tick.timestamp(), time.time()))

    return app


async def test_a_schedule_made_by_another_process_ticks_on_time(worker_url: str) -> None:
    """An idle worker hears of a schedule that another process creates (it would
    otherwise look only at its next safety-net pass, seconds later), and starts each
    tick at its time."""
    ticks: list[tuple[float, float]] = []
    async with ticking_app(worker_url, ticks):
        client = ticking_app(worker_url, [])
        await client.open(serve=False)
        try:
            await asyncio.sleep(1.5)  # the worker's scheduler idles in its long wait
            asked = time.time()
            await client.schedules.create("often", None, "ticked", every=2)
            made = time.time()
            await eventually(lambda: len(ticks) >= 2, timeout=10)
        finally:
            await client.close()
    # the first tick after it was made (none left out), then the next
    assert asked < ticks[0][0] <= made + 2 and ticks[1][0] == ticks[0][0] + 2, ticks
    # Each began at its time: within 1.5 s (a loaded machine delays a run's start by
    # a fraction of a second; 0.67 s was seen with six test processes on two cores).
    # Not heard of, the schedule would wait for the scheduler's safety-net pass, 4-6 s
    # after its last one: the first tick would begin seconds late, or be past.
    for tick, ran in ticks[:2]:
        assert 0 <= ran - tick < 1.5, (tick, ran)


def _watched(app: App, seen: list[tuple[float, str]]) -> None:
    """Note in ``seen`` (monotonic time, what) each change ``app``'s store hears and
    each of its claims of runs (begun, and what it took): what a failure shows."""
    store: Any = app.store
    store.add_listener(lambda channel: seen.append((time.monotonic(), f"heard {channel}")))
    watch_claims(store, "claim_runs", seen, lambda claimed, _: f"claim took {len(claimed)}")


async def test_work_started_by_another_process_is_taken_at_once(worker_url: str) -> None:
    picked: dict[int, float] = {}
    seen: list[tuple[float, str]] = []
    worker = idle_app(worker_url, picked)
    async with worker:
        _watched(worker, seen)
        client = idle_app(worker_url, {})
        await client.open(serve=False)
        try:
            for n in range(4):
                await asyncio.sleep(1.5)  # the worker's loops idle in their long waits
                started = time.monotonic()
                listening = worker.store.listening
                await client.start("note", n)
                committed = time.monotonic()
                await eventually(lambda n=n: n in picked, timeout=10)
                # woken by the notification (plus the claim's 50 ms to coalesce a
                # burst), not by the next safety-net look, seconds later; counted from
                # the start's commit (a loaded disk may hold a commit for seconds: its
                # notification is sent when it commits)
                took = picked[n] - committed
                assert took < AT_ONCE, (
                    f"run {n} taken {took:.3f} s after its start committed (which took "
                    f"{committed - started:.3f} s; the worker listening: {listening}); "
                    "what the worker's store heard and claimed since, in seconds from "
                    "the start: " + ", ".join(
                        f"{at - started:+.3f} {what}" for at, what in seen
                        if at >= started - 0.5
                    )
                )
        finally:
            await client.close()


async def _listen_pids(admin: asyncpg.Connection[Any], schema: str) -> list[int]:
    rows = await admin.fetch(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE $1 AND pid <> pg_backend_pid()",
        f'LISTEN "cantata_changes.{schema}"%',
    )
    return [r[0] for r in rows]


async def test_a_killed_listener_neither_strands_work_nor_stays_down(
    postgres_url: str, pooled_schema: str
) -> None:
    url = with_schema(postgres_url, pooled_schema)
    picked: dict[int, float] = {}
    seen: list[tuple[float, str]] = []
    admin = await asyncpg.connect(postgres_url)
    try:
        async with idle_app(url, picked) as worker:
            _watched(worker, seen)
            client = idle_app(url, {})
            await client.open(serve=False)
            try:
                await asyncio.sleep(1.5)
                # the client's store listens too: the worker's listener is the one that
                # is not there once the worker's store has closed
                pids = await _listen_pids(admin, pooled_schema)
                assert len(pids) == 2
                for pid in pids:
                    await admin.execute("SELECT pg_terminate_backend($1)", pid)
                started = time.monotonic()
                await client.start("note", 1)  # its notification may be lost with them
                await eventually(lambda: 1 in picked, timeout=10)
                assert picked[1] - started < 2.5, picked[1] - started
                # listening again: new listening connections, and work is taken at once
                # (each store's listener comes back on its own: the client's may come
                # after the worker's, as it did beside two CPU burners)
                await eventually(lambda: worker.store.listening and client.store.listening,
                                 timeout=10)
                new = await _listen_pids(admin, pooled_schema)
                assert len(new) == 2 and not set(new) & set(pids), (pids, new)
                await asyncio.sleep(1.5)
                started = time.monotonic()
                await client.start("note", 2)
                committed = time.monotonic()
                await eventually(lambda: 2 in picked, timeout=10)
                # counted from the start's commit, as in the test above: a loaded disk
                # may hold the commit itself for seconds (its notification goes out then)
                took = picked[2] - committed
                assert took < AT_ONCE, (
                    f"run 2 taken {took:.3f} s after its start committed (which took "
                    f"{committed - started:.3f} s); what the worker's store heard and "
                    "claimed since, in seconds from the start: " + ", ".join(
                        f"{at - started:+.3f} {what}" for at, what in seen
                        if at >= started - 0.5
                    )
                )
            finally:
                await client.close()
    finally:
        await admin.close()


async def test_a_listener_cut_off_in_silence_is_found_and_replaced(
    postgres_url: str, pooled_schema: str
) -> None:
    """A half-open listening connection (a NAT that dropped it: nothing closes it, no
    byte passes either way) is found by its probe within about a lease and a half
    (lease 1 s), and replaced: the work its notification was lost for is taken then,
    and later work at once again, not at each safety-net look."""
    url = with_schema(postgres_url, pooled_schema)
    picked: dict[int, float] = {}
    admin = await asyncpg.connect(postgres_url)
    try:
        async with stall_proxy(url) as proxy, idle_app(proxy.url(url), picked, lease=1.0):
            client = idle_app(url, {})
            await client.open(serve=False)
            try:
                await asyncio.sleep(1.5)
                before = await _listen_pids(admin, pooled_schema)  # the worker's, the client's
                assert len(before) == 2
                assert proxy.blackhole(b"LISTEN") == 1  # the worker's listener, silenced
                started = time.monotonic()
                await client.start("note", 1)  # its notification never reaches the worker
                # a new listening connection (the silenced one's backend stays, as a
                # server does not know the network dropped it)
                async def replaced() -> bool:
                    return len(await _listen_pids(admin, pooled_schema)) == 3

                await eventually(replaced, timeout=5, what="a new listening connection")
                await eventually(lambda: 1 in picked, timeout=10)
                assert picked[1] - started < 3.5, picked[1] - started
                for n in (2, 3):
                    await asyncio.sleep(1.5)
                    started = time.monotonic()
                    await client.start("note", n)
                    await eventually(lambda n=n: n in picked, timeout=10)
                    assert picked[n] - started < AT_ONCE, (n, picked[n] - started)
            finally:
                await client.close()
    finally:
        await admin.close()
