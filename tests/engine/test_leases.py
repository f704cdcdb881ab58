"""Leases in one process: re-taken runs, lost runs, stops, and quiet outage warnings.

The multi-process versions (pauses, a store outage, signals) are in
tests/distributed/test_leases.py and test_graceful_stop.py.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pytest

import cantata
from cantata import App, ConfigurationError
from cantata.quietlog import QuietLog
from tests.flow.helpers import max_overlap
from tests.helpers import with_schema

from .helpers import eventually, make_app


def blocking_app(store_url: str, **kw: object) -> tuple[App, list[int], asyncio.Event]:
    app = make_app(store_url, **kw)  # type: ignore[arg-type]
    calls: list[int] = []
    go = asyncio.Event()

    @app.step
    async def slow() -> str:
        calls.append(cantata.step_info().attempt)
        await go.wait()
        return "done"

    @app.workflow
    async def one(ctx: cantata.WorkflowContext) -> str:
        return str(await ctx.run(slow))

    return app, calls, go


async def test_a_run_re_taken_by_its_worker_gets_a_fresh_execution(store_url: str) -> None:
    """The reported cause of runs stuck under a live owner: a worker claims again a
    run it still has an (older, fenced-out) execution of."""
    app, calls, go = blocking_app(store_url)
    async with app:
        h = await app.start(one := "one")
        await eventually(lambda: calls == [1])
        # Another worker (silent since, so claimable again) takes the run over...
        [taken] = await app.store.claim_runs(
            app.name, "ghost", [one], stale_before=app.clock.now() + 60, limit=1
        )
        # ...and this worker claims it back, while its stale execution is in the step.
        await eventually(lambda: len(calls) == 2, timeout=10)
        go.set()
        assert await h.result(timeout=10) == "done"
        run = await app.store.get_run(app.name, h.run_id)
        tried = await app.store.load_attempts(app.name, h.run_id)
    assert run is not None and run.fence > taken.fence
    # The attempt the re-take cut short is this live worker's own: not counted.
    assert [(a.attempt, a.error_type) for a in tried] == [(1, None)]


async def test_an_execution_whose_run_was_taken_over_stops(store_url: str) -> None:
    app, calls, go = blocking_app(store_url)
    async with app:
        h = await app.start("one")
        await eventually(lambda: calls == [1])
        await app.engine.store.heartbeat(app.name, "other", app.clock.now() + 3600, None,
                                         lease=app.lease)
        await app.store.claim_runs(app.name, "other", ["one"],
                                   stale_before=app.clock.now() + 60, limit=1)
        # The worker notices (its periodic check with the store) and stops its execution.
        await eventually(lambda: h.run_id not in app.engine.executions, timeout=10)
        go.set()
        await asyncio.sleep(0.2)
        run = await app.store.get_run(app.name, h.run_id)
    assert run is not None and run.owner == "other" and str(run.status) == "running"
    assert calls == [1]


async def test_a_stop_releases_what_it_cannot_finish_and_counts_no_attempt(
    sqlite_url: str,
) -> None:
    app, calls, _ = blocking_app(sqlite_url, shutdown_grace=0.1)
    async with app:
        h = await app.start("one")
        await eventually(lambda: calls == [1])
    async with make_app(sqlite_url).client() as reader:
        run = await reader.store.get_run(reader.name, h.run_id)
        interrupted = await reader.store.load_attempts(reader.name, h.run_id)
    assert run is not None and run.owner is None  # released at once, not left to a lease
    assert [(a.attempt, a.error_type) for a in interrupted] == [(1, "Interrupted")]
    app2, calls2, go2 = blocking_app(sqlite_url)
    go2.set()
    async with app2:
        assert await app2.get_handle(h.run_id).result(timeout=10) == "done"
        tried = await app2.store.load_attempts(app2.name, h.run_id)
    assert calls2 == [1]  # the interrupted attempt was not counted
    assert [(a.attempt, a.error_type) for a in tried] == [(1, None)]


async def test_a_stop_waits_for_the_step_in_progress(sqlite_url: str) -> None:
    app, calls, go = blocking_app(sqlite_url, shutdown_grace=10)
    async with app:
        h = await app.start("one")
        await eventually(lambda: calls == [1])
        asyncio.get_running_loop().call_later(0.3, go.set)
    run = None
    async with make_app(sqlite_url) as reader:
        run = await reader.store.get_run(reader.name, h.run_id)
    assert run is not None and str(run.status) == "completed" and calls == [1]


async def test_force_stop_ends_the_grace_at_once(sqlite_url: str) -> None:
    app, calls, _ = blocking_app(sqlite_url, shutdown_grace=30)
    await app.open()
    await app.start("one")
    await eventually(lambda: calls == [1])
    closing = asyncio.ensure_future(app.close())
    await asyncio.sleep(0.2)
    assert not closing.done()
    app.force_stop()
    await asyncio.wait_for(closing, 5)


def test_shutdown_grace_must_not_be_negative() -> None:
    with pytest.raises(ConfigurationError, match="shutdown_grace"):
        App("x", store="memory://", shutdown_grace=-1)


def test_quiet_log_says_one_line_per_cause_and_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet = QuietLog(logging.getLogger("cantata.test"), every=60)
    with caplog.at_level(logging.WARNING, "cantata.test"):
        for n in range(50):
            quiet.warning("store", "store down (%d)", n)
        quiet.warning("other", "something else")
        quiet.recovered("store", "store back")
        quiet.recovered("store", "store back")  # said once
        quiet.warning("store", "store down again")
    assert [r.getMessage() for r in caplog.records] == [
        "store down (0)", "something else", "store back", "store down again",
    ]


async def test_a_claim_loads_its_runs_histories_in_one_read(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Runs released with history (a stop mid-step) and claimed together by another
    worker: their histories come in one ``load_histories`` read, not a read per run, and
    each resumes from its own (the finished first step is replayed, not run again)."""
    from cantata.store.sqlite import SQLiteStore

    def two_step_app(**kw: object) -> tuple[App, list[int], asyncio.Event]:
        app = make_app(sqlite_url, **kw)  # type: ignore[arg-type]
        firsts: list[int] = []
        go = asyncio.Event()

        @app.step
        async def first(n: int) -> int:
            firsts.append(n)
            return n * 10

        @app.step
        async def slow() -> str:
            await go.wait()
            return "done"

        @app.workflow
        async def two(ctx: cantata.WorkflowContext, n: int) -> str:
            return f"{await ctx.run(first, n)}:{await ctx.run(slow)}"

        return app, firsts, go

    app, firsts, _ = two_step_app(shutdown_grace=0.1)
    async with app:
        handles = [await app.start("two", n) for n in range(3)]
        await eventually(lambda: sorted(firsts) == [0, 1, 2])
        await asyncio.sleep(0.2)  # each in `slow` now
    reads: list[tuple[str, int]] = []
    batch, single = SQLiteStore.load_histories, SQLiteStore.load_history

    async def load_histories(self: SQLiteStore, app_name: str, ids: list[str]) -> object:
        reads.append(("many", len(ids)))
        return await batch(self, app_name, ids)

    async def load_history(self: SQLiteStore, app_name: str, run_id: str) -> object:
        reads.append(("one", 1))
        return await single(self, app_name, run_id)

    monkeypatch.setattr(SQLiteStore, "load_histories", load_histories)
    monkeypatch.setattr(SQLiteStore, "load_history", load_history)
    app2, firsts2, go2 = two_step_app()
    go2.set()
    async with app2:
        results = [await app2.get_handle(h.run_id).result(timeout=10) for h in handles]
    assert results == ["0:done", "10:done", "20:done"]
    assert firsts2 == []  # replayed from the loaded history, not run again
    assert reads == [("many", 3)]


