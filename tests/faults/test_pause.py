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

from .counters import Execution
from .harness import Cluster, assert_zero, scaled, time_limit, within
from .servers import PrivateNats

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(300))]


async def pause_past_lease(c: Cluster) -> None:
    c.start_workers(3)
    victim = c.workers[0]

    def victim_busy(executions: list[Execution]) -> bool:
        return any(e.pid == victim.pid and e.ended is None for e in executions)

    async with c.client():
        submit = asyncio.ensure_future(c.submit(scaled(30), scaled(30), over=2 * c.lease))
        await c.wait_ledger(victim_busy, timeout=30)
        await c.pause(victim, seconds=3 * c.lease)
        resumed = time.monotonic()
        await submit
        counts = await c.recover(resumed, budget=within(4 * c.lease + 10))
    print(f"\npause past the lease on {c.store.split(':')[0]}: {counts}")
    assert victim.proc.poll() is None, "the paused worker died"
    assert_zero(counts, worker_lost=False)


async def test_pause_of_every_worker_past_lease_sqlite(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """The whole host stalls: on waking, every worker finds every other one stale."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.5, FAULT_STEP_SECONDS=0.3)
    c.start_workers(3)

    def all_busy(executions: list[Execution]) -> bool:  # (at least two of the three)
        return len({e.pid for e in executions if e.ended is None}) >= 2

    async with c.client():
        submit = asyncio.ensure_future(c.submit(scaled(30), scaled(30), over=2 * c.lease))
        await c.wait_ledger(all_busy, timeout=30)
        await asyncio.gather(*(c.pause(w, seconds=3 * c.lease) for w in c.workers))
        resumed = time.monotonic()
        await submit
        counts = await c.recover(resumed, budget=within(4 * c.lease + 10))
    print(f"\npause of every worker past the lease: {counts}")
    assert all(w.proc.poll() is None for w in c.workers), c.logs()
    assert_zero(counts, worker_lost=False)


async def test_pause_past_lease_sqlite(cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    await pause_past_lease(cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.5,
                                   FAULT_STEP_SECONDS=0.3))


async def test_pause_past_lease_postgres_nats(
    cluster: Callable[..., Cluster], postgres_store: str, private_nats: PrivateNats
) -> None:
    await pause_past_lease(cluster(postgres_store, private_nats.url, FAULT_LEASE=1.5,
                                   FAULT_STEP_SECONDS=0.3))
