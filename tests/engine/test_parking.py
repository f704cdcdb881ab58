"""Parked runs cost no memory (engine/parking.py): a waiting run is evicted from its
worker and resumed from its history when it wakes, for every kind of wake-up."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from cantata import (
    App,
    RunStatus,
    StoreUnavailable,
    WaitTimeout,
    WorkflowCancelled,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.store.factory import store_from_url
from tests.helpers import with_schema

from .helpers import eventually, make_app


def build(store: str, name: str = "parks", **kw: Any) -> App:
    kw.setdefault("park_after", 0.0)
    app = make_app(store, name, **kw)

    @app.step
    async def double(n: int) -> int:
        return n * 2

    @app.workflow
    async def sleeper(ctx: WorkflowContext, n: int) -> dict[str, Any]:
        a = await ctx.run(double, n)
        stamp = ctx.uuid()
        await ctx.sleep(0.6)
        b = await ctx.run(double, a)
        return {"a": a, "b": b, "uuid": str(stamp)}

    @app.workflow
    async def waiter(ctx: WorkflowContext, order: int, first: float) -> dict[str, Any]:
        await ctx.sleep(first)  # an event may arrive while this sleep is parked
        try:
            ev = await ctx.wait_for_event("invoice.approved", match={"order": order},
                                          timeout=30)
        except WaitTimeout:
            return {"timeout": True}
        return {"amount": ev.data["amount"]}

    @app.workflow
    async def short_wait(ctx: WorkflowContext) -> str:
        try:
            await ctx.wait_for_event("never.comes", timeout=0.8)
        except WaitTimeout:
            return "timed out"
        return "event"

    @app.workflow
    async def child(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep(0.5)
        return n + 1

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call(child, n)) * 10

    @app.workflow
    async def long_sleep(ctx: WorkflowContext) -> None:
        await ctx.sleep(3600)

    @app.workflow
    async def until(ctx: WorkflowContext, due: float) -> float:
        await ctx.sleep(max(0.0, due - ctx.now().timestamp()))
        return ctx.now().timestamp() - due  # how late it woke

    @app.workflow
    async def held(ctx: WorkflowContext, i: int) -> Any:
        ev = await ctx.wait_for_event("batch.held", match={"i": i})  # (no timeout)
        return ev.data["i"]

    @app.workflow
    async def released(ctx: WorkflowContext, i: int) -> float:
        ev = await ctx.wait_for_event("batch.released", match={"i": i}, timeout=60)
        return ctx.now().timestamp() - float(ev.data["sent"])  # how late it resumed

    return app


async def parked(app: App, run_id: str) -> bool:
    run = await app.store.get_run(app.name, run_id)
    return (run is not None and run.owner is None and not run.status.is_final
            and run_id not in app.engine.executions)


async def test_a_sleep_is_evicted_and_resumed_when_due(store_url: str) -> None:
    async with build(store_url) as app:
        handle = await app.start("sleeper", 3)
        await eventually(lambda: parked(app, handle.run_id), timeout=5)
        assert app.engine.metrics.parked >= 1
        out = await handle.result(timeout=10)
        hist = await app.store.load_history(app.name, handle.run_id)
    assert out["a"] == 6 and out["b"] == 12
    assert [e.key for e in hist] == ["double#1", "uuid#1", "sleep#1", "double#2"]
    # The value ctx.uuid() recorded before the eviction is what the replay returned.
    assert json.loads(hist[1].result or "null") == out["uuid"]


async def test_results_are_the_same_with_and_without_eviction(store_url: str) -> None:
    async with build(store_url, park_after=None) as app:
        kept = await (await app.start("sleeper", 5)).result(timeout=10)
        assert app.engine.metrics.parked == 0
    async with build(store_url, name="parks2") as app:
        evicted = await (await app.start("sleeper", 5)).result(timeout=10)
        assert app.engine.metrics.parked >= 1
    assert {k: v for k, v in kept.items() if k != "uuid"} == {
        k: v for k, v in evicted.items() if k != "uuid"}


async def test_an_event_wakes_a_parked_wait_and_only_a_match(store_url: str) -> None:
    async with build(store_url) as app:
        handle = await app.start("waiter", 7, 0.0)
        await eventually(lambda: parked(app, handle.run_id), timeout=5)
        await app.publish("invoice.approved", {"order": 8, "amount": 1})  # not its match
        await asyncio.sleep(0.5)
        assert await parked(app, handle.run_id)
        await app.publish("invoice.approved", {"order": 7, "amount": 42})
        assert await handle.result(timeout=10) == {"amount": 42}


async def test_an_event_that_arrived_before_the_wait_began_wakes_it(store_url: str) -> None:
    async with build(store_url) as app:
        handle = await app.start("waiter", 9, 1.0)
        await eventually(lambda: parked(app, handle.run_id), timeout=5)  # in its sleep
        await app.publish("invoice.approved", {"order": 9, "amount": 5})
        assert await handle.result(timeout=10) == {"amount": 5}


async def test_a_parked_waits_timeout_and_a_short_wait(store_url: str) -> None:
    async with build(store_url) as app:
        handle = await app.start("short_wait")
        await eventually(lambda: parked(app, handle.run_id), timeout=5)
        assert await handle.result(timeout=10) == "timed out"


async def test_cancel_and_deadline_interrupt_a_parked_run(store_url: str) -> None:
    async with build(store_url) as app:
        cancelled = await app.start("long_sleep")
        late = await app.start("long_sleep", deadline=1.0)
        await eventually(lambda: parked(app, cancelled.run_id), timeout=5)
        await eventually(lambda: parked(app, late.run_id), timeout=5)
        await cancelled.cancel()
        with pytest.raises(WorkflowCancelled):
            await cancelled.result(timeout=5)
        with pytest.raises(WorkflowFailed, match="DeadlineExceeded"):
            await late.result(timeout=5)


async def test_a_childs_end_wakes_its_parked_parent(store_url: str) -> None:
    async with build(store_url) as app:
        handle = await app.start("parent", 4)
        await eventually(lambda: parked(app, handle.run_id), timeout=5)
        assert await handle.result(timeout=10) == 50


async def test_the_hot_cache_keeps_a_bounded_number_in_memory(store_url: str) -> None:
    async with build(store_url, park_after=3600.0, hot_runs=2) as app:
        handles = [await app.start("long_sleep") for _ in range(5)]

        async def settled() -> bool:
            states = [await parked(app, h.run_id) for h in handles]
            return states.count(True) == 3

        await eventually(settled, timeout=5)
        assert len(app.engine.executions) == 2
        for h in handles:
            await h.cancel()


async def test_wake_latency_of_a_parked_timer(store_url: str) -> None:
    async with build(store_url) as app:
        handle = await app.start("long_sleep")
        await eventually(lambda: parked(app, handle.run_id), timeout=5)
        await handle.cancel()
        t0 = time.monotonic()
        with pytest.raises(WorkflowCancelled):
            await handle.result(timeout=5)
        assert time.monotonic() - t0 < 3.0
        assert (await handle.status()) == RunStatus.CANCELLED


async def test_parked_timers_wake_on_time_while_other_runs_end(store_url: str) -> None:
    """Each woken run's end is news that wakes the claim loop, which then lets a burst of
    such news gather before it claims; that pause must not run past a timer's due time
    (it did: each timer here woke ~30 ms late, the pause's 50 ms at random); nor may a
    run that came due while the claimed runs were launched wait for the next run's due
    time (it did on a loaded machine: late by steps of the timers' 25 ms spacing).

    How late a timer woke is judged where the worker decided it was due: the ``now``
    of the claim that took its run (``Store.claim_runs(now=...)``, engine/parking.py),
    less the time a plain ``asyncio.sleep`` to the same due time woke in the same event
    loop (a probe: how late the loop itself could act, on a loaded machine). Not by
    ``ctx.now()`` once the run has replayed after the claim: that adds the claim's
    round trip, the history read and the replay (a shared PostgreSQL server's round
    trips), none of them the claim loop's doing; nor by the claim's ``now`` alone,
    which a machine starving the worker's process (load average 10 and two busy
    loops on two cores) delayed by up to 30-40 ms at the median, as it does the probe.
    (Each of these, every fourth value in ms, is in the failure's message.)

    Both defects make every round late (the pause's median is 28-35 ms whatever the
    load); a loaded machine makes a round late now and then: the best of up to three
    rounds is judged."""
    rounds: list[dict[str, list[float]]] = []
    async with build(store_url) as app:
        store: Any = app.store
        claimed_at: dict[str, list[float]] = {}  # run -> the ``now`` of each claim of it
        claim_runs = store.claim_runs

        async def recording(*args: Any, **kw: Any) -> Any:
            got = await claim_runs(*args, **kw)
            for run in got:
                claimed_at.setdefault(run.run_id, []).append(kw["now"])
            return got

        async def probe(due: float) -> float:
            await asyncio.sleep(due - time.time())
            return time.time()

        store.claim_runs = recording
        while len(rounds) < 3 and not (rounds and _median(rounds[-1]["claim loop"]) < 0.02):
            base = time.time() + 1.5
            dues = [base + 0.025 * k for k in range(40)]
            handles = [await app.start("until", due) for due in dues]
            probes = [asyncio.ensure_future(probe(due)) for due in dues]
            replayed = [await h.result(timeout=20) for h in handles]
            woke = [await p for p in probes]
            # the claim that woke it: the first one at or after its due time (its first
            # claim, if any, ran it up to its sleep)
            claimed = [min((t for t in claimed_at.get(h.run_id, []) if t >= due - 0.001),
                           default=float("inf"))
                       for h, due in zip(handles, dues, strict=True)]
            rounds.append({
                "claim loop": sorted(c - w for c, w in zip(claimed, woke, strict=True)),
                "claimed": sorted(c - due for c, due in zip(claimed, dues, strict=True)),
                "loop": sorted(w - due for w, due in zip(woke, dues, strict=True)),
                "replayed": sorted(replayed),
            })
    best = min((r["claim loop"] for r in rounds), key=_median)
    assert _median(best) < 0.02, [
        {what: [round(x * 1000, 1) for x in late[::4]] for what, late in r.items()}
        for r in rounds
    ]


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


async def _park_and_release(app: App, publisher: App, n: int = 25) -> list[float]:
    """Park ``n`` runs of ``released`` in ``app``, publish their events through
    ``publisher`` one every 120 ms (3 s, within one of the apps' poll intervals of
    5 s); how late each run resumed, in order."""
    handles = [await app.start("released", i) for i in range(n)]
    for h in handles:
        await eventually(lambda h=h: parked(app, h.run_id), timeout=10)
    for i in range(n):
        await publisher.publish("batch.released", {"i": i, "sent": time.time()})
        await asyncio.sleep(0.12)
    return sorted([await h.result(timeout=30) for h in handles])


async def _judge_release_rounds(release: Callable[[], Awaitable[list[float]]]) -> None:
    """Prompt wake-ups: the median run resumed within 0.6 s of its event, the last
    within 1.5 s, in the best of up to three rounds of :func:`_park_and_release`.

    A watch loop that waits for its poll interval (5 s) makes every round late: the
    median at least 1.5 s (an event waits for the next look, 0-5 s on, and the stream
    lasts 3 s), the last at least 2 s, and an event missed by a look under way waits
    up to 5 s. A loaded machine makes a round late now and then: on an idle one the
    median is 5-20 ms and the last 15-60 ms; in a full CI run beside a busy shared
    PostgreSQL, resumes came 100-300 ms apart when 50 events came 40 ms apart (the
    runs queued for the worker, p50 0.27-0.44 s)."""
    rounds: list[list[float]] = []
    while len(rounds) < 3 and not (rounds and _prompt(rounds[-1])):
        rounds.append(await release())
    assert _prompt(rounds[-1]), [[round(x * 1000, 1) for x in late] for late in rounds]


def _prompt(late: list[float]) -> bool:
    return _median(late) < 0.6 and late[-1] < 1.5


async def test_parked_waits_wake_promptly_under_a_steady_stream_of_events(
    store_url: str,
) -> None:
    """An event published in this process makes the watch loop look for the parked
    waits it matches at once (and once more right after a look under way), and the
    runs it woke are claimed at once: each resumes within a few ms of its event (a
    few tens on a loaded machine), not at the loop's next poll_interval (it did: p50
    half the poll interval, max all of it: the look waited for the poll interval and
    the claim for its 50 ms pause)."""
    async with build(store_url, poll_interval=5.0) as app:
        await _judge_release_rounds(lambda: _park_and_release(app, app))


@pytest.mark.postgres
async def test_parked_waits_wake_promptly_for_another_processs_events(
    postgres_url: str, pooled_schema: str
) -> None:
    """On PostgreSQL an event committed by another process is heard by notification:
    while runs are parked in event waits, the watch loop looks at once, not at most
    once a poll_interval (it did: p50 half the poll interval, max all of it, under a
    steady stream)."""
    url = with_schema(postgres_url, pooled_schema)
    client = build(url, poll_interval=5.0)
    await client.open(serve=False)
    try:
        async with build(url, poll_interval=5.0) as app:
            await _judge_release_rounds(lambda: _park_and_release(app, client))
    finally:
        await client.close()


async def test_an_event_stored_while_no_worker_looked_wakes_its_parked_wait(
    shared_store: str,
) -> None:
    """Runs wait (parked) for events, with no timeout, and every worker stops; a client
    stores their events meanwhile. Once a worker starts again they resume: its first
    look goes on from where the looks had got to (Store.waits_looked), not from a
    second before it (they never woke: an event stored more than a second before a
    worker's first look woke no parked wait)."""
    async with build(shared_store, poll_interval=0.3) as app:
        handles = [await app.start("held", i) for i in range(3)]
        for h in handles:
            await eventually(lambda h=h: parked(app, h.run_id), timeout=10)
    async with build(shared_store).client() as client:
        for i in range(3):
            await client.publish("batch.held", {"i": i})
        await asyncio.sleep(1.5)
        async with build(shared_store, poll_interval=0.3) as app:
            assert [await app.get_handle(h.run_id).result(timeout=10)
                    for h in handles] == [0, 1, 2]


@pytest.mark.parametrize("deleted", [False, True], ids=["paged", "page-end-deleted"])
async def test_a_backlog_stored_while_no_worker_looked_is_read_a_page_at_a_time(
    shared_store: str, monkeypatch: pytest.MonkeyPatch, deleted: bool
) -> None:
    """A worker's first look after a long stop reads the events stored meanwhile a page
    at a time (``parking.LOOK_PAGE``, made 10 here), each page after the last event of
    the one before in the log's order, and wakes every parked wait one of them matches,
    in whichever page: not in reads that grow and start again from the beginning
    until one holds them all (a backlog of 100,000 events was read whole, and its ids
    then sent back with every look for a second and a half).

    ``page-end-deleted``: the last event of a page is deleted before the next page is
    read (retention), so that nothing can be found after it: the look reads them all
    again, at once, and still wakes every wait."""
    from cantata.engine import parking

    monkeypatch.setattr(parking, "LOOK_PAGE", 10)
    async with build(shared_store, poll_interval=0.3) as app:
        handles = [await app.start("held", i) for i in range(4)]
        for h in handles:
            await eventually(lambda h=h: parked(app, h.run_id), timeout=10)
    async with build(shared_store).client() as client:
        for i in range(4):  # each run's event amid 9 others, in pages 1 to 4
            for n in range(10):
                await client.publish("batch.held", {"i": i if n == 4 else 100 + 10 * i + n})
        await asyncio.sleep(1.5)  # (older than the second a look reads again by the clock)
    app = build(shared_store, poll_interval=0.3)
    kind: Any = type(store_from_url(shared_store))
    find_events = kind.find_events
    reads: list[dict[str, Any]] = []

    async def recorded(store: Any, *args: Any, **kw: Any) -> Any:
        if args[1] == "batch.held":
            reads.append(dict(kw))
            if deleted and kw.get("after") and not any(r.get("deleted") for r in reads):
                reads[-1]["deleted"] = True
                await _delete_event(store, app.name, kw["after"])
        return await find_events(store, *args, **kw)

    monkeypatch.setattr(kind, "find_events", recorded)
    async with app:
        assert [await app.get_handle(h.run_id).result(timeout=20)
                for h in handles] == [0, 1, 2, 3]
    looks = [r for r in reads if r.get("position") is not None or r.get("after")]
    if not deleted:
        assert all(r["limit"] == 10 for r in looks), looks
        assert sum(1 for r in looks if r.get("after")) >= 4, looks
    else:
        assert any(r["limit"] > 10 for r in looks), looks  # the read of them all


async def _delete_event(store: Any, app: str, event_id: str) -> None:
    """Delete one event as retention would (its row alone; none of these is delivered
    to a group)."""
    if hasattr(store, "_t"):  # SQLite
        await store._t.write(lambda c: c.execute(
            "DELETE FROM events WHERE app=? AND id=?", (app, event_id)))
    else:
        await store._db.execute("DELETE FROM events WHERE app=$1 AND id=$2", app, event_id)


async def test_the_looks_mark_where_they_got_to_once_a_second(sqlite_url: str) -> None:
    """A serving worker marks where its looks got to in the log as it starts and then
    at most once a second (``Store.waits_looked``): a worker that starts later reads
    again only what came since, not all that came since the first worker started."""
    async with build(sqlite_url, poll_interval=0.1) as app:
        store: Any = app.store
        await eventually(lambda: store.waits_looked(app.name), timeout=5)
        await asyncio.sleep(0.5)  # its first look (0.1 s after its start) marked too
        started = await store.waits_looked(app.name)
        for i in range(5):
            await app.publish("batch.other", {"i": i})
        end = await store.log_position(app.name)
        assert end > started[0]
        reached = await eventually(
            lambda: _marked_past(store, app.name, end - 1), timeout=5
        )
        assert reached[1] - started[1] >= 1.0  # (no sooner than a second on)


async def _marked_past(store: Any, app: str, position: int) -> tuple[int, float] | None:
    mark = await store.waits_looked(app)
    return mark if mark is not None and mark[0] > position else None


async def test_another_processs_event_in_a_workers_first_poll_interval_wakes_a_wait(
    sqlite_url: str,
) -> None:
    """On SQLite a worker does not hear another process's events: it finds them at its
    looks, one a poll interval (2.5 s here). An event stored in its first poll interval
    wakes the wait parked meanwhile at its first look (it never did: that look read
    from a second before it)."""
    async with build(sqlite_url, poll_interval=2.5) as app:
        handle = await app.start("held", 7)
        await eventually(lambda: parked(app, handle.run_id), timeout=10)
        async with build(sqlite_url).client() as client:
            await client.publish("batch.held", {"i": 7})
        assert await handle.result(timeout=10) == 7


async def test_looks_that_fail_lose_no_event_for_parked_waits(sqlite_url: str) -> None:
    """The store fails every look for parked waits' events for 2 s, as another process
    stores the event a parked run waits for: the first look that gets through finds it
    (it did not: a failed look had moved the next one's start past the event)."""
    async with build(sqlite_url, poll_interval=0.2) as app:
        handle = await app.start("held", 8)
        await eventually(lambda: parked(app, handle.run_id), timeout=10)
        store: Any = app.store
        find_events, down_until, failed = store.find_events, time.time() + 2.0, []

        async def flaky(*args: Any, **kw: Any) -> Any:
            if time.time() < down_until:
                failed.append(time.time())
                raise StoreUnavailable("the test's store is down for 2 s")
            return await find_events(*args, **kw)

        store.find_events = flaky
        async with build(sqlite_url).client() as client:
            await client.publish("batch.held", {"i": 8})
        assert await handle.result(timeout=10) == 8
        assert failed  # (a look failed; on an idle machine they all did for 2 s)


class ClockBehind:
    """The ``time`` module of a process whose wall clock is ``seconds`` behind."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def time(self) -> float:
        return time.time() - self.seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.mark.postgres
async def test_a_parked_wait_wakes_for_an_event_whose_writer_clock_is_behind(
    postgres_url: str, pooled_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each writer stamps ``stored_at`` with its own clock: an event stored by a host
    whose clock is 2 s behind the worker's is older, by the worker's clock, than its
    last look. The look for parked waits follows the log's own order (its sequence),
    not the clocks, so the event wakes the wait at once, not at its timeout."""
    from cantata.store import postgres_event_writes

    url = with_schema(postgres_url, pooled_schema)
    async with build(url, poll_interval=0.05) as app:
        handle = await app.start("waiter", 11, 0.0)
        await eventually(lambda: parked(app, handle.run_id), timeout=5)
        # (the run's own wait takes events stored since it was created, by the clocks)
        await asyncio.sleep(2.5)
        monkeypatch.setattr(postgres_event_writes, "time", ClockBehind(2.0))
        await app.publish("invoice.approved", {"order": 11, "amount": 3})
        monkeypatch.undo()
        assert await handle.result(timeout=10) == {"amount": 3}  # the timeout: 30 s


def _spawn(store: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("park_app.py")), store],
        stdout=subprocess.PIPE, text=True,
    )


