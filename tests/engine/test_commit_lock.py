"""A run's commit lock taken without a coroutine (engine/checkpoint.py, CommitLock).

``take_now`` takes only a free lock nobody waits for: a checkpoint that found it free
must not jump ahead of one already waiting (their order is the order of the run's
writes), which is what ``asyncio.Lock.acquire`` keeps.
"""

from __future__ import annotations

import asyncio

import pytest

from cantata.engine.checkpoint import CommitLock


async def test_take_now_takes_a_free_lock_only() -> None:
    lock = CommitLock()
    assert lock.take_now()
    assert lock.locked()
    assert not lock.take_now()  # held
    lock.release()
    assert not lock.locked()
    async with lock:  # still an asyncio.Lock for everyone else
        assert not lock.take_now()
    assert lock.take_now()
    lock.release()


async def test_take_now_leaves_the_lock_to_a_waiter_first() -> None:
    lock = CommitLock()
    order: list[str] = []
    assert lock.take_now()

    async def waiter() -> None:
        async with lock:
            order.append("waiter")

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)  # the waiter waits for the lock
    lock.release()  # its turn: woken, not yet run
    assert not lock.take_now()  # not taken from under the waiter
    await task
    assert order == ["waiter"]
    assert lock.take_now()
    lock.release()


async def test_release_frees_a_lock_nobody_waits_for_and_wakes_a_waiter() -> None:
    """``release`` without waiters frees the lock without asyncio's wake-up call (round
    twenty-seven); with a waiter, or unheld, it is ``asyncio.Lock.release``: the waiter
    takes the lock, and an unheld lock's release is an error."""
    lock = CommitLock()
    with pytest.raises(RuntimeError):
        lock.release()
    assert lock.take_now()
    lock.release()
    assert not lock.locked()
    assert lock.take_now()
    got: list[str] = []

    async def waiter() -> None:
        await lock.acquire()
        got.append("waiter")

    task = asyncio.create_task(waiter())
    await asyncio.sleep(0)
    lock.release()  # a waiter: woken, and it takes the lock
    await asyncio.wait_for(task, timeout=1)
    assert got == ["waiter"] and lock.locked()
    lock.release()
    assert not lock.locked()
