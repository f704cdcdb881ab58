"""Real crashes: a worker process is SIGKILLed mid-step and another one resumes the run.

Also: a store outage in the middle of a run is retried from history, not turned into a
failed business run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Retry, RunStatus, StoreUnavailable, WorkflowContext
from cantata.model.records import Attempt, RunWrite
from cantata.store.factory import store_from_url

from .crash_app import BACKOFF, build
from .helpers import eventually, make_app

CRASH_APP = Path(__file__).with_name("crash_app.py")

pytestmark = pytest.mark.slow


class Crashy:
    """Runs crash_app.py processes on one SQLite file and reads what they left."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = str(tmp_path / "crash.db")
        self.logs = tmp_path / "logs"
        self.logs.mkdir()

    def args(self, workflow: str, key: str) -> list[str]:
        return [sys.executable, str(CRASH_APP), self.db, str(self.logs), workflow, key]

    def run(self, workflow: str, key: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.args(workflow, key), capture_output=True, text=True,
                              timeout=60, check=False)

    def outcome(self, workflow: str, key: str) -> dict[str, Any]:
        proc = self.run(workflow, key)
        assert proc.returncode == 0, proc.stderr
        return dict(json.loads(proc.stdout.strip().splitlines()[-1]))

    def executions(self, step: str) -> list[dict[str, Any]]:
        path = self.logs / f"{step}.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def inspect(self, run_id: str) -> tuple[Any, list[Attempt]]:
        async def read() -> tuple[Any, list[Attempt]]:
            app = build(self.db, str(self.logs))
            async with app.client():
                run = await app.get_handle(run_id).info()
                return run, await app.store.load_attempts(app.name, run_id)

        return asyncio.run(read())


def killed(proc: subprocess.CompletedProcess[str] | subprocess.Popen[str]) -> bool:
    return proc.returncode == -signal.SIGKILL


def test_run_resumes_after_its_worker_is_killed_mid_step(tmp_path: Path) -> None:
    crashy = Crashy(tmp_path)
    first = crashy.run("self_kill", "order-1")
    assert killed(first), first.stderr
    assert [e["attempt"] for e in crashy.executions("two")] == [1]

    out = crashy.outcome("self_kill", "order-1")  # a fresh process, same idempotency key

    assert out["status"] == "completed"
    assert out["result"] == [2, 20, 23]
    # the completed step was not executed again; the in-flight one ran again
    assert len(crashy.executions("one")) == 1
    two = crashy.executions("two")
    assert [e["attempt"] for e in two] == [1, 2]
    assert two[0]["pid"] != two[1]["pid"]
    assert two[0]["key"] == two[1]["key"]  # idempotency key stable across the recovery
    assert len(crashy.executions("three")) == 1
    assert crashy.executions("undo_one") == []

    run, attempts = crashy.inspect(out["run_id"])
    assert run.status == RunStatus.COMPLETED
    by_key = {(a.key, a.attempt): a for a in attempts}
    assert by_key[("two#1", 1)].error_type == "WorkerLost"
    assert by_key[("two#1", 1)].ended_at is not None
    assert by_key[("two#1", 2)].error_type is None
    assert [a.attempt for a in attempts if a.key == "one#1"] == [1]


