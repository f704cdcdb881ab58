"""Steps in other services: the serving side executes tasks a remote workflow created."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Any

from cantata.errors import UnknownStep
from cantata.flow.limits import release_task_slot, retime_task_begin, take_task_slot, task_holder
from cantata.graceful import wait_or_force
from cantata.model import codec
from cantata.model.records import Attempt, TaskRecord
from cantata.model.status import RunStatus
from cantata.quietlog import reason
from cantata.store.base import TASKS
from cantata.store.faults import wait_out
from cantata.store.roles.lifecycle import idle_wait

from .cleanup import MARKER
from .heartbeat import Beat, beat_for
from .invoke import invoke_step
from .pauses import PAUSED
from .steps import INTERRUPTED, WORKER_LOST

if TYPE_CHECKING:
    from cantata.declare.defs import StepDef

    from .engine import Engine

log = logging.getLogger("cantata.tasks")


class _Unwanted(Exception):
    """Internal: the run of a task waiting for a slot no longer wants it begun."""


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
        self._cutting = False  # a graceful stop is cancelling the steps past its grace

    def start(self) -> None:
        if self.services and self._loop is None:
            self.engine.store.add_listener(self._on_change)
            self._loop = asyncio.create_task(self._run(), name="cantata-tasks")

    def _on_change(self, channel: str) -> None:
        if channel == TASKS:
            self.wakeup.set()

    async def stop(self, deadline: float | None = None, force: asyncio.Event | None = None) -> None:
        """Claim nothing more; let the steps in progress finish until ``deadline`` (loop
        time; default: now) or ``force``, then cancel what is left: its attempt is
        recorded ``Interrupted`` (not an attempt, as a local step's: docs/leases.md)
        and its task goes back to the other workers at once."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.wait([self._loop])  # (a cancel of this stop is passed on)
            self._loop = None
        loop = asyncio.get_running_loop()
        deadline = loop.time() if deadline is None else deadline
        force = force or asyncio.Event()
        while self._inflight and not force.is_set() and loop.time() < deadline:
            self.wakeup.clear()
            await wait_or_force(self.wakeup, deadline, force)
        self._cutting = True
        self.engine.cut_short += len(self._inflight)
        for task in list(self._inflight):
            task.cancel()
        await asyncio.gather(*self._inflight, return_exceptions=True)

    async def _run(self) -> None:
        engine = self.engine
        while True:
            # Cleared before claiming: a wake-up during the claim must not be lost (the
            # next look may be a safety-net wait away, docs/performance.md)
            self.wakeup.clear()
            free = self.concurrency - len(self._inflight)
            claimed: list[TaskRecord] = []
            if free > 0:
                now = engine.clock.now()
                try:
                    claimed = await engine.store.claim_tasks(
                        engine.app, engine.worker_id, self.services, now=now,
                        stale_before=now, limit=free, steps=self._steps(),
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
            # Not asyncio.wait_for: on Python 3.11 it returns, instead of raising, a
            # cancel (the stop) that comes as the wakeup is set, and the loop never ends.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(idle_wait(engine.store, engine.poll_interval)):
                    await self.wakeup.wait()

    def _steps(self) -> list[str]:
        """The steps of the served services this worker's code has: a task of another
        step (declared by a newer version of the service, say) waits for a worker
        that has it, with none of its attempts spent here."""
        return sorted(name for name, s in self.engine.router.steps.items()
                      if s.service in self.services and not s.transactional)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._inflight.discard(task)
        self.wakeup.set()

    async def _settle(self, app: str, task_id: str, fence: int, **outcome: Any) -> bool:
        """Record a task's outcome; a store outage is waited out, not dropped (a task
        left claimed by this live worker would be taken by nobody). While stopping the
        error is raised: the task goes back on removal."""
        return await wait_out(
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

    async def _prior(self, rec: TaskRecord) -> tuple[list[Attempt], int, int,
                                                     tuple[str, str] | None]:
        """The recorded attempts of ``rec`` that count, as (those to close as lost,
        count, highest number, last error): as :func:`steps.prior_attempts` for a local
        step, an attempt whose worker died before it ended counts as ``WorkerLost``
        (with its recorded start), an ``Interrupted`` or ``Paused`` one never counts,
        and a claim that started no attempt is none."""
        if rec.attempts <= 1:  # this claim is the first: nothing before it
            return [], 0, 0, None
        now = self.engine.clock.now()
        closing: list[Attempt] = []
        n = top = 0
        last: tuple[str, str] | None = None
        recorded = await self.engine.store.load_attempts(self.engine.app, rec.run_id)
        for a in sorted((a for a in recorded if a.key == rec.key), key=lambda a: a.attempt):
            if a.error_type in (INTERRUPTED[0], PAUSED[0]):
                continue
            if a.ended_at is None:
                a.ended_at, (a.error_type, a.error) = now, WORKER_LOST
                closing.append(a)
            n += 1
            top = max(top, a.attempt)
            if a.error_type is not None:
                last = (a.error_type, a.error or "")
        return closing, n, top, last

    async def _execute_task(self, rec: TaskRecord) -> None:
        engine = self.engine
        clock = engine.clock
        sdef = engine.router.steps.get(rec.step)
        if sdef is None:  # (the claim takes only the steps this code has)
            err = UnknownStep(f"step {rec.step!r} is not registered in worker {engine.worker_id}")
            await self._finish(rec, "retry", [], error=err, next_at=clock.now() + 5.0)
            return
        closing, n, top, last = await self._prior(rec)
        if n >= sdef.retry.max_attempts and last is not None:
            await self._settle(
                engine.app, rec.task_id, rec.fence, outcome="failed", attempts=closing,
                error=f"{last[0]}: {last[1]}", error_type=last[0], count=n,
            )
            return
        # A limited step waits for its slot before the attempt is recorded (not an
        # attempt), in the scope its local calls take (docs/flow-control.md).
        holder = task_holder(rec.run_id, rec.key, rec.fence)  # (this claim's own)
        try:
            stamped = await take_task_slot(engine, sdef, holder, lambda: self._unwanted(rec))
        except _Unwanted as why:
            # Not begun: the task goes back, unowned, for the run to withdraw it (it
            # waits for no holder any more); due only after a lease, so that no worker
            # takes it again meanwhile.
            log.info("step task %s: %s while it waited for a slot of step %s; given back "
                     "to be withdrawn", rec.task_id, why, sdef.name)
            await self._settle(
                engine.app, rec.task_id, rec.fence, outcome="retry", attempts=closing,
                error=rec.error, error_type=rec.error_type,
                next_at=clock.now() + engine.lease, count=n,
            )
            return
        try:
            await self._attempt(rec, sdef, closing, n + 1, top + 1, stamped)
        finally:
            await release_task_slot(engine, sdef, holder)

    async def _unwanted(self, rec: TaskRecord) -> float | None:
        """Raise ``_Unwanted`` if the run of ``rec`` no longer wants its step begun: the
        run ended, or it is cancelled (before any cleanup of its code) or past its
        deadline and the step is not one of its compensations (those always run).
        Asked while the task waits for a slot: the run withdraws a task no worker
        holds, not one a worker holds (docs/flow-control.md). Else the run's deadline
        (clock time), when it has one that would end the wait: the time to ask again."""
        engine = self.engine
        run = await engine.store.get_run(engine.app, rec.run_id)
        if run is None or run.status.is_final:
            raise _Unwanted(f"run {rec.run_id} has ended")
        if rec.key.startswith("compensate:") or run.status == RunStatus.COMPENSATING:
            return None
        if run.deadline_at is not None and engine.clock.now() >= run.deadline_at:
            raise _Unwanted(f"run {rec.run_id} passed its deadline")
        if run.cancel_requested:
            history = await engine.store.load_history(engine.app, rec.run_id)
            if not any(e.key == MARKER for e in history):  # (not its cleanup's step)
                raise _Unwanted(f"run {rec.run_id} was cancelled")
        return run.deadline_at

    async def _attempt(
        self, rec: TaskRecord, sdef: StepDef, closing: list[Attempt], n: int, number: int,
        stamped: float | None,
    ) -> None:
        """Attempt ``number`` (the ``n``-th that counts): its start committed before the
        step runs (deploy.md), so a kill -9 leaves it recorded, then its outcome."""
        engine = self.engine
        clock = engine.clock
        attempt = Attempt(rec.key, number, clock.now())
        if not await wait_out(
            lambda: engine.store.start_task_attempt(
                engine.app, rec.task_id, rec.fence, [*closing, attempt]),
            quiet=engine.quiet, key="task-settle", what="recording step task attempts",
            give_up=lambda: self._loop is None, max_delay=engine.lease / 4,
        ):
            return  # claimed since by another worker (this one was taken for dead)
        # The heartbeat's read before the re-timing: nothing may be awaited between the
        # re-timing's last look at the clock and the body (flow/limits.py).
        beat = await beat_for(engine.store, engine.app, rec.run_id, sdef.name, rec.key, number)
        if stamped is not None:
            await retime_task_begin(engine, sdef, task_holder(rec.run_id, rec.key, rec.fence),
                                    stamped)
        try:
            value = await invoke_step(
                sdef, codec.loads(rec.args), rec.run_id, rec.key, number, beat=beat
            )
            result = codec.dumps(value, sdef.result_what, limit=engine.max_payload)
        except asyncio.CancelledError:
            if self._cutting:
                await self._interrupted(rec, attempt, n - 1, beat)
            raise
        except Exception as exc:
            await beat.close(failed=True)
            attempt.ended_at = clock.now()
            attempt.error_type, attempt.error = type(exc).__name__, str(exc)
            retryable = sdef.retry.is_retryable(exc)
            if retryable and n < sdef.retry.max_attempts:
                engine.metrics.retries += 1
                await self._finish(rec, "retry", [attempt], error=exc,
                                   next_at=clock.now() + sdef.retry.delay(n), count=n)
            else:
                await self._finish(rec, "failed", [attempt], error=exc, count=n)
            return
        attempt.ended_at = clock.now()
        await self._settle(
            engine.app, rec.task_id, rec.fence, outcome="done", attempts=[attempt],
            result=result, count=n,
        )

    async def _interrupted(self, rec: TaskRecord, attempt: Attempt, counted: int,
                           beat: Beat) -> None:
        """A graceful stop cut ``attempt`` past its grace: recorded ``Interrupted``
        (the next attempt takes its number), the task released at once, due now, with
        the ``counted`` attempts before this one. If the store does not answer within
        the stop, the task goes back when this worker is removed, or after the lease,
        and the attempt counts as ``WorkerLost``."""
        attempt.ended_at = self.engine.clock.now()
        attempt.error_type, attempt.error = INTERRUPTED
        settle = asyncio.ensure_future(self._release(rec, attempt, counted, beat))
        await asyncio.wait([settle], timeout=5.0)  # as a run's release (shutdown.py)
        if not settle.done():
            settle.cancel()

    async def _release(self, rec: TaskRecord, attempt: Attempt, counted: int,
                       beat: Beat) -> None:
        with contextlib.suppress(Exception):
            await beat.close(failed=True)
            await self.engine.store.finish_task(
                self.engine.app, rec.task_id, rec.fence, outcome="retry", attempts=[attempt],
                error=rec.error, error_type=rec.error_type, next_at=0.0, count=counted,
            )

    async def _finish(
        self,
        rec: TaskRecord,
        outcome: str,
        attempts: list[Attempt],
        *,
        error: BaseException,
        next_at: float = 0.0,
        count: int | None = None,
    ) -> None:
        await self._settle(
            self.engine.app, rec.task_id, rec.fence, outcome=outcome, attempts=attempts,
            error=f"{type(error).__name__}: {error}", error_type=type(error).__name__,
            next_at=next_at, count=count,
        )
