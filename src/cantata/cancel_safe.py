"""Waits with a timeout that a cancellation always ends.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that arrives just as what
it waits for completes: it returns the result instead of raising ``CancelledError``.
A loop that waits with it (for a wake-up, or for the next item of a queue) then goes
on after its task was cancelled, and whoever awaits the task after cancelling it waits
for ever: a console's change feed whose last client left while changes flowed kept its
client's stream open (docs/console.md, "Live changes"). Python 3.12 mended
``wait_for``; the project supports 3.11.

These waits use ``asyncio.wait``, which times out without cancelling anyone, and a
cancellation of the waiting task ends them at once, always. (Not ``asyncio.timeout``
either, in the engine: it ends a wait by cancelling the waiting task, and a run's task
takes a cancel while one of its steps is in progress for its workflow code's own,
engine/branches.py.)
"""

from __future__ import annotations

import asyncio
from typing import TypeVar

T = TypeVar("T")


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` seconds pass; whether it is set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((waiter,), timeout=timeout)
    finally:
        waiter.cancel()
    return event.is_set()


async def get_within(queue: asyncio.Queue[T], timeout: float) -> tuple[bool, T | None]:
    """The next item of ``queue`` if one comes within ``timeout`` seconds:
    ``(True, item)``, else ``(False, None)``. An item not taken by then stays in the
    queue; one taken just as the wait is cancelled goes with the cancellation (the
    waiter is ending)."""
    if not queue.empty():
        return True, queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    try:
        await asyncio.wait((getter,), timeout=timeout)
    finally:
        if not getter.done():
            getter.cancel()  # (Queue.get leaves an item it was woken for in the queue)
    if getter.done() and not getter.cancelled():
        return True, getter.result()
    return False, None
