"""Leases across pauses and store outages, with real worker processes.

- A worker paused (SIGSTOP) past its lease and resumed leaves no run stuck under a
  live owner, and no step is completed twice by workers that were running.
- A PostgreSQL outage longer than the lease (a private server the test stops and
  starts) fails no run, charges no attempt, and moves no run between live workers;
  the workers say so in a few one-line warnings and recover by themselves.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cantata import App, RunHandle

from .procs import HERE, PrivatePostgres, marks, pg_bin, run_twice, start_worker, stop

pytestmark = pytest.mark.slow


@pytest.fixture
def lease_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("CANTATA_TEST_MARKS", str(tmp_path))
    if TYPE_CHECKING:
        from tests.distributed import lease_app
    else:
        import lease_app  # as its workers import it (HERE on sys.path)

    app: App = lease_app.app
    yield app
    sys.modules.pop("lease_app", None)


@pytest.fixture(params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                       pytest.mark.nats])])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/leases.db", "embedded"
    store: str = request.getfixturevalue("distributed_url")
    nats: str = request.getfixturevalue("broker_url")
    return store, nats


async def workers_up(app: App, n: int, timeout: float = 30) -> None:
    end = time.monotonic() + timeout
    while len(await app.store.workers(app.name)) < n:
        assert time.monotonic() < end, f"{n} workers did not start within {timeout} s"
        await asyncio.sleep(0.1)


def running_on(folder: Path) -> set[int]:
    """The worker processes that began a step."""
    return {m.pid for m in marks(folder, "start")}


async def test_workers_paused_past_their_lease_leave_no_run_stuck(
    lease_app: App, backend: tuple[str, str], tmp_path: Path
) -> None:
    """One worker is paused past its lease (the other takes its runs), then, once it
    runs again, the other one is (the first takes them back while its own stale
    executions of some of them are still in their 6 s step: the reported cause of runs
    stuck under a live owner): every run ends, and no step is completed twice by
    workers that were running."""
    store, broker = backend
    lease_app.configure(store=store, broker=broker)
    log = tmp_path / "workers.log"
    workers = [start_worker(store, tmp_path, log, broker=broker, lease=1.0) for _ in range(2)]
    resumed: dict[int, float] = {}
    try:
        async with lease_app.client():
            await workers_up(lease_app, 2)
            # Both fully up (a registered worker may still be starting, for seconds on a
            # loaded machine, while the other claims every run).
            end = time.monotonic() + 60
            while log.read_text(errors="replace").count("serving app") < 2:
                assert time.monotonic() < end, "the workers printed no banners within 60 s"
                await asyncio.sleep(0.1)
            handles: list[RunHandle] = []
            # A few at a time, so that both workers claim some: at least 12, and more
            # while one worker runs them all (a worker starved of CPU loses each claim).
            end = time.monotonic() + 60
            while len(handles) < 12 or running_on(tmp_path) != {w.pid for w in workers}:
                assert time.monotonic() < end, "both workers should be running steps"
                if len(handles) < 40:
                    i = len(handles)
                    # (step a spans both pauses; b, which begins after them, need
                    # not be as long)
                    handles.append(await lease_app.start(
                        "chain", {"id": i, "seconds": 6.0, "seconds_b": 0.3, "steps": "ab"}))
                await asyncio.sleep(0.15)
            await asyncio.sleep(0.5)
            for worker in workers:
                worker.send_signal(signal.SIGSTOP)
                await asyncio.sleep(2.5)  # past the lease: the other one takes its runs
                resumed[worker.pid] = time.time()  # before: it may run at once
                worker.send_signal(signal.SIGCONT)
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            stuck = await lease_app.list_runs(status="running", limit=100)
    finally:
        for worker in workers:
            stop(worker)
    assert results == [[f"{s}:{i}" for s in "ab"] for i in range(len(handles))]
    assert stuck == []
    # A paused worker may finish a body it was running when paused (nothing stops it
    # before it runs again; its result is never recorded). Nothing else runs twice.
    ends = marks(tmp_path, "end")
    late = [m for m in ends if resumed[m.pid] <= m.at <= resumed[m.pid] + 0.5]
    twice = Counter(m.key for m in ends if m not in late)
    assert {k: n for k, n in twice.items() if n > 1} == {}
    assert "Traceback" not in log.read_text()


@pytest.mark.nats
@pytest.mark.skipif(pg_bin() is None, reason="needs PostgreSQL binaries to start a server")
async def test_a_store_outage_longer_than_the_lease_fails_no_run_and_charges_nothing(
    lease_app: App, tmp_path: Path, broker_url: str
) -> None:
    pg = PrivatePostgres()
    await asyncio.to_thread(pg.init)
    await asyncio.to_thread(pg.start)
    lease_app.configure(store=pg.url, broker=broker_url)
    log = tmp_path / "workers.log"
    procs = [start_worker(pg.url, tmp_path, log, broker=broker_url, lease=1.5) for _ in range(2)]
    try:
        async with lease_app.client():
            await workers_up(lease_app, 2)
            handles = [await lease_app.start("chain", {"id": i, "seconds": 0.3})
                       for i in range(24)]
            end = time.monotonic() + 30
            while len(marks(tmp_path, "end")) < 10:  # work is in flight everywhere
                assert time.monotonic() < end, "the workers ran no step"
                await asyncio.sleep(0.05)
            await asyncio.to_thread(pg.stop)
            down_at = time.monotonic()
            await asyncio.sleep(5.0)  # more than three leases
            await asyncio.to_thread(pg.start)
            up_at = time.monotonic()
            results = await asyncio.gather(*(h.result(timeout=60) for h in handles))
            recovered_in = time.monotonic() - up_at
            attempts = [a for h in handles
                        for a in await lease_app.store.load_attempts(lease_app.name, h.run_id)]
    finally:
        for p in procs:
            stop(p)
        await asyncio.to_thread(pg.stop)
        pg.remove()
    assert up_at - down_at >= 5.0
    assert results == [[f"{s}:{i}" for s in "abc"] for i in range(24)]
    assert [a for a in attempts if a.error_type is not None] == []  # nothing charged
    assert run_twice(tmp_path) == {}  # no step completed twice, by anyone
    assert recovered_in < 30
    text = log.read_text()
    assert "Traceback" not in text
    warnings = [line for line in text.splitlines() if re.search(r"heartbeat failed", line)]
    assert 1 <= len(warnings) <= 6  # one line per worker and interval, not a flood
