"""PostgreSQL turned read-only under running workers, then writable again.

A primary demoted in a failover, a server in recovery, `default_transaction_read_only`
set for maintenance: reads work, every write fails (SQLSTATE 25006, ``StoreReadOnly``).
Like an outage or a full disk (docs/guarantees.md, "A store outage is not a death",
"Storage faults"), it is waited out: what finished while the store was read-only (a
step, a handler) is recorded once it is writable again, not run again. Before, a
handler's and a checkpoint's commit refused as read-only was given up: the handler
ran again on every redelivery and each step whose result could not be stored ran
again, by live workers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import asyncpg
import pytest

from .counters import Execution
from .harness import Cluster, assert_zero, time_limit
from .servers import PrivateNats, PrivatePostgres

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


async def read_only(pg: PrivatePostgres, on: bool) -> None:
    """Every session's transactions read-only (or not) from their next one on."""
    conn = await asyncpg.connect(pg.url)
    try:
        await conn.execute(
            f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


async def test_a_store_read_only_for_a_while_runs_nothing_again(
    cluster: Callable[..., Cluster], postgres_store: str, private_postgres: PrivatePostgres,
    private_nats: PrivateNats,
) -> None:
    c = cluster(postgres_store, private_nats.url, FAULT_LEASE=1.5, FAULT_STEP_SECONDS=0.3,
                FAULT_HANDLER_SECONDS=0.3)
    c.start_workers(2)
    await c.ready()

    def busy(executions: list[Execution]) -> bool:
        return sum(e.ended is None for e in executions) >= 2

    try:
        async with c.client():
            await c.submit(6, 6)
            await c.wait_ledger(busy, timeout=30)
            await read_only(private_postgres, True)
            await asyncio.sleep(2 * c.lease)
            await read_only(private_postgres, False)
            counts = await c.recover(time.monotonic(), budget=10)
    finally:
        await read_only(private_postgres, False)
    print(f"\nstore read-only for {2 * c.lease} s: {counts}, tracebacks={c.tracebacks()}")
    assert all(w.proc.poll() is None for w in c.workers), c.logs()
    assert_zero(counts)
    assert c.tracebacks() == 0, c.logs()
