"""Operating queued runs (docs/flow-control.md#queues, docs/operating.md): a cancelled
run that never began ends on any worker of its workflow, whatever the version it is
pinned to, and with no worker it stays pending until one runs; a retried run's wait is
counted from the retry; a fork or a retry of a run whose queue row was pruned still
waits in its workflow's queue."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata import App, ResultTimeout, WorkflowCancelled
from cantata.model import codec
from tests.flow.test_queue_starts import (
    _waits_behind_job_0,
    failed_job,
    gated_app,
    two_step_app,
)

TIMEOUT = 15.0


def _two_apps(store_url: str) -> None:
    if store_url == "memory://":
        pytest.skip("two apps share the store: memory:// is one process's own")


async def test_a_queued_run_of_a_version_no_worker_runs_ends_cancelled_on_another(
    store_url: str,
) -> None:
    """A run pinned to v2 waits in its queue while only a v1 worker runs (it may not
    begin there). Cancelled, it ends ``cancelled`` at once on that worker: it never
    began, so no code of v2 is needed; its queue slot and rate window stay free."""
    _two_apps(store_url)
    old, new = two_step_app(store_url, version="v1"), two_step_app(store_url, version="v2")
    async with old:
        async with new:  # v2 serves after v1 did: it is the newer version
            pass
        async with new.client():
            run = await new.start("pair", 3)
        await asyncio.sleep(0.5)
        handle = old.get_handle(run.run_id)
        assert (await handle.status()).value == "pending"
        asked = time.monotonic()
        await handle.cancel(actor="ops:ann")
        with pytest.raises(WorkflowCancelled, match="before it started"):
            await handle.result(timeout=TIMEOUT)
        assert time.monotonic() - asked < 5.0
        assert old.calls == []  # type: ignore[attr-defined]
        [stats] = await old.queue_stats()
        assert (stats.waiting, stats.in_progress, stats.began_last_window) == (0, 0, 0)
        trace = await old.trace(run.run_id)
        assert (trace.status, trace.error) == ("cancelled", "Cancelled: before it started")
        assert await old.stalled(older_than=0) == []
        records = [(r.actor, r.action, codec.loads(r.data).get("status"))
                   for r in await old.store.audit_records(old.name) if r.target == run.run_id]
        assert ("ops:ann", "run.cancel_requested", "pending") in records
        assert records[-1][1:] == ("run.status", "cancelled")
        # the queue goes on: v1's own runs begin
        assert await old.get_handle((await old.start("pair", 1)).run_id).result(
            timeout=TIMEOUT) == 11


async def test_a_queued_run_cancelled_with_no_worker_ends_when_one_runs(
    store_url: str,
) -> None:
    """With no worker at all, a cancel is recorded and the run stays ``pending`` (cancel
    requested): ``result()`` waits (here until its timeout), the trace says it ends
    cancelled, without beginning, once a worker takes it; the first worker ends it."""
    _two_apps(store_url)
    app = two_step_app(store_url)
    async with app.client():
        handle = await app.start("pair", 1)
        await handle.cancel()
        with pytest.raises(ResultTimeout, match="still pending"):
            await handle.result(timeout=0.5)
        info = await handle.info()
        assert (info.status.value, info.cancel_requested) == ("pending", True)
        trace = await app.trace(handle.run_id)
        assert trace.detail is not None and trace.detail.startswith(
            "cancel requested while queued in 'q'"), trace.detail
    async with app:
        with pytest.raises(WorkflowCancelled, match="before it started"):
            await app.get_handle(handle.run_id).result(timeout=TIMEOUT)
    assert app.calls == []  # type: ignore[attr-defined]


async def test_a_retried_runs_wait_counts_from_the_retry(store_url: str) -> None:
    """The trace (and ``cantata stalled``) of a retried run waiting in its queue says how
    long it has waited since the retry, not since the run was created."""
    app = gated_app(store_url)
    async with app:
        failed = await failed_job(app)
        first = await app.start("job", 0)
        await _waits_behind_job_0(app, waiting=0)
        await asyncio.sleep(1.5)  # the run was created long before its retry
        retried_at = app.clock.now()
        await failed.retry()
        await _waits_behind_job_0(app)
        [stall] = [s for s in await app.stalled(older_than=0)
                   if s.node.ref == failed.run_id]
        assert stall.reason == "queued"
        assert stall.since.timestamp() == pytest.approx(retried_at, abs=0.5)
        # it has waited less than a second: no stall for a second
        assert [s for s in await app.stalled(older_than=1.2)
                if s.node.ref == failed.run_id] == []
        app.gate.set()  # type: ignore[attr-defined]
        assert await failed.result(timeout=TIMEOUT) == 1
        assert await first.result(timeout=TIMEOUT) == 0


async def pruned(app: App) -> None:
    """Prune the queue's row of the ended run, as retention would. The pruner skips a
    row a claim of the queue holds at that moment (the worker's, woken by the run's
    end): it is pruned at a next pass."""
    deadline = time.monotonic() + TIMEOUT
    while not await app.store.prune_queue_runs(app.name, "q", before=time.time() + 3600,
                                               limit=10):
        assert time.monotonic() < deadline, "the ended run's queue row was never pruned"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("how", ["fork", "retry", "fork without the code"])
async def test_a_fork_or_retry_of_a_pruned_row_waits_in_the_workflows_queue(
    store_url: str, how: str,
) -> None:
    """The source run's queue row was pruned (retention): the fork (or the retried run)
    still waits in the queue its workflow declares, behind job 0, which holds its slot;
    so does a fork from a process without the workflow's code (``cantata fork``), which
    reads the queue its workers recorded."""
    if how == "fork without the code":
        _two_apps(store_url)
    app = gated_app(store_url)
    async with app:
        source = await failed_job(app)
        await pruned(app)
        assert await app.store.run_queue(app.name, source.run_id) is None
        first = await app.start("job", 0)
        await _waits_behind_job_0(app, waiting=0)
        if how == "fork":
            again = await app.fork(source.run_id, from_step="work#1")
        elif how == "fork without the code":
            bare = App(app.name, store=store_url)
            async with bare.client():
                forked = await bare.fork(source.run_id, from_step="work#1")
            again = app.get_handle(forked.run_id)
        else:
            await source.retry()
            again = source
        await _waits_behind_job_0(app)
        app.gate.set()  # type: ignore[attr-defined]
        assert await again.result(timeout=TIMEOUT) == 1
        assert await first.result(timeout=TIMEOUT) == 0
    assert app.order == [0, 1]  # type: ignore[attr-defined]
