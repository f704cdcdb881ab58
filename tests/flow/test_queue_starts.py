"""Every start of a workflow declared with a queue waits in it: a trigger's run
(``app.start_on``), a child started with ``ctx.start_child`` and one called with
``ctx.call``, a fork (``app.fork``) and a retried run (``handle.retry``), as
``app.start`` does. A ``ctx.call`` of a run that holds the only slot
of a queue, for a child that would wait behind it, fails at once (it could never
begin)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata import App, Retry, RunHandle, WorkflowContext, WorkflowFailed
from cantata.errors import QueueDeadlock

TIMEOUT = 15.0


def gated_app(store: str) -> App:
    """An app whose ``job(i)`` waits in queue ``q`` (concurrency 1); job 0 holds the
    slot until the test sets ``app.gate``; ``app.order`` lists the jobs that began; a job
    in ``app.broken`` fails (at its first attempt)."""
    app = App("flowstarts", store=store, poll_interval=0.05)
    app.queue("q", concurrency=1)
    gate = asyncio.Event()
    order: list[int] = []
    broken: set[int] = set()
    app.gate = gate  # type: ignore[attr-defined]
    app.order = order  # type: ignore[attr-defined]
    app.broken = broken  # type: ignore[attr-defined]

    @app.step(retry=Retry(max_attempts=1))
    async def work(i: int) -> int:
        order.append(i)
        if i in broken:
            raise RuntimeError(f"job {i} is broken")
        if i == 0:
            await gate.wait()
        return i

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, i: int) -> int:
        return await ctx.run(work, i)  # type: ignore[no-any-return]

    return app


async def failed_job(app: App) -> RunHandle:
    """Job 1, failed (its step broken at its only attempt), then fixed: ``app.order``
    cleared and nothing broken any more."""
    broken: set[int] = app.broken  # type: ignore[attr-defined]
    broken.add(1)
    handle = await app.start("job", 1)
    with pytest.raises(WorkflowFailed):
        await handle.result(timeout=TIMEOUT)
    app.order.clear()  # type: ignore[attr-defined]
    broken.clear()  # the fix
    return handle


async def _waits_behind_job_0(app: App, waiting: int = 1) -> None:
    """Job 0 holds the slot and ``waiting`` runs wait in ``q`` (none of them began)."""
    order: list[int] = app.order  # type: ignore[attr-defined]
    deadline = time.monotonic() + TIMEOUT
    while True:
        [stats] = await app.queue_stats()
        if order == [0] and (stats.in_progress, stats.waiting) == (1, waiting):
            break
        assert order in ([], [0]), f"began while job 0 held the queue's slot: {order}"
        assert time.monotonic() < deadline, (
            f"no run waits in the queue: {stats}, began {order}"
        )
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)  # and they go on waiting
    assert order == [0]


async def test_a_triggered_run_waits_in_its_workflows_queue(store_url: str) -> None:
    app = gated_app(store_url)
    app.start_on("job.wanted", "job")
    async with app:
        first = await app.start("job", 0)
        await app.publish("job.wanted", 1)
        await _waits_behind_job_0(app)
        app.gate.set()  # type: ignore[attr-defined]
        assert await first.result(timeout=TIMEOUT) == 0
        [triggered] = [r for r in await app.list_runs(workflow="job") if r.run_id != first.run_id]
        assert await app.get_handle(triggered.run_id).result(timeout=TIMEOUT) == 1
    assert app.order == [0, 1]  # type: ignore[attr-defined]


async def test_a_started_child_waits_in_its_workflows_queue(store_url: str) -> None:
    app = gated_app(store_url)

    @app.workflow
    async def spawner(ctx: WorkflowContext) -> str:
        return await ctx.start_child("job", 1)

    async with app:
        first = await app.start("job", 0)
        parent = await app.start(spawner)
        child_id = await parent.result(timeout=TIMEOUT)
        await _waits_behind_job_0(app)
        app.gate.set()  # type: ignore[attr-defined]
        assert await app.get_handle(child_id).result(timeout=TIMEOUT) == 1
        assert await first.result(timeout=TIMEOUT) == 0
    assert app.order == [0, 1]  # type: ignore[attr-defined]


async def test_a_called_child_waits_in_its_workflows_queue(store_url: str) -> None:
    app = gated_app(store_url)

    @app.workflow
    async def caller(ctx: WorkflowContext) -> int:
        return await ctx.call("job", 1) + 10  # type: ignore[no-any-return]

    async with app:
        first = await app.start("job", 0)
        parent = await app.start(caller)
        await _waits_behind_job_0(app)
        assert not (await parent.status()).is_final
        app.gate.set()  # type: ignore[attr-defined]
        assert await parent.result(timeout=TIMEOUT) == 11
        assert await first.result(timeout=TIMEOUT) == 0
    assert app.order == [0, 1]  # type: ignore[attr-defined]


async def test_a_forked_run_waits_in_its_workflows_queue(store_url: str) -> None:
    """A fork is a new run of the workflow: it waits in the queue as a start does, not
    beside it (the queue's one slot is job 0's)."""
    app = gated_app(store_url)
    async with app:
        done = await app.start("job", 1)
        assert await done.result(timeout=TIMEOUT) == 1
        app.order.clear()  # type: ignore[attr-defined]
        first = await app.start("job", 0)
        fork = await app.fork(done.run_id, from_step="work#1")
        await _waits_behind_job_0(app)
        app.gate.set()  # type: ignore[attr-defined]
        assert await fork.result(timeout=TIMEOUT) == 1
        assert await first.result(timeout=TIMEOUT) == 0
    assert app.order == [0, 1]  # type: ignore[attr-defined]


async def test_a_retried_run_waits_in_its_workflows_queue(store_url: str) -> None:
    """A failed run retried after a fix waits in its queue again, behind the runs
    in progress, rather than begin beside them."""
    app = gated_app(store_url)
    async with app:
        failed = await failed_job(app)
        first = await app.start("job", 0)
        await _waits_behind_job_0(app, waiting=0)
        await failed.retry()
        await _waits_behind_job_0(app)
        app.gate.set()  # type: ignore[attr-defined]
        assert await failed.result(timeout=TIMEOUT) == 1
        assert await first.result(timeout=TIMEOUT) == 0
    assert app.order == [0, 1]  # type: ignore[attr-defined]


async def test_a_call_that_could_never_begin_fails_naming_the_queue(store_url: str) -> None:
    """A run holding the only slot of ``q`` calls a child that waits in ``q`` (same
    partition): the child could begin only once the parent ended, which waits for it."""
    app = gated_app(store_url)

    @app.workflow(queue="q")
    async def nested(ctx: WorkflowContext) -> int:
        try:
            return await ctx.call("job", 1)  # type: ignore[no-any-return]
        except QueueDeadlock as exc:
            raise RuntimeError(str(exc)) from None

    async with app:
        h = await app.start(nested)
        with pytest.raises(WorkflowFailed, match=r"queue 'q'.*concurrency=1.*start_child"):
            await h.result(timeout=TIMEOUT)
        assert [r.workflow for r in await app.list_runs()] == ["nested"]  # no child stored


async def test_a_call_into_another_partition_is_no_deadlock(store_url: str) -> None:
    """The parent holds the slot of its own partition: a child in the default one
    begins."""
    app = gated_app(store_url)

    @app.workflow(queue="q")
    async def nested(ctx: WorkflowContext) -> int:
        return await ctx.call("job", 1) + 10  # type: ignore[no-any-return]

    async with app:
        h = await app.start(nested, partition="customer-1")
        assert await h.result(timeout=TIMEOUT) == 11


def two_step_app(store: str, version: str | None = None) -> App:
    """``pair(i)`` waits in queue ``q`` and runs ``first`` then ``second``; ``app.calls``
    lists the steps run, ``app.broken`` the jobs whose ``second`` fails."""
    app = App("flowpairs", store=store, poll_interval=0.05, version=version)
    app.queue("q", concurrency=1)
    calls: list[str] = []
    broken: set[int] = set()
    app.calls = calls  # type: ignore[attr-defined]
    app.broken = broken  # type: ignore[attr-defined]

    @app.step
    async def first(i: int) -> int:
        calls.append(f"first {i}")
        return i

    @app.step(retry=Retry(max_attempts=1))
    async def second(i: int) -> int:
        calls.append(f"second {i}")
        if i in broken:
            raise RuntimeError(f"job {i} is broken")
        return i * 10

    @app.workflow(queue="q")
    async def pair(ctx: WorkflowContext, i: int) -> int:
        a: int = await ctx.run(first, i)
        b: int = await ctx.run(second, i)
        return a + b

    return app


async def test_a_queued_fork_or_retry_replays_the_steps_it_keeps(store_url: str) -> None:
    """Admitted from the queue, a fork and a retried run go on from their history: the
    steps recorded before the fork's step, or before the failed one, are not run again."""
    app = two_step_app(store_url)
    app.broken.add(1)  # type: ignore[attr-defined]
    async with app:
        failed = await app.start("pair", 1)
        with pytest.raises(WorkflowFailed):
            await failed.result(timeout=TIMEOUT)
        app.broken.clear()  # type: ignore[attr-defined]
        done = await app.start("pair", 2)
        assert await done.result(timeout=TIMEOUT) == 22
        app.calls.clear()  # type: ignore[attr-defined]
        await failed.retry()
        assert await failed.result(timeout=TIMEOUT) == 11
        fork = await app.fork(done.run_id, from_step="second#1")
        assert await fork.result(timeout=TIMEOUT) == 22
    assert app.calls == ["second 1", "second 2"]  # type: ignore[attr-defined]


