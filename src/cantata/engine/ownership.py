"""A worker's hold on its runs: heartbeats, self-fencing, careful takeovers, repair.

The rules, with the reasons (docs/leases.md):

- A worker holds its runs while its heartbeat is younger than its own lease (recorded
  with the heartbeat: workers with other leases judge it by this one); each claim
  of a run increments the run's fence, and every checkpoint is written only if its
  fence still holds (a worker that lost a run cannot commit anything for it).
- A worker that could not heartbeat for ``FENCE_AT`` of the lease (cut off from the
  store) stops its step bodies before another worker may take the runs over, so two
  live workers never run one step at once. Its executions keep their state and wait;
  once the store answers, each stopped attempt starts again (not counted) if a fenced
  checkpoint proves the run is still its own.
- A worker judges its own hold by two clocks: monotonic time (which keeps counting
  through SIGSTOP) and the wall clock its heartbeats are stamped with, which the store
  and the other workers judge it by (a paused VM's monotonic clock stands still while
  its wall clock jumps ahead when it resumes). Its hold may have lapsed once either
  says more than ``FENCE_AT`` of the lease has passed since its last heartbeat.
- A worker that was paused (SIGSTOP, a VM stall: its own loop woke far too late, or
  its wall clock ran far ahead of its monotonic clock) past the fence holds its step
  bodies and begins no handler body, nor goes on with one begun before the pause,
  until the heartbeat it sends at once answers: if the store found its expiry not
  passed at that renewal (by the store's own clock too) and the answer came within
  the lease of its last heartbeat before the pause, its hold never lapsed and they
  go on (but the handlers of NATS messages, which NATS may have delivered again:
  pauses.handler_fence); otherwise they are stopped (:meth:`Ownership.pause_verdict`).
  It then checks
  which runs it still owns, and stops the executions of the others. While the store
  is away (its heartbeat failing), only a stall past the fence in one go is such a
  pause (:meth:`Ownership.pause_bar`): the outage put
  the hold in doubt already, and its rules hold.
- A worker whose heartbeat lapsed takes no other worker's runs for one lease after
  it reaches the store again: in a store outage every worker lapsed at once, and the
  live ones need that long to heartbeat again. Only a worker that stays silent is
  dead, so a store outage moves no run between live workers.
- Every lease, and after any doubt (a claim whose answer was lost, a run let go), a
  worker reconciles with the store: a run it owns but does not execute is resumed
  (so no run is stranded under a live owner); an execution of a run it no longer
  owns is stopped.
- A heartbeat that finds the store migrated by a newer Cantata (``StoreUpgraded``)
  stops the claims; the worker's process stops gracefully (``Engine.store_upgraded``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from cantata.cancel_safe import wait_event
from cantata.errors import StoreUpgraded
from cantata.fencing import pause_clock
from cantata.model.records import Attempt, HistoryEntry, RunRecord
from cantata.quietlog import QuietLog, outage_interval, reason
from cantata.store.roles.lifecycle import idle_wait

from . import gate, versioning
from .clock import wall_time

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("cantata.worker")

FENCE_AT = 0.75  # of the lease: silent this long, a worker stops its own executions
CLAIM_BATCH = 100  # runs one claim takes at most


class Ownership:
    """Heartbeat, claim and reconcile loops of one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.quiet = QuietLog(log, every=outage_interval(engine.lease))
        self._wall = wall_time(engine.clock)
        # When the last successful heartbeat was sent: monotonic, and by the wall clock
        # the store judges it by (the same reading, as near as two clocks can be read)
        self.beat_at = time.monotonic()
        self.beat_wall = self._wall()
        # Pauses of the whole process past the fence noticed so far whose hold may have
        # lapsed (not proven held, see pause_verdict): a handler begun before one is not
        # resumed after it (pauses.handler_fence), even once the heartbeat got through.
        self.pauses = 0
        # Pauses of the whole process past the fence noticed so far, proven harmless
        # later or not: a handler of a delivery its lease alone does not hold (a NATS
        # message) is not resumed after one (pauses.handler_fence).
        self.noticed = 0
        # The verdict on the pause noticed last, until the heartbeat sent after it tells
        # whether the hold never lapsed (pause_verdict); and beat_at, beat_wall then
        self._verdict: asyncio.Future[bool] | None = None
        self._anchor = (0.0, 0.0)
        self._noticed_at = float("nan")  # beat_wall when the last pause was noticed
        self._pause_seen = False  # the heartbeat loop reconciles after its next beat
        self._beat_now = asyncio.Event()  # a pause was noticed: heartbeat at once
        self.regained_at = float("-inf")  # when the store answered after a lapse
        self.lapsed = False
        # The last heartbeat tried failed (the store is away): a stall is a pause only
        # past the fence then (pause_bar)
        self.store_away = False
        self._healthy = asyncio.Event()  # cleared while lapsed
        self._healthy.set()
        self._beaten = asyncio.Event()  # set by every heartbeat that gets through
        self.claim_wakeup = asyncio.Event()
        # Runs this worker woke are claimable: claim at once, not after the pause in
        # which a burst of notifications gathers (see claim_now)
        self._claim_now = asyncio.Event()
        self._repair_wakeup = asyncio.Event()
        self._heartbeat: asyncio.Task[None] | None = None
        self._loops: list[asyncio.Task[Any]] = []
        self._watchdog: asyncio.TimerHandle | None = None
        self._watch_every = 0.05
        self._watch_due = 0.0
        self._watch_wall_due = 0.0
        # Other parts of this worker that own work on its row (the choreography
        # consumer's deliveries): while any holds it, a stop keeps the heartbeat going.
        self._holds = 0
        self._stopped = False
        # While the store hears other processes (idle_wait): when the earliest expiry of
        # another worker comes (the app's clock; None: not known), see _expiry_loop.
        self.next_expiry: float | None = None
        self._gate_beats = 0  # heartbeats until the gate is looked at again (gate.look)

    # -- state ----------------------------------------------------------------------------

    def expired(self) -> bool:
        """True when this worker may have lost its runs (no heartbeat for a while):
        more than ``FENCE_AT`` of the lease since the last heartbeat that got through,
        by monotonic time or by the wall clock (a VM paused: its monotonic clock stood
        still). A wall clock set back makes it no later than monotonic time says."""
        fence = self.engine.lease * FENCE_AT
        return (time.monotonic() - self.beat_at > fence
                or self._wall() - self.beat_wall > fence)

    def in_doubt(self) -> bool:
        """True when a body must not go on: this worker heartbeats (it serves, or it
        drains in a graceful stop) and its hold may have lapsed (:meth:`expired`)."""
        if self._heartbeat is None:
            return False
        # (expired(), inline: every resumption of every step's body asks this)
        fence = self.engine.lease * FENCE_AT
        return (time.monotonic() - self.beat_at > fence
                or self._wall() - self.beat_wall > fence)

    def step_fenced(self) -> bool | asyncio.Future[bool]:
        """The guard of step bodies (:class:`~cantata.fencing.InlineBody`): true when a
        body must not go on, :meth:`in_doubt`; but while a pause of the whole process
        past the fence awaits its verdict (:meth:`pause_verdict`), that verdict: the
        body is held until it comes, goes on if the hold never lapsed, and is stopped
        otherwise (:meth:`_judge` stops every step body then, ``Engine.fence_self``)."""
        if self._heartbeat is None or not self.expired():
            return False
        verdict = self._verdict
        if verdict is None and self.process_paused():
            verdict = self.pause_verdict()
        return True if verdict is None else verdict

    def process_paused(self) -> bool:
        """True when the whole process stood still for :meth:`pause_bar` or more since
        the last heartbeat that got through (in one stall while the store is away), not
        only its event loop (held by a body's own code) nor its store (an outage): the
        pause clock's thread stood still too (SIGSTOP, CPU starvation), or the wall
        clock ran ahead of monotonic time (a paused VM, whose monotonic clock stood
        still; a wall clock set ahead looks the same)."""
        return self.stood_still() >= self.pause_bar()

    def stood_still(self) -> float:
        """How long the whole process stood still since the last heartbeat that got
        through, as :meth:`process_paused` judges it: the wall clock's lead over the
        monotonic one, or the pause clock's stalls (summed; the longest one alone
        while the store is away)."""
        # The wall clock first: a reader held between the two readings (its thread
        # preempted) then reads monotonic time later, and the hold makes the lead
        # smaller, not larger; read the other way round, it looked like a paused VM
        # for that one reading (a handler's guard stopped its body on it).
        wall = self._wall()
        now = time.monotonic()
        ahead = (wall - self.beat_wall) - (now - self.beat_at)
        if self.store_away:
            return max(ahead, pause_clock().longest(self.beat_at, now))
        return max(ahead, pause_clock().stood_still(self.beat_at, now))

    def pause_bar(self) -> float:
        """How long the whole process must have stood still to be taken for paused past
        its fence. While its heartbeats get through, a quarter lease: the last one may
        be a quarter lease old, and such a stall brings the fence near. While the store
        is away (the last heartbeat tried failed), the fence itself, in one stall: the
        hold is in doubt by the outage already, whose rules hold (step bodies stopped,
        handlers run on, docs/leases.md), and a shorter stall lets no other worker in
        that the outage did not: the other workers take over only one lease after
        their own heartbeat got through again, and this one's, tried again every
        quarter lease as the process runs on, gets through before that. (Taken for a
        pause, a 0.8 s stall of a loaded machine after a full disk, lease 2 s, cut the
        handlers running on through the outage, and the worker ran them again.) A stall
        past the fence is a pause as ever: the store may have come back meanwhile."""
        return self.engine.lease * (FENCE_AT if self.store_away else 0.25)

    def pause_verdict(self) -> asyncio.Future[bool] | None:
        """The verdict pending on a pause of the whole process past the fence (noticed
        now if the watchdog has not yet): it comes with the answer of the first
        heartbeat sent after the pause was noticed, ``True`` when that heartbeat proves
        this worker's hold never lapsed (:meth:`_judge`), ``False`` otherwise. ``None``:
        no verdict is pending (none was due, or it came: ``False`` then, while the hold
        is still in doubt). A handler body's guard holds the body until it comes
        (:func:`cantata.engine.pauses.handler_fence`)."""
        if self._verdict is None and self._heartbeat is not None:
            self._paused(self.stood_still())  # (no-op if noticed already)
        return self._verdict

    def _judge(self, verdict: asyncio.Future[bool] | None, held: bool) -> None:
        """Give ``verdict`` (pending on a pause): ``held``, the hold proven never to have
        lapsed, or not; the latter counts the pause in :attr:`pauses` first."""
        if verdict is None or verdict.done():
            return
        if self._verdict is verdict:
            self._verdict = None
        if held:
            log.warning("worker %s: its heartbeat after the pause got through within its "
                        "lease, the store's clock agreeing: its hold never lapsed, and its "
                        "step bodies and the handlers of deliveries its lease alone holds "
                        "go on", self.engine.worker_id)
        else:
            log.warning("worker %s: its hold may have lapsed during the pause (its heartbeat "
                        "after it failed, or came past its lease): stopping its step and "
                        "handler bodies until it knows which runs it still owns",
                        self.engine.worker_id)
            self.pauses += 1
            self.engine.fence_self()
        verdict.set_result(held)

    def _held_since_anchor(self) -> bool:
        """True while less than a lease has passed, by monotonic time and by the wall
        clock, since the last heartbeat that had got through when the pause being
        judged was noticed: the expiry it recorded has not passed here."""
        at, wall = self._anchor
        lease = self.engine.lease
        return time.monotonic() - at <= lease and self._wall() - wall <= lease

    def may_take_over(self) -> bool:
        """True when silent workers' runs may be claimed (see the module docstring)."""
        return (
            not self.lapsed and not self.expired()
            and time.monotonic() - self.regained_at >= self.engine.lease
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self, before_claiming: Callable[[], Awaitable[None]] | None = None) -> None:
        """Heartbeat, then claim. ``before_claiming`` is awaited once the first heartbeat
        is in and the heartbeat goes on, before anything is claimed (an error it raises
        is the start's: the engine's stop ends the heartbeat)."""
        self._stopped = False
        # The hold begins here, not when the engine was made (a client that starts to
        # serve later has not lapsed, nor been paused).
        self.beat_at, self.beat_wall = time.monotonic(), self._wall()
        await self.beat()
        self._watch_every = min(0.05, self.engine.lease / 20)
        self._watchdog = asyncio.get_running_loop().call_later(self._watch_every, self._watch)
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(), name="cantata-heartbeat")
        if before_claiming is not None:
            await before_claiming()
        self._loops = [
            asyncio.create_task(self._claim_loop(), name="cantata-claim"),
            asyncio.create_task(self._repair_loop(), name="cantata-reconcile"),
            asyncio.create_task(self._expiry_loop(), name="cantata-expiries"),
        ]

    async def stop_claiming(self) -> None:
        """Claim and resume nothing more; the heartbeat goes on (a stop is draining)."""
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        self._loops = []

    def hold(self) -> None:
        """Keep this worker's heartbeat going past :meth:`stop` until :meth:`release`:
        the consumer's deliveries are owned through the same worker row, and one
        heartbeat keeps both (docs/architecture.md, docs/leases.md)."""
        self._holds += 1

    async def release(self) -> None:
        """End a :meth:`hold`; after a stop, the last one ends the heartbeat."""
        self._holds -= 1
        if self._holds <= 0 and self._stopped:
            await self._stop_heartbeat()

    async def stop(self) -> None:
        await self.stop_claiming()
        self._stopped = True
        if self._holds <= 0:
            await self._stop_heartbeat()

    async def _stop_heartbeat(self) -> None:
        # The watchdog goes with the heartbeat: while the consumer's handlers drain
        # (hold), a pause still stops them.
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        self._judge(self._verdict, False)  # (no heartbeat is left to give it)

    async def regained(self) -> None:
        """Return once this worker's hold is sure again: its heartbeat gets through
        (at once unless lapsed or paused past the fence)."""
        while True:
            await self._healthy.wait()
            if not self.expired():
                return
            self._beaten.clear()
            await wait_event(self._beaten, self.engine.lease / 4)

    def repair_soon(self) -> None:
        """Reconcile with the store soon (a run was let go, or an answer was lost)."""
        self._repair_wakeup.set()

    # -- heartbeat ------------------------------------------------------------------------

    async def beat(self) -> None:
        engine = self.engine
        sent, wall = time.monotonic(), self._wall()
        if self.expired() and self.process_paused():
            # Paused past the fence (a VM's: its monotonic timers were not late), noticed
            # here before the watchdog could: stop what runs before it may go on. (The
            # stall is logged, not the time since the last heartbeat, which an outage
            # before the stall lengthens.)
            self._paused(self.stood_still())
        # A pause noticed before this heartbeat is sent is judged by its answer: the
        # hold never lapsed if the store found this worker's expiry not passed at the
        # renewal, by its own clock and this one's stamp, and the answer came within the
        # lease of the last heartbeat before the pause, by both clocks here.
        verdict = self._verdict
        try:
            held = await engine.store.heartbeat(
                engine.app, engine.worker_id, engine.clock.now(),
                versioning.worker_info(engine), lease=engine.lease)
        except BaseException:
            self._judge(verdict, False)  # (not known: not proven)
            raise
        self._judge(verdict, held is True and self._held_since_anchor())
        self.store_away = False
        if (self.lapsed or sent - self.beat_at > engine.lease
                or wall - self.beat_wall > engine.lease):
            self.lapsed = False
            self._healthy.set()
            self.regained_at = time.monotonic()
            log.warning(
                "worker %s reaches the store again: resuming the runs it still owns, and "
                "taking over silent workers' runs only after one lease (%.1f s)",
                engine.worker_id, engine.lease,
            )
            self.repair_soon()
        self.beat_at, self.beat_wall = sent, wall
        self._beaten.set()
        self.quiet.recovered("heartbeat", "worker %s: heartbeat works again", engine.worker_id)
        # The gate of the lean writes: on the first heartbeat, then once a lease
        # (engine/gate.py); after the bookkeeping above, so that its read does not
        # hold back the end of a lapse (a worker back from an outage)
        self._gate_beats -= 1
        if self._gate_beats <= 0:
            self._gate_beats = gate.GATE_EVERY
            await gate.look(engine)

    def _watch(self) -> None:
        """A timer every few milliseconds: after a pause of the whole process it is due
        at once, and runs in the loop's first pass, before any task resumes. If the
        hold may have lapsed meanwhile, the step bodies are held (their guards) until
        the heartbeat sent at once judges the pause, and cancelled then unless it proves
        the hold never lapsed (:meth:`_paused`), so a body that was waiting does not go
        on to its side effect in a run another worker may own by now. Each starts again
        only once its fenced start checkpoint proves the run is still this worker's (not
        counted as an attempt).
        A paused VM's monotonic clock stands still, so the timer is not late by it when
        the VM resumes: the wall clock, which jumped ahead, tells (due within one tick;
        until then the bodies' guards stop them, :meth:`expired`)."""
        loop = asyncio.get_running_loop()
        now, wall = loop.time(), self._wall()
        if self._watch_due:
            late = max(now - self._watch_due, wall - self._watch_wall_due)
            if late > self.pause_bar() and self.expired():
                self._paused(late)
        self._watch_due, self._watch_wall_due = now + self._watch_every, wall + self._watch_every
        self._watchdog = loop.call_later(self._watch_every, self._watch)

    def _paused(self, seconds: float) -> None:
        """This worker was paused past the fence (or its wall clock set ahead that far,
        which looks the same): heartbeat at once and then check which runs it still
        owns. Its step bodies, and the handler bodies begun before, are held until that
        heartbeat's answer judges the pause (:meth:`_judge`: stopped unless it proves
        the hold never lapsed). Only the step bodies, stopped at once, when the whole
        process did not stand still (a body held the loop: handlers go on then)."""
        if self.beat_wall == self._noticed_at:
            return  # noticed already, since the same last heartbeat
        self._noticed_at = self.beat_wall
        self._pause_seen = True
        self._beat_now.set()
        if not self.process_paused():
            log.warning("worker %s: its event loop was held for %.1f s (by a step body's "
                        "own code?) and its hold may have lapsed: stopping its step bodies "
                        "until it knows which runs it still owns",
                        self.engine.worker_id, seconds)
            self.engine.fence_self()
            return
        self.noticed += 1
        if self._verdict is None:
            log.warning("worker %s was paused for %.1f s, past 3/4 of its lease (or its wall "
                        "clock was set ahead): holding its step and handler bodies until its "
                        "next heartbeat tells whether its hold lapsed", self.engine.worker_id,
                        seconds)
            # Judged by the next heartbeat (pause_verdict): the step and handler bodies
            # are held by their guards meanwhile, and stopped if it does not prove the
            # hold never lapsed (_judge).
            self._verdict = asyncio.get_running_loop().create_future()
            self._anchor = (self.beat_at, self.beat_wall)

    async def _heartbeat_loop(self) -> None:
        engine = self.engine
        while True:
            due, wall_due = time.monotonic() + engine.lease / 4, self._wall() + engine.lease / 4
            await wait_event(self._beat_now, engine.lease / 4)  # (at once after a pause)
            self._beat_now.clear()
            # Woken far too late (by either clock: a paused VM's monotonic clock stands
            # still), or the watchdog noticed a pause: this process did not run
            # (SIGSTOP, a VM or GC stall), so its runs may belong to another worker.
            late = max(time.monotonic() - due, self._wall() - wall_due)
            stalled = late > engine.lease / 2 or self._pause_seen
            if self.store_away and not self.lapsed and self.expired():
                # Cut off from the store: stop before another worker may take over.
                self.lapsed = True
                self._healthy.clear()
                log.warning(
                    "worker %s could not heartbeat for %.1f s (lease %.1f s): stopping its "
                    "step bodies until the store answers; another worker may take its runs",
                    engine.worker_id, time.monotonic() - self.beat_at, engine.lease,
                )
                engine.fence_self()
            try:
                async with asyncio.timeout(max(engine.lease / 2, 1.0)):
                    try:
                        await self.beat()
                    except StoreUpgraded as exc:
                        # A newer Cantata migrated the store (said once, nothing written):
                        # this worker stops gracefully, and heartbeats on meanwhile.
                        engine.store_upgraded(exc)
                        await self.beat()
            except Exception as exc:
                self.store_away = True
                self.quiet.warning(
                    "heartbeat", "worker %s: heartbeat failed (%s); retrying",
                    engine.worker_id, reason(exc) if str(exc) else "timed out",
                )
                continue
            if stalled:
                self._pause_seen = False
                log.warning("worker %s was paused: checking which runs it still owns",
                            engine.worker_id)
                try:
                    await self.reconcile()
                except Exception as exc:
                    self.quiet.warning("reconcile", "worker %s: checking its runs failed "
                                       "(%s); retrying", engine.worker_id, reason(exc))
                    self.repair_soon()

    # -- claims ---------------------------------------------------------------------------

    async def _claim_loop(self) -> None:
        engine = self.engine
        workflows = engine.served_workflows()
        while True:
            # Cleared before claiming: a notification heard during the claim must not be
            # lost (the next look may be a safety-net wait away, idle_wait)
            self.claim_wakeup.clear()
            self._claim_now.clear()
            claimed = []
            looked = None  # the claim took the parked runs due by then (engine/parking.py)
            # App(max_runs=...): at most the room this worker has now; none while full
            # (a run of its own that ends or waits wakes this loop: Engine.slot_freed)
            limit = engine.claim_limit(CLAIM_BATCH)
            capped = limit < CLAIM_BATCH
            with engine.claiming_up_to(limit):
                if workflows and limit and not self.expired():
                    # Owners past their own expiry are gone (each is judged by its own
                    # lease); while this worker's own hold is in doubt, only runs nobody
                    # owns.
                    stale_before = engine.clock.now() if self.may_take_over() else 0.0
                    looked = engine.clock.now()
                    try:
                        claimed = await versioning.claim(
                            engine, workflows, stale_before=stale_before, limit=limit
                        )
                    except Exception as exc:
                        looked = None
                        self.quiet.warning(
                            "claim", "worker %s: claiming runs failed (%s); retrying",
                            engine.worker_id, reason(exc),
                        )
                        self.repair_soon()  # the claim may have been applied, its answer lost
                    else:
                        self.quiet.recovered("claim", "worker %s: claiming runs works again",
                                             engine.worker_id)
                # Held back by the bound: as full as its room (more may be claimable); a
                # claim that found less than its room took all there was.
                engine.claims_held = capped and len(claimed) == limit
                loaded = await self._histories(claimed)
                for run in claimed:
                    log.info("resuming run %s of %s", run.run_id, run.workflow)
                    engine.launch(run, history=loaded.get(run.run_id))
            if claimed and len(claimed) == limit:
                continue  # more may be claimable (the bound: none, unless a slot freed)
            # While the store hears other processes, new work wakes this loop: it looks
            # on its own only every few seconds (idle_wait), and at the times it knows
            # work comes due without a notification (docs/performance.md, "Idle workers").
            wait = engine.poll_interval * 5
            if self.may_take_over():  # (else it may soon: look at the old cadence)
                wait = idle_wait(engine.store, wait)
            due = None
            if workflows:  # until the next parked run is due (engine/parking.py)
                try:
                    # After the claim's time, not now: a run that came due since (while
                    # the claimed runs were loaded and launched, long on a loaded
                    # machine) is claimed at once, not at the next run's due time.
                    now = engine.clock.now()
                    due = await engine.store.next_wake(
                        engine.app, workflows, after=now if looked is None else looked)
                except Exception:
                    due = None  # the claim's own warning says the store fails
                if due is not None:
                    wait = min(wait, max(due - engine.clock.now(), 0.0) + 0.001)
            await wait_event(self.claim_wakeup, wait)
            if self.claim_wakeup.is_set() and not self._claim_now.is_set():
                # Woken by a change notification: let a burst of them coalesce, so a
                # busy store is not asked to claim once per commit; but not past the
                # time a parked run comes due (its timer would wait for the burst).
                pause = min(0.05, engine.poll_interval)
                if due is not None:
                    pause = min(pause, max(due - engine.clock.now(), 0.0))
                await wait_event(self._claim_now, pause)  # (ended by claim_now)

    def claim_now(self) -> None:
        """This worker woke parked runs (the watch loop, engine/parking.py): the claim
        loop claims at once, without letting other notifications gather first."""
        self._claim_now.set()
        self.claim_wakeup.set()

    async def _histories(
        self, claimed: list[RunRecord]
    ) -> dict[str, tuple[list[HistoryEntry], list[Attempt]]]:
        """The histories and attempts of a claim's runs, two reads for all of them (not two
        round trips per run as each execution would make). On a failed read, none: each
        execution then loads its own, and says so if that fails too."""
        if len(claimed) < 2:
            return {}
        try:
            return await self.engine.store.load_histories(
                self.engine.app, [r.run_id for r in claimed]
            )
        except Exception as exc:
            log.debug("loading the histories of %d claimed runs failed (%s); each loads its "
                      "own", len(claimed), reason(exc))
            return {}

    # -- other workers' expiries ----------------------------------------------------------

    async def _expiry_loop(self) -> None:
        """Wake this worker's claimers when another worker's expiry passes (its work may
        be taken over then), while the store hears other processes: their loops wait
        for notifications then, and a worker that dies writes none. A heartbeat only
        moves a worker's expiry later, so the earliest one read is the first moment a
        takeover may be due: read again then (about once every 3/4 of a lease when
        other workers live; when none is known, after a safety-net wait or 3/4 of a
        lease, whichever is shorter), and wake the claimers if a worker is past its
        expiry now that was not at the last read (one that registered after that read
        and died at once included). Without a
        listener the claimers look every poll interval anyway, and this loop only
        waits."""
        engine = self.engine
        past: set[str] | None = None  # other workers past their expiry at the last read
        while True:
            wait = engine.poll_interval * 5
            if getattr(engine.store, "listening", False):
                # With no other worker known live, read again within 3/4 of a lease: a
                # worker that registers after a read, claims work and dies at once is
                # seen past its expiry then, not a safety-net wait later.
                wait = min(idle_wait(engine.store, wait), engine.lease * FENCE_AT)
                now = engine.clock.now()
                due = self.next_expiry
                if due is None or due <= now:
                    try:
                        workers = await engine.store.workers(engine.app)
                    except Exception:
                        workers = None  # (the claims' own warnings say the store fails)
                    now = engine.clock.now()
                    if workers is None:
                        self.next_expiry, past = None, None
                        engine.wake_claimers()  # they look every poll interval anyway
                    else:
                        others = [w for w in workers if w.worker_id != engine.worker_id]
                        gone = {w.worker_id for w in others if w.expires_at <= now}
                        if past is not None and gone - past:
                            engine.wake_claimers()  # its work is free to take over now
                        past = gone
                        later = [w.expires_at for w in others if w.expires_at > now]
                        self.next_expiry = min(later) if later else None
                    due = self.next_expiry
                if due is not None:
                    wait = min(wait, max(due - now, 0.0) + 0.001)
            else:
                self.next_expiry, past = None, None
            await asyncio.sleep(wait)

    # -- reconciliation -------------------------------------------------------------------

    async def _repair_loop(self) -> None:
        engine = self.engine
        while True:
            await wait_event(self._repair_wakeup, engine.lease)
            self._repair_wakeup.clear()
            if self.expired():
                continue  # resumed once a heartbeat gets through (it wakes this loop)
            # Not at once: a burst of let-go runs is reconciled in one pass, and a run
            # that keeps failing internally is not relaunched in a tight loop.
            await asyncio.sleep(max(engine.poll_interval, min(engine.lease / 4, 1.0)))
            try:
                await self.reconcile()
            except Exception as exc:
                self.quiet.warning(
                    "reconcile", "worker %s: checking its runs against the store failed "
                    "(%s); retrying", engine.worker_id, reason(exc),
                )
                self._repair_wakeup.set()

    async def reconcile(self) -> None:
        """Resume runs owned here but not executed; stop executions of runs lost."""
        engine = self.engine
        store, app = engine.store, engine.app
        before = dict(engine.executions)
        owned = await store.owned_runs(app, engine.worker_id)
        for run_id, fence in owned.items():
            current = engine.executions.get(run_id)
            if current is not None and current.run.fence >= fence:
                continue
            run = await store.get_run(app, run_id)
            if (run is not None and not run.status.is_final and run.owner == engine.worker_id
                    and engine.serving and not self.expired()):
                log.info("run %s: owned by this worker but not executed here; resuming it",
                         run_id)
                engine.launch(run)
        for run_id, execution in before.items():
            if run_id in owned or engine.executions.get(run_id) is not execution:
                continue
            if not execution.stored or execution.evicting:
                continue  # a run being parked (engine/parking.py) is released on purpose
            run = await store.get_run(app, run_id)
            if run is None or run.status.is_final:
                continue  # ending here right now
            if run.owner != engine.worker_id or run.fence != execution.run.fence:
                execution.lost = run.owner != engine.worker_id
                log.warning("run %s was taken over by %s: stopping its execution here",
                            run_id, run.owner or "nobody")
                engine.drop(execution)
