"""Waiting out a graceful stop: until done, a deadline, or a second signal (force).

Shared by the engine's drain and the choreography consumer's (docs/leases.md), and by
the parts that close after them: the outbox relay and the broker's pull loops.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection
from typing import Any


async def wait_or_force(
    done: asyncio.Event | None, deadline: float, force: asyncio.Event
) -> None:
    """Wait until ``done`` is set (if given), ``deadline`` (loop time) passes, or
    ``force`` is set, whichever comes first."""
    loop = asyncio.get_running_loop()
    waiters = [asyncio.ensure_future(force.wait())]
    if done is not None:
        waiters.append(asyncio.ensure_future(done.wait()))
    try:
        await asyncio.wait(waiters, timeout=max(0.0, deadline - loop.time()),
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


async def finish_unless(
    tasks: Collection[asyncio.Future[Any]], timeout: float, give_up: Callable[[], bool],
    *, every: float = 0.1,
) -> bool:
    """Wait up to ``timeout`` seconds for ``tasks`` to end by themselves, and cancel
    what is left (waiting for the cancel) once the time is up or, looked at every
    ``every`` seconds, ``give_up()`` says the rest can only end in a timeout (the
    server they talk to is gone: a stop does not wait out a client's timeouts).
    Returns whether every task ended by itself."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pending = {t for t in tasks if not t.done()}
    while pending and not give_up() and loop.time() < deadline:
        _, pending = await asyncio.wait(pending, timeout=min(every, deadline - loop.time()))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
    return not pending
