"""Queues, engine side: where a started run waits, and the loop that lets runs begin.

The limits are enforced by the store (:meth:`~cantata.store.roles.flow.FlowStore.
claim_queued_runs`); this loop only asks it, for every queue, to admit what fits,
whenever a run ended or was queued (a store notification), when a rate window
frees a begin, and every few poll intervals. See docs/flow-control.md.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import TYPE_CHECKING

from cantata.declare.records import declared_queues
from cantata.engine.versioning import queue_checked, queue_versions, saga_workflows
from cantata.errors import ConfigurationError, QueueDeadlock, UnknownQueue
from cantata.model.checks import check_key
from cantata.model.event import MAX_ATTRIBUTE
from cantata.model.flow import QueueEntry, QueueSpec, make_spec  # noqa: F401 (make_spec re-exported)
from cantata.quietlog import QuietLog, outage_interval, reason
from cantata.store.roles.lifecycle import idle_wait

if TYPE_CHECKING:
    from cantata.engine.engine import Engine

log = logging.getLogger("cantata.queues")

CLAIM_LIMIT = 50  # runs one claim admits at most
#: Seconds of the app's clock between two prunings of the rows of ended runs
#: (``queue_runs``), once those rows have left every window they count in.
PRUNE_EVERY = 60.0
#: Rows one pruning deletes from one queue at most (one short write); after a full
#: batch, the next pass of the loop prunes again.
PRUNE_BATCH = 1000


async def entry_for(
    engine: Engine,
    workflow: str,
    queue: str | None,
    priority: object,
    partition: object,
) -> QueueEntry | None:
    """Where a new run of ``workflow`` waits (``None``: it begins at once).

    ``queue`` defaults to the workflow's ``@app.workflow(queue=...)``: where this
    process does not have the workflow's code, as the code that declared it recorded it
    (:func:`declared_queue`).

    Raises:
        UnknownQueue: no process of the app declared the queue.
        ConfigurationError: ``priority`` is not an int or ``partition`` not a string
            of 1-500 characters, or either is given without a queue.
    """
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigurationError(f"priority must be an integer, got {priority!r}")
    if not -(2**63) <= priority < 2**63:  # the stores keep it as a signed 64-bit integer
        raise ConfigurationError(
            f"priority={priority!r} is out of range: use an integer from -2**63 to 2**63-1"
        )
    # (bounded as an event's attributes: the store indexes it with the queue)
    check_key("partition", partition, "the key the queue's limits apply per (e.g. a "
              "customer id), or None", empty=False, longest=MAX_ATTRIBUTE)
    if queue is None:
        wdef = engine.router.workflows.get(workflow)
        queue = wdef.queue if wdef is not None else await declared_queue(engine, workflow)
    if queue is None:
        if priority != 0 or partition is not None:
            raise ConfigurationError(
                f"priority={priority!r} / partition={partition!r} need a queue: pass queue=NAME"
            )
        return None
    if not isinstance(queue, str):
        raise UnknownQueue(f"queue must be a queue's name, got {queue!r}")
    if queue not in engine.router.queues:
        known = {q.name for q in await engine.store.queues(engine.app)}
        if queue not in known:
            raise UnknownQueue(
                f"no queue named {queue!r} in app {engine.app!r} (known: "
                f"{', '.join(sorted(known)) or 'none'}); declare it with app.queue({queue!r})"
            )
    return QueueEntry(queue, "" if partition is None else str(partition), priority)


async def default_entry(engine: Engine, workflow: str) -> QueueEntry | None:
    """Where a run of ``workflow`` started by Cantata itself waits (a trigger's run, a
    child, a schedule's tick): the workflow's own queue, default partition and
    priority; ``None`` when it has none."""
    wdef = engine.router.workflows.get(workflow)
    if wdef is not None and wdef.queue is None:
        return None  # (the common case, without entry_for's checks)
    return await entry_for(engine, workflow, None, 0, None)


async def check_call(
    engine: Engine, parent: str, parent_workflow: str, child: str, entry: QueueEntry
) -> None:
    """Refuse a ``ctx.call`` whose child could never begin: it would wait in the
    partition of a queue of concurrency 1 whose slot its parent, waiting for it, holds.

    Raises:
        QueueDeadlock: naming the queue, the two workflows and what to do instead.
    """
    held = await engine.store.run_queue(engine.app, parent)
    if held is None or (held.queue, held.partition) != (entry.queue, entry.partition):
        return
    spec = engine.router.queues.get(entry.queue)
    if spec is None:
        spec = next((q for q in await engine.store.queues(engine.app)
                     if q.name == entry.queue), None)
    if spec is None or spec.concurrency != 1:
        return
    part = f" (partition {entry.partition!r})" if entry.partition else ""
    raise QueueDeadlock(
        f"run {parent} of workflow {parent_workflow!r} holds the one slot of queue "
        f"{entry.queue!r}{part} (concurrency=1), and ctx.call({child!r}) would wait for a "
        f"child that waits in that queue behind it: the child could never begin. Start it "
        "with ctx.start_child (the parent does not wait), give one of the two workflows "
        "another queue (or none), or raise the queue's concurrency"
    )


#: Seconds a process keeps the queues it read from the declarations before it reads
#: them again: a start by name follows a deploy that changed a workflow's queue.
DECLARED_TTL = 5.0


class DeclaredQueues:
    """The queues of the workflows whose code this process does not have, as the
    processes with the code declared them (``cantata.declare.records``), read at most
    every :data:`DECLARED_TTL` seconds."""

    def __init__(self) -> None:
        self.read_at = -math.inf
        self.queues: dict[str, str | None] = {}
        self.warned: set[str] = set()  # workflows whose unknown queue was warned about

    async def of(self, engine: Engine, workflow: str) -> str | None:
        """The queue of ``workflow`` (``None``: none, or none recorded)."""
        now = time.monotonic()
        if now - self.read_at > DECLARED_TTL or workflow not in self.queues:
            self.queues = declared_queues(await engine.store.declarations(engine.app))
            self.read_at = now
        if workflow not in self.queues:
            return None  # not declared: the caller tells (UnknownWorkflow)
        queue = self.queues[workflow]
        if queue is None:
            await self._not_recorded(engine, workflow)
        return queue or None

    async def _not_recorded(self, engine: Engine, workflow: str) -> None:
        """Warn (once per workflow) that a run of ``workflow`` may skip its queue: the
        code that declared it did not record one, and the app has queues."""
        if workflow in self.warned:
            return
        known = sorted(q.name for q in await engine.store.queues(engine.app))
        if not known:
            return  # no queue to skip
        self.warned.add(workflow)
        log.warning(
            "workflow %r is started by name without its code here, and the code that "
            "declared it does not record its queue (an older Cantata version); app %r has "
            "queues: %s. The run begins outside any queue: to keep a queue's limits, start "
            "it from a process with the workflow's code, pass queue=NAME to app.start, or "
            "open the app's workers on this version (their declarations record it)",
            workflow, engine.app, ", ".join(known),
        )


async def declared_queue(engine: Engine, workflow: str) -> str | None:
    """The queue of ``workflow``, whose code this process does not have, as the code
    that declared it recorded it (``None``: none; warned about when not recorded)."""
    if engine.declared_queues is None:
        engine.declared_queues = DeclaredQueues()
    return await engine.declared_queues.of(engine, workflow)


class QueueLoop:
    """Lets waiting runs of the workflows this worker serves begin, queue by queue."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.wakeup = asyncio.Event()  # a run ended or was queued somewhere
        self.queued = asyncio.Event()  # a run was queued by this process
        self._queued_here = False  # ...since the last claim (queued, cleared each pass)
        self._waiting = True  # some run waits behind a limit (so a run's end matters)
        self._queues: list[str] = []
        self._specs: list[QueueSpec] = []
        self._listed_at: float | None = None
        self._list_every = 0.0  # seconds the list is kept while the store listens
        self._heard = False  # the pass was woken by a change heard (or a run queued)
        self._in_doubt = False  # the last pass was skipped: this worker's hold is in doubt
        self._pruned_at: float | None = None  # (the app's clock)
        # a store outage fails every claim: one line per max(10 s, lease), docs/leases.md
        self.quiet = QuietLog(log, every=outage_interval(engine.lease))

    async def run(self) -> None:
        engine = self.engine
        while True:
            self._heard = self.wakeup.is_set()
            self.wakeup.clear()
            self._queued_here = self._queued_here or self.queued.is_set()
            self.queued.clear()
            retry_at = None
            try:
                retry_at = await self.claim_all()
            except Exception as exc:
                self.quiet.warning("claim", "claiming queued runs failed (%s); retrying",
                                   reason(exc))
                # not again at every notification: the store is failing; the next
                # claim lists the queues again (so its success means the store answers)
                self._listed_at = None
                await asyncio.sleep(engine.poll_interval * 5)
                continue
            if self._in_doubt:
                # Skipped while the heartbeat is late: looked at again every poll interval
                # until it gets through, with what woke this pass still to be claimed. Not
                # the safety net's wait: the news of runs queued meanwhile was spent here.
                if self._heard:
                    self.wakeup.set()
                await asyncio.sleep(engine.poll_interval)
                continue
            if self._listed_at is not None:  # (the store answered: not a claim skipped)
                self.quiet.recovered("claim", "claiming queued runs works again")
            try:
                await self.prune()
            except Exception as exc:
                self._pruned_at = engine.clock.now()  # (not again at every pass)
                self.quiet.warning("prune", "pruning the rows of ended queued runs failed "
                                   "(%s); trying again later", reason(exc))
            if self._waiting:
                wait, timed = idle_wait(engine.store, engine.poll_interval * 5), False
                if retry_at is not None and retry_at - engine.clock.now() < wait:
                    wait, timed = max(retry_at - engine.clock.now(), 0.005), True
                await self._wait(wait, self.wakeup, timed)
            elif getattr(engine.store, "listening", False):
                # Nothing waits, and the store hears other processes: a run queued
                # anywhere wakes the loop (``runs``), at most once a poll interval (the
                # end of a run frees nothing anyone waits for, and a busy store says
                # ``runs`` at every one); a run queued here at once.
                passed = time.monotonic()
                await self._wait(idle_wait(engine.store, engine.poll_interval), self.wakeup)
                if not self.queued.is_set():
                    await self._wait(
                        max(0.0, passed + engine.poll_interval - time.monotonic()),
                        self.queued,
                    )
            else:
                # Nothing waits: the end of a run frees nothing anyone waits for, so only
                # a run queued here wakes the loop, and runs queued by other processes
                # are looked for every poll interval.
                await self._wait(engine.poll_interval, self.queued)

    async def _wait(self, seconds: float, event: asyncio.Event, timed: bool = False) -> None:
        # Polling for other processes' changes waits in real time; only a rate limit's
        # next free begin (``timed``) is a time of the app's clock (which tests skip).
        sleeper = asyncio.ensure_future(
            self.engine.clock.sleep(seconds) if timed else asyncio.sleep(seconds)
        )
        waiter = asyncio.ensure_future(event.wait())
        try:
            await asyncio.wait([sleeper, waiter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeper.cancel()
            waiter.cancel()
        if event.is_set():  # let a burst of notifications coalesce
            await asyncio.sleep(min(0.02, self.engine.poll_interval))

    async def claim_all(self) -> float | None:
        """One claim per queue; returns when a rate limit lets the next run begin."""
        engine = self.engine
        ownership = getattr(engine, "ownership", None)
        self._in_doubt = ownership is not None and ownership.expired()
        if self._in_doubt:
            return None  # this worker's hold is in doubt: it takes on nothing new
        now = engine.clock.now()
        # Listed again every few poll intervals (queues other processes declared), or
        # at once when this process queued a run (its queue may be new to this list).
        # An app without queues is not asked every pass.
        # While the store hears other processes, listed again only when one changed a
        # run (it may have queued it in a queue new to this list) or after the safety
        # net's wait (idle_wait: a queue declared elsewhere, no run queued in it yet).
        every = engine.poll_interval * 5
        age = math.inf if self._listed_at is None else now - self._listed_at
        if getattr(engine.store, "listening", False) and not self._heard:
            every = max(every, self._list_every)
        if age > every or (not self._queues and self._queued_here):
            self._specs = await engine.store.queues(engine.app)
            self._queues = [q.name for q in self._specs]
            self._listed_at = now
            self._list_every = idle_wait(engine.store, engine.poll_interval * 5)
        self._queued_here = False
        workflows = engine.served_workflows()
        retry_at: float | None = None
        self._waiting = False
        # Runs of newer code that has served wait for its workers (docs/operating.md).
        newer, known = await queue_versions(engine) if self._queues else ([], None)
        # and queued runs with history of other versions begin only once checked
        checked = await queue_checked(engine, workflows) if self._queues and workflows \
            else None
        sagas = saga_workflows(engine)
        engine.queue_held = False
        for name in self._queues:
            while True:
                # App(max_runs=...): no more than the worker's room. Held back by it
                # (full, or a claim as full as its room), the loop waits for a run here
                # to end or wait (Engine.slot_freed), as for any run's end (run).
                limit = engine.claim_limit(CLAIM_LIMIT)
                if not limit:
                    engine.queue_held = self._waiting = True
                    return retry_at
                # (the room kept until the runs it takes are launched: Engine.claiming_up_to)
                with engine.claiming_up_to(limit):
                    claim = await engine.store.claim_queued_runs(
                        engine.app, engine.worker_id, name, workflows,
                        now=engine.clock.now(), limit=limit, exclude_versions=newer,
                        only_versions=known,
                        pin_version=engine.version,  # the code that begins it (versioning.claim)
                        keep_versions_of=sagas,  # but a saga's run keeps its version (the same)
                        replay_checked=checked,
                    )
                    for run in claim.runs:
                        # A run started here never began: no history to load. A retried run
                        # (epoch > 0) or a fork (caused by its source run) has one.
                        engine.launch(run, fresh=run.epoch == 0 and run.causation_id is None)
                self._waiting = self._waiting or claim.waiting
                if claim.retry_at is not None:
                    retry_at = claim.retry_at if retry_at is None else min(retry_at,
                                                                           claim.retry_at)
                if limit < CLAIM_LIMIT and len(claim.runs) == limit:
                    engine.queue_held = self._waiting = True
                if len(claim.runs) < limit:
                    break
        return retry_at

    async def prune(self) -> None:
        """Every :data:`PRUNE_EVERY` seconds, delete the queues' rows that can no longer
        matter (``Store.prune_queue_runs``): of ended runs, begun before the longest
        window their begins count in (the rate's, the stats'), less a lease for the
        workers' clocks, which may differ by that much (docs/leases.md). At most
        :data:`PRUNE_BATCH` rows per queue and pass: a queue that had more is pruned
        again at the next pass."""
        engine = self.engine
        now = engine.clock.now()
        if self._pruned_at is not None and now - self._pruned_at < PRUNE_EVERY:
            return
        more = False
        for spec in self._specs:
            before = now - spec.stats_window - engine.lease
            gone = await engine.store.prune_queue_runs(
                engine.app, spec.name, before=before, limit=PRUNE_BATCH
            )
            more = more or gone >= PRUNE_BATCH
        if not more:
            self._pruned_at = now
