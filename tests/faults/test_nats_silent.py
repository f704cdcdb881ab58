"""A worker's NATS connection silently gone: a half-open TCP connection (a NAT or
firewall that dropped its mapping, a server host that vanished, a network that
blackholes its packets). Nothing closes it, so nothing tells the client; only a ping
the server does not answer does. The worker must find out within about a lease and
connect again, as the PostgreSQL listener does (docs/leases.md), not after the NATS
client's default of two unanswered pings two minutes apart, meanwhile handling none
of its groups' events.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.stall_proxy import StallProxy

from .harness import Cluster, assert_zero, time_limit
from .servers import PrivateNats

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


async def test_a_worker_whose_nats_connection_went_silent_connects_again(
    cluster: Callable[..., Cluster], postgres_store: str, private_nats: PrivateNats
) -> None:
    """The only worker's connection to NATS (through a proxy) forwards nothing more
    either way and stays open; events published then (by a client connected directly)
    are handled within a few leases (before: none in minutes)."""
    proxy = StallProxy(("127.0.0.1", private_nats.port))
    await proxy.start()
    try:
        c = cluster(postgres_store, private_nats.url, FAULT_LEASE=1.5,
                    FAULT_HANDLER_SECONDS=0.05)
        c.start_worker("--broker", proxy.url(private_nats.url))
        await c.ready()
        async with c.client():
            assert proxy.blackhole(b"CONNECT") == 1  # (its one connection, subscribed)
            silent = time.monotonic()
            await c.submit(0, 3)
            counts = await c.recover(silent, budget=4 * c.lease + 2)
        print(f"\nworker's NATS connection silent: {counts}")
        assert_zero(counts)
        assert counts.recover_seconds is not None and counts.recover_seconds < 4 * c.lease + 2
    finally:
        await proxy.close()
