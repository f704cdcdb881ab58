"""The engine of one process: creates runs, claims and executes them, wakes waiters."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from cantata.cancel_safe import wait_event
from cantata.declare.defs import StepDef, remote_step_def
from cantata.declare.router import Router
from cantata.errors import Cancelled, StoreUpgraded
from cantata.model import codec
from cantata.model.checks import check_key
from cantata.model.event import Event
from cantata.model.idempotency import KEY_ADVICE, args_hash, check_correlation_id
from cantata.model.records import Attempt, Declaration, HistoryEntry, RunRecord
from cantata.model.signing import Signer
from cantata.model.status import RunStatus
from cantata.quietlog import QuietLog, outage_interval, reason
from cantata.store.base import CANCEL, EVENTS, RUNNABLE, RUNS, TASKS, Store
from cantata.store.roles.lifecycle import idle_wait

from . import checkpoint, gcpolicy
from .branches import RunTask
from .clock import Clock
from .creation import create_once
from .deadlines import WaitDeadlines
from .event_waits import EventWaits, Wants
from .hooks import Hooks
from .metrics import Metrics
from .ownership import Ownership
from .parking import HotRuns, wake_for_events
from .runner import RunExecution
from .shutdown import drain

if TYPE_CHECKING:
    from cantata.flow.queues import DeclaredQueues
    from cantata.flow.service import FlowService
    from cantata.model.flow import QueueEntry

    from .tasks import TaskServer

log = logging.getLogger("cantata.worker")

# Enum members used on every run, as module constants (an enum class's attribute
# goes through EnumType.__getattr__'s slow hook on Python 3.11: docs/performance.md,
# round twenty-five).
_PENDING, _COMPLETED = RunStatus.PENDING, RunStatus.COMPLETED
# A run that completed here answers a later local result() from memory for this long
# (the ENDED_KEPT newest). Only completed runs: a retry (docs/operating.md) makes a failed
# or compensated run live again, and must never be answered with its old outcome.
ENDED_TTL = 10.0
ENDED_KEPT = 10_000


class Engine:
    """Runs workflows for one app in this process.

    Args:
        lease: seconds without a heartbeat after which another worker takes a run over.
        poll_interval: seconds between looks for work committed by other processes.
        max_runs: runs in progress in this worker at most (``None``: no bound); a run
            that only waits (``ctx.sleep``, ``ctx.wait_for_event``, ``ctx.call``, a
            step's retry backoff), in memory or parked, does not count (see :meth:`room`).
    """

    def __init__(
        self,
        app: str,
        router: Router,
        store: Store,
        clock: Clock,
        *,
        worker_id: str,
        lease: float,
        poll_interval: float,
        services: frozenset[str] | None = None,
        hooks: Hooks | None = None,
        signer: Signer | None = None,
        max_payload: int | None = None,
        version: str | None = None,
        any_version: bool = False,
        park_after: float | None = None,
        hot_runs: int = 10_000,
        max_runs: int | None = None,
    ) -> None:
        self.app = app
        self.router = router
        self.store = store
        # The apps whose lean writes are open (engine/gate.py): the store's set
        # (StoreBase.lean_apps, which its own writers read too), or one of this engine's
        # for a backend without it (never opened: engine/gate.py).
        lean = getattr(store, "lean_apps", None)
        self.lean_apps: set[str] = set() if lean is None else lean
        self.clock = clock
        self.worker_id = worker_id
        self.lease = lease
        self.poll_interval = poll_interval
        self.wait_poll_interval = max(poll_interval, 0.5)
        self.services = services
        # The handler groups this worker's consumer serves, set before its first
        # heartbeat (which records them: observability/stall_hints.py); None for a
        # client.
        self.handler_groups: list[str] | None = None
        self.metrics = Metrics()
        self.hooks = hooks if hooks is not None else Hooks()
        self.signer = signer if signer is not None else Signer(None)
        # bytes of JSON one argument, result or event may take (None: the store's bound)
        self.max_payload = max_payload
        self.serving = False
        self.executions: dict[str, RunExecution] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # Runs whose held checkpoint is committed on its own if still held once they
        # yield (checkpoint.defer): one loop callback for all of them, not one each.
        self.to_flush: list[RunExecution] = []
        self.flush_handle: asyncio.Handle | None = None  # the callback for to_flush
        self._loops: list[asyncio.Task[Any]] = []
        # Called when another worker's expiry passes (Ownership._expiry_loop), besides
        # this engine's own claimers: the embedded broker's consumers (app_runtime.py).
        self.claimer_wakers: list[Callable[[], None]] = []
        self._watch_wakeup = asyncio.Event()  # events or cancellations heard
        # An event parked runs may wait for was committed: the watch loop looks at once,
        # not at its poll_interval cadence (see look_for_parked)
        self._watch_now = asyncio.Event()
        self.ownership = Ownership(self)
        self.quiet = QuietLog(log, every=outage_interval(lease))
        # A graceful stop is under way: runs park at their next durable point, and
        # ``quiesce`` is set whenever one parks or ends (see shutdown.drain).
        self.draining = False
        # The app is closing (set as its stop begins): a start still finding out
        # whether its run was stored stops at once (engine/creation.py).
        self.closing = asyncio.Event()
        # The stop gave up on the store (past its bound, or a second signal): a
        # checkpoint failing on an outage is no longer retried (see waits_out_outages).
        self.cutting = False
        self.cut_short = 0  # steps and handlers a stop released past its grace
        # of which: what finished but could not be stored (the store away past the
        # stop's bound: shutdown.release), not what the grace cut
        self.unstored = 0
        self.quiesce = asyncio.Event()
        # run id -> (step key, attempt) this worker started but cut short itself (a
        # re-take, an outage, a self-fence): not attempts, this worker is alive.
        self._cut_short: dict[str, set[tuple[str, int]]] = {}
        # Times this worker stopped its step bodies itself (fence_self): a body cut so
        # was stopped by its own worker, for a hold in doubt, not by a stop or a cancel
        self.fences = 0
        self._completions: dict[str, list[asyncio.Future[RunRecord | None]]] = {}
        self.result_deadlines = WaitDeadlines()  # the timeouts of those waits (handle.py)
        # run id -> (when, final record) of runs that ended here lately, oldest first:
        # a result() asked for after the end needs no read (see completion)
        self._ended: OrderedDict[str, tuple[float, RunRecord]] = OrderedDict()
        self._runs_pulse = asyncio.Event()
        self.event_waits = EventWaits()  # runs here waiting for events, by type
        self._run_waiters: dict[str, set[RunExecution]] = {}
        self._declared_waits: set[tuple[str, str]] = set()
        # Told the types runs reach waits of (the App has a broker keep the events from
        # outside of those types for them: broker/nats_outside.py).
        self.waits_reached: Callable[[list[str]], Awaitable[None]] | None = None
        self._known_remote: set[str] = set()
        # The queues of workflows whose code is not here (a start by name: flow/queues.py)
        self.declared_queues: DeclaredQueues | None = None
        self._remote_steps: dict[str, StepDef] = {}
        # (monotonic time, patterns every service declared): the orphan check's cache
        self.declared_patterns: tuple[float, list[str]] | None = None
        self.declared_reading: asyncio.Task[list[str]] | None = None  # (orphans.py)
        self.orphans_unchecked: list[Event[Any]] = []  # (orphans.py, report_orphans)
        self.task_server: TaskServer | None = None
        # Raises if the broker would refuse an event (the App sets the broker's check).
        self.check_event: Callable[[Event[Any]], None] = lambda event: None
        # Code version (docs/operating.md): recorded on runs started here; claims are
        # limited to it and to runs this code replays, unless any_version.
        self.version = version
        self.any_version = any_version
        self.replay_verdicts: dict[str, tuple[float, bool]] = {}  # run id -> (updated, ok)
        self.version_order: tuple[float, dict[str, float]] | None = None  # (read at, order)
        self.foreign_checked_at = -1e9  # monotonic time of the last look at older runs
        self.versions_checked_at = -1e9  # monotonic time the served versions were last read
        # queued runs of other versions whose history this code replays (run id ->
        # updated_at as checked), and the monotonic time of the last look for them
        self.queue_checked: dict[str, float] = {}
        self.queue_checked_at = -1e9
        self.flow: FlowService | None = None  # queues, schedules, slots (while serving)
        self._launched: dict[str, asyncio.Future[None]] = {}  # see wait_launched
        self.hot = HotRuns(self, park_after, hot_runs)  # which waiting runs stay in memory
        # App(max_runs=...): the runs in progress here at most (docs/flow-control.md,
        # "Runs per worker"). ``waiting_runs``: executions whose code only waits now
        # (RunExecution.wait_until), which do not count. ``claims_held`` /
        # ``queue_held``: the bound held back the claim loop (or a start past it was
        # left to it) / the queues' admissions, so a slot that frees wakes it at once.
        self.max_runs = max_runs
        self.claiming = 0  # room kept for claims under way (claiming_up_to)
        self.waiting_runs = 0
        self.claims_held = False
        self.queue_held = False
        # A newer Cantata migrated the store under this serving worker (its heartbeat
        # said so): the error, and the event the process's serving loop waits on to stop
        # gracefully (`cantata worker`, App.run_worker). See store_upgraded.
        self.upgraded: StoreUpgraded | None = None
        self.must_stop = asyncio.Event()
        # The store says ``runnable`` (store.base.RUNNABLE) when a run may have become
        # claimable: the claim loop wakes at that, not at every ``runs`` (a run's end).
        self._hears_runnable = bool(getattr(store, "says_runnable", False))
        self._hears_others = bool(getattr(store, "hears_others", False))
        store.add_listener(self._on_store_change)

    # -- what this worker serves --------------------------------------------------------

    def serves(self, workflow: str) -> bool:
        wdef = self.router.workflows.get(workflow)
        if wdef is None:
            return False
        return self.services is None or wdef.service is None or wdef.service in self.services

    def served_workflows(self) -> list[str]:
        return [name for name in self.router.workflows if self.serves(name)]

    async def knows_workflow(self, name: str) -> bool:
        if name in self.router.workflows or name in self._known_remote:
            return True
        decls = await self.store.declarations(self.app)
        self._known_remote = {d.name for d in decls if d.kind == "workflow"}
        return name in self._known_remote

    async def remote_step(self, name: str) -> StepDef | None:
        """A step another service of this app declared (``None`` if nobody did)."""
        found = self._remote_steps.get(name)
        if found is not None:
            return found
        for d in await self.store.declarations(self.app):
            if d.kind == "step" and d.service and d.name not in self._remote_steps:
                self._remote_steps[d.name] = remote_step_def(d.name, d.service)
        return self._remote_steps.get(name)

    def is_remote(self, sdef: StepDef) -> bool:
        """True when ``sdef`` must run as a task for another service's workers."""
        if sdef.service is None:
            return False
        local = self.router.steps.get(sdef.name)
        if local is None or local.fn is not sdef.fn:
            return True
        return self.services is not None and sdef.service not in self.services

    def served_services(self) -> list[str]:
        """Services whose step tasks this worker executes."""
        if self.services is not None:
            return sorted(self.services)
        return sorted({s.service for s in self.router.steps.values() if s.service})

    def traceparent_for(self, run: RunRecord) -> str | None:
        """W3C traceparent to stamp on events emitted by ``run`` (from the tracing hook)."""
        return self.hooks.traceparent() if self.hooks else None

    # -- runs --------------------------------------------------------------------------------

    async def create_run(
        self,
        workflow: str,
        args: Sequence[Any],
        *,
        idempotency_key: str | None = None,
        correlation_id: str | None = None,
        causation_id: str | None = None,
        parent_run_id: str | None = None,
        deadline: float | None = None,
        queue: QueueEntry | None = None,
        actor: str | None = None,
    ) -> tuple[RunRecord, bool]:
        """Store a new run (or return the one with that idempotency key) and start it here
        when this process serves the workflow; with ``queue``, it waits there to begin.
        ``actor`` (an operator, checked by the caller) is who its ``run.created`` record
        names (``None``: ``system``).

        Returns:
            The run, and whether this call created it (``False``: the key's run existed,
            nothing was started). A creation whose answer was lost is found out by the
            run's id (:func:`~cantata.engine.creation.create_once`).
        """
        if idempotency_key is not None:  # (None passes both checks: no call on every start)
            check_key("idempotency_key", idempotency_key, KEY_ADVICE, empty=False)
        if correlation_id is not None:
            check_correlation_id(correlation_id)
        args_json = codec.dumps(
            list(args), f"arguments of workflow {workflow}", limit=self.max_payload
        )
        run_id = codec.new_id()
        now = self.clock.now()
        local = self.serving and self.serves(workflow) and queue is None
        if local and self.max_runs is not None:
            room = self.room()
            if not room:
                # Past App(max_runs=...): stored for any worker with room to claim (this
                # one too, once a run of its own ends or waits), not executed here now.
                local = False
                self.claims_held = True
        wdef = self.router.workflows.get(workflow)
        run = RunRecord(
            run_id=run_id,
            app=self.app,
            workflow=workflow,
            status=_PENDING,
            args=args_json,
            created_at=now,
            updated_at=now,
            correlation_id=correlation_id or run_id,
            causation_id=causation_id,
            idempotency_key=idempotency_key,
            args_hash=args_hash(workflow, args_json),
            parent_run_id=parent_run_id,
            deadline_at=None if deadline is None else now + deadline,
            owner=self.worker_id if local else None,
            fence=1 if local else 0,
            service=wdef.service if wdef else None,
            version=self.version if wdef else None,
        )
        # Each creation below goes through create_once: an answer lost after the run
        # was stored is found out by the run's id (engine/creation.py).
        if queue is not None:
            entry = queue
            if actor is None:
                creation = await create_once(
                    self, run, lambda: self.store.create_queued_run(run, entry))
            else:
                creation = await create_once(
                    self, run, lambda: self.store.create_queued_run(run, entry, actor=actor))
            if creation.created and self.flow is not None:
                self.flow.wake()
            return creation.run, creation.created
        if actor is not None:  # an operator's start: its record names them, not system
            creation = await create_once(
                self, run, lambda: self.store.create_run(run, actor=actor))
        elif local and idempotency_key is None:
            # Executed here at once, and new for sure: the run is stored with its first
            # checkpoint, in one transaction, when its workflow reaches it.
            execution = self.launch(run, fresh=True, create=True)
            # A future of this caller's own (not ``created`` itself, which a cancelled
            # caller must not cancel): cheaper than asyncio.shield, one callback less.
            assert execution.created is not None
            if execution.created.done():  # never yet: its task has not begun
                return execution.created.result()
            starter: asyncio.Future[tuple[RunRecord, bool]]
            starter = execution.starter = asyncio.get_running_loop().create_future()
            return await starter
        else:
            creation = await create_once(self, run, lambda: self.store.create_run(run))
        stored, created, read_back = creation
        if created and local and not read_back:
            self.launch(stored, fresh=True)
        elif created and local:
            # Stored with its answer lost: maybe resumed here by reconciling meanwhile
            # (launch keeps that execution), maybe ended already (nothing to launch).
            if stored.owner == self.worker_id and not stored.status.is_final:
                self.launch(stored)
        elif created:
            self.ownership.claim_wakeup.set()
        elif stored.owner == self.worker_id and stored.run_id not in self.executions:
            # The key's run, stored by an earlier start here whose answer was lost: owned
            # by this worker, not executed yet (reconciling resumes it).
            self.ownership.repair_soon()
        return stored, created

    def completion(self, run_id: str) -> asyncio.Future[RunRecord | None] | None:
        """A future resolved when this process stops executing ``run_id`` (``None`` if it
        does not execute it): lets a local ``handle.result()`` wait without polling.

        Its result is the run as its final checkpoint stored it, or ``None`` when this
        process let the run go before it ended.
        """
        if run_id not in self.executions:
            ended = self._ended.get(run_id)
            if ended is None or time.monotonic() - ended[0] > ENDED_TTL:
                return None
            done: asyncio.Future[RunRecord | None] = asyncio.get_running_loop().create_future()
            done.set_result(ended[1])
            return done
        # A future of each caller's own, which it may await directly (cancelling it
        # touches no other caller), resolved by the run's end with no callback between.
        fut: asyncio.Future[RunRecord | None] = asyncio.get_running_loop().create_future()
        waiters = self._completions.get(run_id)
        if waiters is None:
            self._completions[run_id] = [fut]
        else:
            waiters[:] = [w for w in waiters if not w.done()]  # given up (a timeout)
            waiters.append(fut)
        return fut

    def ends_here(self, run_id: str) -> bool:
        """:meth:`completion` would give a future (without making one)."""
        if run_id in self.executions:
            return True
        ended = self._ended.get(run_id)
        return ended is not None and time.monotonic() - ended[0] <= ENDED_TTL

    def track(self, task: asyncio.Task[Any]) -> None:
        """Keep a background task of this engine alive until it ends (cancelled on stop)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def room(self) -> int | None:
        """How many more runs this worker may take on now under ``App(max_runs=...)``
        (``None``: no bound): the bound less the runs it executes that do more than
        wait (a run waiting in ``ctx.sleep``, ``ctx.wait_for_event``, ``ctx.call`` or a
        step's backoff does not count, nor, parked, is it here at all)."""
        if self.max_runs is None:
            return None
        busy = len(self.executions) - self.waiting_runs
        return max(0, self.max_runs - max(0, busy) - self.claiming)

    @contextlib.contextmanager
    def claiming_up_to(self, limit: int) -> Iterator[None]:
        """Keep ``limit`` of the room (:meth:`room`) for a claim under way until the runs
        it took are launched: a start in this process meanwhile (``start``, ``local``),
        or the other claim loop (runs, queued runs), must not take the same room, or
        both would run here past ``max_runs``. Room it kept and did not fill frees a
        slot for a loop the room held back meanwhile (:meth:`slot_freed`), which no
        run's end would wake (it waited ~5 s for its own next look)."""
        self.claiming += limit
        try:
            yield
        finally:
            self.claiming -= limit
            if limit and (self.claims_held or self.queue_held) and self.room():
                self.slot_freed()

    def claim_limit(self, most: int) -> int:
        """How many runs a claim of at most ``most`` may take now: ``most``, or less
        under ``App(max_runs=...)`` (:meth:`room`)."""
        room = self.room()
        return most if room is None else min(most, room)

    def slot_freed(self) -> None:
        """A run here ended or began to wait: if a claim or a start was cut short by
        ``max_runs``, look for work again now, not at the next poll (the claim loop's
        coalescing pause gathers the slots that free meanwhile)."""
        if self.claims_held:
            self.claims_held = False
            self.ownership.claim_wakeup.set()
        if self.queue_held:
            self.queue_held = False
            if self.flow is not None:
                self.flow.queues.wakeup.set()

    def launch(
        self, run: RunRecord, *, fresh: bool = False, create: bool = False,
        history: tuple[list[HistoryEntry], list[Attempt]] | None = None,
    ) -> RunExecution:
        """Execute ``run`` in this process (it is owned by this worker).

        ``fresh``: the run was just created here, so it has no history to load.
        ``create``: it is not stored yet; its first write stores it (see
        :attr:`RunExecution.created`). ``history``: its history and attempts, read
        already (with the other runs of a claim, ``Store.load_histories``).
        """
        current = self.executions.get(run.run_id)
        previous: asyncio.Task[Any] | None = None
        if current is not None:
            if run.fence <= current.run.fence:
                return current
            # Re-taken (after a pause or an outage, this worker claimed the run again):
            # the execution here holds a stale fence and can commit nothing. A fresh
            # execution replaces it, once the stale one has stopped (never both at once).
            log.info("run %s: re-taken with fence %d; a fresh execution replaces the stale "
                     "one (fence %d)", run.run_id, run.fence, current.run.fence)
            previous = current.task
            current.let_go()
        wdef = self.router.workflows[run.workflow]
        execution = RunExecution(self, run, wdef)
        execution.fresh = fresh or create
        execution.preloaded = history
        self.executions[run.run_id] = execution
        launched = self._launched.pop(run.run_id, None)
        if launched is not None and not launched.done():
            launched.set_result(None)
        task = RunTask(execution.execute(after=previous), execution,
                       name=f"cantata-run:{run.run_id}")
        execution.task = task
        self._tasks.add(task)
        if create:
            # After the task: its first pass usually reaches the first checkpoint,
            # which stores the run, before the flush this schedules looks.
            execution.expect_creation()

        def done(t: asyncio.Task[Any], run_id: str = run.run_id) -> None:
            execution.on_end = None
            self._tasks.discard(t)
            if execution.create_pending and not execution.flush_scheduled:
                # Its task never got to its code (checkpoint.expect_creation): stored
                # now all the same (what the creator is waiting for).
                execution.flush_scheduled = True
                checkpoint.flush_later(execution)
            self.quiesce.set()
            # The execution and its task refer to each other: let go of that now, so that
            # the run's state is freed by reference counting, not left for the garbage
            # collector to find (docs/performance.md, round nineteen).
            execution.task = None
            if self.executions.get(run_id) is not execution:
                return  # superseded: the fresh execution answers for the run
            del self.executions[run_id]
            if self.claims_held or self.queue_held:
                self.slot_freed()
            self._runs_pulse.set()
            waiters = self._completions.pop(run_id, None)
            final = execution.run.status.is_final  # (a property: asked once)
            if waiters is not None:
                ended = execution.run if final else None
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(ended)
            if final:
                self._cut_short.pop(run_id, None)
            if execution.run.status is _COMPLETED:
                self._ended[run_id] = (time.monotonic(), execution.run)
                if len(self._ended) > ENDED_KEPT:
                    self._ended.popitem(last=False)
            elif self.serving and not execution.evicted:
                # Let go while this worker lives (lease lost, store failure, internal
                # error): the store decides whether it is still ours to resume.
                self.ownership.repair_soon()

        # Run by the task's own coroutine as its last act (RunExecution.execute), which
        # takes this callback back first: the caller of result() is woken in the pass
        # the run ends in, not one later, and no loop callback is made for it. Left as
        # the task's done callback for a task that never got there (cancelled before its
        # first step, or while it waited for a stale execution).
        execution.on_end = done
        task.add_done_callback(done)
        return execution

    def note_cut_short(self, run_id: str, attempts: set[tuple[str, int]]) -> None:
        """Remember attempts this worker cut short itself (not charged when resumed)."""
        if attempts:
            self._cut_short.setdefault(run_id, set()).update(attempts)

    def cut_short_here(self, run_id: str, key: str, attempt: int) -> bool:
        """True when this (live) worker started that attempt and cut it short itself."""
        return (key, attempt) in self._cut_short.get(run_id, ())

    def fence_self(self) -> None:
        """Stop every step body running here: this worker's hold on its runs is in doubt.

        Their checkpoints could not be committed anyway (fenced); stopping the bodies
        stops their side effects too, before another worker may take the runs over.
        Each execution keeps its state and waits for the store: the stopped attempts
        start again (not counted) once a fenced checkpoint proves the run is still
        owned here (see :mod:`cantata.engine.ownership`).
        """
        self.fences += 1
        for execution in list(self.executions.values()):
            for body in list(execution.bodies):
                body.cancel()

    def store_upgraded(self, exc: StoreUpgraded) -> None:
        """A newer Cantata migrated the store under this worker (its heartbeat said so,
        docs/deploy.md "Upgrading Cantata"): say it once, as an error naming the store,
        both schema versions and what to do; claim and admit nothing more; and ask the
        process to stop gracefully (:attr:`must_stop`, which ``cantata worker`` and
        ``App.run_worker`` wait on): steps in progress finish within the grace, what is
        left is released to the workers of the new release."""
        if self.upgraded is not None:
            return
        self.upgraded = exc
        log.error("worker %s: %s", self.worker_id, exc)
        self.must_stop.set()

        async def claim_nothing_more() -> None:
            if self.flow is not None:  # queue admissions and schedule ticks
                await self.flow.stop()
            await self.ownership.stop_claiming()

        if self.serving:
            self.track(asyncio.ensure_future(claim_nothing_more()))

    def forget_ended(self, run_id: str) -> None:
        """A retry makes ``run_id`` live again: no answer from memory for it."""
        self._ended.pop(run_id, None)

    def drop(self, execution: RunExecution) -> None:
        """Stop one execution whose run this worker no longer owns."""
        execution.let_go()

    def waits_out_outages(self) -> bool:
        """Whether a checkpoint that fails on a store outage is tried again: while
        serving, and during a graceful stop until it gives up (shutdown.drain): the
        outcomes of the steps that finished during the grace are committed, not
        dropped (their steps would run again elsewhere)."""
        return self.serving or (self.draining and not self.cutting)

    def background(self) -> list[asyncio.Task[Any]]:
        """Every task of this engine still alive (executions, flushes, checks)."""
        return list(self._tasks)

    # -- serving ---------------------------------------------------------------------------

    async def start_serving(
        self, before_claiming: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Heartbeat, then claim and execute runs until :meth:`stop`.

        ``before_claiming``: awaited once this worker's first heartbeat is in (its row
        says what it serves) and before it claims anything (Ownership.start).
        """
        if self.serving:
            return
        self.draining = False
        gcpolicy.tune()  # once per process: fewer garbage collections (gcpolicy.py)
        self.ownership = Ownership(self)
        await self.ownership.start(before_claiming)
        self.serving = True
        self._loops = [asyncio.create_task(self._watch_loop(), name="cantata-watch")]
        from .tasks import TaskServer

        self.task_server = TaskServer(self, self.served_services())
        self.task_server.start()
        from cantata.flow.service import FlowService

        self.flow = FlowService(self)
        self.flow.start()

    async def stop(
        self, grace: float = 0.0, force: asyncio.Event | None = None, *,
        keep_worker: bool = False,
    ) -> None:
        """Stop executing: claim nothing more, let steps in progress finish for up to
        ``grace`` seconds (or until ``force`` is set), then release what is left so
        other workers resume it at once (see :mod:`cantata.engine.shutdown`).

        ``keep_worker``: leave this worker's row (its handlers may still be draining:
        without the row other workers would take their deliveries); call
        :meth:`forget_worker` once they are done.
        """
        loop = asyncio.get_running_loop()
        self.closing.set()
        if self.flow is not None:  # admit no more queued runs, start no more ticks
            await self.flow.stop()
            self.flow = None
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []
        if self.serving or self.executions:
            await drain(self, loop.time() + grace, force or asyncio.Event())
        self.serving = False
        await self.ownership.stop()
        self.task_server = None
        if not keep_worker:
            await self.forget_worker()
        self.draining = False

    async def forget_worker(self) -> None:
        """Remove this worker's row: what it still held is free for others at once."""
        try:
            await self.store.remove_worker(self.app, self.worker_id)
        except Exception as exc:
            log.warning("worker %s: could not release its work on stop (%s); other workers "
                        "take it over after the lease", self.worker_id, reason(exc))

    def wake_claimers(self) -> None:
        """Let every loop that claims work look now (another worker's work may be free
        to take over)."""
        self.ownership.claim_wakeup.set()
        if self.task_server is not None:
            self.task_server.wakeup.set()
        for wake in list(self.claimer_wakers):
            wake()

    async def _watch_loop(self) -> None:
        """Notice what other processes did: cancellations, and events runs here wait for.

        Every poll interval at most; while the store hears other processes, only once
        it heard of events or cancellations, or after a safety-net wait (idle_wait).
        But the look for the events of parked runs' waits goes at once, as often as
        such events come (one look at a time, and one more right after it for those
        committed during it), while runs are parked in waits for their types: for an
        event committed in this process (events_appended), and for every event another
        process commits on a store that hears them (PostgreSQL says not its type)."""
        last_cancel_check = 0.0
        last = time.monotonic()
        now = self._watch_now
        # The first look one poll interval after the start, whatever was heard: it
        # reads where the log ends, from which the next look takes what was stored
        # (engine/parking.py, wake_for_events)
        self._watch_wakeup.set()
        try:
            await self.hot.begin()  # (where the first look goes on from)
            await self.event_waits.begin(self)  # (and the first poll of waits here)
        except Exception as exc:
            self.quiet.warning("events", "looking for awaited events failed (%s); "
                               "retrying", reason(exc))
        while True:
            await wait_event(self._watch_wakeup, idle_wait(self.store, self.poll_interval))
            self._watch_wakeup.clear()
            if not now.is_set():
                # (no more often than before: a busy store notifies at every commit)
                await wait_event(now, max(0.0, last + self.poll_interval - time.monotonic()))
            # The looks for the waits of parked runs and of runs here go at once for
            # an event they may wait for (look_for_parked, news of events), the rest
            # only at the poll_interval cadence. One asked for during this look is made
            # right after it (the flag is cleared first).
            urgent = now.is_set()
            now.clear()
            due = not urgent or time.monotonic() >= last + self.poll_interval
            if due:
                last = time.monotonic()
            else:  # the rest at its time, as if this look had not been asked for
                self._watch_wakeup.set()
            try:
                # Where the log ends before the looks: each goes on from there next.
                reached = await self.store.log_position(self.app)
                await self.event_waits.poll(self, reached)  # the waits of runs here
                if await wake_for_events(self, reached):  # the waits of parked runs
                    self.ownership.claim_now()  # the woken runs: claimed at once
            except Exception as exc:
                self.quiet.warning("events", "looking for awaited events failed (%s); "
                                   "retrying", reason(exc))
                self._watch_wakeup.set()  # again in a poll interval
                last = time.monotonic()
            # With many runs in flight, look for cancellations less often (in-process and
            # PostgreSQL cancellations arrive by notification at once anyway).
            every = self.poll_interval * max(1.0, len(self.executions) / 500)
            if time.monotonic() - last_cancel_check >= every:
                last_cancel_check = time.monotonic()
                try:
                    await self.check_cancellations()
                except Exception as exc:
                    self.quiet.warning("cancellations", "checking cancellations failed "
                                       "(%s); retrying", reason(exc))

    async def _check_cancellations_heard(self) -> None:
        """:meth:`check_cancellations` for a ``cancel`` heard. The store also calls every
        listener when its listening connection is lost (then the store is often
        unreachable): a failure is one quiet warning, and the watch loop looks again."""
        try:
            await self.check_cancellations()
        except Exception as exc:
            self.quiet.warning("cancellations", "checking cancellations failed (%s); "
                               "retrying", reason(exc))

    async def check_cancellations(self) -> None:
        if not self.executions:
            return
        for run_id in await self.store.cancelled_runs(self.app, list(self.executions)):
            execution = self.executions.get(run_id)
            if execution is not None:
                execution.request_interrupt(Cancelled())

    def _on_store_change(self, channel: str) -> None:
        if channel == RUNS:
            self._runs_pulse.set()
            if not self._hears_runnable:  # (a store that never says which runs are news)
                self.ownership.claim_wakeup.set()
            for group in self._run_waiters.values():
                for execution in group:
                    execution.wakeup.set()
        elif channel == RUNNABLE:  # (a run's end alone is not news to the claim loop)
            self.ownership.claim_wakeup.set()
        elif channel == CANCEL:
            self._watch_wakeup.set()
            self._runs_pulse.set()
            self.ownership.claim_wakeup.set()  # a parked run, woken to be cancelled
            if self.executions:
                self.track(asyncio.create_task(self._check_cancellations_heard()))
        elif channel == TASKS:
            for group in self._run_waiters.values():
                for execution in group:
                    execution.wakeup.set()
        elif channel == EVENTS:
            self._watch_wakeup.set()
            # Another process's event (a store that hears them, PostgreSQL, says not
            # which type): looked for at once while runs wait for events, parked or
            # here (the watch loop reads the new ones and wakes the waits they may
            # satisfy, not each wait to read them itself). This process's own events
            # woke their waits already (events_appended).
            if self._hears_others and (self.hot.waited or self.event_waits):
                self._watch_now.set()

    async def wait_launched(self, run_id: str, timeout: float) -> None:
        """Return when this process begins executing ``run_id`` (a run waiting in a
        queue), or after ``timeout``: a waiting caller is not woken by every other run's
        change."""
        fut = self._launched.get(run_id)
        if fut is None:
            fut = self._launched[run_id] = asyncio.get_running_loop().create_future()
        await asyncio.wait([fut], timeout=timeout)
        if not fut.done():
            self._launched.pop(run_id, None)

    async def wait_runs_changed(self, timeout: float) -> None:
        """Return when some run changed in this process, or after ``timeout``."""
        self._runs_pulse.clear()
        waiter = asyncio.ensure_future(self._runs_pulse.wait())
        try:
            await asyncio.wait([waiter], timeout=timeout)
        finally:
            waiter.cancel()

    # -- waiters --------------------------------------------------------------------------

    def add_waiter(self, event_type: str, execution: RunExecution, wants: Wants) -> None:
        self.event_waits.add(event_type, execution, wants)

    def remove_waiter(self, event_type: str, execution: RunExecution, wants: Wants) -> None:
        self.event_waits.remove(event_type, execution, wants)

    def add_run_waiter(self, run_id: str, execution: RunExecution) -> None:
        self._run_waiters.setdefault(run_id, set()).add(execution)

    def remove_run_waiter(self, run_id: str, execution: RunExecution) -> None:
        group = self._run_waiters.get(run_id)
        if group is not None:
            group.discard(execution)
            if not group:
                del self._run_waiters[run_id]

    def events_appended(self, events: Sequence[Event[Any]]) -> None:
        """Wake the waits of this process that may match ``events``, and look at once
        for the parked waits they may match."""
        self.event_waits.wake_for(events)
        hot = self.hot
        if hot.waited and any(hot.wanted(ev.type) for ev in events):
            self.look_for_parked()

    def look_for_parked(self) -> None:
        """Have the watch loop look for the events parked runs wait for now, or right
        after the look under way (docs/performance.md, "A million parked runs")."""
        if self._loops:  # (serving)
            self._watch_now.set()
            self._watch_wakeup.set()

    async def declare_wait(self, workflow: str, event_type: str) -> None:
        """Record that ``workflow`` waits for ``event_type`` (so it is not an orphan)."""
        if (workflow, event_type) in self._declared_waits:
            return
        await self.store.declare(self.app, [Declaration("wait", workflow, event_type)])
        # Only once stored: a declaration the store failed is made again by the next
        # wait (the run's, resumed from its history after the outage).
        self._declared_waits.add((workflow, event_type))
        if self.waits_reached is not None:
            try:
                await self.waits_reached([event_type])
            except Exception as exc:  # the wait still sees events stored by other means
                log.warning("keeping events from outside of type %s for waits failed: %s",
                            event_type, reason(exc))
