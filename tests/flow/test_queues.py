"""Queues on one process with the skipping clock: limits, priorities, partitions, status."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from cantata import App, Rate, RunHandle, RunStatus
from cantata.errors import ConfigurationError, QueueConflict, UnknownQueue
from cantata.store.factory import store_from_url
from cantata.testing import environment
from tests.flow.helpers import max_in_window, max_overlap, until


def queue_app(
    hold: bool = False, store: str | None = None, step: float = 1.0, **queue: object
) -> tuple[App, list[tuple[float, float]], list[int]]:
    """An app whose ``job(i)`` workflow runs in queue ``q`` (on ``store``, the default
    one if None); spans of its step (``step`` s of clock time) and the order in which
    jobs began are recorded. With ``hold``, job 0 keeps its slot until the test sets
    ``app.gate``."""
    app = App("flow") if store is None else App("flow", store=store)
    app.queue("q", **queue)  # type: ignore[arg-type]
    spans: list[tuple[float, float]] = []
    order: list[int] = []
    gate = asyncio.Event()  # job 0 holds its slot until the test sets it
    app.gate = gate  # type: ignore[attr-defined]
    if not hold:
        gate.set()

    @app.step
    async def work(i: int) -> int:
        begin = app.clock.now()
        order.append(i)
        if i == 0 and not gate.is_set():
            await gate.wait()
        await app.clock.sleep(step)
        spans.append((begin, app.clock.now()))
        return i

    @app.workflow(queue="q")
    async def job(ctx: object, i: int) -> int:
        return await ctx.run(work, i)  # type: ignore[attr-defined, no-any-return]

    return app, spans, order


async def test_concurrency_bounds_runs_in_progress() -> None:
    app, spans, _ = queue_app(concurrency=3)
    async with environment(app):
        handles = [await app.start("job", i) for i in range(10)]
        assert [await h.result(timeout=30) for h in handles] == list(range(10))
    assert max_overlap(spans) == 3


async def test_rate_is_a_sliding_window(sqlite_url: str) -> None:
    # Real time: the skipping clock jumps while a store write is in flight, so the
    # time between a run's admission and its first step is not bounded in it.
    # The rate counts the begins the queue records as it admits runs: those are held
    # to it. A first step starts a moment later, within the window's margin on an idle
    # machine but not on a loaded one (two runs admitted together may start their
    # steps late, next to the next two): timed at the step, only its order is sure.
    app = App("flow", store=sqlite_url)
    app.queue("q", rate=Rate(2, per=0.5))
    begins: dict[int, float] = {}

    @app.step
    async def work(i: int) -> int:
        begins[i] = time.time()
        return i

    @app.workflow(queue="q")
    async def job(ctx: object, i: int) -> int:
        return await ctx.run(work, i)  # type: ignore[attr-defined, no-any-return]

    async with app:
        handles = [await app.start(job, i) for i in range(6)]
        for h in handles:
            await h.result(timeout=30)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        began = dict(db.execute("SELECT run_id, began_at FROM queue_runs WHERE queue='q'"))
    admitted = [began[h.run_id] for h in handles]
    assert max_in_window(admitted, 0.5) == 2
    assert max(admitted) - min(admitted) >= 1.0  # 6 runs at 2 per 0.5 s: three windows
    assert all(begins[i] >= admitted[i] for i in range(6))  # (no step before its begin)


async def test_priorities_lower_first_then_oldest() -> None:
    app, _, order = queue_app(hold=True, concurrency=1, priorities=True)
    async with environment(app):
        first = await app.start("job", 0)  # begins at once and holds the slot
        await until(lambda: order)
        handles = [await app.start("job", i, queue="q", priority=p)
                   for i, p in ((1, 5), (2, 1), (3, 5), (4, 0))]
        app.gate.set()  # type: ignore[attr-defined]
        for h in [first, *handles]:
            await h.result(timeout=30)
    assert order == [0, 4, 2, 1, 3]


async def test_partitions_apply_limits_per_key() -> None:
    app, spans, _ = queue_app(concurrency=1)
    async with environment(app):
        handles = [await app.start("job", i, partition=f"customer-{i % 2}") for i in range(6)]
        for h in handles:
            await h.result(timeout=30)
    assert max_overlap(spans) == 2  # one per customer at a time
    evens = [spans[i] for i in range(len(spans)) if spans[i][0] is not None]
    assert len(evens) == 6


async def test_waiting_run_is_pending_and_trace_and_stalled_say_queued() -> None:
    app, _, order = queue_app(hold=True, concurrency=1)
    async with environment(app):
        first = await app.start("job", 0)
        await until(lambda: order)  # job 0 began and holds the one slot
        second = await app.start("job", 1)
        # Runs queued at the same instant are ordered by id, whose tail is random: the
        # skipping clock must move for "third is behind second" to hold.
        app.clock.advance(0.001)  # type: ignore[attr-defined]
        third = await app.start("job", 2)
        assert await third.status() == RunStatus.PENDING
        tree = await app.trace(third.run_id)
        assert tree.detail == "queued in 'q' behind 1 run(s)"
        app.clock.advance(1.0)  # type: ignore[attr-defined]
        stalls = [s for s in await app.stalled(older_than=0.5) if s.reason == "queued"]
        assert {s.node.ref for s in stalls} == {second.run_id, third.run_id}
        stats = {q.name: q for q in await app.queue_stats()}
        assert (stats["q"].waiting, stats["q"].in_progress) == (2, 1)
        app.gate.set()  # type: ignore[attr-defined]
        for h in (first, second, third):
            await h.result(timeout=30)


async def test_cancelling_a_waiting_run_ends_it() -> None:
    app, _, order = queue_app(hold=True, concurrency=1)
    async with environment(app):
        first = await app.start("job", 0)
        await until(lambda: order)
        waiting = await app.start("job", 1)
        await waiting.cancel()
        app.gate.set()  # type: ignore[attr-defined]
        assert await first.result(timeout=30) == 0
        for _ in range(100):
            if await waiting.status() == RunStatus.CANCELLED:
                break
            await asyncio.sleep(0.02)
        assert await waiting.status() == RunStatus.CANCELLED
    assert order == [0]


async def _ended(handles: list[RunHandle], status: RunStatus) -> None:
    for h in handles:
        for _ in range(500):
            if await h.status() == status:
                break
            await asyncio.sleep(0.02)
        assert await h.status() == status


async def test_cancelled_waiting_runs_leave_the_depth_and_positions(store_url: str) -> None:
    """A run cancelled while it waited is no longer waiting: the depth, the oldest
    waiting time and the trace's place in the queue count pending runs only, even
    while no claim has met the cancelled rows (the slot stays taken)."""
    # (no spans measured: a short step, the four jobs left run one after another)
    app, _, order = queue_app(hold=True, store=store_url, step=0.05, concurrency=1)
    async with app:
        first = await app.start("job", 0)
        await until(lambda: order)  # job 0 holds the one slot
        waiting = []
        for i in range(1, 6):
            waiting.append(await app.start("job", i))
            await asyncio.sleep(0.002)  # distinct creation times: a stable order
        for h in (waiting[0], waiting[1], waiting[3]):
            await h.cancel()
        await _ended([waiting[0], waiting[1], waiting[3]], RunStatus.CANCELLED)
        last = await app.start("job", 6)
        [stats] = await app.queue_stats()
        oldest = await app.store.get_run(app.name, waiting[2].run_id)
        assert oldest is not None
        assert (stats.waiting, stats.in_progress) == (3, 1)
        assert stats.oldest_waiting_at == pytest.approx(oldest.created_at, abs=1e-5)
        assert (await app.trace(waiting[4].run_id)).detail == "queued in 'q' behind 1 run(s)"
        assert (await app.trace(last.run_id)).detail == "queued in 'q' behind 2 run(s)"
        app.gate.set()  # type: ignore[attr-defined]
        for h in (first, waiting[2], waiting[4], last):
            await h.result(timeout=30)
    assert sorted(order) == [0, 3, 5, 6]


async def test_bad_queue_input_names_the_value() -> None:
    app, _, _ = queue_app(concurrency=1)
    with pytest.raises(ConfigurationError, match=r"concurrency must be a whole number > 0, got 0: "
                       r"pass a positive int \(e\.g\. 5\), or leave it out for no limit"):
        app.queue("z", concurrency=0)
    with pytest.raises(ConfigurationError, match=r"got -1"):
        app.queue("z", per_worker=-1)
    with pytest.raises(ConfigurationError, match=r"Rate limit .* got 0"):
        Rate(0, per=1)
    with pytest.raises(ConfigurationError, match=r"per= must be .* seconds .*, got -5"):
        Rate(1, per=-5)
    async with environment(app):
        with pytest.raises(UnknownQueue, match="'nope'"):
            await app.start("job", 1, queue="nope")
        with pytest.raises(ConfigurationError, match=r"priority must be an integer, got 1.5"):
            await app.start("job", 1, priority=1.5)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match=r"priority must be an integer, got '1'"):
            await app.start("job", 1, priority="1")  # type: ignore[arg-type]


def test_limits_above_int64_are_refused_at_declaration() -> None:
    """The stores keep limits as signed 64-bit integers: a larger one is refused where
    it is declared, naming the queue and the field, not by the driver at open."""
    app = App("huge")
    top = 2**63 - 1
    with pytest.raises(ConfigurationError,
                       match=r"queue 'a' concurrency must be a whole number from 1 to "
                             r"2\*\*63-1 .*got 9223372036854775808"):
        app.queue("a", concurrency=2**63)
    with pytest.raises(ConfigurationError, match=r"queue 'b' per_worker .* got 10{30}"):
        app.queue("b", per_worker=10**30)
    with pytest.raises(ConfigurationError, match=r"Rate limit .* 2\*\*63-1 .*got 10{30}"):
        Rate(10**30)
    with pytest.raises(ConfigurationError, match=r"step concurrency .* 2\*\*63-1"):
        app.step(concurrency=2**63)
    # the largest value passes
    assert app.queue("c", concurrency=top, per_worker=top, rate=Rate(top)) == "c"


@pytest.mark.parametrize("per", [
    1e-12, 0.0009, 0, 0.0, -5, -1e-3, float("nan"), float("inf"), float("-inf"),
    3_155_760_001, 10**30, 10**400, True, "1", None,
])
def test_a_rate_window_out_of_range_is_refused_naming_it_and_the_range(per: object) -> None:
    """A window from 1 ms to 100 years, as every other duration: ``per=1e-12`` (a limit
    that nothing can keep, and a window no clock measures) is refused where the Rate is
    made, with the value and the range in the message."""
    with pytest.raises(ConfigurationError) as caught:
        Rate(5, per=per)  # type: ignore[arg-type]
    message = str(caught.value)
    assert f"got {per!r}" in message
    assert "from 0.001 seconds (1 ms) to 3155760000 seconds (100 years)" in message


def test_a_rate_without_a_limit_is_refused_where_it_is_made() -> None:
    # (it was taken, and every run of a step or queue with it failed with a TypeError)
    with pytest.raises(ConfigurationError, match=r"Rate limit .*got None"):
        Rate(None)  # type: ignore[arg-type]


def test_a_rate_window_at_either_end_of_the_range_is_taken() -> None:
    assert Rate(5, per=0.001).per == 0.001
    assert Rate(5, per=3_155_760_000).per == 3_155_760_000
    assert str(Rate(2, per=0.5)) == "2/0.5s"


async def test_a_window_an_older_version_stored_still_reads(sqlite_url: str) -> None:
    """Older versions took any ``per > 0``: a queue row keeping such a window is read as
    it is (shown, compared), not refused as a declaration would be, and the next open
    that declares the queue replaces it."""
    app, _, _ = queue_app(rate=Rate(2, per=1))
    app.configure(store=sqlite_url)
    async with app.client():
        pass
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        db.execute("UPDATE queues SET rate_per=1e-12 WHERE name='q'")
    store = store_from_url(sqlite_url)
    await store.open()
    try:
        [old] = await store.queues(app.name)
    finally:
        await store.close()
    assert old.rate is not None and (old.rate.limit, old.rate.per) == (2, 1e-12)
    async with app.client():
        [spec] = await app.engine.store.queues(app.name)
    assert spec.rate == Rate(2, per=1)


def test_priorities_must_be_a_bool() -> None:
    app = App("prio")
    for bad in ("no", "false", 1, None):
        with pytest.raises(ConfigurationError,
                           match=rf"queue 'q' priorities must be True or False, got {bad!r}"):
            app.queue("q", priorities=bad)  # type: ignore[arg-type]
    assert app.queue("q", priorities=False) == "q"
    assert app.router.queues["q"].priorities is False


async def test_largest_limits_open_on_every_store(store_url: str) -> None:
    """2**63-1, the largest accepted limit, is stored and read back as declared."""
    app = App("huge", store=store_url)
    top = 2**63 - 1
    app.queue("q", concurrency=top, per_worker=top, rate=Rate(top, per=1))

    @app.workflow(queue="q")
    async def wf(ctx: object) -> int:
        return 1

    async with app.client():
        [spec] = await app.engine.store.queues(app.name)
    assert (spec.concurrency, spec.per_worker, spec.rate) == (top, top, Rate(top, per=1))


async def test_two_processes_declaring_other_limits_is_an_error(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/q.db"
    first, _, _ = queue_app(concurrency=2, rate=Rate(5, per=1))
    second, _, _ = queue_app(concurrency=3, rate=Rate(5, per=1))
    first.configure(store=url)
    second.configure(store=url)
    async with first:
        with pytest.raises(QueueConflict, match=r"'q'.*concurrency: 3 vs 2"):
            await second.open()


async def test_an_app_without_queues_does_not_ask_the_store_for_them_every_pass(
    sqlite_url: str,
) -> None:
    """Queues other processes declare are looked for every 5 poll intervals, not at
    every pass of the loop (each poll_interval) when the app has none."""
    app = App("noqueues", store=sqlite_url, poll_interval=0.05)

    @app.workflow
    async def wf(ctx: object) -> int:
        return 1

    async with app:
        store = app.store
        asked = 0
        listed = store.queues

        async def counted(app_name: str) -> list[object]:
            nonlocal asked
            asked += 1
            return list(await listed(app_name))

        store.queues = counted  # type: ignore[method-assign,assignment]
        await asyncio.sleep(1.0)
    assert 1 <= asked <= 6, asked  # (about 4: once every 0.25 s)


@pytest.mark.parametrize("limit", ["concurrency", "rate"])
async def test_one_keys_backlog_past_a_claims_page_does_not_starve_another_key(
    store_url: str, limit: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim reads a page of the waiting runs, best first (500 of them); here a page of
    # 4, so that a backlog longer than a page is a few runs. Customer A's backlog fills
    # the page and A is at its limit: B, queued behind it, must begin all the same.
    from cantata.store import postgres_flow, sqlite_flow

    monkeypatch.setattr(sqlite_flow, "CANDIDATES", 4)
    monkeypatch.setattr(postgres_flow, "CANDIDATES", 4)
    app = App("flow", store=store_url, poll_interval=0.05)
    app.queue("q", **({"concurrency": 1} if limit == "concurrency"
                      else {"rate": Rate(1, per=60)}))
    gate, begun = asyncio.Event(), []

    @app.step
    async def work(key: str) -> str:
        begun.append(key)
        if key == "A0" and limit == "concurrency":
            await gate.wait()  # A's one slot stays taken
        return key

    @app.workflow(queue="q")
    async def job(ctx: object, key: str) -> str:
        return await ctx.run(work, key)  # type: ignore[attr-defined, no-any-return]

    async with app:
        await app.start(job, "A0", partition="A")
        await until(lambda: begun)  # A0 took A's slot (or the window's one begin)
        backlog = [await app.start(job, f"A{i}", partition="A") for i in range(1, 9)]
        other = await app.start(job, "B", partition="B")
        # (at the next claim: it reads the other keys' heads past the held-back page)
        assert await other.result(timeout=10) == "B"
        assert [await h.status() for h in backlog] == [RunStatus.PENDING] * 8
        gate.set()
        for h in backlog:
            await h.cancel()


async def test_more_keys_behind_a_backlog_than_a_claim_reads_all_begin(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A claim's page and the keys it reads past a held-back page: 3 here (500 in use),
    # so that 10 keys behind customer A's backlog take turns over several claims.
    from cantata.store import postgres_flow, sqlite_flow

    monkeypatch.setattr(sqlite_flow, "CANDIDATES", 3)
    monkeypatch.setattr(postgres_flow, "CANDIDATES", 3)
    app = App("flow", store=store_url, poll_interval=0.05)
    app.queue("q", concurrency=1)
    gate, begun = asyncio.Event(), []

    @app.step
    async def work(key: str) -> str:
        begun.append(key)
        if key.startswith("A"):
            await gate.wait()  # A's one slot stays taken
        return key

    @app.workflow(queue="q")
    async def job(ctx: object, key: str) -> str:
        return await ctx.run(work, key)  # type: ignore[attr-defined, no-any-return]

    async with app:
        await app.start(job, "A0", partition="A")
        await until(lambda: begun)
        backlog = [await app.start(job, f"A{i}", partition="A") for i in range(1, 6)]
        later = [await app.start(job, f"K{i}", partition=f"K{i}") for i in range(4, 10)]
        assert sorted([await h.result(timeout=20) for h in later]) == [
            f"K{i}" for i in range(4, 10)
        ]
        # Keys before those the last claims read (in key order) are read too: the reads
        # go round.
        earlier = [await app.start(job, f"K{i}", partition=f"K{i}") for i in range(4)]
        assert sorted([await h.result(timeout=20) for h in earlier]) == [
            f"K{i}" for i in range(4)
        ]
        assert [await h.status() for h in backlog] == [RunStatus.PENDING] * 5
        gate.set()
        for h in backlog:
            await h.cancel()
