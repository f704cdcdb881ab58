"""The NATS hand-off with several workers (docs/performance.md, issue 19): an event a
handler emits is held in the store for the emitting worker and handled there at once;
NATS's copy of it reaching another worker must not run the handler again while the
holder lives (``steps_twice_live``), and a holder that dies has the event handled by
another worker after the lease."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Cluster, assert_zero, scaled, time_limit, within
from .servers import PrivateNats

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(300))]


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return str(request.getfixturevalue("postgres_store"))


async def test_two_workers_run_each_handed_off_event_once(
    cluster: Callable[..., Cluster], store_url: str, private_nats: PrivateNats
) -> None:
    # 100 ms handlers: NATS's copy of a handed-off event reaches the other worker
    # while the hand-off's handler still runs.
    c = cluster(store_url, private_nats.url, FAULT_HANDLER_SECONDS=0.1)
    c.start_workers(2)
    await c.ready()
    async with c.client():
        await c.submit(0, scaled(40), over=2.0)
        counts = await c.recover(time.monotonic(), budget=within(20))
    print(f"\nhand-off, two workers on {store_url.split(':')[0]}: {counts}")
    assert_zero(counts)


async def test_a_holder_killed_mid_hand_off_has_its_events_taken_over(
    cluster: Callable[..., Cluster], store_url: str, private_nats: PrivateNats
) -> None:
    # Handlers of 300 ms, and a worker killed while it has hand-offs in progress: the
    # deliveries it held are handled by the other worker after the lease, once each.
    c = cluster(store_url, private_nats.url, FAULT_HANDLER_SECONDS=0.3, FAULT_LEASE=1.5,
                FAULT_PATIENT=1)
    c.start_workers(2)
    await c.ready()
    async with c.client():
        submit = asyncio.ensure_future(c.submit(0, scaled(30), over=3.0))
        kills = await c.storm(3.0, every=(0.6, 1.0), respawn=True)
        await submit
        ended = time.monotonic()
        counts = await c.recover(ended, budget=c.lease * 3 + 15)
    print(f"\nhand-off holder killed on {store_url.split(':')[0]}: {kills} kills: {counts}")
    assert kills > 0 and counts.info["reruns"] > 0, "no kill cut a handler short"
    assert_zero(counts, worker_lost=False)
