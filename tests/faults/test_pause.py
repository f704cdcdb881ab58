"""A worker paused past its lease (SIGSTOP, then SIGCONT): a GC pause, a VM stall.

While it is stopped its runs are taken over; once it resumes it must neither keep runs
it no longer owns (stuck ``running`` under a live owner) nor start a step another
worker has run: every run ends within the recovery time, no count above zero.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.flow.helpers import max_overlap, until

from .counters import Execution, begun_before_pauses, read_ledger
from .harness import Cluster, Worker, assert_zero, scaled, time_limit, within
from .servers import PrivateNats

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(300))]


async def pause_past_lease(c: Cluster) -> None:
    """50 sagas (150 steps) on three workers; the busiest one is paused for three leases
    in the middle of its steps. Every count at zero, in particular:

    - ``worker_lost_attempts``: the attempts the paused worker was cut off in were
      charged as ``WorkerLost`` at takeover; it excuses them on resuming;
    - ``steps_finished_late``: no body of the paused worker goes on to its end after
      another worker began its step (the body guard stops it at its next await).
    """
    c.start_workers(3)
    await c.ready()

    def victim_busy(executions: list[Execution]) -> bool:
        open_ = [e.pid for e in executions if e.what == "step" and e.ended is None]
        return any(open_.count(w.pid) >= 2 for w in c.workers)

    async with c.client():
        submit = asyncio.ensure_future(c.submit(scaled(50), scaled(30), over=2 * c.lease))
        await c.wait_ledger(victim_busy, timeout=30)
        victim = c.busiest()
        paused_at = time.time()
        await c.pause(victim, seconds=3 * c.lease)
        resumed = time.monotonic()
        await submit
        counts = await c.recover(resumed, budget=within(4 * c.lease + 10))
        # The paused worker excuses its attempts within moments of resuming; give it a
        # lease before the attempts are counted for good.
        await asyncio.sleep(c.lease)
        settled = await c.counts()
        settled.recover_seconds = counts.recover_seconds
    cut = [e for e in read_ledger(c.ledger) if e.pid == victim.pid and e.what == "step"
           and e.began < paused_at and (e.ended is None or e.ended > paused_at)]
    settled.info["steps_paused"] = len(cut)
    print(f"\npause past the lease on {c.store.split(':')[0]}: {settled}")
    assert victim.proc.poll() is None, "the paused worker died"
    assert cut, "the pause cut no step short: the scenario proves nothing"
    assert_zero(settled)


async def test_pause_of_every_worker_past_lease_sqlite(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The whole host stalls: on waking, every worker finds every other one stale."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.5, FAULT_STEP_SECONDS=0.3)
    c.start_workers(3)
    await c.ready()

    def all_busy(executions: list[Execution]) -> bool:  # (at least two of the three)
        return len({e.pid for e in executions if e.ended is None}) >= 2

    async with c.client():
        submit = asyncio.ensure_future(c.submit(scaled(30), scaled(30), over=2 * c.lease))
        await c.wait_ledger(all_busy, timeout=30)
        await asyncio.gather(*(c.pause(w, seconds=3 * c.lease) for w in c.workers))
        resumed = time.monotonic()
        await submit
        counts = await c.recover(resumed, budget=within(4 * c.lease + 10))
        await asyncio.sleep(c.lease)  # let any excuse land before counting attempts
        settled = await c.counts()
        settled.recover_seconds = counts.recover_seconds
    print(f"\npause of every worker past the lease: {settled}")
    assert all(w.proc.poll() is None for w in c.workers), c.logs()
    assert_zero(settled)


async def test_pause_past_lease_sqlite(cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    await pause_past_lease(cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.5,
                                   FAULT_STEP_SECONDS=0.3))


async def test_pause_past_lease_postgres_nats(
    cluster: Callable[..., Cluster], postgres_store: str, private_nats: PrivateNats
) -> None:
    await pause_past_lease(cluster(postgres_store, private_nats.url, FAULT_LEASE=1.5,
                                   FAULT_STEP_SECONDS=0.3))


async def worker_of(c: Cluster, pid: int) -> str:
    """The worker id the process ``pid`` heartbeats under."""
    for info in await c.app.store.workers(c.app.name):
        if f":{pid}:" in info.worker_id:
            return info.worker_id
    raise AssertionError(f"no worker row for pid {pid}")


async def test_a_paused_workers_last_attempt_is_excused_before_the_run_fails(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The race of the excuse: a step with one attempt is taken over from a paused
    worker. The new owner finds that attempt ``WorkerLost`` and would fail the run at
    once; it waits a lease for the paused worker, which resumes, excuses the attempt,
    and the new owner runs the step: the run completes, nothing charged."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.5, FAULT_LONG_SECONDS=1.5)
    c.start_workers(2)
    await c.ready()
    async with c.client():
        run_id = await c.start_saga(0, "last_chance")
        victim = await c.busy_worker()
        worker_id = await worker_of(c, victim.pid)
        stopped = await c.stop(victim)  # (outside a write: the other worker must write)
        try:
            deadline = time.monotonic() + 10 * c.lease
            while True:  # until the other worker has taken the run over
                run = await c.app.store.get_run(c.app.name, run_id)
                assert run is not None and time.monotonic() < deadline, "never taken over"
                if run.owner not in (None, worker_id) or run.status.is_final:
                    break
                await asyncio.sleep(0.02)
            # Resume well within the lease the new owner waits (and past the lease, so
            # the counters take the takeover for the pause's).
            await asyncio.sleep(max(c.lease / 4, stopped + c.lease - time.time()))
        finally:
            c.resume(victim, stopped=stopped)
        counts = await c.recover(time.monotonic(), budget=within(4 * c.lease + 10))
        await asyncio.sleep(c.lease)  # let the excuse land before counting attempts
        settled = await c.counts()
    print(f"\nlast attempt taken over from a paused worker: {settled}")
    assert counts.runs_failed == 0 and settled.worker_lost_attempts == 0, settled
    assert_zero(settled)


async def slot_kept_by_the_new_owner(c: Cluster) -> None:
    """A worker paused past its lease in the body of a ``concurrency=1`` step, holding
    its one slot; the other worker takes the run over and runs the step, holding the
    slot in turn, with more runs waiting for it; the paused worker resumes, its stale
    body is cut, and its execution lets the run go. It must free only its own slot,
    not the new owner's (the same holder: run id and step key): else the new owner's
    slot is free while its body runs, the next run's step begins beside it, and the
    step runs twice at once."""
    c.start_workers(2)
    await c.ready()
    async with c.client():
        first = await c.start_saga(0, "one_at_a_time")
        victim = await c.busy_worker()
        # (outside a write: a SQLite worker stopped inside one holds the file's write
        # lock, and the other worker could take nothing over until it resumed)
        stopped = await c.stop(victim)
        try:
            # Until the other worker has taken the run over and holds the slot for it.
            await c.wait_ledger(lambda ex: any(e.run == first and e.pid != victim.pid
                                               for e in ex), timeout=30)
            # More runs, claimed by the other worker: they wait for the slot.
            for i in range(1, 4):
                await c.start_saga(i, "one_at_a_time")
            others = set(c.runs) - {first}
            await until(lambda: _owned(c, others, victim), timeout=30)
            await asyncio.sleep(0.3)  # (their waiters ask for the slot)
        finally:
            c.resume(victim, stopped=stopped)
        counts = await c.recover(time.monotonic(), budget=within(4 * 3.0 + 4 * c.lease + 10))
        await asyncio.sleep(c.lease)  # let the excuse land before counting attempts
        settled = await c.counts()
        settled.recover_seconds = counts.recover_seconds
    spans = []
    for e in begun_before_pauses(read_ledger(c.ledger), c.faults):
        end = e.ended if e.ended is not None else float("inf")
        # A body the pause froze, cut by its guard as the process resumed, made no
        # progress after the pause began.
        froze = [stop for stop, _ in c.faults.paused.get(e.pid, ())
                 if e.cut and e.began <= stop < end]
        spans.append((e.began, min(froze, default=end), e.pid, e.run[-8:]))
    print(f"\nslot of a paused worker's step: {settled}; bodies {spans}")
    assert any(pid == victim.pid and r == first[-8:] for _, _, pid, r in spans), \
        "the pause cut no body of the step short: the scenario proves nothing"
    assert max_overlap([(b, e) for b, e, _, _ in spans]) == 1, spans
    assert_zero(settled)


async def _owned(c: Cluster, runs: set[str], victim: Worker) -> bool:
    """True once every run of ``runs`` is owned by a worker other than ``victim``."""
    mine = f":{victim.pid}:"
    for run_id in runs:
        run = await c.app.store.get_run(c.app.name, run_id)
        if run is None or run.owner is None or mine in run.owner:
            return False
    return True


async def test_a_paused_worker_leaves_the_new_owner_its_slot_sqlite(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    await slot_kept_by_the_new_owner(cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.5,
                                             FAULT_SINGLE_SECONDS=3.0))


async def test_a_paused_worker_leaves_the_new_owner_its_slot_postgres(
    cluster: Callable[..., Cluster], postgres_store: str
) -> None:
    await slot_kept_by_the_new_owner(cluster(postgres_store, FAULT_LEASE=1.5,
                                             FAULT_SINGLE_SECONDS=3.0))


async def handlers_across_a_pause_within_the_lease(c: Cluster, *, go_on: bool = True) -> None:
    """A worker with handlers in progress is paused past the fence (3/4 of the lease)
    but within the lease, from just after one of its heartbeats got through. Its hold
    never lapsed, and the heartbeat it sends on resuming proves so (the store found its
    expiry not passed at the renewal): with the embedded broker (deliveries held by the
    worker's lease alone) its handler bodies go on, each once. Before, each was stopped
    by its own guard, its event handed back and run again (``reruns_after_own_stop``):
    user code run twice although nobody else could have run it. Every count at zero,
    and no handler of the paused worker cut. With NATS (``go_on=False``), which
    delivers a message again once its ack wait has passed since the worker's last "in
    progress", whatever the store says, they are still stopped, and every count is zero
    too: the "in progress" goes every eighth of the ack wait (the lease), so NATS
    delivers none of them again before 7/8 of the lease, and this pause ends at 0.8 of
    it (at every third, NATS delivered some again to the other worker during the pause,
    which began them beside the paused bodies: ``steps_twice_live`` in one run of two;
    docs/leases.md, "With NATS")."""
    c.start_workers(2)
    await c.ready()
    async with c.client():
        await c.submit(0, scaled(6))
        victim = await c.busy_worker("handler")
        worker_id = await worker_of(c, victim.pid)

        async def heartbeat_at() -> float:
            for info in await c.app.store.workers(c.app.name):
                if info.worker_id == worker_id:
                    return info.heartbeat_at
            raise AssertionError(f"no worker row for {worker_id}")

        before = beat = await heartbeat_at()
        while beat == before:  # just after its next heartbeat
            await asyncio.sleep(0.005)
            beat = await heartbeat_at()
        # Not while that heartbeat's answer is on its way: a pause then is judged against
        # the heartbeat before (the one in flight may have been written only after the
        # hold had lapsed, its answer lost to its timeout), a lease ago by the time the
        # next one gets through: not proven, the bodies stopped (docs/leases.md).
        await asyncio.sleep(0.2)
        stopped = await c.stop(victim)
        try:
            # Past the fence, within the lease, counted from that heartbeat.
            await asyncio.sleep(max(0.0, beat + 0.8 * c.lease - time.time()))
        finally:
            c.resume(victim, stopped=stopped)
        resumed = time.monotonic()
        counts = await c.recover(resumed, budget=within(4 * c.lease + 10))
    spanned = [e for e in read_ledger(c.ledger) if e.pid == victim.pid
               and e.what == "handler" and e.began < stopped
               and (e.ended is None or e.ended > stopped)]
    cut = [e for e in spanned if e.cut]
    counts.info["handlers_paused"] = len(spanned)
    print(f"\nhandlers across a pause within the lease on {c.store.split(':')[0]}: {counts}")
    assert victim.proc.poll() is None, "the paused worker died"
    assert spanned, "the pause held no handler: the scenario proves nothing"
    if go_on:
        assert not cut and counts.info["reruns_after_own_stop"] == 0, (cut, counts)
        assert_zero(counts)
    else:
        assert len(cut) == len(spanned), counts
        assert_zero(counts)


async def test_handlers_go_on_after_a_pause_within_the_lease_sqlite(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    await handlers_across_a_pause_within_the_lease(cluster(
        f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=5.0, FAULT_HANDLER_SECONDS=3.0))


async def test_handlers_go_on_after_a_pause_within_the_lease_postgres(
    cluster: Callable[..., Cluster], postgres_store: str
) -> None:
    await handlers_across_a_pause_within_the_lease(cluster(
        postgres_store, FAULT_LEASE=5.0, FAULT_HANDLER_SECONDS=3.0))


async def test_nats_handlers_stop_after_a_pause_within_the_lease_postgres_nats(
    cluster: Callable[..., Cluster], postgres_store: str, private_nats: PrivateNats
) -> None:
    """Let go on (as the first version of the rule did), the paused worker's handlers
    ran on to their end beside the copies NATS had delivered again to the other worker
    at the end of their ack wait (none of them cut)."""
    await handlers_across_a_pause_within_the_lease(cluster(
        postgres_store, private_nats.url, FAULT_LEASE=5.0, FAULT_HANDLER_SECONDS=3.0),
        go_on=False)
