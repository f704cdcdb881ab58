"""Executing one run: replay of recorded history, checkpoints, retries, compensation."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any

from cantata.declare.defs import StepDef, WorkflowDef
from cantata.errors import (
    Cancelled,
    CantataError,
    DeadlineExceeded,
    NonDeterminismError,
    StepFailed,
    StoreError,
    error_text,
)
from cantata.model import codec
from cantata.model.parking import Parking
from cantata.model.records import (
    TASK_WITHDRAWN,
    Attempt,
    EntryKind,
    HistoryEntry,
    RunRecord,
    RunWrite,
)
from cantata.model.schedule import tick_signature
from cantata.model.status import RunStatus

from . import branches, checkpoint, cleanup, steps
from .branches import OpenStep, RunTask
from .compensation import (
    ApiState,
    compensation_key,
    registered,
    returned_ending,
    unwound_ending,
)
from .context import WorkflowContext  # (at the top: imported in each run, ~11 k instructions)
from .journal import IDLE_TURNS, Journal
from .parking import Evicted, can_evict, evict, with_deadline
from .pauses import excuse
from .runtime import Interrupt, Watch
from .signals import (
    CompensatedElsewhere,
    _Abandon,
    _BranchStopped,
    _DeadlinePassed,
    _StoreFailed,
)
from .steps import INTERRUPTED

if TYPE_CHECKING:
    from cantata.fencing import InlineBody

    from .engine import Engine

log = logging.getLogger("cantata.engine")

# Enum members used on every run, as module constants (an enum class's attribute
# goes through EnumType.__getattr__'s slow hook on Python 3.11: docs/performance.md,
# round twenty-five).
_PENDING, _RUNNING, _COMPLETED = RunStatus.PENDING, RunStatus.RUNNING, RunStatus.COMPLETED


def signal_in(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a run acts on when its code raised a task group's errors: the engine's
    signal among them if a branch met one (the worker lost the run, the store failed,
    the deadline passed, the run was cancelled...), as if raised alone; else the
    group itself (the workflow failed with those errors)."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    for kind in (_Abandon, _StoreFailed, _DeadlinePassed, Cancelled):
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    for leaf in leaves:  # any other signal (not a branch stopped: the run ends anyway)
        if not isinstance(leaf, (Exception, _BranchStopped)):
            return leaf
    if isinstance(group, Exception):
        return group
    errors = [leaf for leaf in leaves if isinstance(leaf, Exception)]
    return ExceptionGroup(group.message, errors) if errors else leaves[0]


class RunExecution:
    """Drives one run in this worker until it ends or the worker lets it go."""

    def __init__(self, engine: Engine, run: RunRecord, wdef: WorkflowDef) -> None:
        self.engine = engine
        self.run = run
        self.wdef = wdef
        self.journal = Journal(self)  # the history, as the workflow replays it
        self.attempts: dict[str, list[Attempt]] = {}
        self.pending: list[HistoryEntry] = []
        self.pending_attempts: list[Attempt] = []
        self.uncommitted: list[Attempt] = []  # attempts of a checkpoint the store failed
        self.pending_status: RunStatus | None = None
        self.commit_lock = checkpoint.CommitLock()
        self.flush_failed: BaseException | None = None
        self.flush_scheduled = False
        # The run's task is executing its code now (checkpoint.FlushAtYield), and what a
        # step's end deferred there waits for the task to yield (or a commit).
        self.riding = False
        self.flush_at_yield = False
        # Set when the run is not stored yet: its first commit creates it (and resolves
        # this future with the stored run), see :meth:`expect_creation`.
        self.created: asyncio.Future[tuple[RunRecord, bool]] | None = None
        self.create_pending = False
        # The caller of ``create_run`` waiting for ``created`` (its own future, so that
        # cancelling it leaves ``created`` alone): see checkpoint.resolve_created.
        self.starter: asyncio.Future[tuple[RunRecord, bool]] | None = None
        self.compensations: list[tuple[StepDef, list[Any]]] = []
        self.interrupt: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()
        self.compensating = False
        self.made_tasks = False  # a remote step's task was created or awaited here
        self.wakeup = asyncio.Event()
        self.fresh = False  # created by this process just now: no history to load
        # its history and attempts, read with the other runs of its claim (load() uses
        # them once instead of reading them)
        self.preloaded: tuple[list[HistoryEntry], list[Attempt]] | None = None
        self.began = False  # its task has begun (checkpoint.flush_all)
        self.task: asyncio.Task[None] | None = None
        self.inflight: dict[str, Attempt] = {}  # step key -> attempt whose body runs
        # Attempts started here, and those whose body held the loop past the fence: if
        # the run is taken from this live worker (``lost``), the others are excused.
        self.mine: dict[tuple[str, int], Attempt] = {}
        # Steps whose first attempt's row was left out so far (its history entry says it:
        # checkpoint.lean_attempts): its end goes without a row too while the gate is open.
        self.rowless: set[str] = set()
        self.stalled: dict[tuple[str, int], float] = {}  # -> seconds it held the loop
        self.lost = False
        # the step bodies running -> whether the run's deadline cuts it (not an undoing)
        self.bodies: dict[InlineBody[Any], bool] = {}
        self.past_deadline = False  # the deadline passed: the bodies running were cut
        self.cut: set[InlineBody[Any]] = set()  # the bodies the deadline cut
        # (step key, attempt) -> result of a transactional attempt whose transaction
        # committed, while its body runs on (a stop coming now does not undo it)
        self.tx_done: dict[tuple[str, int], Any] = {}
        self.parked = False  # waiting, during a graceful stop, to be released
        self.patches: dict[str, bool] = {}  # ctx.patched answers, fixed for the whole run
        self._deadline_timer: asyncio.Task[None] | None = None
        self.api = ApiState()  # ctx.compensate and cleanup after cancel
        self.waiting = 0  # wait_until calls in progress (branches of a gather)
        self.idle_waits = 0  # of which those that leave App(max_runs=...)'s count
        self.evict_now = False  # pushed out of the hot cache (see parking.HotRuns)
        self.evicting = False  # being parked: released on purpose (engine/parking.py)
        self.evicted = False  # parked in the store: this execution commits nothing more
        # Branches (branches.py): the step the run's own task is in (a cancel of the
        # task by the workflow's code waits for it to end), the tasks of steps awaited
        # by other tasks, replays waiting for the cancel history records.
        self.inline_step: OpenStep | None = None
        self.step_tasks: set[asyncio.Future[Any]] = set()
        self.cancel_waiters: set[asyncio.Future[None]] = set()
        self.letting_go = False  # the worker stops this execution: nothing is waited for
        self.code_ended = False  # the workflow's code returned or raised: no new call
        # What the engine does once the run's task ends (Engine.launch's ``done``): run
        # by execute() as its last act (and taken off the task's done callbacks).
        self.on_end: Callable[[asyncio.Task[Any]], None] | None = None

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

    async def release(self) -> bool:
        """Give the run up after a graceful stop: commit what is held, mark the attempts
        cut short ``Interrupted`` (not attempts), clear the owner (docs/leases.md).

        Returns False when outcomes of steps that ended here may not be stored (their
        commit failed), so those steps run again elsewhere: the stop cut them short."""
        if not self.stored or self.run.status.is_final:
            return True
        now = self.engine.clock.now()
        cut = [Attempt(a.key, a.attempt, a.started_at, now, *INTERRUPTED)
               for a in self.inflight.values()]
        self.inflight.clear()
        kept = True
        while True:
            if self.flush_failed is not None:
                # A commit of held outcomes (checkpoint.flush) failed: it dropped them.
                kept = False
                self.flush_failed = None
            held = bool(self.pending or self.pending_attempts)
            try:
                await self.commit(RunWrite(attempts=list(cut), release=True))
                return kept
            except (_Abandon, _StoreFailed, Exception) as exc:
                if exc is self.flush_failed:
                    continue  # a flush that failed while this waited for it: release now
                log.warning("run %s: could not release it (%s); another worker takes it "
                            "over after the lease", self.run.run_id, type(exc).__name__)
                return kept and not held

    def commit(self, write: RunWrite) -> Coroutine[Any, Any, None]:
        """Flush lazily recorded entries and write one checkpoint (fenced).

        (The coroutine of :func:`checkpoint.commit` itself: one layer less.)"""
        return checkpoint.commit(self, write)

    def let_go(self) -> None:
        """Stop this execution at once (the run is taken over, or released at a stop):
        its task and its steps' tasks are cancelled; no step in progress is waited for
        (another worker resumes the run from its history)."""
        self.letting_go = True
        task = self.task
        if isinstance(task, RunTask):
            task.engine_cancel()
        elif task is not None:
            task.cancel()
        for step in list(self.step_tasks):
            step.cancel()

    def expect_creation(self) -> None:
        """This run is not stored yet: store it with its first checkpoint."""
        checkpoint.expect_creation(self)

    def store_first(self) -> Coroutine[Any, Any, None]:
        """Before a child's creation names this run as its parent: the run is stored
        (at once when it is already: :func:`checkpoint.store_first`)."""
        return checkpoint.store_first(self)

    def defer(self, write: RunWrite) -> None:
        """Hold a finished step's checkpoint to commit it with the run's next write."""
        checkpoint.defer(self, write)

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
        if isinstance(exc, _BranchStopped):  # (in a branch, as the run ends)
            raise branches.branch_stopped(self, str(exc))
        cleanup.deliver(self, exc)
        raise exc

    # -- the runtime interface the journal and ctx use (runtime.py) ---------------------

    def now(self) -> float:
        return self.engine.clock.now()

    def hold(self, entry: HistoryEntry) -> None:
        self.pending.append(entry)

    def cancel_pending(self) -> bool:
        return self.interrupt.done() and isinstance(self.interrupt.result(), Cancelled)

    def interrupted(self) -> bool:
        return not self.compensating and self.interrupt.done()

    def new_call(self, key: str) -> None:
        if self.code_ended:  # a branch the workflow left running: it begins nothing new
            raise branches.branch_stopped(self)
        self.check_interrupt()

    @contextlib.contextmanager
    def watching(self, watch: Watch | None) -> Iterator[None]:
        """While inside: the engine wakes this run on news about ``watch``."""
        if watch is None:
            yield
            return
        engine, on_event = self.engine, watch.on == "event"
        if on_event:
            engine.add_waiter(watch.name, self, watch.wants)
        else:
            engine.add_run_waiter(watch.name, self)
        try:
            yield
        finally:
            if on_event:
                engine.remove_waiter(watch.name, self, watch.wants)
            else:
                engine.remove_run_waiter(watch.name, self)

    async def wait_until(
        self,
        wake_at: float | None,
        wake: Callable[[], Awaitable[bool]] | None = None,
        *,
        poll: bool = True,
        park: Parking | None = None,
        interrupt: Interrupt = "raise",
        busy: bool = False,
    ) -> None:
        """Sleep until ``wake_at`` (clock time), an interrupt, or ``wake()`` returns True.

        ``interrupt``: a pending cancel or deadline is raised (``"raise"``), ends the
        wait (``"return"``: the caller decides), or does not end it (``"ignore"``).

        ``wake()`` is tried again whenever this execution is woken, and, with ``poll``,
        every ``wait_poll_interval`` too (without it the engine wakes it on news).
        ``park``: what wakes the run if it is evicted from memory meanwhile (see
        :mod:`cantata.engine.parking`); without it the wait stays in memory.
        ``busy``: the run still counts against ``App(max_runs=...)`` while it waits
        (a step waiting for its slot: it is about to run, and never parks).
        """
        clock = self.engine.clock
        hot = self.engine.hot
        parkable = park is not None and hot.enabled
        idle_since = clock.now()
        self.waiting += 1
        engine = self.engine
        idle = not busy
        if idle:
            self.idle_waits += 1
            if self.idle_waits == 1:  # the run only waits: it leaves max_runs' count
                engine.waiting_runs += 1
                if engine.claims_held or engine.queue_held:
                    engine.slot_freed()
        if parkable:
            hot.enter(self)
        try:
            while True:
                # Cleared before looking, not after: news that arrives while ``wake()``
                # reads the store (a child ending meanwhile) ends the sleep below.
                self.wakeup.clear()
                await self.park_if_stopping()
                if interrupt == "raise":
                    self.check_interrupt()
                elif interrupt == "return" and self.interrupted():
                    return
                if wake is not None and await wake():
                    return
                now = clock.now()
                if wake_at is not None and now >= wake_at:
                    return
                remaining = None if wake_at is None else wake_at - now
                if parkable:
                    assert park is not None and hot.park_after is not None
                    if self.evict_now or now >= idle_since + hot.park_after:
                        if can_evict(self):
                            # raises Evicted once parked
                            await evict(self, with_deadline(park, self.run.deadline_at), wake)
                        self.evict_now = False
                        idle_since = now  # not now: try again after another while
                    until = idle_since + hot.park_after - now
                    remaining = until if remaining is None else min(remaining, until)
                if wake is not None and poll:
                    every = self.engine.wait_poll_interval
                    remaining = every if remaining is None else min(remaining, every)
                sleeper = (None if remaining is None
                           else asyncio.ensure_future(clock.sleep(remaining)))
                waiter = asyncio.ensure_future(self.wakeup.wait())
                try:
                    heed = None if interrupt == "ignore" else self.interrupt
                    await asyncio.wait(
                        [f for f in (sleeper, waiter, heed) if f is not None],
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    for f in (sleeper, waiter):
                        if f is not None and not f.done():
                            f.cancel()
        finally:
            self.waiting -= 1
            if idle:
                self.idle_waits -= 1
                if self.idle_waits == 0:
                    engine.waiting_runs -= 1
            if parkable:
                hot.leave(self)

    # -- steps ---------------------------------------------------------------------

    def call_step(
        self, sdef: StepDef, args: list[Any], key: str, kind: EntryKind = EntryKind.STEP
    ) -> Coroutine[Any, Any, Any]:
        """Run (or replay) one step or compensation and return its decoded JSON result.

        (The coroutine of :func:`steps.call_step` itself: one layer less.)"""
        return steps.call_step(self, sdef, args, key, kind)

    def run_step(
        self, sdef: StepDef, args: list[Any], key: str, compensate: StepDef | None
    ) -> Coroutine[Any, Any, Any]:
        """``ctx.run`` of one step: its result, its compensation registered once it
        completed; a cancel of its branch by the workflow's code waits for it to end.

        (The coroutine of :func:`branches.run_step` itself.)"""
        return branches.run_step(self, sdef, args, key, compensate)

    # -- the run ---------------------------------------------------------------------

    async def load(self) -> None:
        if self.fresh:
            return
        if self.preloaded is not None:
            history, attempts = self.preloaded
            self.preloaded = None
        else:
            store, app, run_id = self.engine.store, self.run.app, self.run.run_id
            history = await store.load_history(app, run_id)
            attempts = await store.load_attempts(app, run_id)
        self.journal.load(history)
        for a in attempts:
            self.attempts.setdefault(a.key, []).append(a)

    async def execute(self, after: asyncio.Task[Any] | None = None) -> None:
        """Run the workflow to its end (or until this worker lets it go).

        ``after``: a stale execution of the same run, cancelled; this one starts once
        it has stopped, so one worker never runs a run's step twice at once.
        """
        self.began = True
        if after is not None:
            await asyncio.wait([after])
        try:
            if self.engine.hooks.hooks:  # (the list: Hooks.__bool__ is a Python call)
                with self.engine.hooks.run(self.run, await self._parent_traceparent()):
                    await checkpoint.FlushAtYield(self, self._execute_run())
            else:
                await checkpoint.FlushAtYield(self, self._execute_run())
        except (_Abandon, Evicted):
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
            # A checkpoint still under way (a step's end flushed in the background,
            # waiting out the outage) lands, or fails, before the run is resumed: a
            # history read before it would run that step again, its attempt charged
            # WorkerLost. (This execution stays the run's meanwhile: not resumed.)
            async with self.commit_lock:
                pass
        except Exception:
            log.exception("run %s: internal error; it will be retried", self.run.run_id)
        except GeneratorExit:  # (a task destroyed pending: it never ends, as before)
            self.on_end = None
            raise
        finally:
            # Steps cut short here by this live worker do not count as attempts when
            # it resumes the run (see steps.prior_attempts); nor do those that ended
            # here but whose end was never committed (held for the run's next write
            # when the store failed): the worker did not die in them.
            # (each looked at only when there is something: a run that ended as usual
            # has none)
            if self.inflight or self.pending_attempts or self.uncommitted:
                self.engine.note_cut_short(self.run.run_id, {
                    *((a.key, a.attempt) for a in self.inflight.values()),
                    *((a.key, a.attempt)
                      for a in (*self.pending_attempts, *self.uncommitted)),
                })
            # Taken from this live worker (a pause past its lease): the attempts it was
            # cut off in are excused, unless their own body stalled it.
            if self.lost:
                cut = [a for k, a in self.mine.items() if k not in self.stalled]
                if cut:
                    self.engine.track(asyncio.create_task(
                        excuse(self.engine, self.run.run_id, self.run.app, cut)))
            if self._deadline_timer is not None:
                self._deadline_timer.cancel()
            if self.created is not None and not self.created.done():
                # Ended (the app stopping, or an internal error) before the run was stored.
                checkpoint.resolve_created(self, error=CantataError(
                    f"run {self.run.run_id} of {self.wdef.name} was not stored: the worker "
                    "stopped executing it first; start it again"
                ))
            # Last: nothing after this in the task (it ends on return), so what the
            # engine does at its end is done now, in this pass (Engine.launch).
            on_end, task = self.on_end, self.task
            if on_end is not None and task is not None:
                task.remove_done_callback(on_end)
                on_end(task)

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
        self.cut_at_deadline()

    def cut_at_deadline(self) -> None:
        """The deadline passed: stop the step bodies running now, as a step's timeout
        would (a sync step's thread is left to finish, its result unused). Not while
        the run undoes what it did: compensations always run to their end.
        (steps.call_step records the attempt cut and stops the run.)"""
        if self.compensating:
            return
        self.past_deadline = True
        for body, cuttable in list(self.bodies.items()):
            if cuttable:
                self.cut.add(body)
                body.cancel()

    def check_deadline(self) -> None:
        """Raise ``_DeadlinePassed`` if the run is past its deadline (a workflow that
        returns past it does not complete)."""
        deadline = self.run.deadline_at
        if (deadline is not None and not self.compensating
                and self.engine.clock.now() >= deadline):
            raise _DeadlinePassed()

    async def _execute_run(self) -> None:
        run = self.run
        if not self.fresh:  # (load's own first test: no coroutine for a new run)
            await self.load()
        if run.cancel_requested:
            self.request_interrupt(Cancelled())
        if run.deadline_at is not None:
            delay = run.deadline_at - self.engine.clock.now()
            if delay <= 0:
                self.request_interrupt(_DeadlinePassed())
            else:
                self._deadline_timer = asyncio.create_task(self._deadline_after(delay))
        if run.status == _PENDING:
            if run.cancel_requested:
                await self._finish(RunStatus.CANCELLED, error="Cancelled: before it started")
                return
            self.pending_status = _RUNNING
            run.status = _RUNNING
        ctx = WorkflowContext(self)
        try:
            # Inside the try: arguments that do not match the declared types fail the run
            # (SerializationError) instead of leaving it owned and stuck.
            sig = self.wdef.sig
            if run.idempotency_key and run.idempotency_key.startswith("schedule:"):
                sig = tick_signature(sig)  # whichever way the schedule was made
            args = sig.restore_args(codec.loads(run.args), self.wdef.what)
            try:
                value = await self.wdef.fn(ctx, *args)
            except BaseExceptionGroup as group:  # a TaskGroup's: act on an engine signal
                raise signal_in(group) from None
            finally:
                self._code_ended()
            if self.journal.divergence is not None:
                raise self.journal.divergence
            if run.deadline_at is not None:
                self.check_deadline()
            if not self.api.cancel_delivered:
                # a cancel (or the deadline) that came while the last call ran: the
                # run's end is its next durable point, so it stops there and compensates
                self.check_interrupt()
            await self._settle_returned()
            self.journal.check_all_replayed()
            result = codec.dumps(value, self.wdef.result_what, limit=self.engine.max_payload)
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
            if self.journal.divergence is not None:
                await self._finish(RunStatus.FAILED, error=error_text(self.journal.divergence),
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

    def _code_ended(self) -> None:
        """The workflow's code returned or raised: a branch it left running begins no
        new call (new_call); a replay waiting for a branch's recorded cancel that the
        code no longer made stops waiting."""
        self.code_ended = True
        for waiter in self.cancel_waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _settle_returned(self) -> None:
        """The workflow returned: a step still in progress in a branch it did not await
        is waited for (its outcome recorded before the run's end), with a warning
        naming it; the branches begin nothing new (and stop waiting)."""
        if not self.interrupt.done():
            self.interrupt.set_result(_BranchStopped("returned"))
        self.wakeup.set()
        journal = self.journal
        if len(journal.consumed) < len(journal.history):  # (its loop's test: else no
            await self._replay_branches()                  # coroutine, as for a new run)
        api = self.api
        if api.open_steps:
            log.warning(
                "workflow %s (run %s) returned while step %s was in progress in a branch "
                "it did not await: the run ends once it has ended; await every branch "
                "(asyncio.gather, asyncio.TaskGroup)", self.wdef.name, self.run.run_id,
                ", ".join(sorted(s.key for s in api.open_steps.values())),
            )
            await self._open_steps_ended()

    async def _replay_branches(self) -> None:
        """In a replay, give the branches the code did not await the loop turns they take
        to replay their recorded calls (and resume a step they had in progress), so
        that the run's end is decided on the history as recorded."""
        journal, idle = self.journal, 0
        while idle < IDLE_TURNS and len(journal.consumed) < len(journal.history):
            if not journal.has_unreplayed_calls():
                return
            before = len(journal.consumed)
            await asyncio.sleep(0)
            idle = 0 if len(journal.consumed) > before else idle + 1

    async def _open_steps_ended(self) -> None:
        api = self.api
        while api.open_steps:
            settled = api.steps_settled
            if settled is None:  # (made when first waited for)
                settled = api.steps_settled = asyncio.Event()
            settled.clear()
            await settled.wait()

    async def _unwind(self, final: RunStatus, error: str) -> None:
        """Run registered compensations in reverse order, then end the run."""
        await self._settle_branches()
        if not self.compensations:
            final, error, flagged = unwound_ending(self, final, error)
            await self._finish(final, error=error, flagged=flagged)
            return
        self.compensating = True
        if self.run.status != RunStatus.COMPENSATING:
            await self._withdraw_tasks("began compensating")
            await self.commit(RunWrite(status=RunStatus.COMPENSATING, error=error))
        failures: list[str] = []
        for sdef, args in reversed(registered(self)):
            key = compensation_key(self, sdef.name)
            try:
                await self.call_step(sdef, args, key, kind=EntryKind.COMPENSATION)
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

    async def _settle_branches(self) -> None:
        """The workflow's code failed while steps of its other branches (an
        ``asyncio.gather``, or one it did not await) were in progress: each branch
        stops at its next durable point (no new step begins; a task no live worker
        holds is withdrawn), and the steps in progress end as they will. Waits for
        them, so that the unwind compensates every step that completed, in reverse
        order of completion."""
        await self._replay_branches()
        api = self.api
        if not api.open_steps:
            return
        if not self.interrupt.done():  # (a cancel or a deadline stops them already)
            self.interrupt.set_result(_BranchStopped("failed"))
        self.wakeup.set()
        log.info("workflow %s (run %s) failed while step %s was in progress in another "
                 "branch: the run waits for it, and undoes it if it completes",
                 self.wdef.name, self.run.run_id,
                 ", ".join(sorted(s.key for s in api.open_steps.values())))
        await self._open_steps_ended()

    async def _withdraw_tasks(self, what: str) -> None:
        """Before the run ends or unwinds: its remote steps' tasks that no live worker
        holds are withdrawn, so none of them starts for a run that is over (a task a
        worker holds ends as it will; a claim never takes a task of an ended run)."""
        if not self.made_tasks:
            return
        now = self.engine.clock.now()
        await self.engine.store.withdraw_tasks(
            self.run.app, self.run.run_id, stale_before=now,
            actor=self.engine.worker_id,
            error=f"{TASK_WITHDRAWN}: run {self.run.run_id} {what} before a worker took "
                  "this step; it never ran",
        )

    async def _finish(
        self,
        status: RunStatus,
        *,
        result: str | None = None,
        error: str | None = None,
        flagged: bool | None = None,
    ) -> None:
        if self.api.open_steps:  # never an end recorded before a step's outcome
            await self._settle_branches()
        name = str(status)
        if self.made_tasks:  # (no coroutine, no text, for a run that made none)
            await self._withdraw_tasks(f"ended {name}")
        await self.commit(RunWrite(
            status=status, result=result, error=error, flagged=flagged, release=True,
            wake=self.run.parent_run_id,  # a parent parked in ctx.call (engine/parking.py)
        ))
        run = self.run
        run.result, run.error, run.owner = result, error, None
        if flagged is not None:
            run.flagged = flagged
        if status != _COMPLETED:
            log.info("run %s of %s ended %s: %s", self.run.run_id, self.wdef.name, status, error)
        runs = self.engine.metrics.runs
        runs[name] = runs.get(name, 0) + 1
        if self.engine.hooks.hooks:
            self.engine.hooks.notify("run_finished", self.run, name, error)
