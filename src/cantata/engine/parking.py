"""Parked runs cost no memory (docs/architecture.md, parking).

A run that waits in ``ctx.sleep``, ``ctx.wait_for_event``, ``ctx.call`` or a step's
retry backoff longer than ``App(park_after=...)`` seconds, or that falls out of the
hot cache of ``App(hot_runs=...)`` waiting runs, is evicted: its pending checkpoint
is committed, the run is released in the store with what wakes it (:class:`Parking`),
and its execution ends. It is then an unowned run that no claim takes until it is due
(its timer, the wait's timeout or the run's deadline), woken (a matching event, the
end of the child it waits for) or cancelled; then any worker serving its workflow
claims it and replays its history, the path crash recovery takes (docs/leases.md).

The wake-ups, and why none is lost:

- a timer: ``Store.claim_runs(now=...)`` takes due runs; each worker's claim loop
  sleeps until the next ``wake_at`` (``Store.next_wake``).
- an event: every poll, :func:`wake_for_events` reads the new events of each type
  parked runs wait for (new in the log's order, whatever the writers' clocks) and
  wakes the waits they match (``Store.wake_waiting``); and at once, not at the next
  poll, when an event of such a type (:meth:`HotRuns.wanted`) is committed in this
  process, or another process's event is heard (PostgreSQL): one look at a time, one
  more right after it for what came during it, the woken runs claimed at once. An
  event stored before the run was parked is found by the look made right after the
  park commit (:func:`evict`), which wakes the run again if it matches. One stored
  while no worker looked (every one stopped) is found by the next worker's first
  look, which goes on from where the looks had got to (``Store.waits_looked``).
- a child's end: the child's final checkpoint wakes its parent in the same
  transaction (``RunWrite.wake``); a child that ended before the park is found by
  the same look.
- a cancellation: ``Store.request_cancel`` wakes the run; a park committed after a
  cancel request leaves the run claimable.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cantata.errors import LeaseLost, StoreError
from cantata.model import parking as rules
from cantata.model.event import Event, matches
from cantata.model.parking import FOREVER, Parking
from cantata.model.records import RunWrite
from cantata.quietlog import reason

from .clock import SystemClock
from .signals import _Abandon

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import RunExecution

log = logging.getLogger("cantata.engine")


class Evicted(BaseException):
    """Internal: the run was parked in the store; its execution here ends."""


def parking_for(
    wake_at: float | None, event_type: str | None = None, match: Any = None
) -> Parking:
    """What wakes a run parked in a wait until ``wake_at`` (``None``: no time limit),
    for an event of ``event_type`` matching ``match`` if given. The run's deadline is
    folded in by :func:`with_deadline`."""
    due = FOREVER if wake_at is None else wake_at
    if event_type is None:
        return Parking(due)
    waits_for, wait_match = rules.event_wait(event_type, match)
    return Parking(due, waits_for, wait_match)


def with_deadline(parking: Parking, deadline_at: float | None) -> Parking:
    """``parking`` due at the latest at the run's deadline (which interrupts it)."""
    if deadline_at is None or deadline_at >= parking.wake_at:
        return parking
    return Parking(deadline_at, parking.waits_for, parking.wait_match)


