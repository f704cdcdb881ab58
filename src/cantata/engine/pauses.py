"""A worker paused past its lease: its step bodies stop at once, its attempts are excused.

The rules, with the reasons (docs/leases.md, "Paused past the lease"):

- **The body guard.** Every step body runs through
  :class:`~cantata.fencing.GuardedBody`, which checks
  the owner's fence before it lets the body go on after an ``await``: when more than
  ``FENCE_AT`` of the lease has passed since the last heartbeat that got through, by
  ``time.monotonic()`` (which keeps counting through SIGSTOP) or by the wall clock the
  store judges the worker by (which jumps ahead when a paused VM resumes, its
  monotonic clock having stood still), it throws
  ``CancelledError`` into the body instead of resuming it. So a body never goes on
  past a pause longer than that, before any other code of the process runs: another
  worker may own the run by now. Unless the heartbeat sent after a pause of the whole
  process proves the hold never lapsed (``Ownership.pause_verdict``): until its answer
  the body is held, and it goes on if so. Only a pause inside the body's own synchronous code
  (between two awaits, or in a thread) lets it finish late.
- **Excuses.** A pause is not a death. At takeover time a paused worker looks dead,
  so the new owner records the attempt it was in as ``WorkerLost``; the paused
  worker, once it runs again and finds the run taken over, marks those of its
  attempts ``Paused`` (:meth:`~cantata.store.base.Store.excuse_attempts`), which
  does not count. An attempt whose body held the event loop past the fence itself
  (a step that blocks its worker) is not excused, so a step that stalls its worker
  every time still runs out of attempts. A pause of the whole process inside the
  body's code is told from that by :class:`~cantata.fencing.PauseClock`, a thread that keeps ticking
  while only the event loop is blocked, and stands still with the whole process.
- **Before failing a step for good** on attempts of which some are ``WorkerLost``,
  the owner waits up to one lease (:func:`await_excuses`) for their workers to
  excuse them: a worker that was paused excuses its attempts within moments of
  running again. A worker silent that long past the takeover is taken for dead, so a
  step that kills its worker every time still fails after its attempts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from cantata.errors import CantataError
from cantata.fencing import Fence, GuardedBody, PauseClock
from cantata.model.records import Attempt
from cantata.quietlog import reason

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import RunExecution

log = logging.getLogger("cantata.worker")

# An attempt cut off by a pause of its worker past the lease, the run taken over
# meanwhile: recorded, not counted (docs/leases.md).
PAUSED = (
    "Paused",
    "the worker running this attempt was paused past its lease and another worker took "
    "the run over; not counted as an attempt",
)


class StepStalled(CantataError):
    """A step body held its worker's event loop past the fence in its own code.

    Its worker cannot heartbeat meanwhile, so another worker may take the run over: the
    body is stopped at its next ``await`` and the attempt counts (a step that does
    this every time runs out of attempts instead of being restarted forever).
    """


async def excuse(engine: Engine, run_id: str, app: str, attempts: Sequence[Attempt]) -> None:
    """Mark ``attempts`` (this live worker's, of a run taken from it) ``Paused``.

    Retried for a few leases while the store is away (the worker just came back from
    a pause or an outage); given up after that: the attempts stay charged. (A retry
    after a try that was applied but whose answer was lost could, in theory, excuse
    an attempt the new owner started since under the same number and start time.)
    """
    now = engine.clock.now()
    marked = [Attempt(a.key, a.attempt, a.started_at, now, *PAUSED) for a in attempts]
    deadline = time.monotonic() + 4 * engine.lease
    delay = 0.05
    while True:
        try:
            n = await engine.store.excuse_attempts(app, run_id, marked)
        except Exception as exc:
            if time.monotonic() > deadline:
                log.warning(
                    "run %s: could not mark the attempts this worker was cut off "
                    "in as paused (%s); they count as attempts",
                    run_id,
                    reason(exc),
                )
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, engine.lease / 4)
            continue
        if n:
            log.info(
                "run %s was taken over while this worker was paused: %d attempt(s) "
                "it was cut off in do not count",
                run_id,
                n,
            )
        return


async def await_excuses(execution: RunExecution, key: str, lost: Sequence[Attempt]) -> int:
    """Wait up to one lease for the workers of ``lost`` (``WorkerLost`` attempts of
    step ``key``) to excuse them, as a worker that was only paused does on resuming.

    Returns how many of them were excused (marked ``Paused``); they are marked so in
    ``lost`` too. Called only before a step fails for running out of attempts.

    The lease is waited in real time, except under a virtual clock (a test's
    ``SkipClock``, whose time moves on its own account): in the app's time then, as the
    step's retries and sleeps are, so a crash test's cut attempt does not cost a lease
    of real time per point.
    """
    engine, run = execution.engine, execution.run
    wanted = {(a.attempt, a.started_at): a for a in lost}
    virtual = getattr(engine.clock, "virtual", False)
    now: Callable[[], float] = engine.clock.now if virtual else time.monotonic
    sleep: Callable[[float], Awaitable[None]] = (
        engine.clock.sleep if virtual else asyncio.sleep
    )
    deadline = now() + engine.lease
    while True:
        try:
            rows = await engine.store.load_attempts(run.app, run.run_id)
        except Exception:
            rows = []
        excused = [
            a
            for a in rows
            if a.key == key and a.error_type == PAUSED[0] and (a.attempt, a.started_at) in wanted
        ]
        if excused or now() >= deadline:
            for a in excused:
                mine = wanted[(a.attempt, a.started_at)]
                mine.ended_at, mine.error_type, mine.error = a.ended_at, a.error_type, a.error
            return len(excused)
        await sleep(min(engine.lease / 4, max(0.0, deadline - now())))


def handler_fenced(engine: Engine) -> bool:
    """Whether a handler body must not be resumed: this worker's hold may have lapsed
    by a pause of the whole process. Only a pause, not a store outage: in an outage a
    handler runs on and its outcome waits for the store, the delivery staying this
    live worker's (docs/leases.md); stopping it would only spend its attempts
    (``Ownership.process_paused``: SIGSTOP, or a paused VM)."""
    ownership = engine.ownership
    return ownership.in_doubt() and ownership.process_paused()


def handler_fence(engine: Engine, held_by_lease: bool = False) -> Fence:
    """The guard of a handler body beginning now: true once it must not be resumed,
    or once this worker noticed a pause past the fence since it began that its next
    heartbeat did not prove harmless (``Ownership.pauses``). The body of a paused VM
    may resume only after its worker's first heartbeat got through (its timers stood
    still with its monotonic clock), when its delivery may be another worker's by now.

    For a delivery ``held_by_lease`` (held for this worker by its lease in the store
    alone: the embedded broker's), a pause is judged by the heartbeat sent after it
    (``Ownership.pause_verdict``): until its answer the guard returns the pending
    verdict, and the body is held, not resumed (:class:`~cantata.fencing.InlineBody`);
    it goes on if that heartbeat proves the hold never lapsed (the store found the
    worker's expiry not passed at the renewal, by its own clock too), and is stopped
    otherwise: refused, lapsed, or not known (docs/leases.md). Any other delivery (a
    NATS message: NATS delivers it again once its ack wait has passed since the last
    "in progress" this worker sent, whatever the store says, and a paused worker sent
    none) is stopped after every pause past the fence noticed since it began
    (``Ownership.noticed``), proven harmless to the store or not."""
    ownership = engine.ownership
    if not held_by_lease:
        noticed = ownership.noticed

        def unproven() -> bool:
            return ownership.noticed != noticed or handler_fenced(engine)

        return unproven
    began = ownership.pauses

    def fenced() -> bool | asyncio.Future[bool]:
        if ownership.pauses != began:
            return True
        if not handler_fenced(engine):
            return False
        verdict = ownership.pause_verdict()
        return True if verdict is None else verdict

    return fenced


__all__ = ["PAUSED", "GuardedBody", "PauseClock", "StepStalled", "await_excuses", "excuse",
           "handler_fence", "handler_fenced"]
