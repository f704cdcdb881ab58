"""Graceful stop of real worker processes (SQLite): drain, release, force, handlers.

A stop is never an attempt (docs/leases.md): a step in progress finishes within the
grace and is recorded once; past the grace it is released at once to another worker
(well before the lease) without a ``WorkerLost`` attempt; a second signal stops at once.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from cantata import App
from tests.helpers import eventually
from tests.stall_proxy import stall_proxy

from .procs import HERE, marks, run_twice, start_worker, stop

pytestmark = pytest.mark.slow


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("CANTATA_TEST_MARKS", str(tmp_path))
    if TYPE_CHECKING:
        from tests.distributed import lease_app
    else:
        import lease_app  # as its workers import it (HERE on sys.path)

    app: App = lease_app.app
    app.configure(store=f"sqlite:///{tmp_path}/leases.db", broker="embedded")
    yield app
    sys.modules.pop("lease_app", None)


@pytest.fixture(params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                       pytest.mark.nats])])
def any_client(request: pytest.FixtureRequest, client: App) -> App:
    """The client app on SQLite (embedded broker), then on PostgreSQL + NATS."""
    if request.param != "sqlite":
        client.configure(store=request.getfixturevalue("distributed_url"),
                         broker=request.getfixturevalue("broker_url"))
    return client


GRACE_RAN_OUT = "did not finish within the grace"
STORE_AWAY = "the store ("


def stop_message(log: Path) -> str:
    """The line ``cantata worker`` printed as it exited with status 3."""
    [line] = [x for x in log.read_text().splitlines() if x.startswith("stopped: ")]
    return line


def broker_of(app: App) -> str:
    return app._broker_spec if isinstance(app._broker_spec, str) else "embedded"


async def serving(log: Path, n: int = 1) -> None:
    """Until ``n`` workers logging to ``log`` have started (their banner, printed once
    ``async with app`` is in): these tests are about the stop, and a store stalled or
    cut during the start fails the start itself (exit 1). (A worker's start writes
    everything before it serves, app_runtime.serve, so a step or handler that has begun
    already says as much; the banner is the worker's own word for it.)"""
    await eventually(lambda: log.exists() and log.read_text().count("serving app") >= n,
                     60, "the worker serving")


async def exited(proc: subprocess.Popen[bytes], within: float) -> int | None:
    """The exit code, if ``proc`` ends within ``within`` seconds."""
    end = time.monotonic() + within
    while time.monotonic() < end:
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    return None


async def attempts_of(app: App, run_id: str) -> list[tuple[str, int, str | None]]:
    return sorted((a.key, a.attempt, a.error_type)
                  for a in await app.store.load_attempts(app.name, run_id))


async def test_sigterm_lets_the_step_in_progress_finish_and_records_it_once(
    any_client: App, tmp_path: Path
) -> None:
    client = any_client
    store, broker, log = client._store_spec, broker_of(client), tmp_path / "workers.log"
    assert isinstance(store, str)
    first = start_worker(store, tmp_path, log, broker=broker, grace=10, grace_flag=True)
    procs = [first]
    try:
        async with client.client():
            h = await client.start("chain", {"id": 1, "seconds": 1.5, "steps": "ab"})
            # (generous deadlines: a worker process takes 10-15 s to start on a machine
            # loaded as a full test run loads it)
            await eventually(lambda: marks(tmp_path, "start"), 60, "the first step start")
            first.send_signal(signal.SIGTERM)
            assert await exited(first, 30) == 0
            run = await client.store.get_run(client.name, h.run_id)
            assert run is not None and run.owner is None  # released, not left to the lease
            procs.append(start_worker(store, tmp_path, log, broker=broker, grace=10))
            await eventually(lambda: log.read_text().count("serving app") >= 2, 60,
                             "the second worker's banner")
            assert await h.result(timeout=60) == ["a:1", "b:1"]
            tried = await attempts_of(client, h.run_id)
    finally:
        for p in procs:
            stop(p)
    ends = {m.key: m.pid for m in marks(tmp_path, "end")}
    assert ends == {"1.a": first.pid, "1.b": procs[1].pid}  # the drained step ran once
    assert tried == [("work#1", 1, None), ("work#2", 1, None)]
    assert "Traceback" not in log.read_text()


@pytest.mark.postgres
@pytest.mark.nats
async def test_a_drained_step_is_committed_through_a_store_outage_during_the_stop(
    client: App, tmp_path: Path, distributed_url: str, broker_url: str
) -> None:
    """The outcome of a step that finished during the grace is committed even when the
    store is lost for a moment right then (connections cut, connecting slower than its
    timeout): the stop waits the outage out as a live worker does, within its bound, and
    no step runs twice. (A stopping worker used to give up at the first failure: the
    step's outcome was dropped, the run released, exit status 0, the step run again.)"""
    client.configure(store=distributed_url, broker=broker_url)
    log = tmp_path / "workers.log"
    async with stall_proxy(distributed_url) as proxy:
        first = start_worker(proxy.url(distributed_url), tmp_path, log, broker=broker_url,
                             lease=60, grace=30, grace_flag=True)
        procs = [first]
        try:
            await serving(log)
            async with client.client():
                h = await client.start("chain", {"id": 1, "seconds": 2.0, "steps": "ab"})
                await eventually(lambda: marks(tmp_path, "start"), 60, "the first step start")
                first.send_signal(signal.SIGTERM)
                await eventually(lambda: "stopping: waiting up to" in log.read_text(), 20,
                                 "the drain")
                proxy.stall()  # the store stops answering as the step ends...
                await eventually(lambda: marks(tmp_path, "end"), 20, "the first step end")
                await asyncio.sleep(0.5)
                proxy.cut()  # ...its commit is lost with the connections...
                await asyncio.sleep(5.0)  # ...and connecting again times out meanwhile
                assert proxy.held, "nothing tried to connect during the stall"
                proxy.resume()
                assert await exited(first, 60) == 0
                procs.append(start_worker(distributed_url, tmp_path, log, broker=broker_url,
                                          lease=60, grace=10))
                assert await h.result(timeout=60) == ["a:1", "b:1"]
                tried = await attempts_of(client, h.run_id)
        finally:
            for p in procs:
                stop(p)
    ends = sorted((m.key, m.pid) for m in marks(tmp_path, "end"))
    assert ends == [("1.a", first.pid), ("1.b", procs[1].pid)]  # the drained step ran once
    assert tried == [("work#1", 1, None), ("work#2", 1, None)]


@pytest.mark.postgres
@pytest.mark.nats
async def test_a_drained_step_whose_result_cannot_be_stored_is_not_a_clean_stop(
    client: App, tmp_path: Path, distributed_url: str, broker_url: str
) -> None:
    """The store stays away past the stop's bound as a drained step ends: the worker
    gives up on it, but says so and exits 3 (cut short), not 0 as after a clean stop."""
    client.configure(store=distributed_url, broker=broker_url)
    log = tmp_path / "workers.log"
    async with stall_proxy(distributed_url) as proxy:
        first = start_worker(proxy.url(distributed_url), tmp_path, log, broker=broker_url,
                             lease=60, grace=2, grace_flag=True)
        try:
            await serving(log)
            async with client.client():
                await client.start("chain", {"id": 2, "seconds": 1.0, "steps": "ab"})
                await eventually(lambda: marks(tmp_path, "start"), 60, "the first step start")
                first.send_signal(signal.SIGTERM)
                await eventually(lambda: "stopping: waiting up to" in log.read_text(), 20,
                                 "the drain")
                proxy.stall()
                await eventually(lambda: marks(tmp_path, "end"), 20, "the first step end")
                await asyncio.sleep(0.5)
                proxy.cut()  # the store is gone for good (as far as this stop goes)
                code = await exited(first, 90)
        finally:
            stop(first)
    assert code == 3
    assert "could not commit what the steps of 1 run(s) finished" in log.read_text()
    # The exit's message names the cause: not the grace, the store.
    message = stop_message(log)
    assert GRACE_RAN_OUT not in message, message
    assert "could not be reached to store the results of 1 run(s)' steps or " \
        "handler(s) that had finished" in message, message
    assert "check that the store is up" in message, message


@pytest.mark.postgres
@pytest.mark.nats
async def test_a_handler_whose_outcome_cannot_be_stored_is_not_said_cut_by_the_grace(
    client: App, tmp_path: Path, distributed_url: str, broker_url: str
) -> None:
    """A handler finishes within the grace but its outcome cannot be recorded (the store
    gone): the stop is cut short (exit 3), and its message names the store, not the
    grace."""
    client.configure(store=distributed_url, broker=broker_url)
    log = tmp_path / "workers.log"
    async with stall_proxy(distributed_url) as proxy:
        worker = start_worker(proxy.url(distributed_url), tmp_path, log, broker=broker_url,
                              lease=60, grace=3, grace_flag=True)
        try:
            await serving(log)
            async with client.client():
                await client.publish("job.requested", {"id": 4, "seconds": 1.0})
                await eventually(lambda: marks(tmp_path, "hstart"), 60, "the handler start")
                worker.send_signal(signal.SIGTERM)
                proxy.stall()  # the store stops answering as the handler ends...
                await eventually(lambda: marks(tmp_path, "hend"), 20, "the handler end")
                await asyncio.sleep(0.3)
                proxy.cut()  # ...and is gone for good (as far as this stop goes)
                code = await exited(worker, 60)
        finally:
            stop(worker)
    assert code == 3
    message = stop_message(log)
    assert GRACE_RAN_OUT not in message, message
    assert "could not be reached to store the results of 1 run(s)' steps or " \
        "handler(s)" in message, message


async def test_past_the_grace_a_step_is_released_at_once_and_not_counted(
    client: App, tmp_path: Path
) -> None:
    store, log = client._store_spec, tmp_path / "workers.log"
    assert isinstance(store, str)
    # A lease of 60 s: only the release can move the step this fast.
    procs = [start_worker(store, tmp_path, log, lease=60, grace=0.5) for _ in range(2)]
    try:
        async with client.client():
            await eventually(lambda: len(log.read_text().splitlines()) >= 2, 20, "workers up")
            h = await client.start("chain", {"id": 7, "seconds": 3.0, "steps": "a"})
            await eventually(lambda: marks(tmp_path, "start"), 20, "the step start")
            [started] = marks(tmp_path, "start")
            owner = next(p for p in procs if p.pid == started.pid)
            other = next(p for p in procs if p is not owner)
            owner.send_signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            assert await exited(owner, 5) == 3  # released past the grace (docs/leases.md)
            await eventually(lambda: any(m.pid == other.pid for m in marks(tmp_path, "start")),
                        10, "the takeover")
            taken_over_in = time.monotonic() - stopped_at
            assert await h.result(timeout=20) == ["a:7"]
            tried = await attempts_of(client, h.run_id)
    finally:
        for p in procs:
            stop(p)
    assert taken_over_in < 3.0  # the grace (0.5 s) and a poll, not the lease (60 s)
    message = stop_message(log)  # (the cause: the grace, not the store)
    assert f"1 step(s) or handler(s) {GRACE_RAN_OUT} (0.5 s, --grace)" in message, message
    assert "give a longer --grace" in message and STORE_AWAY not in message, message
    assert tried == [("work#1", 1, None)]  # the released attempt is not counted
    assert [m.pid for m in marks(tmp_path, "end")] == [other.pid]


async def test_a_second_signal_stops_at_once(client: App, tmp_path: Path) -> None:
    """SIGINT, then SIGTERM: either signal stops gracefully, a second one at once."""
    store, log = client._store_spec, tmp_path / "workers.log"
    assert isinstance(store, str)
    worker = start_worker(store, tmp_path, log, lease=60, grace=30)
    try:
        async with client.client():
            h = await client.start("chain", {"id": 3, "seconds": 60, "steps": "a"})
            await eventually(lambda: marks(tmp_path, "start"), 20, "the step start")
            worker.send_signal(signal.SIGINT)
            assert await exited(worker, 1.0) is None  # draining: the step has 30 s
            worker.send_signal(signal.SIGTERM)
            assert await exited(worker, 5) == 3  # its step was released, not finished
            run = await client.store.get_run(client.name, h.run_id)
            tried = await attempts_of(client, h.run_id)
    finally:
        stop(worker)
    assert run is not None and run.owner is None and str(run.status) == "running"
    assert tried == [("work#1", 1, "Interrupted")]  # recorded, never a WorkerLost


async def test_a_handler_is_bounded_by_the_grace(any_client: App, tmp_path: Path) -> None:
    client = any_client
    store, broker, log = client._store_spec, broker_of(client), tmp_path / "workers.log"
    assert isinstance(store, str)
    worker = start_worker(store, tmp_path, log, broker=broker, grace=1.0)
    try:
        async with client.client():
            await client.publish("job.requested", {"id": 1, "seconds": 600})
            await eventually(lambda: marks(tmp_path, "hstart"), 20, "the handler start")
            worker.send_signal(signal.SIGTERM)
            started = time.monotonic()
            code = await exited(worker, 10)
            took = time.monotonic() - started
    finally:
        stop(worker)
    assert code == 3 and took < 5.0  # the handler was cut short past the grace
    message = stop_message(log)
    assert f"1 step(s) or handler(s) {GRACE_RAN_OUT}" in message, message
    assert STORE_AWAY not in message, message


async def test_three_rolling_restarts_during_one_long_step_do_not_fail_the_run(
    client: App, tmp_path: Path
) -> None:
    store, log = client._store_spec, tmp_path / "workers.log"
    assert isinstance(store, str)
    procs = [start_worker(store, tmp_path, log, lease=60, grace=0.2)]
    try:
        async with client.client():
            h = await client.start("chain", {"id": 5, "seconds": 2.0, "steps": "a"})
            for n in range(1, 4):
                await eventually(lambda n=n: len(marks(tmp_path, "start")) >= n, 20, f"start {n}")
                procs.append(start_worker(store, tmp_path, log, lease=60, grace=0.2))
                procs[-2].send_signal(signal.SIGTERM)
                assert await exited(procs[-2], 5) == 3  # released past the grace
            assert await h.result(timeout=30) == ["a:5"]
            tried = await attempts_of(client, h.run_id)
    finally:
        for p in procs:
            stop(p)
    assert tried == [("work#1", 1, None)]
    assert run_twice(tmp_path) == {}
    assert len(marks(tmp_path, "start")) == 4  # three restarts cut it short, one finished


async def test_a_client_that_exits_runs_no_step_twice(tmp_path: Path) -> None:
    """Runs started by a process that then leaves (``async with app:`` exits) are
    drained and released: the worker that resumes them runs no step again."""
    ran: dict[str, int] = {}

    def build() -> App:
        app = App("drain", store=f"sqlite:///{tmp_path}/drain.db", broker="embedded",
                  lease=60, poll_interval=0.05)

        @app.step
        async def slow(i: int, step: str) -> str:
            ran[f"{i}.{step}"] = ran.get(f"{i}.{step}", 0) + 1  # the side effect, first
            await asyncio.sleep(0.2)
            return step

        @app.workflow
        async def two(ctx: Any, i: int) -> list[str]:
            return [await ctx.run(slow, i, "a"), await ctx.run(slow, i, "b")]

        return app

    client = build()
    async with client:
        ids = [(await client.start("two", i)).run_id for i in range(60)]
        await asyncio.sleep(0.05)  # every run is in its first step
    worker = build()
    async with worker:
        for run_id in ids:
            assert await worker.get_handle(run_id).result(timeout=30) == ["a", "b"]
    assert sorted(ran) == sorted(f"{i}.{s}" for i in range(60) for s in "ab")
    assert {k: n for k, n in ran.items() if n > 1} == {}