# -- workers with different leases (a rolling change of App(lease=...)) ----------------


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One store two apps share: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    postgres: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")
    return with_schema(postgres, schema)


def limited_app(url: str, lease: float, bodies: list[tuple[str, int, float, float]]) -> App:
    """An app (the embedded broker) whose one step allows one body at a time in the
    cluster and sleeps 3 s for run 1 (0.2 s for the others: a body taken beside run 1's
    overlaps it from its begin); each body appends (its app's lease, run, begin, end)."""
    app = make_app(url, "mixed", lease=lease, broker="embedded")
    who = f"lease={lease:g}"

    @app.step(concurrency=1)
    async def pay(i: int) -> int:
        begin = time.time()
        await asyncio.sleep(3.0 if i == 1 else 0.2)
        bodies.append((who, i, begin, time.time()))
        return i

    @app.workflow
    async def order(ctx: cantata.WorkflowContext, i: int) -> int:
        return int(await ctx.run(pay, i))

    return app


async def test_a_short_lease_worker_leaves_a_long_lease_worker_its_slot_and_run(
    shared_url: str,
) -> None:
    """Each worker is judged by its own lease: a worker with lease 1 s must not take the
    slot (nor the run) of a live worker with lease 30 s, which heartbeats only every
    7.5 s. Judged by the short lease, the long one looked dead after 1 s: the short one
    ran the step a second time beside it, and a second body of a concurrency=1 step."""
    bodies: list[tuple[str, int, float, float]] = []
    long_app = limited_app(shared_url, 30.0, bodies)
    short_app = limited_app(shared_url, 1.0, bodies)
    async with long_app:
        first = await long_app.start("order", 1)
        await eventually(lambda: _in_step(long_app, first.run_id), timeout=10)
        async with short_app:
            second = await short_app.start("order", 2)
            assert await first.result(timeout=30) == 1
            assert await short_app.get_handle(second.run_id).result(timeout=30) == 2
    assert min(bodies, key=lambda b: b[2])[:2] == ("lease=30", 1), bodies
    assert sorted(i for _, i, _, _ in bodies) == [1, 2], bodies  # each step ran once
    assert max_overlap([(begin, end) for _, _, begin, end in bodies]) == 1, bodies


async def _in_step(app: App, run_id: str) -> bool:
    """True once ``app``'s worker owns ``run_id`` and holds the step's one slot."""
    run = await app.store.get_run(app.name, run_id)
    held = await app.store.slots_held(app.name, "step:pay")
    return run is not None and run.owner == app.engine.worker_id and held == 1
