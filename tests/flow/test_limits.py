"""Step and handler limits on one process: overlap, rate, waiting is not an attempt."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Rate, Retry
from cantata.errors import ConfigurationError, RegistrationError, StoreUnavailable
from cantata.flow.limits import Granted, acquire_ahead, retime_begin
from cantata.model.flow import SlotGrant
from cantata.store.sqlite import SQLiteStore
from cantata.testing import environment
from tests.flow.helpers import max_in_window, max_overlap
from tests.helpers import eventually


async def test_step_concurrency_across_runs_and_waiting_is_not_an_attempt() -> None:
    app = App("limits")
    spans: list[tuple[float, float]] = []

    @app.step(concurrency=2)
    async def pay(i: int) -> int:
        begin = time.monotonic()
        await asyncio.sleep(0.05)
        spans.append((begin, time.monotonic()))
        return i

    @app.workflow
    async def order(ctx: object, i: int) -> int:
        return await ctx.run(pay, i)  # type: ignore[attr-defined, no-any-return]

    async with environment(app):
        handles = [await app.start(order, i) for i in range(8)]
        assert [await h.result(timeout=30) for h in handles] == list(range(8))
        for h in handles:
            attempts = await app.store.load_attempts(app.name, h.run_id)
            assert [a.attempt for a in attempts] == [1]
        assert await app.store.slots_held(app.name, "step:pay") == 0
    assert max_overlap(spans) == 2


async def test_a_freed_step_slot_goes_to_a_waiting_run_at_once(tmp_path: Path) -> None:
    # a real clock: the testing environment's skips the waits this is about
    app = App("limits", store=f"sqlite:///{tmp_path}/limits.db", broker="embedded")
    spans: list[tuple[float, float]] = []

    @app.step(concurrency=1)
    async def pay(i: int) -> int:
        begin = time.monotonic()
        await asyncio.sleep(0.05)
        spans.append((begin, time.monotonic()))
        return i

    @app.workflow
    async def order(ctx: object, i: int) -> int:
        return await ctx.run(pay, i)  # type: ignore[attr-defined, no-any-return]

    async with app:
        handles = [await app.start(order, i) for i in range(6)]
        assert [await h.result(timeout=30) for h in handles] == list(range(6))
    spans.sort()
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(spans)]
    # the release wakes the waiters (not their next poll: poll_interval * 5 = 1 s)
    assert max(gaps) < 0.3, gaps
    assert max_overlap(spans) == 1


async def test_step_rate_and_slot_freed_on_failure() -> None:
    app = App("limits", store="memory://")
    begins: list[float] = []
    failed = set()

    @app.step(rate=Rate(3, per=0.4), concurrency=1,
              retry=Retry(max_attempts=3, initial_interval=0.01))
    async def call_api(i: int) -> int:
        begins.append(time.time())
        if i % 2 and i not in failed:
            failed.add(i)
            raise RuntimeError("flaky")
        return i

    @app.workflow
    async def wf(ctx: object, i: int) -> int:
        return await ctx.run(call_api, i)  # type: ignore[attr-defined, no-any-return]

    async with app:
        handles = [await app.start(wf, i) for i in range(6)]
        assert [await h.result(timeout=30) for h in handles] == list(range(6))
        assert await app.store.slots_held(app.name, "step:call_api") == 0
    assert len(begins) == 9  # three retried after a failure, whose slot was released
    # Timed in the bodies: a body that begins late after its grant has its begin
    # recorded again (unlimited, the nine would begin within a few milliseconds).
    assert max_in_window(begins, 0.4) <= 3, sorted(b - min(begins) for b in begins)


async def test_a_begin_waited_for_is_timed_again_when_the_wait_ends_late() -> None:
    """A begin recorded ahead (after a slow round trip) is waited for; a loaded machine
    or a busy event loop may end that wait late. The re-timing (flow/limits.py) looks
    at the clock again then and records the begin anew: the body never begins more
    than half the window's margin after its recorded begin (before, it began as late as
    the wake-up came, and a rate counted by the bodies' own clocks was exceeded)."""
    app = App("limits", store="memory://")
    rate = Rate(3, per=0.4)
    slack = (rate.window - rate.per) / 2
    recorded: list[float] = []

    async with app:
        engine = app.engine

        async def ask(lead: float) -> Granted:  # the step's own request, as the engine's
            granted = await acquire_ahead(engine, "step:call_api", "r1:call_api#1@1", None,
                                          rate, asyncio.sleep, lead)
            recorded.append(granted.begin)
            return granted

        first = await ask(0.05)  # recorded 50 ms ahead
        # The loop busy from 10 ms to 110 ms: the wait for the begin ends 60 ms late.
        asyncio.get_running_loop().call_later(0.01, time.sleep, 0.1)
        await retime_begin(engine, rate, first.begin, ask)
        began = time.time()  # (what the body would read first)
    assert 0 <= began - recorded[-1] <= slack, (began - first.begin, recorded)
    assert len(recorded) >= 2  # recorded again after the late wake-up


