"""SIGKILL at random points: three workers, sagas and events, kills for seconds on end.

Steps are at-least-once, their recorded results and the handlers' effects exactly-once:
a step runs again only when the process running it died, never after its result was
recorded; no run is lost or stuck; every event's chain of handlers completes once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .harness import Cluster, assert_zero, scale, scaled, time_limit
from .servers import PrivateNats

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(600))]


async def storm(c: Cluster) -> None:
    sagas = scaled(50)
    # Bounded: 8 s of kills; scaled: 12 s per unit of scale (two minutes at 10).
    seconds = 8.0 if scale() <= 1 else 12.0 * scale()
    c.start_workers(3)
    await c.ready()
    async with c.client():
        # Work arrives all through the storm, so kills land in the middle of steps and
        # handlers, between them, and in the middle of commits.
        submit = asyncio.ensure_future(c.submit(sagas, sagas, over=seconds * 0.8))
        kills = await c.storm(seconds, every=(0.5, 2.0) if scale() <= 1 else (2.0, 6.0))
        await submit
        ended = time.monotonic()
        counts = await c.recover(ended, budget=c.lease * 3 + 15 * scale())
    print(f"\nSIGKILL storm on {c.store.split(':')[0]}: {kills} kills, "
          f"{len(c.runs)} sagas, {len(c.event_ids)} events: {counts}")
    assert kills > 0 and counts.info["reruns"] > 0, "no kill cut a step or handler short"
    assert_zero(counts, worker_lost=False)


async def test_sigkill_storm_sqlite(cluster: Callable[..., Cluster], tmp_path: Path) -> None:
    await storm(cluster(f"sqlite:///{tmp_path}/store.db", FAULT_STEP_SECONDS=0.2,
                        FAULT_PATIENT=1, FAULT_LEASE=3.0))


async def test_sigkill_storm_postgres_nats(
    cluster: Callable[..., Cluster], postgres_store: str, private_nats: PrivateNats
) -> None:
    await storm(cluster(postgres_store, private_nats.url, FAULT_STEP_SECONDS=0.2,
                        FAULT_PATIENT=1, FAULT_LEASE=3.0))
