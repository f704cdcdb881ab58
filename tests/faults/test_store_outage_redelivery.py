"""The store away for longer than a handler's attempts' worth of NATS redeliveries.

A worker that cannot read the store cannot tell whether a message it pulled is its to
handle, so it does not run the handler. Before, it left the message to NATS, which
delivered it again after every ack wait; each delivery counted as an attempt (NATS's
delivery count is how a handler cut short by a worker crash is charged), so after five
ack waits of outage the handler was dead-lettered, "cut short 6 time(s) by a worker
crash", once the store came back, though no worker had died. A store outage is not a
death (docs/guarantees.md): the worker now holds such a message (telling NATS it is in
progress) and reads again until the store answers.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import pytest

from tests.stall_proxy import StallProxy

from .harness import Cluster, assert_zero, time_limit
from .servers import PrivateNats, PrivatePostgres

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


async def test_a_store_outage_of_many_ack_waits_dead_letters_no_event(
    cluster: Callable[..., Cluster], postgres_store: str, private_postgres: PrivatePostgres,
    private_nats: PrivateNats,
) -> None:
    """The worker's way to PostgreSQL is cut (its store through a proxy that refuses
    connections) for six ack waits (the lease, 1 s), while a client that still reaches
    the store publishes events: NATS hands them to the worker, which cannot read the
    store. Once it can, every event is handled, none dead-lettered or lost."""
    proxy = StallProxy(("127.0.0.1", private_postgres.port))
    await proxy.start()
    try:
        c = cluster(postgres_store, private_nats.url, FAULT_LEASE=1.0,
                    FAULT_HANDLER_SECONDS=0.05)
        c.start_worker("--store", proxy.url(postgres_store))
        await c.ready()
        async with c.client():
            proxy.refuse()  # (the worker's connections closed, new ones refused)
            cut = time.monotonic()
            await c.submit(0, 5)
            await asyncio.sleep(6 * c.lease - (time.monotonic() - cut))
            await proxy.reopen()
            counts = await c.recover(time.monotonic(), budget=6)
        print(f"\nworker cut from the store for six ack waits: {counts}")
        assert_zero(counts)
    finally:
        await proxy.close()
