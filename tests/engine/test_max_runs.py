"""``App(max_runs=...)``: the runs in progress in one worker process at most
(docs/flow-control.md, "Runs per worker"). Its claims take no more than its room, a
start past it is stored for any worker with room, a run that only waits does not
count, and a slot that frees claims again at once."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cantata import App, ConfigurationError, WorkflowContext
from tests.helpers import eventually, watch_claims

from .helpers import make_app


class Gauge:
    """Runs inside the step at once: now, and the most seen."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def hold(self, seconds: float) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.now -= 1


def build(url: str, gauge: Gauge, ran: list[int] | None = None, *, step_s: float = 0.05,
          **kw: Any) -> App:
    kw.setdefault("park_after", None)
    app = make_app(url, "bound", **kw)
    app.queue("q", per_worker=100)

    @app.step
    async def work(n: int) -> int:
        await gauge.hold(step_s)
        if ran is not None:
            ran.append(n)
        return n

    @app.step(concurrency=1)
    async def narrow(n: int) -> int:
        await gauge.hold(step_s)
        return n

    @app.workflow
    async def short(ctx: WorkflowContext, n: int) -> int:
        result: int = await ctx.run(work, n)
        return result

    @app.workflow
    async def through_narrow(ctx: WorkflowContext, n: int) -> int:
        result: int = await ctx.run(narrow, n)
        return result

    @app.workflow
    async def sleeper(ctx: WorkflowContext, seconds: float) -> str:
        await ctx.sleep(seconds)
        return "woke"

    @app.workflow
    async def nap(ctx: WorkflowContext, n: int) -> int:
        await ctx.sleep(0.5)
        result: int = await ctx.run(work, n)
        return result

    @app.workflow
    async def parent(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.call("short", n)) + 1000

    return app


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10"])
def test_max_runs_is_checked(bad: object) -> None:
    with pytest.raises(ConfigurationError, match=r"max_runs must be a whole number of runs "
                       r">= 1, or None for no bound, got"):
        App("bound", store="memory://", max_runs=bad)  # type: ignore[arg-type]


def test_max_runs_is_no_bound_unless_given() -> None:
    assert App("bound", store="memory://").max_runs is None
    assert App("bound", store="memory://", max_runs=1).max_runs == 1


async def test_a_worker_never_has_more_than_max_runs_in_progress(shared_store: str) -> None:
    """3 K runs started at once, by the worker itself and by a client: never more than
    K in the step at once, and every run ends."""
    k, gauge = 4, Gauge()
    async with build(shared_store, gauge, max_runs=k) as app, \
            build(shared_store, Gauge()).client() as client:
        handles = await asyncio.gather(
            *(app.start("short", n) for n in range(2 * k)),
            *(client.start("short", n) for n in range(2 * k, 3 * k)))
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert sorted(results) == list(range(3 * k))
    assert gauge.peak <= k, f"{gauge.peak} runs in progress at once, max_runs={k}"


async def test_two_workers_each_end_a_fair_share_of_a_burst(shared_store: str) -> None:
    """A client starts 6 K runs at once; two workers of max_runs=K share them: each
    ends at least a quarter (without the bound, one claim of up to 100 runs could take
    them all)."""
    k, total = 3, 18
    a_ran: list[int] = []
    b_ran: list[int] = []
    a_gauge, b_gauge = Gauge(), Gauge()
    async with build(shared_store, a_gauge, a_ran, step_s=0.1, max_runs=k), \
            build(shared_store, b_gauge, b_ran, step_s=0.1, max_runs=k):
        await asyncio.sleep(0.3)  # (both serving)
        async with build(shared_store, Gauge()).client() as client:
            handles = await asyncio.gather(*(client.start("short", n) for n in range(total)))
            await asyncio.gather(*(h.result(timeout=60) for h in handles))
    assert sorted(a_ran + b_ran) == list(range(total))
    assert len(a_ran) >= total // 4 and len(b_ran) >= total // 4, (len(a_ran), len(b_ran))
    assert a_gauge.peak <= k and b_gauge.peak <= k, (a_gauge.peak, b_gauge.peak)