class HotRuns:
    """Which waiting executions stay in memory: the ``hot_runs`` most recently parked
    in a wait, each for at most ``park_after`` seconds."""

    def __init__(self, engine: Engine, park_after: float | None, hot_runs: int) -> None:
        self.engine = engine
        self.park_after = park_after
        self.hot_runs = hot_runs
        # A clock that skips time (cantata.testing) only moves for waits in memory.
        self.enabled = park_after is not None and isinstance(engine.clock, SystemClock)
        self._idle: dict[str, RunExecution] = {}  # insertion order: oldest first
        # Wall time of the last look for parked waits' events (before the first: this
        # worker's start, unless the store's mark is earlier; wake_for_events).
        self.checked_at = time.time()
        self.position: int | None = None  # where the log ended when that look began
        self._marked: int | None = None  # the position last marked in the store
        self._marked_at = 0.0  # (monotonic) when
        # event type -> {id: when first seen} of the events the last looks saw
        self.seen: dict[str, dict[str, float]] = {}
        # The event types (or patterns) parked runs wait for, as far as this worker
        # knows: the last look's parked waits, and the runs it parked since. An event
        # of such a type committed here makes the watch loop look at once (wanted).
        self.waited: set[str] = set()
        self._parked_since: set[str] | None = None  # types parked here during a look

    async def begin(self) -> None:
        """Where this worker's first look goes on from: the store's mark of where the
        looks had got to (``Store.waits_looked``). In a store no worker has marked, the
        log's end now, marked at once: a worker that parks runs and stops before its
        first look leaves the next one a place to go on from. The watch loop calls it
        as it starts; the first look does, if that failed."""
        engine = self.engine
        store, app = engine.store, engine.app
        mark = await store.waits_looked(app)
        if mark is None:
            at = time.time()
            reached = await store.log_position(app)
            await store.mark_waits_looked(app, reached, at)
            mark = await store.waits_looked(app)  # (a peer's, if it marked further first)
            if mark is None:
                mark = (reached, at)
        self.position, self.checked_at = mark[0], min(mark[1], self.checked_at)

    async def mark(self, position: int, at: float) -> None:
        """Mark in the store where the looks have got to (``Store.mark_waits_looked``),
        at most once a poll interval, and a second (a write of the store's: workers
        that poll every 20 ms would write 50 a second each): a worker that starts
        later goes on from there, reading again what the looks since read. Failing,
        it says so once and marks again at the next look."""
        engine = self.engine
        tick = time.monotonic()
        if (self._marked is not None and position <= self._marked) or (
            tick - self._marked_at < max(engine.poll_interval, 1.0)
        ):
            return
        try:
            await engine.store.mark_waits_looked(engine.app, position, at)
        except StoreError as exc:
            engine.quiet.warning("wait-looks", "could not mark where the looks for parked "
                                 "waits' events got to (%s); marking again at the next "
                                 "look", reason(exc))
            return
        self._marked, self._marked_at = position, tick

    def reading(self) -> None:
        """A look begins to read the parked waits: note the runs parked from now on."""
        self._parked_since = set()

    def read(self, event_types: set[str] | None) -> None:
        """The look read that parked runs wait for ``event_types`` (``None``: it
        failed); those parked here since it began to read wait too."""
        if event_types is not None and self._parked_since is not None:
            self.waited = event_types | self._parked_since
        self._parked_since = None

    def parked(self, waits_for: str) -> None:
        """A run was parked here in an event wait ``waits_for``."""
        event_type, _ = rules.split_waits_for(waits_for)
        self.waited.add(event_type)
        if self._parked_since is not None:
            self._parked_since.add(event_type)

    def wanted(self, event_type: str) -> bool:
        """Whether a parked run may wait for an event of ``event_type``."""
        waited = self.waited
        if not waited:
            return False
        if event_type in waited:
            return True
        return any("*" in t and matches(t, event_type) for t in waited)

    def enter(self, x: RunExecution) -> None:
        """``x`` waits in a wait it may be evicted from."""
        idle = self._idle
        idle.pop(x.run.run_id, None)
        idle[x.run.run_id] = x
        while len(idle) > self.hot_runs:
            oldest = next(iter(idle))
            cold = idle.pop(oldest)
            cold.evict_now = True
            cold.wakeup.set()

    def leave(self, x: RunExecution) -> None:
        if self._idle.get(x.run.run_id) is x:
            del self._idle[x.run.run_id]

    def __len__(self) -> int:
        return len(self._idle)


def can_evict(x: RunExecution) -> bool:
    """Only a run whose one activity is this wait: no step running, nothing held.

    Not a run cleaning up after a cancel (engine/cleanup.py): the store hands a parked
    run whose cancel is requested back at once, so it would be replayed again and
    again, and the end of its cleanup window, kept by a timer in memory, never come.
    The window bounds how long it stays in memory.
    """
    return (
        x.waiting == 1 and not x.bodies and not x.inflight and not x.compensating
        and x.stored and not x.engine.draining and not x.interrupt.done()
        and x.engine.serving and not x.run.status.is_final and not x.api.cancel_delivered
    )


async def evict(
    x: RunExecution, parking: Parking, wake: Callable[[], Awaitable[bool]] | None
) -> None:
    """Park ``x``'s run in the store and end its execution (raises :class:`Evicted`).

    Returns (the run stays in memory) when it cannot be parked now.
    """
    engine, run = x.engine, x.run
    if x.pending or x.pending_attempts or x.pending_status is not None:
        await x.commit(RunWrite())  # what ctx.now() and friends recorded
    async with x.commit_lock:
        if x.pending or x.pending_attempts or not can_evict(x):
            return
        x.evicting = True
        try:
            await engine.store.park_run(run.app, run.run_id, run.fence, parking)
        except LeaseLost:
            raise _Abandon() from None
        except StoreError as exc:
            x.evicting = False
            engine.quiet.warning("park", "run %s: could not park it (%s); it stays in memory",
                                 run.run_id, reason(exc))
            return
        x.evicted = True
    if parking.waits_for is not None:
        engine.hot.parked(parking.waits_for)
    # What arrived before the park commit: the look the wait would have made.
    try:
        if wake is not None and await wake():
            await engine.store.wake_runs(run.app, [run.run_id])
    except Exception as exc:  # be safe: wake it, it looks again when claimed
        log.warning("run %s: the look after parking it failed (%s); waking it",
                    run.run_id, reason(exc))
        try:
            await engine.store.wake_runs(run.app, [run.run_id])
        except Exception:
            log.warning("run %s: could not wake it; it wakes at its due time", run.run_id)
    engine.metrics.parked += 1
    # Its wake time may come before the one the claim loop sleeps until: it looks again
    # (no notification tells of a park, docs/performance.md, "Idle workers").
    engine.ownership.claim_wakeup.set()
    raise Evicted()