async def test_an_older_worker_does_not_begin_a_queued_run_of_a_newer_version(
    store_url: str,
) -> None:
    """docs/operating.md, versions: older code never takes the runs of a newer version
    that has served. A run waiting in a queue is no exception: a worker of the old
    version leaves it waiting for one of its version."""
    if store_url == "memory://":
        pytest.skip("two apps share the store: memory:// is one process's own")
    old, new = two_step_app(store_url, version="v1"), two_step_app(store_url, version="v2")
    async with old:
        async with new:  # v2 serves after v1 did: it is the newer version
            pass
        async with new.client():
            run = await new.start("pair", 3)
        await asyncio.sleep(1.5)  # the old worker's queue loop looks many times meanwhile
        assert old.calls == []  # type: ignore[attr-defined]
        assert not (await old.get_handle(run.run_id).status()).is_final
        # and `cantata stalled` says why it waits, as for a run outside a queue
        [stall] = await old.stalled(older_than=0)
        assert stall.reason == "queued" and stall.hint is not None, stall
        assert "no live worker takes version v2 of this run" in stall.hint, stall
    async with new:
        assert await new.get_handle(run.run_id).result(timeout=TIMEOUT) == 33
    assert new.calls == ["first 3", "second 3"]  # type: ignore[attr-defined]
