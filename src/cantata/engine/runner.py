"""Executing one run: replay of recorded history, checkpoints, retries, compensation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cantata.errors import (
    Cancelled,
    CantataError,
    DeadlineExceeded,
    LeaseLost,
    NonDeterminismError,
    StepFailed,
    StoreError,
    error_text,
)
from cantata.flow.limits import release_step_slot, take_step_slot
from cantata.model import codec
from cantata.model.records import (
    ATTRS,
    COMPENSATION,
    ENTRY_COMPLETED,
    ENTRY_FAILED,
    ENTRY_RUNNING,
    PATCH,
    SLEEP,
    TASK_DONE,
    TASK_FAILED,
    VALUE,
    Attempt,
    HistoryEntry,
    RunRecord,
    RunWrite,
    TaskRecord,
)
from cantata.model.status import RunStatus
from cantata.store.faults import wait_out

from . import cleanup
from .compensation import ApiState, compensation_key, returned_ending, unwound_ending
from .heartbeat import beat_for
from .invoke import invoke_step
from .ownership import FENCE_AT
from .pauses import PAUSED, GuardedBody, StepStalled, await_excuses, excuse
from .registry import StepDef, WorkflowDef
from .versioning import args_shape

if TYPE_CHECKING:
    from .worker import Engine

log = logging.getLogger("cantata.engine")

WORKER_LOST = (
    "WorkerLost",
    "the worker running this attempt stopped (crash or kill) before the attempt finished",
)
# An attempt a live worker cut short itself (a graceful stop past its grace): recorded,
# but not counted as an attempt; the next attempt takes its number (docs/leases.md).
INTERRUPTED = (
    "Interrupted",
    "the worker stopped gracefully before the attempt finished; not counted as an attempt",
)


class _DeadlinePassed(BaseException):
    """Internal: raised at a durable point once the run's deadline has passed."""


class CompensatedElsewhere(Exception):
    """Raised by a workflow whose compensation already ran outside it (choreographed saga).

    The run ends with ``status`` and the message as its error, as if it had unwound here.
    """

    def __init__(
        self, error: str, status: RunStatus = RunStatus.COMPENSATED, flagged: bool = False
    ) -> None:
        super().__init__(error)
        self.status = status
        self.flagged = flagged


class _Abandon(BaseException):
    """Internal: this worker lost the run (lease taken over, or shutting down)."""


class _StoreFailed(BaseException):
    """Internal: the store failed mid-run; the run is retried from its history.

    A ``BaseException`` so that neither workflow code nor the engine's failure handling
    turns an infrastructure error into a failed (and compensated) business run.
    """


class _Fenced(BaseException):
    """Internal: the step body was stopped because this worker's hold lapsed."""


def _split_error(exc: BaseException) -> tuple[str, str]:
    if isinstance(exc, StepFailed):
        return exc.error_type, exc.error_message
    return type(exc).__name__, str(exc)


