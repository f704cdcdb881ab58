"""The store away for longer than the lease (the private PostgreSQL stopped, restarted).

Every worker lives through it: a store outage is not a worker's death. Nothing is taken
over as ``WorkerLost``, no run fails or sticks, no step runs twice, and the workers
say so in short warnings, not tracebacks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from .counters import Execution
from .harness import Cluster, assert_zero, scaled, time_limit, within
from .servers import PrivateNats, PrivatePostgres

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(300))]


async def test_store_outage_longer_than_the_lease(
    cluster: Callable[..., Cluster], postgres_store: str, private_postgres: PrivatePostgres,
    private_nats: PrivateNats,
) -> None:
    c = cluster(postgres_store, private_nats.url, FAULT_LEASE=2.0, FAULT_STEP_SECONDS=0.5,
                FAULT_HANDLER_SECONDS=0.3)
    c.start_workers(3)
    await c.ready()  # (an outage during a worker's start-up is another story)

    def busy(executions: list[Execution]) -> bool:
        return sum(e.ended is None for e in executions) >= 3

    async with c.client():
        await c.submit(scaled(30), scaled(30))
        await c.wait_ledger(busy, timeout=30)
        private_postgres.stop()  # steps and handlers in flight in every worker
        await asyncio.sleep(2 * c.lease)
        private_postgres.start()
        back = time.monotonic()
        await c.submit(scaled(10), scaled(10), first=scaled(30))
        counts = await c.recover(back, budget=within(4 * c.lease + 15))
    print(f"\nstore outage of {2 * c.lease} s: {counts}, tracebacks={c.tracebacks()}")
    assert all(w.proc.poll() is None for w in c.workers), c.logs()
    assert_zero(counts)
    assert c.tracebacks() == 0, c.logs()