async def test_a_run_parked_by_a_killed_worker_still_wakes(sqlite_url: str) -> None:
    """kill -9 while evicted: the run is unowned in the store, so another worker
    resumes it when it is due or its event comes, without waiting for a lease."""
    from .park_app import build as build_park_app

    proc = _spawn(sqlite_url)
    try:
        assert proc.stdout is not None
        line = await asyncio.to_thread(proc.stdout.readline)
        sleepy, waiting = line.split()
        async with build_park_app(sqlite_url).client() as client:
            await eventually(lambda: parked(client, sleepy), timeout=10)
            await eventually(lambda: parked(client, waiting), timeout=10)
        proc.kill()
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    async with build_park_app(sqlite_url) as app:
        await app.publish("payment.done", {"order": 5, "amount": 12})
        assert await app.get_handle(sleepy).result(timeout=10) == "slept"
        assert await app.get_handle(waiting).result(timeout=10) == 12


async def test_any_worker_resumes_a_parked_run_and_none_runs_a_step_twice(
    sqlite_url: str,
) -> None:
    executed: list[int] = []

    def worker() -> App:
        app = make_app(sqlite_url, "parkshare", park_after=0.0)

        @app.step
        async def once(n: int) -> int:
            executed.append(n)
            await asyncio.sleep(0.05)
            return n

        @app.workflow
        async def two_naps(ctx: WorkflowContext, n: int) -> int:
            await ctx.sleep(0.3)
            await ctx.run(once, n)
            await ctx.sleep(1.5)  # (longer than the twenty starts take on a loaded machine)
            return n

        return app

    # Both workers live while the runs take their first naps and steps: either may claim
    # a parked run (which one is a race of their claim loops). Then the first stops
    # gracefully; every run is parked in its second nap, and only the second worker can
    # end it: the runs the first parked are resumed by the other worker, for sure. (A
    # share of a race was asserted before: CI saw the first worker win all forty.)
    async with worker() as second:
        async with worker() as first:
            handles = [await first.start("two_naps", i) for i in range(20)]
            await eventually(lambda: len(executed) == 20, timeout=20, what="twenty steps")
        results = await asyncio.gather(
            *(second.get_handle(h.run_id).result(timeout=20) for h in handles))
        resumed_in_second = second.engine.metrics.runs.get("completed", 0)
    assert results == list(range(20))
    assert sorted(executed) == list(range(20))  # each step once: never two owners
    assert resumed_in_second == 20  # the second worker resumed every run the first parked
