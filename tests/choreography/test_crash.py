"""A real crash: a worker process is killed (SIGKILL) in the middle of a handler."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

import cantata
from tests.choreography.crash_worker import build_app
from tests.choreography.helpers import SETTLE, events_of_type, eventually

SCRIPT = Path(__file__).with_name("crash_worker.py")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL"),
]


@pytest.fixture
def markers(tmp_path: Path) -> Path:
    path = tmp_path / "markers"
    path.mkdir()
    return path


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "crash.db")


class Worker:
    """The subprocess, so a failing test never leaves it running."""

    def __init__(self, db: str, markers: Path, max_attempts: int, log: Path) -> None:
        self.markers = markers
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), db, str(markers), str(max_attempts)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )

    async def wait_for(self, marker: str, timeout: float = 30.0) -> str:
        path = self.markers / marker

        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.proc.returncode}: {self.output()}"
                )
            return path.exists()

        await eventually(ready, timeout=timeout, what=f"marker {marker}")
        return path.read_text()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def output(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-2000:]

    def close(self) -> None:
        self.kill()
        self.log.close()


class Spawn(Protocol):
    """What the ``spawn`` fixture gives: a worker started with the test's store."""

    def __call__(self, max_attempts: int = 5) -> Worker: ...


@pytest.fixture
def spawn(markers: Path, db: str, tmp_path: Path) -> Iterator[Spawn]:
    started: list[Worker] = []

    class Spawned(Worker):
        def __init__(self, max_attempts: int = 5) -> None:
            super().__init__(db, markers, max_attempts, tmp_path / f"worker{len(started)}.log")
            started.append(self)

    yield Spawned
    for w in started:
        w.close()


async def publish_order(db: str, markers: Path) -> cantata.Event[Any]:
    api = build_app(db, markers, hang=False)
    async with api.client():
        return await api.publish("order.placed", {"order_id": 42})


async def test_a_handler_killed_mid_way_is_handled_by_a_fresh_worker_exactly_once(
    db: str, markers: Path, spawn: Spawn
) -> None:
    doomed = spawn()
    await doomed.wait_for("ready")
    placed = await publish_order(db, markers)
    assert await doomed.wait_for(f"in-handler-{doomed.proc.pid}") == placed.id
    doomed.kill()  # after its emit, before its completion: nothing was committed
    assert doomed.proc.returncode == -signal.SIGKILL

    reserved: list[cantata.Event[Any]] = []
    fresh = build_app(db, markers, hang=False, on_reserved=reserved.append)
    killed_at = time.monotonic()
    async with fresh:
        await eventually(lambda: reserved, timeout=30, what="the fresh worker to take over")
        took = time.monotonic() - killed_at
        await asyncio.sleep(SETTLE + 0.5)
        logged = await events_of_type(fresh, "inventory.reserved")
        dead = await fresh.dead_letters()

    assert (markers / f"in-handler-{os.getpid()}").read_text() == placed.id
    [event] = reserved
    assert event.data == {"order_id": 42, "pid": os.getpid()}  # the fresh worker's emit
    assert event.correlation_id == placed.id and event.causation_id == placed.id
    assert [e.id for e in logged] == [event.id]  # the killed worker's emit never landed
    assert dead == []
    # taken over after the lease (1 s) of the silent worker, not the 10 s default
    assert took < 5.0, f"takeover took {took:.1f} s with lease=1.0"


async def test_a_handler_that_keeps_killing_its_worker_is_dead_lettered(
    db: str, markers: Path, spawn: Spawn
) -> None:
    doomed = spawn(max_attempts=1)
    await doomed.wait_for("ready")
    placed = await publish_order(db, markers)
    await doomed.wait_for(f"in-handler-{doomed.proc.pid}")
    doomed.kill()

    reserved: list[cantata.Event[Any]] = []
    fresh = build_app(db, markers, hang=False, max_attempts=1, on_reserved=reserved.append)
    async with fresh:
        [dl] = await eventually(fresh.dead_letters, timeout=30, what="a WorkerLost dead letter")
        await asyncio.sleep(SETTLE)

    assert dl.event.id == placed.id
    assert dl.group == "inventory"
    assert dl.error.startswith("WorkerLost: ")
    assert reserved == []  # the cut-short attempt's emit never landed, and no retry ran
    assert not (markers / f"in-handler-{os.getpid()}").exists()
