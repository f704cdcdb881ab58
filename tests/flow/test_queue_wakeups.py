"""A throttled queue begins its next run as soon as a slot frees (a run ends, fails or
is cancelled), in every store: not at the queue loop's next look on its own (every
5 poll intervals, or PostgreSQL's safety-net wait), and not later for runs cancelled
while they waited ahead of it (docs/flow-control.md)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata import App, RunStatus, WorkflowContext, WorkflowFailed
from tests.flow.helpers import until
from tests.helpers import watch_claims, with_schema

# Seconds from a slot freed to the next run's begin that count as "at once": far above
# a claim's round trips, well below the loop's own look (1 s in process with the default
# poll interval, about 5 s while PostgreSQL's listener hears other processes).
AT_ONCE = 0.8


async def test_a_freed_slot_begins_the_next_run_at_once_past_cancelled_ones(
    store_url: str,
) -> None:
    app = App("wake", store=store_url)  # the default poll interval
    app.queue("q", concurrency=1)
    begun: dict[int, float] = {}
    ended: dict[int, float] = {}
    gate = asyncio.Event()

    @app.step
    async def work(i: int) -> int:
        begun[i] = time.monotonic()
        if i == 0:
            await gate.wait()
        ended[i] = time.monotonic()  # the slot frees a few writes later, not earlier
        return i

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, i: int) -> int:
        out: int = await ctx.run(work, i)
        if i == 5:
            raise ValueError("job 5 fails: its slot frees all the same")
        return out

    async with app:
        first = await app.start(job, 0)
        await until(lambda: 0 in begun)  # job 0 holds the one slot
        handles = [await app.start(job, i) for i in range(1, 7)]
        cancelled = [handles[0], handles[1], handles[3]]  # jobs 1, 2 and 4
        for h in cancelled:
            await h.cancel()
        for h in cancelled:
            await until(lambda h=h: _is(h, RunStatus.CANCELLED))  # type: ignore[misc]
        gate.set()
        assert await first.result(timeout=30) == 0
        assert await handles[2].result(timeout=30) == 3
        with pytest.raises(WorkflowFailed):
            await handles[4].result(timeout=30)
        assert await handles[5].result(timeout=30) == 6
    assert sorted(begun) == [0, 3, 5, 6]
    waits = {
        "3 after 0 ended (1 and 2 cancelled between)": begun[3] - ended[0],
        "5 after 3 ended (4 cancelled between)": begun[5] - ended[3],
        "6 after 5 failed": begun[6] - ended[5],
    }
    assert all(w < AT_ONCE for w in waits.values()), waits


async def _is(handle: object, status: RunStatus) -> bool:
    return await handle.status() == status  # type: ignore[attr-defined, no-any-return]


@pytest.mark.postgres
async def test_a_run_ending_in_another_process_begins_the_next_one_at_once(
    postgres_url: str, pooled_schema: str
) -> None:
    """PostgreSQL: the end of a run wakes the queue loops of the other processes too
    (the store's ``runs`` notification), not only after their safety-net wait. Two
    workers of one app, each with the code of one of the queue's two workflows: a run
    of ``wb`` can begin only on B, when the run of ``wa`` that held the slot ends on A."""
    url = with_schema(postgres_url, pooled_schema)
    begun: dict[str, float] = {}
    ended: dict[str, float] = {}
    gate = asyncio.Event()

    def worker(workflow: str) -> App:
        app = App("wake2", store=url, broker="embedded")
        app.queue("q", concurrency=1)

        @app.step
        async def work(key: str) -> str:
            begun[key] = time.monotonic()
            if key == "held":
                await gate.wait()
            ended[key] = time.monotonic()
            return key

        async def body(ctx: WorkflowContext, key: str) -> str:
            return await ctx.run(work, key)  # type: ignore[no-any-return]

        body.__name__ = body.__qualname__ = workflow
        app.workflow(queue="q")(body)
        return app

    a, b = worker("wa"), worker("wb")
    async with a, b:
        held = await a.start("wa", "held")
        await until(lambda: "held" in begun)
        queued = await a.start("wb", "next")
        await asyncio.sleep(0.2)  # B's loop has looked and waits (its safety net: ~5 s)
        gate.set()
        assert await held.result(timeout=30) == "held"
        assert await queued.result(timeout=30) == "next"
    assert begun["next"] - ended["held"] < AT_ONCE, begun["next"] - ended["held"]


@pytest.mark.postgres
async def test_a_run_queued_while_the_workers_hold_is_in_doubt_begins_once_it_is_not(
    postgres_url: str, pooled_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a run queued by another process while the worker's heartbeat is late
    (its hold in doubt: it takes on nothing new) begins within a poll interval or so of
    the heartbeat getting through, not after the queue loop's safety-net wait (~5 s):
    the notification that told of it came while the loop could not claim."""
    url = with_schema(postgres_url, pooled_schema)
    begun: dict[str, float] = {}

    def app_of(serves: bool) -> App:
        app = App("doubt", store=url, broker="embedded")
        app.queue("q", concurrency=1)

        @app.workflow(queue="q")
        async def job(ctx: WorkflowContext, key: str) -> str:
            if serves:
                begun[key] = time.monotonic()
            return key

        return app

    worker, client = app_of(True), app_of(False)
    async with worker:
        await client.open(serve=False)
        try:
            await until(lambda: worker.store.listening)
            engine = worker._engine
            assert engine is not None and engine.flow is not None
            monkeypatch.setattr(engine.ownership, "expired", lambda: True)
            # A pass now, skipped: one under way before the patch (it had looked at the
            # hold already) has ended, and would otherwise claim the run started next.
            queues = engine.flow.queues
            queues.wakeup.set()
            await until(lambda: queues._in_doubt)
            handle = await client.start("job", "late")
            await asyncio.sleep(1.0)  # the loop heard of it, and could not claim it
            assert "late" not in begun, "a worker whose hold is in doubt took on a run"
            monkeypatch.undo()
            back = time.monotonic()
            assert await handle.result(timeout=30) == "late"
        finally:
            await client.close()
    assert begun["late"] - back < AT_ONCE, (
        f"the run began {begun['late'] - back:.2f} s after the hold was sure again")


async def test_a_new_keys_run_begins_at_once_behind_another_keys_long_backlog(
    store_url: str,
) -> None:
    """Key A holds its one slot (``concurrency=1`` per key) with 700 runs waiting, more
    than a claim's first page (500): a run of key B queued behind them begins at the
    next claim, not after a back-off (up to 8 s before the claims read the partitions'
    heads; more than 120 s before they read past a held-back page at all)."""
    app = App("wake", store=store_url)  # the default poll interval
    app.queue("q", concurrency=1)
    begun: dict[str, float] = {}
    gate = asyncio.Event()

    @app.step
    async def work(key: str) -> str:
        begun[key] = time.monotonic()
        if key == "A0":
            await gate.wait()
        return key

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, key: str) -> str:
        out: str = await ctx.run(work, key)
        return out

    claims: list[tuple[float, str]] = []
    async with app:
        watch_claims(app.store, "claim_queued_runs", claims,
                     lambda done, kw: f"took {len(done.runs)} of {kw.get('limit')}")
        first = await app.start(job, "A0", partition="A")
        await until(lambda: "A0" in begun)
        # (started, and cancelled below, side by side: 700 round trips one after
        # another were most of the test's time on PostgreSQL)
        backlog = await asyncio.gather(
            *(app.start(job, f"A{i}", partition="A") for i in range(1, 701)))
        # Long enough for claims to read past A's full page and find nothing (which
        # made the claims of an older version wait 1, 2, then 4 s before reading again).
        await asyncio.sleep(3.5)
        started = time.monotonic()
        other = await app.start(job, "B", partition="B")
        assert await other.result(timeout=30) == "B"
        late = begun["B"] - started
        assert late < 1.0, (f"B began {late:.2f} s after its start; the claims since 1 s "
                            "before it: " + "; ".join(
                                f"{at - started:+.3f} s {what}" for at, what in claims
                                if at > started - 1.0))
        assert len(begun) == 2  # none of A's backlog began
        gate.set()
        assert await first.result(timeout=30) == "A0"
        await asyncio.gather(*(h.cancel() for h in backlog))