@pytest.mark.parametrize("park_after", [None, 0.0], ids=["in-memory", "parked"])
async def test_runs_that_wait_do_not_count(
    shared_store: str, park_after: float | None
) -> None:
    """K runs asleep (kept in memory, or parked in the store) leave the room of K to
    new runs, which end while they sleep."""
    k, gauge = 3, Gauge()
    async with build(shared_store, gauge, max_runs=k, park_after=park_after) as app:
        sleepers = [await app.start("sleeper", 60.0) for _ in range(k)]
        await asyncio.sleep(0.3)  # (each in its sleep)
        handles = await asyncio.gather(*(app.start("short", n) for n in range(2 * k)))
        results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
        assert sorted(results) == list(range(2 * k))
        for s in sleepers:
            assert not (await s.status()).is_final
    assert gauge.peak <= k


async def test_parents_waiting_for_their_children_leave_them_room(shared_store: str) -> None:
    """K parents fill the room, each calls a child (``ctx.call``): waiting for it, a
    parent does not count, so the children begin and every parent ends."""
    k, gauge = 2, Gauge()
    async with build(shared_store, gauge, max_runs=k) as app:
        handles = await asyncio.gather(*(app.start("parent", n) for n in range(2 * k)))
        results = await asyncio.gather(*(h.result(timeout=20) for h in handles))
    assert sorted(results) == [1000 + n for n in range(2 * k)]
    assert gauge.peak <= k


async def test_a_slot_that_frees_claims_again_at_once(shared_store: str) -> None:
    """max_runs=1 and a poll interval of 3 s: each run past the first begins when the
    one before ends here (Engine.slot_freed), not at the next look for work (on
    PostgreSQL a run's end is not news to the claim loop: store.base.RUNNABLE)."""
    gauge = Gauge()
    async with build(shared_store, gauge, max_runs=1, poll_interval=3.0) as app:
        await asyncio.sleep(0.2)
        started = time.monotonic()
        handles = await asyncio.gather(*(app.start("short", n) for n in range(5)))
        await asyncio.gather(*(h.result(timeout=30) for h in handles))
        took = time.monotonic() - started
    assert gauge.peak == 1
    assert took < 2.5, f"5 runs of 0.05 s one after another took {took:.2f} s"


async def test_parked_runs_that_come_due_are_claimed_within_max_runs(shared_store: str) -> None:
    """3 K runs parked in a 0.5 s sleep (``park_after=0``) come due together: the
    claims of their timers take no more than the room, and every run ends."""
    k, gauge = 3, Gauge()
    async with build(shared_store, gauge, max_runs=k, park_after=0.0) as app:
        handles = await asyncio.gather(*(app.start("nap", n) for n in range(3 * k)))
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert sorted(results) == list(range(3 * k))
    assert gauge.peak <= k, f"{gauge.peak} runs in progress at once, max_runs={k}"


async def test_a_dead_workers_runs_are_taken_over_within_max_runs(shared_store: str) -> None:
    """3 K runs claimed by a worker that then fell silent (its heartbeat long past its
    lease): a worker of max_runs=K takes them over K at a time, and ends them all."""
    k, gauge = 3, Gauge()
    async with build(shared_store, Gauge()).client() as client:
        handles = await asyncio.gather(*(client.start("short", n) for n in range(3 * k)))
        store, now = client.store, time.time()
        await store.heartbeat(client.name, "ghost", now - 100.0, None, lease=1.0)
        taken = await store.claim_runs(client.name, "ghost", ["short"], stale_before=now,
                                       limit=100, now=now)
        assert len(taken) == 3 * k
        async with build(shared_store, gauge, max_runs=k):
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
    assert sorted(results) == list(range(3 * k))
    assert gauge.peak <= k, f"{gauge.peak} runs in progress at once, max_runs={k}"


