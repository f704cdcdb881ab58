"""Storage faults on SQLite: full disks, read-only stores, emptied and damaged files.

Each gives one clear error (a :class:`~cantata.CantataError` naming the store and
what to do), never a driver's exception, and never a flood of tracebacks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Event, StoreCorrupt, StoreFull, StoreReadOnly
from cantata.model.records import Declaration
from cantata.store.sqlite import SQLiteStore
from tests.store.fault_support import fill, immutable, remount, small_disk

BLOB = "x" * 20_000


async def test_a_full_disk_is_store_full_and_writes_work_again_once_freed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handled: list[str] = []
    with small_disk(tmp_path / "disk") as disk:
        app = App("shop", store=f"sqlite:///{disk}/shop.db", poll_interval=0.05, lease=1.0)

        @app.on("order.placed", group="billing")
        async def bill(event: Event[Any]) -> None:
            handled.append(event.id)

        async with app:
            stored = [await app.publish("order.placed", {"n": i}) for i in range(3)]
            filler = fill(disk)
            with pytest.raises(StoreFull) as info:
                for _ in range(200):  # the WAL may still have room for a few
                    await app.publish("order.placed", {"blob": BLOB})
            assert str(info.value).startswith(f"disk full at {disk}/shop.db: free space")
            assert not isinstance(info.value, sqlite3.Error)
            await asyncio.sleep(1.0)  # the worker keeps going meanwhile
            filler.unlink()
            after = await app.publish("order.placed", {"n": 99})
            deadline = asyncio.get_running_loop().time() + 10
            while after.id not in handled:
                assert asyncio.get_running_loop().time() < deadline, "not handled after"
                await asyncio.sleep(0.05)
        assert {e.id for e in stored} <= set(handled)
        conn = sqlite3.connect(disk / "shop.db")
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        finally:
            conn.close()
    tracebacks = [r for r in caplog.records if r.exc_info and r.name.startswith("cantata")]
    assert tracebacks == []


async def test_opening_on_a_full_disk_never_says_the_store_is_damaged(tmp_path: Path) -> None:
    with small_disk(tmp_path / "disk") as disk:
        existing = SQLiteStore(str(disk / "shop.db"))
        await existing.open()
        await existing.close()
        fill(disk)
        again = SQLiteStore(str(disk / "shop.db"))
        try:
            await again.open()  # a current schema needs no write: it opens
            assert await again.apps() == []
        except StoreFull:
            pass
        finally:
            await again.close()
        new = SQLiteStore(str(disk / "new.db"))
        with pytest.raises(StoreFull, match=f"disk full at {disk}/new.db"):
            await new.open()
        # ... and leaves no empty file behind that would later pass for a truncated store
        assert not (disk / "new.db").exists()


async def _store_with_data(path: Path) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    try:
        await store.declare("shop", [Declaration("handler", "billing", "order.placed")])
        await store.append_events("shop", [Event("order.placed", {"n": 1})])
    finally:
        await store.close()


async def _read_then_write(path: Path) -> None:
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.apps() == ["shop"]
        assert len(await store.unpublished_events("shop", limit=10)) == 1
        with pytest.raises(StoreReadOnly, match=r"read-only.*reading works"):
            await store.append_events("shop", [Event("order.placed", {"n": 2})])
    finally:
        await store.close()


async def test_an_immutable_store_file_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    await _store_with_data(path)
    with immutable(path):
        await _read_then_write(path)


async def test_a_store_on_a_read_only_file_system_reads_and_refuses_writes(
    tmp_path: Path,
) -> None:
    with small_disk(tmp_path / "disk") as disk:
        path = disk / "shop.db"
        await _store_with_data(path)
        remount(disk, "ro")
        try:
            await _read_then_write(path)
            app = App("shop", store=f"sqlite:///{path}")
            with pytest.raises(StoreReadOnly):  # a worker cannot run on it
                async with app:
                    pass
        finally:
            remount(disk, "rw")


async def test_a_store_truncated_to_zero_bytes_is_refused_not_set_up_again(
    tmp_path: Path,
) -> None:
    path = tmp_path / "shop.db"
    await _store_with_data(path)
    _truncate(path)
    app = App("shop", store=f"sqlite:///{path}")
    with pytest.raises(StoreCorrupt, match=r"is empty \(0 bytes\).*truncated"):
        async with app:
            pass
    assert path.stat().st_size == 0


async def test_a_damaged_store_is_store_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "shop.db"
    await _store_with_data(path)
    _damage(path)
    store = SQLiteStore(str(path))
    with pytest.raises(StoreCorrupt, match=r"damaged|not a usable"):
        await store.open()
        try:
            await store.unpublished_events("shop", limit=10)
        finally:
            await store.close()


def _truncate(path: Path) -> None:
    for side in (f"{path}-wal", f"{path}-shm"):
        if os.path.exists(side):
            os.remove(side)
    os.truncate(path, 0)


def _damage(path: Path) -> None:
    with open(path, "r+b") as f:  # overwrite everything after the header page
        f.seek(4096)
        f.write(os.urandom(max(0, path.stat().st_size - 4096)) or b"\xff" * 4096)


def test_store_errors_are_logged_without_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from cantata.quietlog import QuietLog

    log = logging.getLogger("cantata.test")
    quiet = QuietLog(log, every=60)
    with caplog.at_level(logging.WARNING, logger="cantata.test"):
        for _ in range(100):
            quiet.warning("k", "store failed (%s)", "disk full")
    assert [r.getMessage() for r in caplog.records] == ["store failed (disk full)"]
