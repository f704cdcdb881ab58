"""Waiting out a graceful stop: until done, a deadline, or a second signal (force).

Shared by the engine's drain and the choreography consumer's (docs/leases.md).
"""

from __future__ import annotations

import asyncio


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
