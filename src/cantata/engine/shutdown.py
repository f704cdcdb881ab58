"""Graceful stop of an engine: drain for a grace period, then release at once.

A stop is not a failure of the work in progress (docs/leases.md): steps that are
running finish within the grace and their results are committed; what is left is
released (owner cleared) so another worker resumes it without waiting for the lease,
and the attempts cut short are marked ``Interrupted``, which does not count as an
attempt. Nothing new starts once the stop began: claims end, and each run parks at
its next durable point (a new step, a sleep, a wait). The results of the steps that
finished are committed through a store outage until the stop's bound (:func:`release`);
any that could not be are counted as cut short, never passed off as a clean stop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from cantata.graceful import wait_or_force

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import RunExecution

log = logging.getLogger("cantata.worker")

# Seconds the releases get at least (past the grace, if it is over already): their
# commits carry the outcomes of the steps that finished during the grace.
RELEASE_WAIT = 5.0


async def drain(engine: Engine, deadline: float, force: asyncio.Event) -> None:
    """Stop ``engine`` gracefully; returns once nothing of it runs any more."""
    loop = asyncio.get_running_loop()
    engine.serving = False
    engine.draining = True
    engine.cutting = False
    await engine.ownership.stop_claiming()
    server_stop = None
    if engine.task_server is not None:
        server_stop = asyncio.ensure_future(engine.task_server.stop(deadline, force))
    for execution in list(engine.executions.values()):
        execution.wakeup.set()  # a sleep or a wait parks at once
    busy = [e for e in engine.executions.values() if e.inflight]  # (the others park)
    if busy:
        log.info("stopping: waiting up to %.1f s for %d run(s) in a step",
                 max(0.0, deadline - loop.time()), len(busy))
    while not force.is_set() and loop.time() < deadline:
        if all(e.parked or e.task is None or e.task.done()
               for e in engine.executions.values()):
            break
        engine.quiesce.clear()
        await wait_or_force(engine.quiesce, min(deadline, loop.time() + 0.1), force)
    left = list(engine.executions.values())
    running = [e for e in left if e.inflight]
    engine.cut_short += len(running)
    if running:
        log.warning("stopping: releasing %d run(s) whose step did not finish in time; "
                    "another worker resumes them at once", len(running))
    for execution in left:
        execution.let_go()
    tasks = [e.task for e in left if e.task is not None]
    if tasks:
        await asyncio.wait(tasks, timeout=2.0)
    if left:
        await release(engine, left, max(deadline, loop.time() + RELEASE_WAIT), force)
    if server_stop is not None:
        await server_stop
    # What else is left (a checkpoint flush, a relaunch): give it a moment, then cancel.
    others = [t for t in engine.background() if not t.done()]
    if others:
        await asyncio.wait(others, timeout=1.0)
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)


async def release(
    engine: Engine, left: list[RunExecution], until: float, force: asyncio.Event
) -> None:
    """Release ``left``: commit the outcomes their steps left held (waiting out a store
    outage, as a live worker does) and clear their owners, until ``until`` (loop time)
    or ``force``. Then the stop gives up on the store; a run whose steps' outcomes may
    not be stored is counted as cut short (those steps run again elsewhere), so the stop
    does not pass for a clean one (``cantata worker`` exits with status 3)."""
    releases = [asyncio.ensure_future(e.release()) for e in left]
    done = asyncio.Event()
    pending = set(releases)

    def ended(fut: asyncio.Future[bool]) -> None:
        pending.discard(fut)
        if not pending:
            done.set()

    for fut in releases:
        fut.add_done_callback(ended)
    await wait_or_force(done, until, force)
    if pending:
        engine.cutting = True  # commits waiting out an outage give up now
        await asyncio.wait(pending, timeout=2.0)  # (their commits raise, or hang)
    lost = [fut for fut in releases if not fut.done() or fut.cancelled()
            or fut.exception() is not None or not fut.result()]
    if lost:
        engine.cut_short += len(lost)
        engine.unstored += len(lost)
        log.warning("stopping: could not commit what the steps of %d run(s) finished "
                    "(the store did not answer in time); those steps run again on "
                    "another worker", len(lost))