#: The events of a type one read of a look for parked waits' events takes at most.
LOOK_PAGE = 1000


async def _wake_for(engine: Engine, kinds: list[str], events: list[Event[Any]]) -> int:
    """Wake the parked waits of ``kinds`` (one event type's) that ``events`` match."""
    datas = [e.data for e in events if engine.signer.accepts(e)]
    woken = 0
    if datas:
        for waits_for in kinds:
            _, keys = rules.split_waits_for(waits_for)
            found = rules.candidates(keys, datas)
            if found:
                woken += await engine.store.wake_waiting(engine.app, waits_for, found)
    return woken


async def wake_for_events(engine: Engine, reached: int | None = None) -> int:
    """Wake the parked waits that the events stored since the last look match; returns
    how many runs it woke.

    "Since" is the log's own order: what was stored after the log position read as
    the last look began, whatever the clocks of the processes that wrote it (each
    stamps ``stored_at`` with its own: one whose clock is behind this worker's stores
    events "older" than this worker's last look). The look also takes what was stored
    in the last second by this worker's clock (a write under way as the position was
    read may come before it in the log); the ids the looks of that second saw are
    left out, so that looks made one right after another (the watch loop looks at
    once for an event committed here) read each event once.

    A worker's first look goes on from where the looks of every worker of the app had
    got to (``Store.waits_looked``, marked at most once a poll interval or a second),
    or, in a store no look has marked yet, from this worker's start: an event stored
    while no worker looked (all of them stopped) or in a new worker's first poll
    interval wakes the waits it matches all the same (:meth:`HotRuns.begin`). A look
    that fails moves nothing on: the next one reads what it would have read.
    """
    hot, store, app = engine.hot, engine.store, engine.app
    now = time.time()
    if hot.position is None:
        await hot.begin()
    since = hot.checked_at - 1.0  # margin: late commits
    position = hot.position
    if reached is None:  # (the log position before the look: the watch loop's)
        reached = await store.log_position(app)
    hot.reading()
    waits: list[str] | None = None
    try:
        waits = await store.parked_waits(app)
    finally:
        hot.read(None if waits is None else {rules.split_waits_for(w)[0] for w in waits})
    by_type: dict[str, list[str]] = {}
    for waits_for in waits:
        event_type, _ = rules.split_waits_for(waits_for)
        by_type.setdefault(event_type, []).append(waits_for)
    woken = 0
    seen_now: dict[str, dict[str, float]] = {}
    for event_type, kinds in by_type.items():
        seen = hot.seen.get(event_type, {})
        # What the next look could read again (stored from ``now`` less a second on):
        # what this one read, and what earlier ones first saw from 1.5 s ago on (half a
        # second more for the commits that ended as a look read, and writers whose
        # clocks are ahead; one left out earlier is read again, as every look once read
        # again what the one before it saw). Reading one again only wakes its runs
        # again, which are awake already.
        kept = {i: at for i, at in seen.items() if at >= now - 1.5}
        events = await store.find_events(
            app, event_type, since=since, exclude=sorted(seen), limit=LOOK_PAGE,
            position=position,
        )
        while True:  # all of them, a page at a time: one not read now would be behind
            # the next look (a first look after a long stop reads a backlog)
            woken += await _wake_for(engine, kinds, events)
            if len(kept) < LOOK_PAGE:
                kept.update((e.id, now) for e in events)
            if len(events) < LOOK_PAGE:
                break
            # The next page: after the last event read, in the log's order (a range of
            # the log, whatever the clocks: find_events' ``after``).
            last = events[-1].id
            events = await store.find_events(
                app, event_type, since=float("inf"), exclude=[], limit=LOOK_PAGE,
                after=last,
            )
            if not events and await store.get_event(app, last) is None:
                # That event was deleted meanwhile (retention), and what follows it
                # cannot be found by it: read all of them again, at once (what was
                # read already wakes nothing more).
                limit = LOOK_PAGE * 4
                while True:
                    events = await store.find_events(
                        app, event_type, since=since, exclude=[], limit=limit,
                        position=position,
                    )
                    if len(events) < limit:
                        break
                    limit *= 4
                woken += await _wake_for(engine, kinds, events)
                break
        seen_now[event_type] = kept
    # Done: the next look goes on from here.
    hot.seen = seen_now
    hot.checked_at, hot.position = now, reached
    await hot.mark(reached, now)
    return woken
