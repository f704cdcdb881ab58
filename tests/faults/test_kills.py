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

from .counters import read_ledger
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


async def test_a_step_that_kills_its_worker_every_time_fails_after_its_attempts(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A kill is a death, not a pause: nobody excuses the attempts, so a step that kills
    its worker each time (a segfault, the OOM killer) uses its three attempts up and
    fails its run — after one lease of waiting for an excuse — instead of looping."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.0)
    c.start_workers(2)
    await c.ready()
    async with c.client():
        handle = await c.app.start("kills_its_worker", {"id": 0})
        deadline = time.monotonic() + 90
        while True:
            run = await c.app.store.get_run(c.app.name, handle.run_id)
            assert run is not None
            if run.status.is_final:
                break
            assert time.monotonic() < deadline, f"still {run.status}: {c.logs()}"
            for worker in list(c.workers):
                if worker.proc.poll() is not None:  # its step killed it: start another
                    c.faults.killed[worker.pid] = time.time()
                    c._gone(worker)
                    c.start_worker()
            await asyncio.sleep(0.1)
        attempts = await c.app.store.load_attempts(c.app.name, handle.run_id)
    began = [e for e in read_ledger(c.ledger) if e.run == handle.run_id]
    print(f"\na step that kills its worker: {run.status} after {len(began)} executions: "
          f"{run.error}")
    assert str(run.status) == "failed", run.error
    assert "WorkerLost" in (run.error or "") and "3 attempt" in (run.error or ""), run.error
    assert [(a.attempt, a.error_type) for a in attempts] == [
        (1, "WorkerLost"), (2, "WorkerLost"), (3, "WorkerLost")
    ]
    assert len(began) == 3, began
