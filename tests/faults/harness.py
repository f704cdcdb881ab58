"""The fault harness: worker processes of ``fault_app``, the faults done to them, the counts.

A :class:`Cluster` starts ``cantata worker tests.faults.fault_app:app`` processes on a
store and a broker, does faults to them (SIGKILL, SIGSTOP/SIGCONT, SIGTERM), keeps a
:class:`~tests.faults.counters.FaultLog` of what it did, drives work through a client
app in the test process, and counts the outcome once recovery time is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cantata import App, CantataError

from . import fault_app
from .counters import (
    Counts,
    FaultLog,
    begun_before_pauses,
    count_events,
    count_runs,
    count_settled,
    finished_late,
    read_beats,
    read_lapses,
    read_ledger,
    twice_live,
)

ROOT = Path(__file__).resolve().parents[2]
APP_SPEC = "tests.faults.fault_app:app"


def scale() -> float:
    """``CANTATA_FAULT_SCALE``: 1 (default) is the bounded run; 10 is the outside run."""
    return float(os.environ.get("CANTATA_FAULT_SCALE", "1") or 1)


def scaled(n: float) -> int:
    """A count of runs or events, grown with the scale."""
    return max(1, round(n * scale()))


def time_limit(seconds: int) -> int:
    """A test's timeout (pytest-timeout), grown with the scale."""
    return int(seconds * max(1.0, scale()))


def within(seconds: float) -> float:
    """A recovery budget, grown with the scale (more work in flight to finish)."""
    return seconds * max(1.0, scale() / 2)


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


