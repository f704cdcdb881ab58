"""The flow-control part of a worker: queue loop, scheduler, slot wake-ups, declarations."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from cantata.store.base import CANCEL, RUNS, SCHEDULES, SLOTS

from .queues import QueueLoop
from .schedules import Scheduler, new_row

if TYPE_CHECKING:
    from cantata.declare.router import Router
    from cantata.engine.engine import Engine
    from cantata.engine.runner import RunExecution


async def declare_queues(engine: Engine, router: Router) -> None:
    """Record the router's queues in the store (whenever the app opens).

    Raises:
        QueueConflict: a live worker declared one of the queues with other limits.
    """
    now = engine.clock.now()
    for spec in router.queues.values():
        await engine.store.declare_queue(
            engine.app, spec, worker_id=engine.worker_id, stale_before=now
        )


async def declare_schedules(engine: Engine, router: Router) -> None:
    """Record the router's schedules in the store (source ``code``), when the app opens
    to serve: a worker of that code is what ticks them. A client's open (a read-only
    command, an API process) records none, so a schedule ``delete`` removed stays
    removed until a worker whose code declares it opens the app again."""
    now = engine.clock.now()
    for sched in router.schedule_specs.values():
        await engine.store.put_schedule(engine.app, new_row(sched, "code", now))


class FlowService:
    """Runs the queue loop and the scheduler of one serving engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.queues = QueueLoop(engine)
        self.scheduler = Scheduler(engine)
        self.slot_waiters: set[RunExecution] = set()
        self.released = asyncio.Event()
        self.releases = 0  # news that may have freed a slot, counted (flow.limits.acquire)
        # cancels heard (a remote step's task waiting for a slot looks at its run then:
        # flow.limits.take_task_slot)
        self.cancelled = asyncio.Event()
        self.cancels = 0
        self._tasks: list[asyncio.Task[None]] = []
        engine.store.add_listener(self._on_change)

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.queues.run(), name="cantata-queues"),
            asyncio.create_task(self.scheduler.run(), name="cantata-schedules"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []

    def wake(self) -> None:
        """A run was queued here: look for runs to begin now."""
        self.queues.queued.set()
        self.queues.wakeup.set()

    def _on_change(self, channel: str) -> None:
        # (here or, with PostgreSQL, in any process)
        if not self._tasks:
            return
        if channel == RUNS:  # a run ended or was queued: a queued run may begin now
            self.queues.wakeup.set()
            self.scheduler.run_ended.set()
        elif channel == SLOTS:  # a slot was freed or a waiter left: one may be next
            self.releases += 1
            self.released.set()
            for execution in self.slot_waiters:
                execution.wakeup.set()
        elif channel == CANCEL:
            self.cancels += 1
            self.cancelled.set()
        elif channel == SCHEDULES:  # created, changed or deleted, here or elsewhere
            self.scheduler.changed.set()
