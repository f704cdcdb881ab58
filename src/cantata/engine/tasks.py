"""Steps in other services: the serving side executes tasks a remote workflow created."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from cantata.errors import UnknownStep
from cantata.graceful import wait_or_force
from cantata.model import codec
from cantata.model.records import Attempt, TaskRecord
from cantata.quietlog import reason
from cantata.store.base import TASKS
from cantata.store.faults import wait_out

from .heartbeat import beat_for
from .invoke import invoke_step
from .steps import WORKER_LOST

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("cantata.tasks")


class TaskServer:
    """Claims tasks addressed to the services this worker serves and runs their steps.

    The result is written in the same transaction that completes the task; the
    workflow waiting for it (in another process) is woken by the store.
    """

    def __init__(self, engine: Engine, services: list[str], *, concurrency: int = 64) -> None:
        self.engine = engine
        self.services = services
        self.concurrency = concurrency
        self.wakeup = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self._loop: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self.services and self._loop is None:
            self.engine.store.add_listener(self._on_change)
            self._loop = asyncio.create_task(self._run(), name="cantata-tasks")

    def _on_change(self, channel: str) -> None:
        if channel == TASKS:
            self.wakeup.set()

    async def stop(self, deadline: float | None = None, force: asyncio.Event | None = None) -> None:
        """Claim nothing more; let the steps in progress finish until ``deadline`` (loop
        time; default: now) or ``force``, then cancel what is left (its task goes back
        to the other workers when this one is removed)."""
        if self._loop is not None:
            self._loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop
            self._loop = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() if deadline is None else deadline
        force = force or asyncio.Event()
        while self._inflight and not force.is_set() and loop.time() < deadline:
            self.wakeup.clear()
            await wait_or_force(self.wakeup, deadline, force)
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _run(self) -> None:
        engine = self.engine
        while True:
            free = self.concurrency - len(self._inflight)
            claimed: list[TaskRecord] = []
            if free > 0:
                now = engine.clock.now()
                try:
                    claimed = await engine.store.claim_tasks(
                        engine.app, engine.worker_id, self.services, now=now,
                        stale_before=now - engine.lease, limit=free,
                    )
                except Exception as exc:
                    engine.quiet.warning("tasks", "claiming step tasks failed (%s); retrying",
                                         reason(exc))
            for rec in claimed:
                t = asyncio.create_task(self._execute(rec))
                self._inflight.add(t)
                t.add_done_callback(self._done)
            if claimed and len(claimed) == free:
                await asyncio.sleep(0)
                continue
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), engine.poll_interval)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.wakeup.set()

    async def _settle(self, app: str, task_id: str, fence: int, **outcome: Any) -> None:
        """Record a task's outcome; a store outage is waited out, not dropped (a task
        left claimed by this live worker would be taken by nobody). While stopping the
        error is raised: the task goes back on removal."""
        await wait_out(
            lambda: self.engine.store.finish_task(app, task_id, fence, **outcome),
            quiet=self.engine.quiet, key="task-settle",
            what="recording step task outcomes", give_up=lambda: self._loop is None,
            max_delay=self.engine.lease / 4,
        )

    async def _execute(self, rec: TaskRecord) -> None:
        try:
            await self._execute_task(rec)
        except Exception as exc:
            self.engine.quiet.warning(
                "task", "step task %s: %s; it is retried once this worker stops or its "
                "lease lapses", rec.task_id, reason(exc),
            )

    async def _execute_task(self, rec: TaskRecord) -> None:
        engine = self.engine
        clock = engine.clock
        sdef = engine.router.steps.get(rec.step)
        n = rec.attempts
        lost: list[Attempt] = []
        if n > 1:  # an attempt that left no record was cut short by a crash
            recorded = {
                a.attempt for a in await engine.store.load_attempts(engine.app, rec.run_id)
                if a.key == rec.key
            }
            lost = [Attempt(rec.key, i, clock.now(), clock.now(), *WORKER_LOST)
                    for i in range(1, n) if i not in recorded]
        if sdef is None:
            err = UnknownStep(f"step {rec.step!r} is not registered in worker {engine.worker_id}")
            await self._finish(rec, "retry", lost, error=err, next_at=clock.now() + 5.0)
            return
        if n > sdef.retry.max_attempts:
            await self._settle(
                engine.app, rec.task_id, rec.fence, outcome="failed", attempts=lost,
                error=f"{WORKER_LOST[0]}: {WORKER_LOST[1]}", error_type=WORKER_LOST[0],
            )
            return
        started = clock.now()
        attempt = Attempt(rec.key, n, started)
        beat = await beat_for(engine.store, engine.app, rec.run_id, sdef.name, rec.key, n)
        try:
            value = await invoke_step(
                sdef, codec.loads(rec.args), rec.run_id, rec.key, n, beat=beat
            )
            result = codec.dumps(value, f"result of step {sdef.name}", limit=engine.max_payload)
        except Exception as exc:
            await beat.close(failed=True)
            attempt.ended_at = clock.now()
            attempt.error_type, attempt.error = type(exc).__name__, str(exc)
            retryable = sdef.retry.is_retryable(exc)
            if retryable and n < sdef.retry.max_attempts:
                engine.metrics.retries += 1
                await self._finish(rec, "retry", [*lost, attempt], error=exc,
                                   next_at=clock.now() + sdef.retry.delay(n))
            else:
                await self._finish(rec, "failed", [*lost, attempt], error=exc)
            return
        attempt.ended_at = clock.now()
        await self._settle(
            engine.app, rec.task_id, rec.fence, outcome="done", attempts=[*lost, attempt],
            result=result,
        )

    async def _finish(
        self,
        rec: TaskRecord,
        outcome: str,
        attempts: list[Attempt],
        *,
        error: BaseException,
        next_at: float = 0.0,
    ) -> None:
        await self._settle(
            self.engine.app, rec.task_id, rec.fence, outcome=outcome, attempts=attempts,
            error=f"{type(error).__name__}: {error}", error_type=type(error).__name__,
            next_at=next_at,
        )