class Cluster:
    """Worker processes of the fault app on one store and broker, and a client.

    Args:
        tmp: a folder for the ledger and the workers' logs.
        store: the store URL every process uses.
        broker: the broker URL (``embedded`` for SQLite alone).
        env: ``FAULT_*`` settings (see :mod:`tests.faults.fault_app`).
    """

    def __init__(self, tmp: Path, store: str, broker: str, **env: str | float) -> None:
        self.tmp = tmp
        self.store = store
        self.broker = broker
        self.ledger = tmp / "ledger.jsonl"
        settings = {"FAULT_LEASE": 2.0, **env}
        self.env = {k: str(v) for k, v in settings.items()}
        self.env["FAULT_LEDGER"] = str(self.ledger)
        self.lease = float(self.env["FAULT_LEASE"])
        self.faults = FaultLog(lease=self.lease)
        self.workers: list[Worker] = []
        self.exited: list[Worker] = []
        self.runs: dict[str, Any] = {}  # run id -> the result the run must end with
        self.event_ids: list[int] = []
        self.poison: frozenset[str] = frozenset()  # ids of events sent to be refused
        self.app = fault_app.build(self.env)
        self.app.configure(store=store, broker=broker)
        self._watching = True
        self._watcher = threading.Thread(target=self._watch_exits, daemon=True)
        self._watcher.start()

    def _watch_exits(self) -> None:
        """Note when each worker process is seen gone (a crash is told from a kill)."""
        while self._watching:
            for worker in [*self.workers, *self.exited]:
                if worker.pid not in self.faults.exited and worker.proc.poll() is not None:
                    self.faults.exited[worker.pid] = time.time()
            time.sleep(0.05)

    # -- processes --------------------------------------------------------------------

    def process_env(self) -> dict[str, str]:
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        return {**os.environ, **self.env, "PYTHONPATH": path}

    def start_worker(self, *extra: str, env: Mapping[str, str] | None = None) -> Worker:
        n = len(self.workers) + len(self.exited)
        log = self.tmp / f"worker-{n}.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cantata", "worker", APP_SPEC, "--store", self.store,
                 "--broker", self.broker, *extra],
                env={**self.process_env(), **(env or {})}, cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT,
            )
        worker = Worker(proc, log)
        self.workers.append(worker)
        if not self._watcher.is_alive():
            self._watching = True
            self._watcher = threading.Thread(target=self._watch_exits, daemon=True)
            self._watcher.start()
        return worker

    def start_workers(self, n: int) -> None:
        for _ in range(n):
            self.start_worker()

    def _gone(self, worker: Worker) -> None:
        if worker in self.workers:
            self.workers.remove(worker)
            self.exited.append(worker)

    def kill(self, worker: Worker) -> None:
        """SIGKILL: the process dies wherever it is."""
        self.faults.killed[worker.pid] = time.time()
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait()
        self._gone(worker)

    async def pause(self, worker: Worker, seconds: float) -> None:
        """SIGSTOP for ``seconds`` (outside a write of its own: :meth:`stop`), then
        SIGCONT: a GC pause or a VM stall."""
        began = await self.stop(worker)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.resume(worker, stopped=began)

    async def stop(self, worker: Worker, *, tries: int = 50) -> float:
        """SIGSTOP ``worker`` at a moment it holds no SQLite write lock; returns when (the
        wall clock) the stop that held began, for the counters.

        A SQLite worker stopped inside a write transaction of its own (a heartbeat, a
        claim, a checkpoint) holds the file's one write lock until it runs again: no
        other process can write meanwhile, heartbeats included, and the scenario is a
        store outage instead of a stalled worker (inherent to SQLite, and not what a
        pause scenario tests). So, on a SQLite store, each stop is probed: a fresh
        connection's ``BEGIN IMMEDIATE`` (waiting 0.2 s at most), then ``ROLLBACK``.
        Refused, the worker is let go on (SIGCONT) for a few milliseconds and stopped
        again, ``tries`` times at most. (Those stops of 0.2 s are not recorded: far
        shorter than any fence, they lapse no hold.) On another store, one SIGSTOP.
        """
        path = sqlite_file(self.store)
        for _ in range(tries):
            began = time.time()
            worker.proc.send_signal(signal.SIGSTOP)
            await asyncio.to_thread(wait_stopped, worker.pid)
            if path is None or await asyncio.to_thread(write_lock_free, path):
                return began
            worker.proc.send_signal(signal.SIGCONT)
            await asyncio.sleep(random.uniform(0.005, 0.02))
        raise AssertionError(f"worker {worker.pid} held the write lock of {path} at each of "
                             f"{tries} stops: it writes all the time, or another process "
                             f"holds the lock (see the logs): {self.logs()}")

    def resume(self, worker: Worker, *, stopped: float | None = None) -> None:
        """SIGCONT; a pause that began at ``stopped`` (a :meth:`stop`'s answer) is
        recorded for the counters (none: a stall behind the harness's back). Its end is
        the time just before the SIGCONT, as its start is just before the SIGSTOP: every
        line the worker writes after the resume is later (taken after the signal, the
        harness, starved of CPU, once noted it after the worker's own next line: a body
        whose effect came before the pause and its end line at the resume then read as
        going on past it, ``counters.finished_late``)."""
        resumed = time.time()
        worker.proc.send_signal(signal.SIGCONT)
        if stopped is not None:
            self.faults.paused.setdefault(worker.pid, []).append((stopped, resumed))

    async def terminate(self, worker: Worker, *, timeout: float = 60.0) -> float:
        """SIGTERM and wait for the process to exit; returns how long it took."""
        began = time.monotonic()
        self.faults.stopped.add(worker.pid)
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(worker.proc.wait, timeout)
        self._gone(worker)
        return time.monotonic() - began

    async def wait_ledger(self, predicate: Callable[[list[Any]], bool], timeout: float) -> None:
        """Wait until the ledger's executions satisfy ``predicate``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(read_ledger(self.ledger)):
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"the ledger never showed the awaited executions in {timeout} s")

    async def ready(self, timeout: float = 60) -> None:
        """Wait until every worker serves (has opened the store and the broker)."""
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            while "serving app" not in worker.log.read_text(errors="replace"):
                if worker.proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"worker {worker.pid} did not start: {self.logs()}")
                await asyncio.sleep(0.05)

    async def busy_worker(self, what: str = "step", timeout: float = 30) -> Worker:
        """A worker with a step (or handler) in progress, once there is one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            busy = {e.pid for e in read_ledger(self.ledger) if e.what == what and e.ended is None}
            for worker in self.workers:
                if worker.pid in busy:
                    return worker
            await asyncio.sleep(0.05)
        raise AssertionError(f"no worker had a {what} in progress within {timeout} s")

    def expect_exit(self, worker: Worker) -> None:
        """This worker is meant to refuse to start: its exit is not a crash."""
        self.faults.stopped.add(worker.pid)

    def busiest(self) -> Worker:
        """The serving worker with the most steps and handlers in progress right now."""
        open_ = [e.pid for e in read_ledger(self.ledger) if e.ended is None]
        return max(self.workers, key=lambda w: open_.count(w.pid))

    def stop_all(self) -> None:
        """Kill what is left (the end of a test: not counted as a fault)."""
        for worker in list(self.workers):
            self.faults.stopped.add(worker.pid)
            if worker.proc.poll() is None:
                worker.proc.send_signal(signal.SIGCONT)
                worker.proc.kill()
                worker.proc.wait()
            self._gone(worker)
        self._watching = False

    def tracebacks(self) -> int:
        """How many tracebacks the workers printed (a flood is a defect of its own)."""
        return sum(w.log.read_text(errors="replace").count("Traceback")
                   for w in [*self.workers, *self.exited] if w.log.exists())

    def logs(self, limit: int = 4000) -> str:
        text = "".join(f"--- {w.log.name} (pid {w.pid})\n"
                       + w.log.read_text(errors="replace")[-limit // 2:]
                       for w in [*self.workers, *self.exited] if w.log.exists())
        return text[-limit:]

    # -- work ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[App]:
        """The app in this process, opened as a client (it executes nothing)."""
        async with self.app.client():
            yield self.app

    async def start_saga(self, i: int, workflow: str = "saga") -> str:
        order = {"id": i}
        handle = await retrying(lambda: self.app.start(workflow, order,
                                                       idempotency_key=f"{workflow}-{i}"))
        steps = fault_app.STEPS_OF[workflow]
        run_id: str = handle.run_id
        self.runs[run_id] = [f"{s}:{i}" for s in steps]
        return run_id

    async def publish(self, i: int) -> None:
        await retrying(lambda: self.app.publish("order.placed", {"id": i},
                                                id=f"placed-{i}", subject=f"order-{i}"))
        self.event_ids.append(i)

    async def submit(self, sagas: int, events: int, *, over: float = 0.0,
                     workflow: str = "saga", first: int = 0) -> None:
        """Start ``sagas`` runs and publish ``events`` events, spread over ``over`` seconds."""
        n = max(sagas, events)
        for i in range(first, first + n):
            if i - first < sagas:
                await self.start_saga(i, workflow)
            if i - first < events:
                await self.publish(i)
            if over:
                await asyncio.sleep(over / n)

    def serving(self) -> list[Worker]:
        """The workers that have started serving."""
        return [w for w in self.workers
                if "serving app" in w.log.read_text(errors="replace")]

    async def storm(self, seconds: float, every: tuple[float, float], respawn: bool = True,
                    ) -> int:
        """SIGKILL a worker every ``every`` seconds for ``seconds``, and start another.

        The victim is a serving worker (one still starting would die before it did
        anything), most often one with a step or handler in progress at that moment.
        """
        kills = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            await asyncio.sleep(random.uniform(*every))
            candidates = self.serving()
            busy_pids = {e.pid for e in read_ledger(self.ledger) if e.ended is None}
            busy = [w for w in candidates if w.pid in busy_pids]
            if busy and random.random() < 0.7:
                candidates = busy
            if candidates:
                self.kill(random.choice(candidates))
                kills += 1
                if respawn:
                    self.start_worker()
        return kills

    async def counts(self) -> Counts:
        """The counts as the store and the ledger have them now."""
        counts = Counts()
        self.faults.lapses = read_lapses(self.ledger)
        executions = begun_before_pauses(read_ledger(self.ledger), self.faults)
        after_lapse: list[str] = []
        after_stop: list[str] = []
        counts.steps_twice_live, reruns, details = twice_live(
            executions, self.faults, after_lapse=after_lapse, after_stop=after_stop)
        counts.info["reruns"] = reruns
        counts.info["reruns_after_lapse"] = len(after_lapse)
        counts.info["reruns_after_own_stop"] = len(after_stop)
        counts.details.extend(after_lapse[:3])
        counts.details.extend(after_stop[:3])
        counts.info["kills"] = len(self.faults.killed)
        crashed = self.faults.crashed()
        counts.workers_crashed = len(crashed)
        counts.details.extend(f"worker {pid} exited by itself" for pid in crashed)
        counts.details.extend(details)
        counts.steps_finished_late, late = finished_late(executions, self.faults)
        counts.details.extend(late)
        await count_runs(self.app, self.runs, executions, self.faults, counts)
        await count_settled(self.app, executions, counts, self.faults)
        if self.event_ids:
            await count_events(self.app, self.event_ids, counts, poison=self.poison)
        return counts

    async def heard_from(self, deadline: float) -> None:
        """Wait until every live worker that ran a step or handler has had a heartbeat
        get through after the last execution began (or until ``deadline``, a
        ``time.monotonic()``). Only then is each lapse of its hold that may explain a
        re-run of what it ran in the ledger (a worker writes it once its heartbeat gets
        through again, ``fault_app.record_lapses``): counted sooner, a worker starved
        of CPU past its lease looks like a live one."""
        while time.monotonic() < deadline:
            executions = read_ledger(self.ledger)
            if not executions:
                return
            last = max(e.began for e in executions)
            ran = {e.pid for e in executions}
            beats = read_beats(self.ledger)
            if all(beats.get(w.pid, 0.0) >= last for w in self.workers
                   if w.pid in ran and w.proc.poll() is None):
                return
            await asyncio.sleep(0.05)

    async def recover(self, fault_ended: float, budget: float) -> Counts:
        """Wait until every run is final and every event's chain done, or ``budget``
        seconds past ``fault_ended`` (a ``time.monotonic()``); then count, once the
        live workers have been heard from (:meth:`heard_from`: until the same deadline,
        or four leases from now if that is later)."""
        deadline = fault_ended + budget
        while True:
            try:
                counts = await self.counts()
            except CantataError:  # the store is still coming back
                counts = None
            if counts is not None and not counts.runs_stuck and not counts.events_lost:
                done = round(time.monotonic() - fault_ended, 2)
                await self.heard_from(max(deadline, time.monotonic() + 4 * self.lease))
                counts = await self.counts()
                counts.recover_seconds = done
                return counts
            if time.monotonic() > deadline:
                return counts if counts is not None else await self.counts()
            await asyncio.sleep(0.25)


def sqlite_file(store: str) -> Path | None:
    """The file of a ``sqlite:///`` store URL (None for another store)."""
    if not store.startswith("sqlite:///"):
        return None
    return Path(store.removeprefix("sqlite:///").split("?")[0])


def write_lock_free(path: Path) -> bool:
    """True if a write transaction can begin on the SQLite file ``path`` within 0.2 s
    (no process holds its write lock): ``BEGIN IMMEDIATE`` on a fresh connection, then
    ``ROLLBACK`` (nothing written)."""
    conn = sqlite3.connect(path, timeout=0.2, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ROLLBACK")
        return True
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return False
        raise
    finally:
        conn.close()


def wait_stopped(pid: int, timeout: float = 1.0) -> None:
    """Return once process ``pid`` is stopped (SIGSTOP is delivered asynchronously: it
    could begin a write between the signal and its stop); Linux's ``/proc`` tells."""
    stat = Path(f"/proc/{pid}/stat")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return  # (no /proc, or the process is gone)
        if state in ("T", "t", "Z", "X"):
            return
        time.sleep(0.001)


async def retrying(call: Callable[[], Any], attempts: int = 40) -> Any:
    """A client call retried while the store is away (a client's own business)."""
    for i in range(attempts):
        try:
            return await call()
        except (CantataError, OSError):
            if i == attempts - 1:
                raise
            await asyncio.sleep(0.5)
    return None


def assert_zero(counts: Counts, *, worker_lost: bool = True) -> None:
    """Every count zero; the message shows all counts and what made one non-zero."""
    bad = {k: v for k, v in counts.zeros(worker_lost=worker_lost).items() if v}
    assert not bad, str(counts)