async def test_a_slot_release_the_store_refused_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A release that meets an outage is retried until the store takes it: a live
    worker's slot is freed by no one else (each execution's holder is its own), so a
    release given up would hold the slot for as long as the worker lives."""
    app = App("limits", store="memory://")

    @app.step(concurrency=1)
    async def pay(i: int) -> int:
        return i

    @app.workflow
    async def order(ctx: object, i: int) -> int:
        return await ctx.run(pay, i)  # type: ignore[attr-defined, no-any-return]

    async with app:
        real = app.store.release_slot
        refused: list[tuple[Any, ...]] = []

        async def flaky(*args: Any, **kw: Any) -> None:
            if not refused:
                refused.append(args)
                raise StoreUnavailable("the store is away for a moment (on purpose)")
            await real(*args, **kw)

        monkeypatch.setattr(app.store, "release_slot", flaky)
        first = await app.start(order, 1)
        assert await first.result(timeout=10) == 1
        second = await app.start(order, 2)
        assert await second.result(timeout=10) == 2
        assert refused
        await eventually(lambda: _no_slot(app, "step:pay"), timeout=5)


async def _no_slot(app: App, scope: str) -> bool:
    return await app.store.slots_held(app.name, scope) == 0


async def test_handler_group_concurrency() -> None:
    app = App("limits")
    spans: list[tuple[float, float]] = []
    done = asyncio.Event()

    @app.on("order.placed", group="billing", concurrency=2)
    async def bill(event: object) -> None:
        begin = time.monotonic()
        await asyncio.sleep(0.05)
        spans.append((begin, time.monotonic()))
        if len(spans) == 7:
            done.set()

    async with environment(app):
        for i in range(7):
            await app.publish("order.placed", {"i": i})
        await asyncio.wait_for(done.wait(), 30)
    assert max_overlap(spans) == 2


def test_bad_limits_name_the_value() -> None:
    app = App("limits")
    with pytest.raises(ConfigurationError, match=r"step concurrency .* got 0"):
        app.step(concurrency=0)
    with pytest.raises(RegistrationError, match=r"Rate\(\.\.\.\), got 5"):
        app.step(rate=5)  # type: ignore[call-overload]  # not a Rate, on purpose
    with pytest.raises(ConfigurationError, match=r"'billing' concurrency .* got -2"):
        app.on("a.b", group="billing", concurrency=-2)


class SlowSlotsStore(SQLiteStore):
    """A SQLite store whose slot requests take 0.2 s more (0.1 s on the way there, 0.1 s
    on the way back) for the first ``slow_for`` seconds after the first one, then none:
    a cold pool, a busy moment."""

    def __init__(self, path: str, slow_for: float) -> None:
        super().__init__(path)
        self.slow_for = slow_for
        self.slow_until: float | None = None
        self.slow_calls = 0

    async def acquire_slot(self, *args: Any, **kwargs: Any) -> SlotGrant:
        if self.slow_until is None:
            self.slow_until = time.monotonic() + self.slow_for
        lag = 0.1 if time.monotonic() < self.slow_until else 0.0
        self.slow_calls += lag > 0
        await asyncio.sleep(lag)
        grant = await super().acquire_slot(*args, **kwargs)
        await asyncio.sleep(lag)
        return grant


async def test_step_rate_holds_as_the_bodies_see_it_with_a_slow_store(tmp_path: Path) -> None:
    """Slot requests 0.2 s slower than the window's margin (0.1 s) for a while: the
    bodies' starts, timed in the bodies, still keep the rate. (Re-timed three times
    and then let go 0.2 s after its last recorded begin, the first bodies began so late
    that the next ones, asking once the store was fast, began less than ``per`` after
    them.)"""
    store = SlowSlotsStore(str(tmp_path / "slow.db"), slow_for=0.9)
    app = App("rate", store=store, poll_interval=0.1, lease=2.0)
    starts: list[float] = []

    @app.step(rate=Rate(2, per=1))
    async def call(i: int) -> int:
        starts.append(time.time())
        return i

    @app.workflow
    async def wf(ctx: object, i: int) -> int:
        return await ctx.run(call, i)  # type: ignore[attr-defined, no-any-return]

    async with app:
        handles = [await app.start(wf, i) for i in range(4)]
        assert [await h.result(timeout=60) for h in handles] == list(range(4))
    assert store.slow_calls >= 4  # (the slow store was asked)
    assert max_in_window(starts, 1.0) <= 2, sorted(b - min(starts) for b in starts)


@pytest.mark.postgres
@pytest.mark.parametrize("round_", range(3))  # (it failed one round in six)
async def test_step_rate_holds_as_the_bodies_see_it_on_postgres(
    postgres_url: str, pooled_schema: str, round_: int
) -> None:
    """No window of ``per`` seconds holds more than ``limit`` starts of the step's body,
    timed in the body (the cold first calls of a fresh pool once let a third in)."""
    app = App("rate", store=f"{postgres_url}?schema={pooled_schema}", poll_interval=0.1,
              lease=2.0)
    starts: list[float] = []

    @app.step(rate=Rate(2, per=1))
    async def call(i: int) -> int:
        starts.append(time.time())
        return i

    @app.workflow
    async def wf(ctx: object, i: int) -> int:
        return await ctx.run(call, i)  # type: ignore[attr-defined, no-any-return]

    async with app:
        handles = [await app.start(wf, i) for i in range(8)]
        assert [await h.result(timeout=60) for h in handles] == list(range(8))
    assert max_in_window(starts, 1.0) <= 2, sorted(b - min(starts) for b in starts)
