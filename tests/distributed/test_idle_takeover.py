"""A worker that waits for PostgreSQL's notifications still takes over a dead worker's
run at once at its expiry (a dead worker notifies nothing): its claimers are woken
when the other worker's expiry passes, not at their next safety-net look, seconds
later; and a run that the dead worker parked is woken at its time when that comes
after the expiry (docs/performance.md, "Idle workers"). That holds for a worker that
registered after the idle worker last read the workers and died before its next read
too."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest

from cantata import App
from tests.helpers import with_schema

from .procs import marks, start_run_here, start_worker, stop
from .test_leases import lease_app, workers_up  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


async def test_a_dead_workers_run_is_taken_over_at_its_expiry(
    lease_app: App, postgres_url: str, pooled_schema: str, tmp_path: Path  # noqa: F811
) -> None:
    store = with_schema(postgres_url, pooled_schema)
    lease_app.configure(store=store, broker="embedded")
    log = tmp_path / "workers.log"
    first = start_worker(store, tmp_path, log, lease=1.0)
    second = None
    try:
        async with lease_app.client() as client:
            await workers_up(client, 1)
            await client.start("chain", {"id": 1, "steps": "a", "seconds": 60})
            end = time.monotonic() + 30
            while not marks(tmp_path, "start"):
                assert time.monotonic() < end, log.read_text()
                await asyncio.sleep(0.05)
            second = start_worker(store, tmp_path, log, lease=1.0)
            await workers_up(client, 2)
            end = time.monotonic() + 60
            while log.read_text(errors="replace").count("serving app") < 2:
                assert time.monotonic() < end, "the second worker printed no banner"
                await asyncio.sleep(0.1)
            await asyncio.sleep(3.0)  # its loops wait for notifications by now
            first.send_signal(signal.SIGKILL)
            killed = time.time()
            end = time.monotonic() + 30
            while len(marks(tmp_path, "start")) < 2:
                assert time.monotonic() < end, log.read_text()
                await asyncio.sleep(0.05)
            taken = max(m.at for m in marks(tmp_path, "start"))
            # the lease (1 s from the last heartbeat, at most 1 s after the kill), a
            # claim and the run's start: not 1 s + a safety-net wait of up to 6 s
            assert taken - killed < 2.0, taken - killed
    finally:
        stop(first)
        if second is not None:
            stop(second)


async def test_a_run_parked_by_a_worker_that_dies_wakes_on_time(
    lease_app: App, postgres_url: str, pooled_schema: str, tmp_path: Path,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A park notifies nobody: the other worker learns the run's time when it next reads
    # the parked runs' next wake-up, here at the dead worker's expiry (its claimers
    # woken by the expiry loop), before the run is due; not at a safety-net look.
    store = with_schema(postgres_url, pooled_schema)
    lease_app.configure(store=store, broker="embedded")
    monkeypatch.setenv("CANTATA_TEST_PARK_AFTER", "0")
    log = tmp_path / "workers.log"
    workers = [start_worker(store, tmp_path, log, lease=1.0) for _ in range(2)]
    try:
        async with lease_app.client() as client:
            await workers_up(client, 2)
            end = time.monotonic() + 60
            while log.read_text(errors="replace").count("serving app") < 2:
                assert time.monotonic() < end, "a worker printed no banner"
                await asyncio.sleep(0.1)
            await asyncio.sleep(3.0)  # their loops wait for notifications by now
            await client.start("napper", 2.0)
            end = time.monotonic() + 30
            while not marks(tmp_path, "end"):  # the step, just before the sleep
                assert time.monotonic() < end, log.read_text()
                await asyncio.sleep(0.02)
            [step] = marks(tmp_path, "end")
            await asyncio.sleep(0.2)  # parked (at once: park_after=0)
            napper = next(w for w in workers if w.pid == step.pid)
            napper.send_signal(signal.SIGKILL)
            end = time.monotonic() + 30
            while not marks(tmp_path, "woke"):
                assert time.monotonic() < end, log.read_text()
                await asyncio.sleep(0.02)
            [woke] = marks(tmp_path, "woke")
            assert woke.pid != step.pid
            # due 2 s after the step (the dead worker's expiry came about 1.2 s after
            # it); at the other worker's next safety-net look it would be 1-4 s late
            assert woke.at - step.at - 2.0 < 0.5, woke.at - step.at
    finally:
        for w in workers:
            stop(w)


async def test_a_worker_that_came_and_died_between_two_reads_is_taken_over_at_its_expiry(
    lease_app: App, postgres_url: str, pooled_schema: str, tmp_path: Path  # noqa: F811
) -> None:
    # The idle worker reads the workers as it starts, and sees nobody else; the second
    # one registers after that read, starts a run of its own and dies in its step. No
    # notification says so: the idle worker must still find it past its expiry and take
    # the run over within the lease, not at a look of its safety net (stretched to 30 s
    # here, so the two are far apart: it used to be the only look that found such a
    # worker, one it had never seen live).
    lease = 2.0
    store = with_schema(postgres_url, pooled_schema)
    lease_app.configure(store=store, broker="embedded")
    log = tmp_path / "workers.log"
    idle = start_worker(store, tmp_path, log, lease=lease, safety_net=30.0)
    owner = None
    try:
        async with lease_app.client() as client:
            await workers_up(client, 1)
            end = time.monotonic() + 60
            while "serving app" not in log.read_text(errors="replace"):
                assert time.monotonic() < end, "the idle worker printed no banner"
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.0)  # past its first read of the workers
            owner = start_run_here(store, tmp_path, log, {"id": 1, "steps": "a", "seconds": 60},
                                   lease=lease)
            end = time.monotonic() + 30
            while not marks(tmp_path, "start"):
                assert time.monotonic() < end, log.read_text()
                await asyncio.sleep(0.02)
            [begun] = marks(tmp_path, "start")
            assert begun.pid == owner.pid  # (its own run: started where it is served)
            owner.send_signal(signal.SIGKILL)
            killed = time.time()
            end = time.monotonic() + 45
            while len(marks(tmp_path, "start")) < 2:
                assert time.monotonic() < end, log.read_text()
                await asyncio.sleep(0.05)
            taken = max(marks(tmp_path, "start"), key=lambda m: m.at)
            assert taken.pid == idle.pid
            # the lease (from its last heartbeat, before the kill), a claim and the
            # run's start: not a safety-net look, 24-36 s after the idle worker's last
            assert taken.at - killed < lease + 1.5, taken.at - killed
    finally:
        stop(idle)
        if owner is not None:
            stop(owner)
