"""``cantata.cancel_safe``: a wait with a timeout that a cancellation always ends, however
it falls against what the wait is for (``asyncio.wait_for`` on Python 3.11 returns
instead when the two come together), and that otherwise ends as a timed wait does."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata.cancel_safe import get_within, wait_event

# (loop turns before the wait is answered, loop turns between the answer and the cancel)
TURNS = [(before, after) for before in range(3) for after in range(5)]


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


async def swallowed(wait: Callable[[], Awaitable[Any]], answer: Callable[[], None],
                    before: int, after: int) -> bool:
    """Whether a cancel of a task in ``wait`` was lost (the task ended without
    ``CancelledError``): the wait answered (``answer``) ``before`` loop turns after it
    began, the task cancelled ``after`` turns later if it had not ended by then."""
    task = asyncio.ensure_future(wait())
    await _turns(before)
    answer()
    await _turns(after)
    if not task.cancel():  # it ended first, answered: nothing to lose
        return False
    try:
        await asyncio.wait_for(asyncio.shield(task), 2)
    except asyncio.CancelledError:
        return False
    return True


Setup = Callable[[], tuple[Callable[[], Awaitable[Any]], Callable[[], None]]]


async def lost_cancels(setup: Setup) -> list[tuple[int, int]]:
    """The turns (:data:`TURNS`) at which a cancel was lost; ``setup`` makes a fresh
    wait and what answers it for each."""
    lost = []
    for before, after in TURNS:
        wait, answer = setup()
        if await swallowed(wait, answer, before, after):
            lost.append((before, after))
    return lost


def on_event(wait: Callable[[asyncio.Event], Awaitable[Any]]) -> Setup:
    def setup() -> tuple[Callable[[], Awaitable[Any]], Callable[[], None]]:
        event = asyncio.Event()
        return (lambda: wait(event)), event.set
    return setup


def on_queue() -> tuple[Callable[[], Awaitable[Any]], Callable[[], None]]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    return (lambda: get_within(queue, 10)), (lambda: queue.put_nowait("x"))


async def test_a_cancel_always_ends_wait_event() -> None:
    assert await lost_cancels(on_event(lambda e: wait_event(e, 10))) == []


async def test_a_cancel_always_ends_get_within() -> None:
    assert await lost_cancels(on_queue) == []


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for mended in 3.12")
async def test_the_probe_finds_asyncio_wait_for_losing_a_cancel_on_3_11() -> None:
    """What the probe above is for: it finds the turns where 3.11's own wait loses the
    cancel (were it to find none, the tests above would prove nothing)."""
    async def stdlib(event: asyncio.Event) -> None:
        await asyncio.wait_for(event.wait(), 10)

    assert await lost_cancels(on_event(stdlib)) != []


async def test_wait_event_says_whether_it_was_set() -> None:
    event = asyncio.Event()
    loop = asyncio.get_running_loop()
    began = loop.time()
    assert await wait_event(event, 0.05) is False
    assert loop.time() - began >= 0.04
    loop.call_later(0.01, event.set)
    assert await wait_event(event, 10) is True
    assert await wait_event(event, 0) is True  # already set: no wait


async def test_get_within_times_out_and_loses_no_item() -> None:
    queue: asyncio.Queue[int] = asyncio.Queue()
    assert await get_within(queue, 0.02) == (False, None)
    queue.put_nowait(1)  # after a wait timed out: still there for the next
    assert await get_within(queue, 0) == (True, 1)
    loop = asyncio.get_running_loop()
    loop.call_later(0.01, queue.put_nowait, 2)
    assert await get_within(queue, 10) == (True, 2)
    # an item put as a wait times out (in the same turn) stays in the queue
    for _ in range(20):
        loop.call_later(0.005, queue.put_nowait, 3)
        got = await get_within(queue, 0.005)
        came, item = got
        if not came:
            assert queue.get_nowait() == 3
        else:
            assert item == 3 and queue.empty()


async def test_a_cancel_always_ends_a_wait_under_asyncio_timeout() -> None:
    """The shape of the library's one-shot waits with a deadline (the relay's last
    marks at stop, the PostgreSQL pool's close): ``asyncio.timeout`` around the await."""
    async def timed(event: asyncio.Event) -> None:
        async with asyncio.timeout(10):
            await event.wait()

    assert await lost_cancels(on_event(timed)) == []


def test_the_library_calls_no_asyncio_wait_for() -> None:
    """Every wait of the library with a timeout is one of the above, never 3.11's
    ``asyncio.wait_for`` (its lost cancels are this module's reason)."""
    src = Path(cantata.__file__).parent
    found = [f"{path.relative_to(src)}:{n}" for path in sorted(src.rglob("*.py"))
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if "asyncio.wait_for(" in line]
    assert found == [], found