class RunExecution:
    """Drives one run in this worker until it ends or the worker lets it go."""

    def __init__(self, engine: Engine, run: RunRecord, wdef: WorkflowDef) -> None:
        self.engine = engine
        self.run = run
        self.wdef = wdef
        self.history: dict[str, HistoryEntry] = {}
        self.attempts: dict[str, list[Attempt]] = {}
        self.consumed: set[str] = set()
        self.consumed_events: set[str] = set()
        self.counters: dict[str, int] = {}
        self.next_seq = 1
        self.pending: list[HistoryEntry] = []
        self.pending_attempts: list[Attempt] = []
        self.pending_status: RunStatus | None = None
        self._commit_lock = asyncio.Lock()
        self._flush_failed: BaseException | None = None
        self._flush_scheduled = False
        # Set when the run is not stored yet: its first commit creates it (and resolves
        # this future with the stored run), see :meth:`expect_creation`.
        self.created: asyncio.Future[tuple[RunRecord, bool]] | None = None
        self._create_pending = False
        self.compensations: list[tuple[StepDef, list[Any]]] = []
        self.interrupt: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.compensating = False
        self.divergence: NonDeterminismError | None = None
        self.wakeup = asyncio.Event()
        self.fresh = False  # created by this process just now: no history to load
        self.task: asyncio.Task[None] | None = None
        self.inflight: dict[str, Attempt] = {}  # step key -> attempt whose body runs
        # Attempts started here, and those whose body held the loop past the fence: if
        # the run is taken from this live worker (``lost``), the others are excused.
        self.mine: dict[tuple[str, int], Attempt] = {}
        self.stalled: dict[tuple[str, int], float] = {}  # -> seconds it held the loop
        self.lost = False
        self.bodies: set[asyncio.Task[Any]] = set()  # the step bodies running
        self.parked = False  # waiting, during a graceful stop, to be released
        self.patches: dict[str, bool] = {}  # ctx.patched answers, fixed for the whole run
        self._deadline_timer: asyncio.Task[None] | None = None
        self.api = ApiState()  # ctx.compensate and cleanup after cancel

    # -- plumbing -----------------------------------------------------------------

    @property
    def store_app(self) -> str:
        return self.run.app

    @property
    def stored(self) -> bool:
        """False while the run waits for its first commit to be stored."""
        return self.created is None or self.created.done()

    async def park_if_stopping(self) -> None:
        """During a graceful stop, start nothing new: wait here to be released."""
        if not self.engine.draining:
            return
        self.parked = True
        self.engine.quiesce.set()
        await asyncio.get_running_loop().create_future()  # cancelled by the release

    async def release(self) -> None:
        """Give the run up after a graceful stop: commit what is held, mark the attempts
        cut short ``Interrupted`` (not attempts), clear the owner (docs/leases.md)."""
        if not self.stored or self.run.status.is_final:
            return
        now = self.engine.clock.now()
        cut = [Attempt(a.key, a.attempt, a.started_at, now, *INTERRUPTED)
               for a in self.inflight.values()]
        self.inflight.clear()
        self._flush_failed = None
        try:
            await self.commit(RunWrite(attempts=cut, release=True))
        except (_Abandon, _StoreFailed, Exception) as exc:
            log.warning("run %s: could not release it (%s); another worker takes it over "
                        "after the lease", self.run.run_id, type(exc).__name__)

    def next_key(self, base: str) -> str:
        n = self.counters.get(base, 0) + 1
        self.counters[base] = n
        return f"{base}#{n}"

    def new_entry(self, key: str, kind: str, name: str, status: str, **kw: Any) -> HistoryEntry:
        entry = HistoryEntry(key, kind, name, status, seq=self.next_seq, **kw)
        self.next_seq += 1
        self.history[key] = entry
        self.consumed.add(key)
        return entry

    async def commit(self, write: RunWrite) -> None:
        """Flush lazily recorded entries and write one checkpoint (fenced)."""
        async with self._commit_lock:
            if self._flush_failed is not None:
                raise self._flush_failed
            if self.pending:
                write.entries[:0] = self.pending
                self.pending = []
            if self.pending_attempts:
                write.attempts[:0] = self.pending_attempts
                self.pending_attempts = []
            if self.pending_status is not None and write.status is None:
                write.status = self.pending_status
            self.pending_status = None
            if self._create_pending:
                self._create_pending = False
                await self._create(write)
            else:
                await self._commit_run(write)
        if write.status is not None:
            self.run.status = write.status
        if write.events:
            self.engine.events_appended(write.events)

    async def _commit_run(self, write: RunWrite) -> None:
        engine = self.engine
        # An outage is not the run's failure: the checkpoint waits and is retried
        # (fenced, so it is refused if another worker took the run meanwhile). A long
        # outage ends this execution through the engine's self-fencing.
        try:
            await wait_out(
                lambda: engine.store.commit_run(
                    self.run.app, self.run.run_id, self.run.fence, write),
                quiet=engine.quiet, key="commit", what="checkpointing runs",
                give_up=lambda: not engine.serving, max_delay=engine.lease / 4,
            )
        except LeaseLost:
            log.warning(
                "run %s was taken over by another worker; letting it go", self.run.run_id
            )
            self.lost = True
            raise _Abandon() from None
        except StoreError as exc:
            raise _StoreFailed(exc) from exc

    def expect_creation(self) -> None:
        """This run is not stored yet: store it with its first checkpoint.

        :attr:`created` resolves once it is durable (or fails with the store's error, and
        the execution ends). If the workflow yields to the event loop before its first
        write, the run is stored on its own then.
        """
        loop = asyncio.get_running_loop()
        self.created = loop.create_future()
        self._create_pending = True
        self._flush_scheduled = True
        loop.call_soon(self._flush_soon)

    async def _create(self, write: RunWrite) -> None:
        assert self.created is not None
        try:
            stored, created = await self.engine.store.create_run(self.run, write)
        except Exception as exc:  # the caller of start() gets it (cancelled: see execute)
            if not self.created.done():
                self.created.set_exception(exc)
            raise _Abandon() from exc
        if not self.created.done():
            self.created.set_result((stored, created))
        if not created:  # only without an idempotency key, so never: be safe anyway
            raise _Abandon()

    def defer(self, write: RunWrite) -> None:
        """Hold a finished step's checkpoint to commit it with the run's next write.

        The workflow code between two steps is deterministic and has no effects, so the
        result of step *n* can share one transaction (and one fsync) with the start of
        step *n+1*: that step's body only runs once both are durable, and a crash before
        then only repeats step *n*, as a crash before its own commit would. If the
        workflow does not reach another write by the time it yields to the event loop
        (parallel steps, a plain ``await``), the held checkpoint is committed on its own.
        """
        self.pending.extend(write.entries)
        self.pending_attempts.extend(write.attempts)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        if self.pending or self.pending_attempts or self._create_pending:
            self.engine.track(asyncio.create_task(self._flush()))

    async def _flush(self) -> None:
        if not (self.pending or self.pending_attempts or self._create_pending):
            return
        try:
            await self.commit(RunWrite())
        except (_Abandon, _StoreFailed) as exc:
            # The run's next write raises it, and the run goes on from its history.
            self._flush_failed = exc
            self.request_interrupt(exc)

    def request_interrupt(self, exc: BaseException) -> None:
        if not cleanup.accepts(self, exc):  # a repeated cancel during cleanup
            return
        if not self.interrupt.done():
            self.interrupt.set_result(exc)
        self.wakeup.set()

    def check_interrupt(self) -> None:
        """Raise the pending cancel / deadline at a durable point (not while compensating)."""
        if self.compensating or not self.interrupt.done():
            return
        exc = self.interrupt.result()
        cleanup.deliver(self, exc)
        raise exc

    async def check_new_call(self, key: str) -> None:
        """A call not in history: every recorded result must have been replayed first."""
        if self.interrupt.done() and isinstance(self.interrupt.result(), Cancelled):
            # A replay of a run that was cancelled meets the cancellation where the
            # first execution did: at its first call not in history (before cleanup).
            self.check_interrupt()
        if not self.history or len(self.consumed) >= len(self.history):
            self.check_interrupt()
            return
        await asyncio.sleep(0)  # let sibling tasks (asyncio.gather) replay their calls
        left = sorted(
            (e for k, e in self.history.items()
             if k not in self.consumed and e.status in (ENTRY_COMPLETED, ENTRY_FAILED)
             and e.kind not in (VALUE, COMPENSATION, PATCH, ATTRS)),
            key=lambda e: e.seq,
        )
        if left and key not in self.history:
            err = NonDeterminismError(self.run.run_id, len(self.consumed) + 1, left[0].key, key)
            self.divergence = err
            raise err
        self.check_interrupt()

    async def check_replayed_before(self, entry: HistoryEntry) -> None:
        """A step in flight is about to run again: every call recorded before it must
        have been replayed first, or the code changed under it (a call before it was
        deleted or moved) and running it again would act on a diverged history."""
        def missed() -> list[HistoryEntry]:
            return sorted(
                (e for k, e in self.history.items()
                 if e.seq < entry.seq and k not in self.consumed
                 and e.kind not in (VALUE, COMPENSATION, PATCH, ATTRS)),
                key=lambda e: e.seq,
            )

        if missed():
            await asyncio.sleep(0)  # let sibling tasks (asyncio.gather) replay their calls
            left = missed()
            if left:
                err = NonDeterminismError(self.run.run_id, left[0].seq, left[0].key, entry.key)
                self.divergence = err
                raise err

    async def wait_until(
        self,
        wake_at: float | None,
        wake: Callable[[], Awaitable[bool]] | None = None,
        *,
        poll: bool = True,
    ) -> None:
        """Sleep until ``wake_at`` (clock time), an interrupt, or ``wake()`` returns True.

        ``wake()`` is tried again whenever this execution is woken, and, with ``poll``,
        every ``wait_poll_interval`` too (without it the engine wakes it on news).
        """
        clock = self.engine.clock
        while True:
            await self.park_if_stopping()
            self.check_interrupt()
            if wake is not None and await wake():
                return
            now = clock.now()
            if wake_at is not None and now >= wake_at:
                return
            remaining = None if wake_at is None else wake_at - now
            if wake is not None and poll:
                every = self.engine.wait_poll_interval
                remaining = every if remaining is None else min(remaining, every)
            self.wakeup.clear()
            sleeper = None if remaining is None else asyncio.ensure_future(clock.sleep(remaining))
            waiter = asyncio.ensure_future(self.wakeup.wait())
            try:
                await asyncio.wait(
                    [f for f in (sleeper, waiter, self.interrupt) if f is not None],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            finally:
                for f in (sleeper, waiter):
                    if f is not None and not f.done():
                        f.cancel()

    # -- steps ---------------------------------------------------------------------

    async def call_step(
        self, sdef: StepDef, args: list[Any], key: str, kind: str = "step"
    ) -> Any:
        """Run (or replay) one step or compensation and return its decoded JSON result."""
        entry = self.history.get(key)
        if entry is not None and entry.status in (ENTRY_COMPLETED, ENTRY_FAILED):
            self.consumed.add(key)
            if entry.status == ENTRY_COMPLETED:
                return codec.loads(entry.result)
            etype, _, emsg = (entry.error or "Error: ").partition(": ")
            raise StepFailed(sdef.name, entry.error_type or etype, emsg, entry.attempts)
        if entry is None:
            shape = None
            if kind != COMPENSATION:
                await self.check_new_call(key)
                shape = codec.dumps({"shape": args_shape(args)})
            entry = self.new_entry(key, kind, sdef.name, ENTRY_RUNNING, detail=shape)
        else:
            self.consumed.add(key)
            if kind != COMPENSATION:
                await self.check_replayed_before(entry)
        if self.engine.is_remote(sdef):
            return await self._call_remote(sdef, args, entry)
        clock = self.engine.clock
        write, last, n, number, lost = self._prior_attempts(key)
        retry = sdef.retry
        while True:
            if n >= retry.max_attempts and last is not None:
                # Some of these attempts' workers may have been paused, not dead: give
                # them one lease to excuse their attempts first (docs/leases.md).
                excused = await await_excuses(self, key, lost) if lost else 0
                if excused:
                    n -= excused
                    lost = [a for a in lost if a.error_type == WORKER_LOST[0]]
                    continue
                return await self._step_failed(entry, write, last, n)
            await self.park_if_stopping()
            if kind != COMPENSATION:
                self.check_interrupt()
            # A limited step waits for its slot here, before the attempt is recorded
            # (released when _execute ends; a slot left by a lost commit is this
            # holder's again when the run goes on, or lapses with this worker).
            await take_step_slot(self, sdef, key)
            n += 1
            number += 1  # not n: an excused attempt may lie between counted ones
            now = clock.now()
            attempt = Attempt(key, number, now)
            entry.attempts, entry.status = n, ENTRY_RUNNING
            entry.started_at = entry.started_at or now
            write.attempts.append(attempt)
            write.entries.append(entry)
            await self.commit(write)
            write = RunWrite()
            self.inflight[key] = attempt
            self.mine[(key, number)] = attempt
            try:
                value = await self._execute_fenced(sdef, args, key, number, kind)
                result = codec.dumps(
                    value, f"result of step {sdef.name}", limit=self.engine.max_payload
                )
            except _Fenced:
                # Stopped because this worker's hold lapsed (a store outage): not an
                # attempt. Once the store answers, the same attempt starts again, after
                # its fenced start checkpoint proves the run is still ours.
                del self.inflight[key]
                await self.engine.ownership.regained()
                n -= 1
                number -= 1
                continue
            except Exception as exc:
                del self.inflight[key]
                attempt.ended_at = clock.now()
                attempt.error_type, attempt.error = type(exc).__name__, str(exc)
                last = (attempt.error_type, attempt.error)
                write.attempts.append(attempt)
                retryable = retry.is_retryable(exc)
                if retryable and n >= retry.max_attempts and lost:
                    excused = await await_excuses(self, key, lost)
                    n -= excused
                    lost = [a for a in lost if a.error_type == WORKER_LOST[0]]
                if not retryable or n >= retry.max_attempts:
                    return await self._step_failed(entry, write, last, n)
                entry.error, entry.error_type = f"{last[0]}: {last[1]}", last[0]
                write.entries.append(entry)
                await self.commit(write)
                write = RunWrite()
                delay = retry.delay(n)
                self.engine.metrics.retries += 1
                if kind == COMPENSATION:
                    await clock.sleep(delay)
                else:
                    await self.wait_until(clock.now() + delay)
                continue
            del self.inflight[key]
            attempt.ended_at = clock.now()
            entry.status, entry.result, entry.ended_at = ENTRY_COMPLETED, result, attempt.ended_at
            entry.error = entry.error_type = None
            write.attempts.append(attempt)
            write.entries.append(entry)
            self.defer(write)
            return codec.loads(result)

    def _prior_attempts(
        self, key: str
    ) -> tuple[RunWrite, tuple[str, str] | None, int, int, list[Attempt]]:
        """The attempts of ``key`` that count, as (write closing the lost ones, last
        error, count, highest number among them, those of them ``WorkerLost``).

        The rule (docs/leases.md): an attempt left unfinished counts as ``WorkerLost``
        (so a step that kills its worker cannot loop forever) unless this live worker
        cut it short itself (it re-took the run, its hold lapsed in a pause or an
        outage); an ``Interrupted`` attempt (a graceful stop) or a ``Paused`` one (its
        worker, paused past its lease, excused it: see :mod:`cantata.engine.pauses`)
        never counts. An attempt that does not count is replaced by the next one above
        the highest that counts, which takes its number.
        """
        write = RunWrite()
        last: tuple[str, str] | None = None
        n = top = 0
        lost: list[Attempt] = []
        for a in self.attempts.get(key, []):
            if a.error_type in (INTERRUPTED[0], PAUSED[0]):
                continue
            if a.ended_at is None:
                if self.engine.cut_short_here(self.run.run_id, key, a.attempt):
                    continue
                a.ended_at, (a.error_type, a.error) = self.engine.clock.now(), WORKER_LOST
                write.attempts.append(a)
            n += 1
            top = max(top, a.attempt)
            if a.error_type == WORKER_LOST[0]:
                lost.append(a)
            if a.error_type is not None:
                last = (a.error_type, a.error or "")
        return write, last, n, top, lost

    async def _call_remote(self, sdef: StepDef, args: list[Any], entry: HistoryEntry) -> Any:
        """A step of another service: a task in the store, executed by that service's workers
        (with their retries and timeout); this run waits for its result."""
        engine, run = self.engine, self.run
        # A retried run's new call of a step is a new task (the old one ended for good).
        task_id = f"{run.run_id}:{entry.key}" + (f"@{run.epoch}" if run.epoch else "")
        service = sdef.service or ""
        info = codec.loads(entry.detail) if entry.detail else {}
        if "task" not in info:
            now = engine.clock.now()
            entry.started_at = now
            entry.detail = codec.dumps({**info, "service": service, "task": task_id})
            task = TaskRecord(
                task_id, run.run_id, entry.key, sdef.name, service,
                codec.dumps(args, f"arguments of step {sdef.name}"), created_at=now,
                updated_at=now, correlation_id=run.correlation_id,
            )
            await self.commit(RunWrite(entries=[entry], tasks=[task]))
        found: list[TaskRecord] = []

        async def look() -> bool:
            rec = await engine.store.get_task(run.app, task_id)
            if rec is not None and rec.status in (TASK_DONE, TASK_FAILED):
                found.append(rec)
                return True
            return False

        engine.add_run_waiter(task_id, self)
        try:
            await self.wait_until(None, look)
        finally:
            engine.remove_run_waiter(task_id, self)
        rec = found[0]
        entry.attempts, entry.ended_at = rec.attempts, engine.clock.now()
        if rec.status == TASK_DONE:
            entry.status, entry.result = ENTRY_COMPLETED, rec.result
            await self.commit(RunWrite(entries=[entry]))
            return codec.loads(rec.result)
        etype = rec.error_type or "Error"
        emsg = (rec.error or "").removeprefix(f"{etype}: ")
        entry.status, entry.error, entry.error_type = ENTRY_FAILED, f"{etype}: {emsg}", etype
        await self.commit(RunWrite(entries=[entry]))
        raise StepFailed(sdef.name, etype, emsg, rec.attempts)

    async def _step_failed(
        self, entry: HistoryEntry, write: RunWrite, last: tuple[str, str], n: int
    ) -> Any:
        entry.status, entry.ended_at = ENTRY_FAILED, self.engine.clock.now()
        entry.error, entry.error_type, entry.attempts = f"{last[0]}: {last[1]}", last[0], n
        write.entries.append(entry)
        await self.commit(write)
        raise StepFailed(entry.name, last[0], last[1], n)

    async def _execute_fenced(
        self, sdef: StepDef, args: list[Any], key: str, attempt: int, kind: str
    ) -> Any:
        """Run the step body in its own task, which the engine cancels when this
        worker's hold lapses (see :meth:`Engine.fence_self`), and which is never
        resumed once that may have happened (:class:`~cantata.engine.pauses.GuardedBody`):
        raises ``_Fenced`` then."""
        engine = self.engine

        def fenced() -> bool:
            return engine.serving and engine.ownership.expired()

        def stalled(seconds: float) -> None:
            self.stalled[(key, attempt)] = max(seconds, self.stalled.get((key, attempt), 0.0))

        body = asyncio.ensure_future(GuardedBody(
            self._execute(sdef, args, key, attempt, kind), fenced, stalled,
            engine.lease * FENCE_AT,
        ))
        self.bodies.add(body)
        try:
            return await body
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if body.cancelled() and me is not None and me.cancelling() == 0:
                held = self.stalled.get((key, attempt))
                if held is not None:  # its own code held the loop: the attempt counts
                    raise StepStalled(
                        f"step {sdef.name} (attempt {attempt}) held its worker's event loop "
                        f"for {held:.1f} s, past 3/4 of the lease ({engine.lease:g} s), so "
                        "another worker could take its run over: move blocking code to a "
                        "sync step or asyncio.to_thread, or raise App(lease=...)"
                    ) from None
                raise _Fenced() from None
            raise
        finally:
            self.bodies.discard(body)

    async def _execute(
        self, sdef: StepDef, args: list[Any], key: str, attempt: int, kind: str = "step"
    ) -> Any:
        if sdef.concurrency is not None or sdef.rate is not None:
            try:
                return await self._with_hooks(sdef, args, key, attempt, kind)
            finally:
                await release_step_slot(self, sdef, key)
        return await self._with_hooks(sdef, args, key, attempt, kind)

    async def _with_hooks(
        self, sdef: StepDef, args: list[Any], key: str, attempt: int, kind: str
    ) -> Any:
        hooks = self.engine.hooks
        if not hooks:
            return await self._invoke(sdef, args, key, attempt)
        started = time.perf_counter()
        with hooks.step(self.run, sdef.name, key, attempt, kind):
            try:
                value = await self._invoke(sdef, args, key, attempt)
            except Exception as exc:
                hooks.notify("step_finished", self.run, sdef.name, attempt,
                             time.perf_counter() - started, exc)
                raise
        hooks.notify("step_finished", self.run, sdef.name, attempt,
                     time.perf_counter() - started, None)
        return value

    async def _invoke(self, sdef: StepDef, args: list[Any], key: str, attempt: int) -> Any:
        """One attempt: heartbeats kept for the next attempt, transactional or not."""
        run = self.run
        beat = await beat_for(self.engine.store, run.app, run.run_id, sdef.name, key, attempt)
        failed = True
        try:
            if sdef.transactional:
                from .transaction import run_transactional

                value = await run_transactional(self, sdef, args, key, attempt, beat)
            else:
                value = await invoke_step(sdef, args, run.run_id, key, attempt, beat=beat)
            failed = False
            return value
        finally:
            await beat.close(failed)

    # -- the run ---------------------------------------------------------------------

    async def load(self) -> None:
        if self.fresh:
            return
        store, app, run_id = self.engine.store, self.run.app, self.run.run_id
        entries = await store.load_history(app, run_id)
        for e in entries:
            self.history[e.key] = e
            self.next_seq = max(self.next_seq, e.seq + 1)
            if e.kind == "wait" and e.status == ENTRY_COMPLETED and e.result:
                self.consumed_events.add(str(codec.loads(e.result).get("id")))
        for a in await store.load_attempts(app, run_id):
            self.attempts.setdefault(a.key, []).append(a)

    async def execute(self, after: asyncio.Task[Any] | None = None) -> None:
        """Run the workflow to its end (or until this worker lets it go).

        ``after``: a stale execution of the same run, cancelled; this one starts once
        it has stopped, so one worker never runs a run's step twice at once.
        """
        if after is not None:
            await asyncio.wait([after])
        try:
            if self.engine.hooks:
                with self.engine.hooks.run(self.run, await self._parent_traceparent()):
                    await self._execute_run()
            else:
                await self._execute_run()
        except _Abandon:
            pass
        except asyncio.CancelledError:
            raise
        except (_StoreFailed, StoreError) as exc:
            # Loading the history (a StoreError) or a checkpoint (_StoreFailed) failed.
            cause = exc.args[0] if isinstance(exc, _StoreFailed) and exc.args else exc
            self.engine.quiet.warning(
                "run-store", "run %s: the store failed (%s); the run will be resumed from "
                "its history", self.run.run_id, cause,
            )
        except Exception:
            log.exception("run %s: internal error; it will be retried", self.run.run_id)
        finally:
            # Steps cut short here by this live worker do not count as attempts when
            # it resumes the run (see _prior_attempts).
            self.engine.note_cut_short(
                self.run.run_id, {(a.key, a.attempt) for a in self.inflight.values()}
            )
            # Taken from this live worker (a pause past its lease): the attempts it was
            # cut off in are excused, unless their own body stalled it.
            cut = [a for k, a in self.mine.items() if k not in self.stalled]
            if self.lost and cut:
                self.engine.track(asyncio.create_task(
                    excuse(self.engine, self.run.run_id, self.run.app, cut)))
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            if self.created is not None and not self.created.done():
                # Ended (the app stopping, or an internal error) before the run was stored.
                self.created.set_exception(CantataError(
                    f"run {self.run.run_id} of {self.wdef.name} was not stored: the worker "
                    "stopped executing it first; start it again"
                ))

    async def _parent_traceparent(self) -> str | None:
        """The traceparent of the event that started this run (to join its trace)."""
        if self.run.causation_id is None or self.run.parent_run_id is not None:
            return None
        with contextlib.suppress(Exception):
            event = await self.engine.store.get_event(self.run.app, self.run.causation_id)
            return None if event is None else event.traceparent
        return None

    async def _deadline_after(self, delay: float) -> None:
        await self.engine.clock.sleep(delay)
        self.request_interrupt(_DeadlinePassed())

    async def _execute_run(self) -> None:
        run = self.run
        await self.load()
        if run.cancel_requested:
            self.request_interrupt(Cancelled())
        if run.deadline_at is not None:
            delay = run.deadline_at - self.engine.clock.now()
            if delay <= 0:
                self.request_interrupt(_DeadlinePassed())
            else:
                self._deadline_timer = asyncio.create_task(self._deadline_after(delay))
        if run.status == RunStatus.PENDING:
            if run.cancel_requested:
                await self._finish(RunStatus.CANCELLED, error="Cancelled: before it started")
                return
            self.pending_status = RunStatus.RUNNING
            run.status = RunStatus.RUNNING
        from .context import WorkflowContext

        ctx = WorkflowContext(self)
        try:
            # Inside the try: arguments that do not match the declared types fail the run
            # (SerializationError) instead of leaving it owned and stuck.
            args = self.wdef.sig.restore_args(codec.loads(run.args), f"workflow {self.wdef.name}")
            value = await self.wdef.fn(ctx, *args)
            if self.divergence is not None:
                raise self.divergence
            self._check_all_replayed()
            result = codec.dumps(
                value, f"result of workflow {self.wdef.name}", limit=self.engine.max_payload
            )
            if self.api.cancel_delivered:  # it caught Cancelled, cleaned up and returned
                raise Cancelled()
        except (_Abandon, asyncio.CancelledError):
            raise
        except NonDeterminismError as exc:
            await self._finish(RunStatus.FAILED, error=error_text(exc), flagged=True)
            return
        except CompensatedElsewhere as exc:
            await self._finish(exc.status, error=str(exc), flagged=exc.flagged or None)
            return
        except Cancelled as exc:
            await self._unwind(RunStatus.CANCELLED,
                               f"Cancelled: {str(exc) or 'the run was cancelled'}")
            return
        except _DeadlinePassed:
            err = DeadlineExceeded(f"run {run.run_id} passed its deadline")
            await self._unwind(RunStatus.FAILED, error_text(err))
            return
        except Exception as exc:
            if self.divergence is not None:
                await self._finish(RunStatus.FAILED, error=error_text(self.divergence),
                                   flagged=True)
                return
            if isinstance(exc, StoreError):  # e.g. a read in wait_for_event / ctx.call
                raise _StoreFailed(exc) from exc
            if self.api.cancel_delivered:  # its cleanup failed: the run is still cancelled
                await self._unwind(RunStatus.CANCELLED,
                                   f"Cancelled: the run was cancelled; {error_text(exc)}")
                return
            await self._unwind(RunStatus.FAILED, error_text(exc))
            return
        status, error, flagged = returned_ending(self)  # ctx.compensate() may have run
        await self._finish(status, result=result, error=error, flagged=flagged)

    def _check_all_replayed(self) -> None:
        left = sorted(
            (e for k, e in self.history.items()
             if k not in self.consumed and e.status in (ENTRY_COMPLETED, ENTRY_FAILED)
             and e.kind not in (VALUE, COMPENSATION, SLEEP, PATCH, ATTRS)),
            key=lambda e: e.seq,
        )
        if left:
            raise NonDeterminismError(
                self.run.run_id, len(self.consumed) + 1, left[0].key, "the end of the workflow"
            )

    async def _unwind(self, final: RunStatus, error: str) -> None:
        """Run registered compensations in reverse order, then end the run."""
        if not self.compensations:
            final, error, flagged = unwound_ending(self, final, error)
            await self._finish(final, error=error, flagged=flagged)
            return
        self.compensating = True
        if self.run.status != RunStatus.COMPENSATING:
            await self.commit(RunWrite(status=RunStatus.COMPENSATING, error=error))
        failures: list[str] = []
        for sdef, args in reversed(self.compensations):
            key = compensation_key(self, sdef.name)
            try:
                await self.call_step(sdef, args, key, kind=COMPENSATION)
            except StepFailed as exc:
                failures.append(str(exc))
        if failures:
            await self._finish(
                RunStatus.FAILED,
                error=f"{error}; compensation failed: {'; '.join(failures)}",
                flagged=True,
            )
        elif final == RunStatus.CANCELLED:
            await self._finish(RunStatus.CANCELLED, error=error)
        else:
            await self._finish(RunStatus.COMPENSATED, error=error)

    async def _finish(
        self,
        status: RunStatus,
        *,
        result: str | None = None,
        error: str | None = None,
        flagged: bool | None = None,
    ) -> None:
        await self.commit(
            RunWrite(status=status, result=result, error=error, flagged=flagged, release=True)
        )
        run = self.run
        run.result, run.error, run.owner = result, error, None
        if flagged is not None:
            run.flagged = flagged
        if status != RunStatus.COMPLETED:
            log.info("run %s of %s ended %s: %s", self.run.run_id, self.wdef.name, status, error)
        self.engine.metrics.runs[str(status)] = self.engine.metrics.runs.get(str(status), 0) + 1
        if self.engine.hooks:
            self.engine.hooks.notify("run_finished", self.run, str(status), error)
