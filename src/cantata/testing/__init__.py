"""Test support for users' own flows.

- :class:`SkipClock`: virtual time; a one-hour ``ctx.sleep`` passes at once.
- :func:`environment`: opens an app on an in-memory store with the skipping clock.
- :func:`crash_test`: runs a workflow (or a saga, in either mode) with a simulated
  crash at every checkpoint in turn — each run checkpoint and each handler's
  completion, before and after the write — and reports whether outcome and side
  effects match a clean run.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import inspect
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from cantata.app import App
from cantata.cancel_safe import wait_event
from cantata.errors import LeaseLost, WorkflowError
from cantata.model.records import RunRecord, RunWrite
from cantata.store.base import Settlement, Store
from cantata.store.factory import store_from_url
from cantata.testing.wait import eventually

__all__ = [
    "CrashPoint",
    "CrashReport",
    "Outcome",
    "SkipClock",
    "crash_test",
    "environment",
    "eventually",
]


class SkipClock:
    """A clock whose sleeps complete as soon as nothing else is runnable.

    Virtual time starts at the wall-clock time and jumps straight to the earliest
    pending wake time whenever the event loop has had a few idle turns. Its jumps are
    not a pause of the worker (``virtual``): the worker judges its own hold by the
    system's clocks (docs/leases.md).
    """

    virtual = True

    def __init__(self, start: float | None = None, *, idle_turns: int = 5) -> None:
        self._now = time.time() if start is None else start
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()
        self._idle_turns = idle_turns
        self._driver: asyncio.Task[None] | None = None

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        """Move virtual time forward and wake every sleeper now due."""
        self._now += seconds
        self._wake_due()

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self._now + seconds, next(self._seq), fut))
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive())
        try:
            await fut
        finally:
            if not fut.done():
                fut.cancel()

    def _wake_due(self) -> None:
        while self._sleepers and self._sleepers[0][0] <= self._now:
            _, _, fut = heapq.heappop(self._sleepers)
            if not fut.done():
                fut.set_result(None)

    async def _drive(self) -> None:
        while self._sleepers:
            # Give real work (store writes in a thread, other tasks) a moment first.
            for _ in range(self._idle_turns):
                await asyncio.sleep(0)
            await asyncio.sleep(0.001)
            self._sleepers = [s for s in self._sleepers if not s[2].done()]
            heapq.heapify(self._sleepers)
            if self._sleepers:
                self._now = max(self._now, self._sleepers[0][0])
                self._wake_due()


@contextlib.asynccontextmanager
async def environment(app: App, *, store: str = "memory://") -> AsyncIterator[App]:
    """Open ``app`` for a test: in-memory store, embedded broker, skipping clock."""
    app.configure(store=store, broker="embedded")
    app.clock = SkipClock()
    async with app:
        yield app


# -- crash injection -------------------------------------------------------------------------


_READS = ("get_", "list_", "load_")  # store calls that change nothing


class _CrashingStore:
    """Delegates to a real store; the n-th checkpoint "crashes" the worker.

    Checkpoints are the writes a worker's progress hangs on: a run's checkpoint
    (``commit_run``, or ``create_run`` with its first one) and a handler's completion
    (``settle_delivery`` done: the hop of a choreography, with the events it emits).
    After the crash the worker is dead, as after ``kill -9``: every later store call
    of it but a plain read fails (claims find nothing), so it makes no more progress
    and its stop changes nothing either (it excuses no attempt, releases no run and
    keeps its worker row, which the next worker finds expired), until :meth:`revive`
    (a new worker process on the same store).
    """

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.url = inner.url
        self.commits = 0
        self.crash_at: int | None = None
        self.when = "before"
        self.crashed = asyncio.Event()
        self.dead = False
        self.creations: set[int] = set()  # checkpoints that stored a new run
        self.crashed_run: str | None = None  # crashed while its start was being stored

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr) or name.startswith(_READS):
            return attr  # url, add_listener, get_run, …: nothing stored
        if name.startswith("claim_"):
            async def claim(*args: Any, **kw: Any) -> Any:
                return [] if self.dead else await attr(*args, **kw)  # a dead worker takes nothing

            return claim

        async def refused(*args: Any, **kw: Any) -> Any:
            self._refuse()
            return await attr(*args, **kw)

        return refused

    def _refuse(self) -> None:
        if self.dead:
            raise LeaseLost("simulated crash: this worker is dead")

    def _crash(self) -> None:
        self.crash_at = None
        self.dead = True
        self.crashed.set()

    def revive(self) -> None:
        """A new worker starts on the same store."""
        self.dead = False

    async def close(self) -> None:
        """Kept open across the simulated restart; :meth:`really_close` ends it."""

    async def really_close(self) -> None:
        await self._inner.close()

    def _due(self) -> bool:
        self.commits += 1
        return self.crash_at is not None and self.commits == self.crash_at

    async def create_run(
        self, run: RunRecord, first: RunWrite | None = None, *, actor: str = "system"
    ) -> tuple[RunRecord, bool]:
        """A run stored with its first checkpoint: that checkpoint can crash too (after
        it is written; before, it is a start that failed, which its caller sees)."""
        self._refuse()
        if first is None:
            return await self._inner.create_run(run, actor=actor)
        due = self._due()
        self.creations.add(self.commits)
        stored = await self._inner.create_run(run, first, actor=actor)
        if due:
            self._crash()
            self.crashed_run = run.run_id
            raise LeaseLost(f"simulated crash at checkpoint {self.commits} (after write)")
        return stored

    async def commit_run(self, app: str, run_id: str, fence: int, write: RunWrite) -> None:
        self._refuse()
        if self._due():
            if self.when == "after":
                await self._inner.commit_run(app, run_id, fence, write)
            self._crash()
            raise LeaseLost(f"simulated crash at checkpoint {self.commits} ({self.when} write)")
        await self._inner.commit_run(app, run_id, fence, write)

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        self._refuse()
        if settlement.outcome == "done" and self._due():
            if self.when == "after":
                await self._inner.settle_delivery(app, group, event_id, settlement)
            self._crash()
            raise LeaseLost(f"simulated crash at checkpoint {self.commits} ({self.when} write)")
        return await self._inner.settle_delivery(app, group, event_id, settlement)


@dataclass(frozen=True)
class Outcome:
    """How a run ended."""

    status: str
    result: Any = None
    error: str | None = None


@dataclass(frozen=True)
class CrashPoint:
    """One simulated crash and what the recovered run did."""

    checkpoint: int
    when: str  # "before" or "after" the checkpoint was written
    outcome: Outcome
    effects: Any
    same: bool


@dataclass
class CrashReport:
    """The clean run and every crash point."""

    clean: Outcome
    clean_effects: Any
    points: list[CrashPoint] = field(default_factory=list)

    @property
    def failures(self) -> list[CrashPoint]:
        return [p for p in self.points if not p.same]

    def assert_ok(self) -> None:
        """Raise ``AssertionError`` naming every crash point whose result differs."""
        if self.failures:
            lines = [
                f"crash {p.when} checkpoint {p.checkpoint}: outcome {p.outcome} effects "
                f"{p.effects!r} (clean: {self.clean} effects {self.clean_effects!r})"
                for p in self.failures
            ]
            raise AssertionError("crash safety violated:\n" + "\n".join(lines))


def _comparable(outcome: Outcome) -> Outcome:
    """Attempt counts legitimately differ after a crash (WorkerLost counts as one)."""
    error = re.sub(r" after \d+ attempt\(s\)", "", outcome.error or "") or None
    return Outcome(outcome.status, outcome.result, error)


async def _kill(app: App) -> None:
    """End every task of ``app``'s engine where it is, as ``kill -9`` would: a step
    body, a checkpoint flush, a retry of a refused write. (The stop that follows then
    finds nothing to wait for; its writes are refused by the dead store.)"""
    engine = app.engine
    while tasks := [t for t in engine.background() if not t.done()]:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _outcome(app: App, run_id: str, timeout: float) -> Outcome:
    handle = app.get_handle(run_id)
    try:
        value = await handle.result(timeout=timeout)
    except WorkflowError as exc:
        return Outcome(exc.status, None, exc.error)
    return Outcome("completed", value)


async def crash_test(
    app: App,
    workflow: Callable[..., Any] | str,
    *args: Any,
    effects: Callable[[], Any] | None = None,
    reset: Callable[[], None] | None = None,
    timeout: float = 30.0,
) -> CrashReport:
    """Run ``workflow`` cleanly, then once per checkpoint with a crash there.

    A checkpoint is a run's commit or, for a choreography (a saga deployed
    ``choreographed``, or handlers reacting to the run's events), the completion of a
    handler with the events it emits: each hop. The crashed worker stops there, as
    under ``kill -9``: it writes nothing more (no release, no excused attempt), so
    the attempt it was in counts as ``WorkerLost``; a new worker on the same store
    takes its runs and deliveries over (their lease runs out at once).

    Args:
        effects: returns a snapshot of the side effects (compared with the clean run's).
        reset: clears the side effects before each run.
        timeout: seconds allowed per run.

    Returns:
        A :class:`CrashReport`; call ``report.assert_ok()`` in a test.
    """

    async def one(crash_at: int | None, when: str) -> tuple[Outcome, Any, int, set[int]]:
        if reset is not None:
            reset()
        store = _CrashingStore(store_from_url("memory://"))
        app.shutdown_grace = grace
        store.crash_at, store.when = crash_at, when
        app.configure(store=store, broker="embedded")
        app.clock = SkipClock()
        try:
            async with app:
                dead = app.engine.worker_id
                try:
                    run_id = (await app.start(workflow, *args)).run_id
                except LeaseLost:
                    if store.crashed_run is None:
                        raise
                    run_id = store.crashed_run
                handle = app.get_handle(run_id)
                deadline = time.monotonic() + timeout
                while not store.crashed.is_set():
                    run = await app.store.get_run(app.name, handle.run_id)
                    if run is not None and run.status.is_final:
                        outcome = await _outcome(app, handle.run_id, timeout)
                        return (outcome, effects() if effects else None, store.commits,
                                store.creations)
                    if time.monotonic() > deadline:
                        raise AssertionError(f"run {handle.run_id} did not end in {timeout} s")
                    await wait_event(store.crashed, 0.005)  # a crash is handled at once
                # A crashed process drains nothing: a step waiting on the dead store
                # (a choreographed step's reply that can no longer be recorded) must
                # not hold this stop for the grace period.
                app.shutdown_grace = 0.0
                await _kill(app)
            # The "process" died; a new worker takes its work over. Its lease runs
            # out at once (a dead process's heartbeat stops; here the clock does not
            # wait for it): what it held (runs, held deliveries) is taken over now.
            store.revive()
            await store.heartbeat(app.name, dead, 0.0, None, lease=app.lease)
            async with app:
                outcome = await _outcome(app, handle.run_id, timeout)
            return outcome, effects() if effects else None, store.commits, store.creations
        finally:
            await store.really_close()

    async def quiet(crash_at: int, when: str) -> tuple[Outcome, Any, int, set[int]]:
        # The dying worker's failed writes are the point of the test, not news.
        logger = logging.getLogger("cantata")
        level = logger.level
        logger.setLevel(logging.CRITICAL)
        try:
            return await one(crash_at, when)
        finally:
            logger.setLevel(level)

    grace = app.shutdown_grace
    try:
        clean, clean_effects, commits, creations = await one(None, "before")
        report = CrashReport(clean, clean_effects)
        for k in range(1, commits + 1):
            for when in ("after",) if k in creations else ("before", "after"):
                outcome, got, _, _ = await quiet(k, when)
                same = _comparable(outcome) == _comparable(clean) and (
                    effects is None or got == clean_effects
                )
                report.points.append(CrashPoint(k, when, outcome, got, same))
    finally:
        app.shutdown_grace = grace
    return report
