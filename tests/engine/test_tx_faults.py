"""A transactional step's own SQL meeting a full disk or a read-only database: a
condition of the store, not the step's failure. The step is given Cantata's error
(``StoreFull``, ``StoreReadOnly``); letting it through is an outage as at the step's
checkpoint: no attempt charged, nothing compensated, the step runs again once the
store takes writes (docs/workflow-api.md). Real server errors: PostgreSQL's SQLSTATE
53100 and 25006, SQLite's SQLITE_FULL and SQLITE_READONLY."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata import StoreError, StoreFull, StoreReadOnly, Tx
from cantata.engine.hooks import Hook
from cantata.model.records import EntryKind, RunRecord
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from tests.engine.test_store_stalls import check_booked, tx_app
from tests.helpers import eventually, with_schema


async def disk_full(tx: Tx) -> None:
    if tx.dialect == "postgresql":  # the server's own error class: disk_full
        await tx.execute("DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space "
                         "left on device' USING ERRCODE = '53100'; END $$")
        return
    # SQLite: the file may not grow past the pages it has (SQLITE_FULL)
    row = await tx.fetchone("PRAGMA page_count")
    most = await tx.fetchone("PRAGMA max_page_count")
    assert row is not None and most is not None
    await tx.execute(f"PRAGMA max_page_count = {int(row[0])}")
    try:
        await tx.execute("INSERT INTO bookings (n) VALUES (zeroblob(4000000))")
    finally:
        await tx.execute(f"PRAGMA max_page_count = {int(most[0])}")


async def read_only(tx: Tx) -> None:
    if tx.dialect == "postgresql":  # (SQLSTATE 25006: read_only_sql_transaction)
        await tx.execute("SET TRANSACTION READ ONLY")
        await tx.execute("INSERT INTO bookings (n) VALUES (0)")
        return
    await tx.execute("PRAGMA query_only = ON")  # (SQLITE_READONLY)
    try:
        await tx.execute("INSERT INTO bookings (n) VALUES (0)")
    finally:
        await tx.execute("PRAGMA query_only = OFF")


FAULTS = {"disk-full": (disk_full, StoreFull), "read-only": (read_only, StoreReadOnly)}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def tx_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return SQLiteStore(str(tmp_path / "faults.db"))
    postgres_url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("pooled_schema")
    return PostgresStore(with_schema(postgres_url, schema))


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_full_or_read_only_store_under_a_steps_sql_is_an_outage_not_its_failure(
    tx_store: Any, fault: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    met: list[BaseException] = []
    meet, expected = FAULTS[fault]

    async def once(tx: Tx) -> None:
        if ran.count("book") == 1:  # its first run only: then the store takes writes
            try:
                await meet(tx)
            except Exception as exc:
                met.append(exc)
                raise
            raise AssertionError(f"the step's SQL met no {fault} store")

    app = tx_app(tx_store, seen, ran, in_step=once)
    async with app:
        handle = await app.start("booking", 6)
        assert await handle.result(timeout=20) == "booked, 1 booking(s)", seen
        # the step was given Cantata's error, naming the store's condition
        assert [type(e) for e in met] == [expected], met
        assert isinstance(met[0], StoreError)
        # run again once the store took writes; its first run was not charged
        assert ran == ["reserve", "book", "book"], ran
        await check_booked(app, handle.run_id, seen, ran, booked=6)


# Another process: takes the file's write lock (BEGIN IMMEDIATE) when told "lock" on
# its standard input, says "locked", and ends its transaction when told "release".
# (It opens the file only then: opened before the store made it, the file would be
# left empty, which the store refuses as a truncated store.)
LOCK_HOLDER = """
import sqlite3, sys
for line in sys.stdin:
    if line.strip() == "lock":
        conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
        conn.execute("BEGIN IMMEDIATE")
        print("locked", flush=True)
    elif line.strip() == "release":
        conn.execute("ROLLBACK")
        print("released", flush=True)
        break
"""


class LockHolder:
    """A process of its own that holds a SQLite file's write lock when told."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", LOCK_HOLDER, str(path)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.locked_at: float | None = None
        # when the release was asked: the lock is held until then at least. (Not when
        # the answer was read: the step may begin between the other process's ROLLBACK
        # and the reading thread's next time slice, and did on a loaded machine.)
        self.releasing_at: float | None = None

    def _say(self, word: str, answer: str) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{word}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == answer

    def lock(self) -> None:
        self._say("lock", "locked")
        self.locked_at = time.monotonic()

    def release(self) -> None:
        self.releasing_at = time.monotonic()
        self._say("release", "released")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture
def lock_holder(tmp_path: Path) -> Iterator[LockHolder]:
    holder = LockHolder(tmp_path / "busy.db")
    yield holder
    holder.stop()


class LockBeforeBooking(Hook):
    """Has the other process take the write lock as step ``book`` begins, the first
    time only: after its attempt's start is committed, before its transaction begins
    (a step hook wraps the attempt's body)."""

    def __init__(self, holder: LockHolder) -> None:
        self.holder = holder
        self.began: list[float] = []

    def step(self, run: RunRecord, name: str, key: str, attempt: int,
             kind: EntryKind) -> None:
        if name == "book":
            self.began.append(time.monotonic())
            if len(self.began) == 1:
                self.holder.lock()


async def test_a_write_lock_held_past_the_busy_timeout_is_an_outage_for_a_transactional_step(
    tmp_path: Path, lock_holder: LockHolder, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holds the SQLite file's write lock as a transactional step begins,
    for longer than the store's busy timeout (?busy_timeout=300, milliseconds): the
    step's transaction cannot begin. An outage, not the step's failure: no attempt
    charged, nothing compensated; once the lock is released the step runs, once."""
    caplog.set_level(logging.WARNING)
    seen: list[str] = []
    ran: list[str] = []
    app = tx_app(f"sqlite:///{tmp_path / 'busy.db'}?busy_timeout=300", seen, ran)
    hook = LockBeforeBooking(lock_holder)
    app.add_hook(hook)
    async with app:
        handle = await app.start("booking", 4)
        await eventually(lambda: lock_holder.locked_at is not None, what="the lock taken")
        await asyncio.sleep(1.5)  # five busy timeouts
        assert ran == ["reserve"], ran  # the step's transaction never began
        await asyncio.to_thread(lock_holder.release)
        assert await handle.result(timeout=20) == "booked, 1 booking(s)", seen
        await check_booked(app, handle.run_id, seen, ran, booked=4)
    assert ran == ["reserve", "book"], ran
    assert lock_holder.releasing_at is not None and hook.began[-1] > lock_holder.releasing_at
    # the step's own transaction met the lock, and was told so
    failed = [r.getMessage() for r in caplog.records
              if "the store failed" in r.getMessage() and handle.run_id in r.getMessage()]
    assert any("stayed locked by another process past the busy timeout" in m
               for m in failed), [r.getMessage() for r in caplog.records]
