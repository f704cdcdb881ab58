"""A SQLite store's write-ahead log at its steady size from a connection's first write
(``store/sqlite_wal.py``): its first commits write over zeros instead of growing the
file, and the zeros are never taken for frames or for a store's content."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from cantata.errors import StoreCorrupt
from cantata.model.status import RunStatus
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_wal import steady_size
from tests.store.fault_support import small_disk
from tests.store.wal_frames import mx_frame

STEADY = steady_size(4096, 1000)  # SQLite's defaults


def _wal_size(path: Path) -> int:
    return os.path.getsize(f"{path}-wal")


def _truncate_beside_zeros(path: Path) -> None:
    path.write_bytes(b"")
    Path(f"{path}-wal").write_bytes(bytes(STEADY))


def _runs(path: Path) -> int:
    with sqlite3.connect(path) as c:
        return int(c.execute("SELECT count(*) FROM runs").fetchone()[0])


async def _write_runs(store: SQLiteStore, n: int) -> None:
    from cantata.testing.contract.support import new_run

    for _ in range(n):
        await store.create_run(new_run("shop", status=RunStatus.PENDING))


async def _make_store(path: Path) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    await _write_runs(store, 1)
    await store.close()


async def test_a_store_opens_with_its_log_at_its_steady_size_and_commits_overwrite_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shop.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await _write_runs(store, 1)
        size = _wal_size(path)
        assert size >= STEADY
        await _write_runs(store, 40)  # ~the first cycle's first fifth
        assert _wal_size(path) == size  # overwritten, not grown
        assert mx_frame(str(path)) > 40
    finally:
        await store.close()
    assert _runs(path) == 41


@pytest.mark.parametrize("mode", ["NORMAL", "OFF"])
async def test_a_store_that_does_not_flush_each_commit_leaves_its_log_alone(
    tmp_path: Path, mode: str,
) -> None:
    path = tmp_path / "shop.db"
    store = SQLiteStore(str(path), synchronous=mode)
    await store.open()
    try:
        await _write_runs(store, 1)
        assert _wal_size(path) < STEADY // 10
    finally:
        await store.close()


_KILLED_WRITER = """
import asyncio, sys
from cantata.model.status import RunStatus
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_open import connect
from cantata.testing.contract.support import new_run

async def main() -> None:
    n = int(sys.argv[2])
    if n == 0:  # killed inside its first write transaction, nothing committed
        conn = connect(sys.argv[1], "sqlite:///" + sys.argv[1], "FULL")
        conn.begin_write()
    else:
        store = SQLiteStore(sys.argv[1])
        await store.open()
        for _ in range(n):
            await store.create_run(new_run("shop", status=RunStatus.PENDING))
    print("written", flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


@pytest.mark.parametrize("n", [0, 30])
def test_a_killed_writers_log_of_frames_and_zeros_recovers_every_commit(
    tmp_path: Path, n: int,
) -> None:
    # The writer dies with its log not checkpointed (kill -9: SQLite neither merges
    # nor deletes it): recovery reads the frames and stops at the zeros; with n=0 the
    # log is zeros alone (killed in its first write transaction), no header: an empty
    # log, not a damaged store.
    path = tmp_path / "shop.db"
    asyncio.run(_make_store(path))
    writer = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(path), str(n)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "written"
        wal = Path(f"{path}-wal")
        assert wal.stat().st_size >= STEADY
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    finally:
        writer.kill()
        writer.wait(10)
        assert writer.stdout is not None
        writer.stdout.close()
    assert wal.exists()
    if n == 0:
        assert wal.read_bytes()[:4] == bytes(4)
    with sqlite3.connect(path) as c:
        assert c.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert _runs(path) == 1 + n

    async def again() -> None:  # and the store goes on writing after it
        store = SQLiteStore(str(path))
        await store.open()
        await _write_runs(store, 5)
        await store.close()

    asyncio.run(again())
    assert _runs(path) == 6 + n


async def test_a_truncated_store_beside_a_log_of_zeros_is_refused(tmp_path: Path) -> None:
    # A log lengthened and never written (its process killed) holds no content: beside
    # a store file truncated to 0 bytes it must not pass for the store's content.
    path = tmp_path / "shop.db"
    await _make_store(path)
    _truncate_beside_zeros(path)
    store = SQLiteStore(str(path))
    with pytest.raises(StoreCorrupt, match=r"is empty \(0 bytes\).*truncated"):
        await store.open()
        await store.unpublished_events("shop", limit=1)
    assert path.stat().st_size == 0


async def test_a_connection_that_only_reads_leaves_the_log_alone(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    await _make_store(path)
    store = SQLiteStore(str(path))  # (as a reading command opens it)
    await store.open()
    try:
        assert await store.list_runs("shop", limit=10)
        assert _wal_size(path) < STEADY // 10
        await _write_runs(store, 1)
        assert _wal_size(path) >= STEADY
    finally:
        await store.close()


async def test_a_small_disk_keeps_its_room_for_the_stores_commits(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk", "8m") as disk:
        path = disk / "shop.db"
        store = SQLiteStore(str(path))
        await store.open()
        try:
            await _write_runs(store, 3)
            assert _wal_size(path) < STEADY // 10
        finally:
            await store.close()