async def test_a_queue_admits_no_more_than_max_runs(shared_store: str) -> None:
    """A queue whose own ``per_worker`` (100) is no bound here: 3 K runs queued at
    once begin K at a time on a worker of max_runs=K, each as a run before it ends."""
    k, gauge = 3, Gauge()
    async with build(shared_store, gauge, max_runs=k, poll_interval=1.0) as app:
        claims = _watch_queue_claims(app)
        await asyncio.sleep(0.2)
        started = time.monotonic()
        handles = await asyncio.gather(
            *(app.start("short", n, queue="q") for n in range(3 * k)))
        results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        took = time.monotonic() - started
    assert sorted(results) == list(range(3 * k))
    assert gauge.peak <= k, f"{gauge.peak} runs in progress at once, max_runs={k}"
    assert took < 4.0, (
        f"3 rounds of 0.05 s steps took {took:.2f} s; the queue's claims, in seconds "
        "from the first start: " + ", ".join(
            f"{at - started:+.2f} {what}" for at, what in claims if at >= started - 0.5))


async def test_room_kept_by_a_claim_that_took_less_lets_a_held_queue_begin_at_once(
    shared_store: str,
) -> None:
    """max_runs=1 and a poll interval of 1 s (the queue loop's own look: 5 s). The claim
    loop's claim of runs (slowed to 0.6 s here, as a loaded store's) keeps the one slot
    while it runs; a run queued meanwhile finds no room, and its queue waits. The claim
    takes nothing: the slot it kept frees, and the queued run begins then, not at the
    queue loop's next look (CI: one such miss made 3 rounds of 0.05 s steps 5.6 s)."""
    gauge = Gauge()
    async with build(shared_store, gauge, max_runs=1, poll_interval=1.0) as app:
        await asyncio.sleep(0.2)
        store: Any = app.store
        claim = store.claim_runs
        claiming: list[float] = []

        async def slow_claim_runs(*args: Any, **kwargs: Any) -> Any:
            claiming.append(time.monotonic())
            await asyncio.sleep(0.6)
            return await claim(*args, **kwargs)

        store.claim_runs = slow_claim_runs
        app._engine.ownership.claim_now()  # type: ignore[union-attr]
        await eventually(lambda: claiming, timeout=5)
        started = time.monotonic()
        handle = await app.start("short", 1, queue="q")
        assert await handle.result(timeout=30) == 1
        took = time.monotonic() - started
        store.claim_runs = claim
    assert took < 2.0, (
        f"a run queued while a claim kept the only slot took {took:.2f} s (the claim "
        f"began {started - claiming[0]:.2f} s before the start)")


def _watch_queue_claims(app: App) -> list[tuple[float, str]]:
    """Each claim of queued runs ``app``'s store makes (monotonic time, what): begun,
    and how many it took of how many it could (what a failure shows)."""
    claims: list[tuple[float, str]] = []
    watch_claims(app.store, "claim_queued_runs", claims,
                 lambda done, kw: f"took {len(done.runs)} of {kw.get('limit')}")
    return claims


async def test_runs_waiting_for_a_steps_slot_count(shared_store: str) -> None:
    """A step of ``concurrency=1``: the runs waiting for its slot are about to run a
    step and count, so a worker of max_runs=K holds K runs, not all 3 K (which would
    wait in its memory, none for another worker to take)."""
    k, gauge = 3, Gauge()
    async with build(shared_store, gauge, max_runs=k, step_s=0.02) as app:
        held = 0

        async def sample() -> None:
            nonlocal held
            while True:
                held = max(held, len(app.engine.executions))
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample())
        try:
            handles = await asyncio.gather(
                *(app.start("through_narrow", n) for n in range(3 * k)))
            results = await asyncio.gather(*(h.result(timeout=30) for h in handles))
        finally:
            sampler.cancel()
    assert sorted(results) == list(range(3 * k))
    assert gauge.peak == 1
    assert held <= k, f"{held} runs held at once, max_runs={k}"
