"""SQLite writes of the store's own event loop, run on the loop's thread when the
store's thread is idle (``cantata.store.sqlite_thread``): one commit per loop turn,
the order the writes were made in, and never a loop blocked by a lock held elsewhere."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from cantata.store import sqlite_ops, sqlite_thread
from cantata.store.sqlite_open import connect
from cantata.store.sqlite_thread import ConnectionThread


@pytest.fixture
async def home(tmp_path: Path) -> AsyncIterator[tuple[ConnectionThread, list[set[str]]]]:
    commits: list[set[str]] = []
    thread = ConnectionThread(
        lambda: connect(str(tmp_path / "inline.db"), "sqlite://inline", "FULL"),
        commits.append, "test-inline", home=asyncio.get_running_loop(),
    )
    thread.start()
    try:
        yield thread, commits
    finally:
        thread.stop()


def meta(key: str, seen: list[tuple[str, int]]) -> Callable[[sqlite3.Connection], str]:
    def op(c: sqlite3.Connection) -> str:
        seen.append((key, threading.get_ident()))
        c.execute("INSERT INTO cantata_meta VALUES (?, 'x')", (key,))
        return key
    return op


async def keys(thread: ConnectionThread) -> list[str]:
    return await thread.read(
        lambda c: [r[0] for r in c.execute(
            "SELECT key FROM cantata_meta WHERE key LIKE 'k%' ORDER BY rowid").fetchall()]
    )


async def test_the_writes_of_one_loop_turn_share_one_commit_on_the_loops_thread(
    home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    thread, commits = home
    seen: list[tuple[str, int]] = []
    got = await asyncio.gather(*(thread.write(meta(f"k{i}", seen), f"c{i}") for i in range(3)))
    assert got == ["k0", "k1", "k2"]
    assert {ident for _, ident in seen} == {threading.get_ident()}
    assert commits == [{"c0", "c1", "c2"}]  # one transaction, one notice
    assert await keys(thread) == ["k0", "k1", "k2"]


async def test_a_failing_inline_write_undoes_only_itself(
    home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    thread, commits = home
    seen: list[tuple[str, int]] = []

    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO cantata_meta VALUES ('kbad', 'x')")
        sqlite_ops.audit_append(c, "a", ("t", "test.bad", "-", {}))
        raise ValueError("this operation fails after writing")

    results = await asyncio.gather(thread.write(meta("k1", seen), "good"),
                                   thread.write(bad, "bad"),
                                   thread.write(meta("k2", seen), "good"),
                                   return_exceptions=True)
    assert results[0] == "k1" and results[2] == "k2"
    assert isinstance(results[1], ValueError)
    assert await keys(thread) == ["k1", "k2"]
    assert commits == [{"good"}]
    assert await thread.read(lambda c: sqlite_ops.audit_records(c, "a", 0, 10)) == []


async def test_a_write_lock_held_elsewhere_never_blocks_the_loop(
    tmp_path: Path, home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    """Another connection (another process, or a transactional step) holds the write
    lock: the write waits for it in the store's thread, and the loop runs on."""
    thread, _ = home
    await thread.write(meta("k0", []))  # the schema exists
    other = sqlite3.connect(tmp_path / "inline.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    seen: list[tuple[str, int]] = []
    try:
        write = thread.write(meta("k1", seen))
        ticks = 0
        t0 = time.monotonic()
        for _ in range(10):
            await asyncio.sleep(0.02)
            ticks += 1
        assert time.monotonic() - t0 < 1.0  # the loop was never held by the lock
        assert ticks == 10 and not write.done()
        # Made while the thread still has k1: they wait behind it, in their order
        # (on the loop, and run there once k1 is answered).
        later = [thread.write(meta(f"k{i}", seen)) for i in (2, 3)]
        await asyncio.sleep(0.05)
        assert seen == [] and not any(w.done() for w in later)
    finally:
        other.execute("COMMIT")
        other.close()
    assert await write == "k1"
    assert await asyncio.gather(*later) == ["k2", "k3"]
    assert [k for k, _ in seen] == ["k1", "k2", "k3"]
    assert seen[0][1] != threading.get_ident()  # the thread waited for the lock
    seen2: list[tuple[str, int]] = []
    await thread.write(meta("k4", seen2))  # the thread is idle again: inline once more
    assert seen2[0][1] == threading.get_ident()
    assert await keys(thread) == ["k0", "k1", "k2", "k3", "k4"]


async def test_another_loops_writes_go_through_the_thread(
    home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    thread, _ = home
    seen: list[tuple[str, int]] = []
    box: dict[str, Any] = {}

    def elsewhere() -> None:
        async def go() -> None:
            box["key"] = await thread.write(meta("k1", seen))
            box["ident"] = threading.get_ident()
        asyncio.run(go())

    runner = threading.Thread(target=elsewhere)
    runner.start()
    await asyncio.to_thread(runner.join, 10)
    assert box["key"] == "k1"
    assert seen[0][1] not in (threading.get_ident(), box["ident"])
    assert await keys(thread) == ["k1"]


async def test_a_turn_with_more_writes_than_a_batch_commits_them_in_order_in_several(
    home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    """A loop turn that makes more writes than MAX_BATCH does not hold the loop for
    one huge transaction: they go in batches of MAX_BATCH, one per turn, in order."""
    thread, commits = home
    seen: list[tuple[str, int]] = []
    batch = sqlite_thread.MAX_BATCH
    n = batch * 2 + 3
    got = await asyncio.gather(*(thread.write(meta(f"k{i}", seen), f"c{i // batch}")
                                 for i in range(n)))
    assert got == [f"k{i}" for i in range(n)]
    assert [len(c) for c in commits] == [1, 1, 1]  # three transactions
    assert [k for k, _ in seen] == [f"k{i}" for i in range(n)]
    assert {ident for _, ident in seen} == {threading.get_ident()}
    assert await keys(thread) == [f"k{i}" for i in range(n)]


def count_of(key: str, where: list[int]) -> Callable[[sqlite3.Connection], int]:
    def op(c: sqlite3.Connection) -> int:
        where.append(threading.get_ident())
        return int(c.execute("SELECT count(*) FROM cantata_meta WHERE key=?",
                             (key,)).fetchone()[0])
    return op


async def test_a_lookup_by_key_is_answered_on_the_loops_thread_when_the_connection_is_free(
    home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    thread, _ = home
    await thread.write(meta("k1", []))
    where: list[int] = []
    assert await thread.lookup(count_of("k1", where)) == 1
    assert where == [threading.get_ident()]  # no hand-off to the store's thread


async def test_a_lookup_never_sees_a_write_the_thread_has_not_committed(
    home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    """While the store's thread holds the connection in a write transaction (here
    another loop's write, which then fails and is rolled back), a lookup made on the
    home loop waits its turn in the thread: it never reads the open transaction."""
    thread, _ = home
    inside, release = threading.Event(), threading.Event()

    def doomed(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO cantata_meta VALUES ('kdoomed', 'x')")
        inside.set()
        release.wait(10)
        raise ValueError("this write fails after writing: rolled back")

    box: dict[str, Any] = {}

    def elsewhere() -> None:
        async def go() -> None:
            try:
                await thread.write(doomed)
            except ValueError as exc:
                box["error"] = exc
        asyncio.run(go())

    runner = threading.Thread(target=elsewhere)
    runner.start()
    try:
        assert await asyncio.to_thread(inside.wait, 10)
        where: list[int] = []
        seen = thread.lookup(count_of("kdoomed", where))
    finally:
        release.set()
    assert await seen == 0
    await asyncio.to_thread(runner.join, 10)
    assert isinstance(box.get("error"), ValueError)
    assert where and where[0] != threading.get_ident()  # answered by the thread
    assert await thread.lookup(count_of("kdoomed", [])) == 0


async def test_a_write_behind_a_read_in_the_thread_runs_once_the_read_lets_go(
    monkeypatch: pytest.MonkeyPatch, home: tuple[ConnectionThread, list[set[str]]],
) -> None:
    """A write of the home loop that finds the connection in the thread's hands (a
    poller's read) runs on the loop as soon as the read ends: the thread tells the loop,
    the write does not sit out a timer (docs/performance.md, "latency swings"). The
    timer is pushed out of reach here, so only the thread's word can run the write."""
    monkeypatch.setattr(sqlite_thread, "_RETRY_S", 3600.0)
    thread, commits = home
    await thread.write(meta("k0", []))  # the schema exists
    inside, release = threading.Event(), threading.Event()

    def slow_read(c: sqlite3.Connection) -> int:
        inside.set()
        release.wait(10)
        return int(c.execute("SELECT count(*) FROM cantata_meta").fetchone()[0])

    read = thread.read(slow_read)
    assert await asyncio.to_thread(inside.wait, 10)
    seen: list[tuple[str, int]] = []
    write = thread.write(meta("k1", seen), "c1")
    await asyncio.sleep(0.05)
    assert not write.done() and seen == []  # the connection is the read's
    release.set()
    assert await asyncio.wait_for(write, 30) == "k1"
    assert await read >= 1
    assert seen == [("k1", threading.get_ident())]  # on the loop's thread, as usual
    assert commits[-1] == {"c1"}
    assert await keys(thread) == ["k0", "k1"]
