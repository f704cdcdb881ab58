"""The Python around a SQLite write's statements, cut (docs/performance.md, round
twenty-five): ``None`` bound through an adapter registered for it (sqlite3's search
for one, failing, cost ~3,200 instructions a ``None``), the write path's statements
run on one cursor of the connection. What is stored must not change: ``None`` is
still NULL, and an adapter for ``None`` registered by someone else is kept."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cantata.model.records import Attempt, EntryKind, EntryStatus, HistoryEntry, RunWrite
from cantata.model.status import RunStatus
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import new_run

APP = "stmts"
NONE_KEY = (type(None), sqlite3.PrepareProtocol)


@pytest.fixture
def adapters() -> Iterator[None]:
    """sqlite3's adapter for ``None`` as it was before the test, put back after it."""
    before = sqlite3.adapters.get(NONE_KEY)
    sqlite3.adapters.pop(NONE_KEY, None)
    try:
        yield
    finally:
        sqlite3.adapters.pop(NONE_KEY, None)
        if before is not None:
            sqlite3.adapters[NONE_KEY] = before


@pytest.fixture
async def store(tmp_path: Path, adapters: None) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "stmts.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_none_is_bound_as_null_through_the_adapter(
    store: SQLiteStore, tmp_path: Path
) -> None:
    assert NONE_KEY in sqlite3.adapters  # registered by the store's connections
    run = new_run(APP, status=RunStatus.RUNNING, owner="w1", fence=1)
    await store.create_run(run)
    running = HistoryEntry("a#1", EntryKind.STEP, "a", EntryStatus.RUNNING, 1, attempts=1,
                           started_at=1.0)
    await store.commit_run(APP, run.run_id, 1, RunWrite(
        entries=[running], attempts=[Attempt("a#1", 1, 1.0)]))
    c = sqlite3.connect(tmp_path / "stmts.db")
    try:
        # the empty columns of the run, its history and its attempt: NULL, not '' or 0
        assert c.execute(
            "SELECT typeof(result), typeof(error), typeof(idempotency_key), "
            "typeof(deadline_at) FROM runs WHERE run_id=?", (run.run_id,),
        ).fetchone() == ("null",) * 4
        assert c.execute(
            "SELECT typeof(result), typeof(error), typeof(error_type), typeof(ended_at), "
            "typeof(wake_at), typeof(detail) FROM history WHERE run_id=?", (run.run_id,),
        ).fetchone() == ("null",) * 6
        assert c.execute(
            "SELECT typeof(ended_at), typeof(error_type), typeof(error) FROM attempts "
            "WHERE run_id=?", (run.run_id,),
        ).fetchone() == ("null",) * 3
        assert c.execute("SELECT ? IS NULL", (None,)).fetchone() == (1,)  # any connection
    finally:
        c.close()
    assert (await store.verify_audit(APP)).ok


async def test_an_adapter_for_none_registered_before_is_kept(
    tmp_path: Path, adapters: None
) -> None:
    def mine(value: None) -> str:
        return "mine"

    sqlite3.register_adapter(type(None), mine)
    s = SQLiteStore(str(tmp_path / "kept.db"))
    await s.open()
    try:
        assert sqlite3.adapters[NONE_KEY] is mine
    finally:
        await s.close()