def test_run_resumes_after_the_test_kills_a_blocked_worker(tmp_path: Path) -> None:
    crashy = Crashy(tmp_path)
    proc = subprocess.Popen(crashy.args("killed_while_blocked", "order-2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (crashy.logs / "blocked").exists():
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the step never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert killed(proc)

    out = crashy.outcome("killed_while_blocked", "order-2")

    assert out == {"run_id": out["run_id"], "status": "completed", "result": [2, 200, 203]}
    assert len(crashy.executions("one")) == 1
    assert [e["attempt"] for e in crashy.executions("blocking")] == [1, 2]
    _, attempts = crashy.inspect(out["run_id"])
    blocking = [a for a in attempts if a.key == "blocking#1"]
    assert [(a.attempt, a.error_type) for a in blocking] == [(1, "WorkerLost"), (2, None)]


def test_step_that_kills_its_worker_every_time_fails_with_worker_lost(tmp_path: Path) -> None:
    crashy = Crashy(tmp_path)
    for _ in range(2):  # max_attempts=2: each attempt takes a worker down with it
        proc = crashy.run("kills_every_time", "order-3")
        assert killed(proc), proc.stderr

    out = crashy.outcome("kills_every_time", "order-3")  # does not run the step a third time

    assert out["status"] == "compensated"
    assert "StepFailed" in out["error"] and "WorkerLost" in out["error"]
    assert [e["attempt"] for e in crashy.executions("doom")] == [1, 2]
    assert len(crashy.executions("one")) == 1
    assert len(crashy.executions("undo_one")) == 1
    run, attempts = crashy.inspect(out["run_id"])
    assert run.status == RunStatus.COMPENSATED
    doom = [a for a in attempts if a.key == "doom#1"]
    assert [(a.attempt, a.error_type) for a in doom] == [(1, "WorkerLost"), (2, "WorkerLost")]


def test_a_first_attempt_cut_short_without_its_row_counts_from_history(
    tmp_path: Path,
) -> None:
    """A step's first attempt whose ``attempts`` row is missing (the lean writer leaves
    to ``history`` what it says alone once every worker of the app is of this release:
    engine/gate.py, docs/performance.md, "Round twenty-six (attempts)") and whose
    worker was killed in it is read from the step's entry on the takeover, closed
    ``WorkerLost`` with its recorded start, and counts: the step still runs
    ``max_attempts`` times, not once more."""
    crashy = Crashy(tmp_path)
    proc = crashy.run("kills_every_time", "order-7")
    assert killed(proc), proc.stderr
    with contextlib.closing(sqlite3.connect(crashy.db)) as db, db:
        begun = db.execute("SELECT started_at FROM history WHERE key='doom#1'").fetchone()[0]
        # written without its row: the gate opened at the worker's first heartbeat
        assert db.execute("SELECT count(*) FROM attempts WHERE key='doom#1'").fetchone() == (0,)
    proc = crashy.run("kills_every_time", "order-7")  # the second attempt, killed too
    assert killed(proc), proc.stderr

    out = crashy.outcome("kills_every_time", "order-7")  # does not run the step a third time

    assert out["status"] == "compensated" and "WorkerLost" in out["error"]
    assert [e["attempt"] for e in crashy.executions("doom")] == [1, 2]
    _, attempts = crashy.inspect(out["run_id"])
    doom = [(a.attempt, a.started_at, a.error_type) for a in attempts if a.key == "doom#1"]
    assert doom[0] == (1, begun, "WorkerLost")
    assert [(n, etype) for n, _, etype in doom] == [(1, "WorkerLost"), (2, "WorkerLost")]


def test_a_worker_killed_in_a_retry_backoff_leaves_the_rest_of_it_to_wait(
    tmp_path: Path,
) -> None:
    """The next attempt's due time is stored with the failed attempt: the process that
    resumes the run after a kill -9 waits until then, not from its own start or not
    at all (the downstream the backoff protects is not called again at once)."""
    crashy = Crashy(tmp_path)
    proc = subprocess.Popen(crashy.args("killed_in_backoff", "order-4"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not failed_attempt_stored(crashy.db):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "the first attempt never failed"
            time.sleep(0.02)
        time.sleep(0.5)  # 0.5 s into the backoff
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert killed(proc)

    out = crashy.outcome("killed_in_backoff", "order-4")

    assert out["status"] == "completed" and out["result"] == 8
    first, second = crashy.executions("flaky")
    assert (first["attempt"], second["attempt"]) == (1, 2)
    _, attempts = crashy.inspect(out["run_id"])
    failed_at = attempts[0].ended_at
    assert attempts[0].error_type == "ConnectionError" and failed_at is not None
    assert second["t"] - failed_at >= BACKOFF - 0.05, second["t"] - failed_at
    # Not a whole backoff again from the resuming process's start: at the stored due
    # time, or as soon as that process could take the run over (its start-up, then
    # the killed worker's lease of 1 s), whichever is later (a loaded machine may take
    # seconds to start a process).
    opened = crashy.executions("opened")[-1]["t"]
    due = max(failed_at + BACKOFF, opened + 1.0)
    assert second["t"] - due < 1.0, (second["t"] - failed_at, opened - failed_at)


def failed_attempt_stored(db: str) -> bool:
    """A failed attempt of step ``flaky`` is committed in crash_app's store."""
    if not Path(db).exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return conn.execute(
                "SELECT 1 FROM attempts WHERE key='flaky#1' AND error_type IS NOT NULL"
            ).fetchone() is not None
    except sqlite3.OperationalError:  # not created yet
        return False


class FlakyStore:
    """A SQLite store whose ``fail_on``-th ``commit_run`` raises, as in a store outage."""

    def __init__(self, url: str, fail_on: int) -> None:
        self._inner = store_from_url(url)
        self.url = url
        self.commits = 0
        self.fail_on = fail_on

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def create_run(self, run: Any, first: RunWrite | None = None) -> Any:
        if self.fail_on == 0:
            self.fail_on = -1
            raise StoreUnavailable("connection refused")
        return await self._inner.create_run(run, first)

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        self.commits += 1
        if self.commits == self.fail_on:
            raise StoreUnavailable("connection reset by peer")
        await self._inner.commit_run(app, run_id, fence, write)


# The run is stored with the start of reserve (create_run), then commits twice:
# reserve's result with the start of charge; charge's result with the run's end.
@pytest.mark.parametrize("fail_on", [1, 2])
async def test_store_outage_mid_run_is_retried_not_failed(sqlite_url: str, fail_on: int) -> None:
    store = FlakyStore(sqlite_url, fail_on)
    app: App = make_app(store)  # type: ignore[arg-type]
    calls: list[str] = []

    # an attempt whose end could not be recorded counts as lost (as after a kill -9),
    # so the steps need a second attempt
    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def reserve(n: int) -> int:
        calls.append("reserve")
        return n

    @app.step
    async def release(n: int) -> None:
        calls.append("release")

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def charge(n: int) -> int:
        calls.append("charge")
        return n * 2

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        a: int = await ctx.run(reserve, n, compensate=release)
        return a + int(await ctx.run(charge, n))

    async with app:
        h = await app.start(order, 5)
        assert await h.result(timeout=5) == 15
        run = await h.info()
    assert store.commits > fail_on
    assert run.status == RunStatus.COMPLETED and run.error is None
    assert "release" not in calls  # an infrastructure error is not a business failure
    assert calls.count("charge") >= 1 and calls.count("reserve") >= 1


async def test_a_finished_step_is_durable_while_a_parallel_step_still_runs(
    store_url: str,
) -> None:
    """A step's result may share a commit with the next step's start, but it is never
    held back behind a step that is still running: a crash then would repeat it."""
    app = make_app(store_url)
    release = asyncio.Event()

    @app.step
    async def quick(n: int) -> int:
        await asyncio.sleep(0.1)  # ends after the start of slow is committed
        return n + 1

    @app.step
    async def slow(n: int) -> int:
        await release.wait()
        return n * 10

    @app.workflow
    async def both(ctx: WorkflowContext, n: int) -> int:
        a, b = await asyncio.gather(ctx.run(quick, n), ctx.run(slow, n))
        return int(a) + int(b)

    async with app:
        h = await app.start(both, 4)
        store = app.store

        async def quick_recorded() -> bool:
            history = await store.load_history(app.name, h.run_id)
            return any(e.name == "quick" and e.status == "completed" for e in history)

        try:
            await eventually(quick_recorded, timeout=5)
        finally:
            release.set()
        assert await h.result(timeout=5) == 45


async def test_a_store_outage_while_starting_is_waited_out(sqlite_url: str) -> None:
    """The run is stored with its first checkpoint; if that fails (an outage: maybe
    applied, maybe not), ``start`` finds out by the run's id and tries again: the run
    is stored and runs once (tests/engine/test_lost_start.py: its answer lost)."""
    store = FlakyStore(sqlite_url, 0)
    app: App = make_app(store)  # type: ignore[arg-type]
    calls: list[int] = []

    @app.step
    async def reserve(n: int) -> int:
        calls.append(n)
        return n

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(reserve, n))

    async with app:
        h = await app.start(order, 1)
        assert store.fail_on == -1, "the creation did not fail"
        assert await h.result(timeout=5) == 1
        assert [r.run_id for r in await app.list_runs()] == [h.run_id]
    assert calls == [1]


async def test_a_workflow_that_awaits_before_its_first_step_is_stored_at_once(
    sqlite_url: str,
) -> None:
    """A run is stored with its first checkpoint; a workflow that awaits something else
    first does not hold ``start`` back: the run is stored on its own then."""
    app = make_app(sqlite_url)
    release = asyncio.Event()

    @app.step
    async def reserve(n: int) -> int:
        return n

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        await release.wait()  # not durable: the run must already be stored
        return int(await ctx.run(reserve, n))

    async with app:
        h = await asyncio.wait_for(app.start(order, 3), 2)
        run = await app.store.get_run(app.name, h.run_id)
        assert run is not None and run.status in (RunStatus.PENDING, RunStatus.RUNNING)
        release.set()
        assert await h.result(timeout=5) == 3
