"""Graceful stop of an engine: drain for a grace period, then release at once.

A stop is not a failure of the work in progress (docs/leases.md): steps that are
running finish within the grace and their results are committed; what is left is
released (owner cleared) so another worker resumes it without waiting for the lease,
and the attempts cut short are marked ``Interrupted``, which does not count as an
attempt. Nothing new starts once the stop began: claims end, and each run parks at
its next durable point (a new step, a sleep, a wait).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from cantata.graceful import wait_or_force

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("cantata.worker")


async def drain(engine: Engine, deadline: float, force: asyncio.Event) -> None:
    """Stop ``engine`` gracefully; returns once nothing of it runs any more."""
    loop = asyncio.get_running_loop()
    engine.serving = False
    engine.draining = True
    await engine.ownership.stop_claiming()
    server_stop = None
    if engine.task_server is not None:
        server_stop = asyncio.ensure_future(engine.task_server.stop(deadline, force))
    for execution in list(engine.executions.values()):
        execution.wakeup.set()  # a sleep or a wait parks at once
    busy = [e for e in engine.executions.values() if not e.parked]
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
        await asyncio.wait(
            [asyncio.ensure_future(e.release()) for e in left], timeout=5.0
        )
    if server_stop is not None:
        await server_stop
    # What else is left (a checkpoint flush, a relaunch): give it a moment, then cancel.
    others = [t for t in engine.background() if not t.done()]
    if others:
        await asyncio.wait(others, timeout=1.0)
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)
