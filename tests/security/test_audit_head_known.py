"""SQLite's audit chain head taken from the connection's last commit instead of read
(docs/performance.md, "Round twenty-seven (saga, SQLite statements)").

The first append of an app in a write transaction takes the head the store's
connection committed last (``TxConnection.known_heads``) when ``PRAGMA data_version``
says no other connection has committed since, and reads it (``sqlite_ops.audit_head``)
otherwise. Whatever another connection or process did in between (appended as an older
release does, moved the heads back, cut the tail, forged a record past the head), the
append must do what a read head would have made it do.
"""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest

from cantata.errors import StoreCorrupt
from cantata.model.records import AuditReport, RunWrite
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_thread import TxConnection
from cantata.testing.contract.support import new_run
from tests.security.test_audit_head_gate import (
    APP,
    KEY,
    busy,
    heads,
    last_record,
    older_append,
    sql,
)

HEAD_READ = "FROM audit_head h"  # (sqlite_ops._SELECT_HEADS, the head's read)


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)


@pytest.fixture(params=["closed", "open"])
async def store(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "c.db"))
    await s.open()
    s.set_audit_key(APP, audit.AuditKey(KEY))
    if request.param == "open":
        s.lean_apps.add(APP)
    try:
        yield s
    finally:
        await s.close()


def conn_of(store: SQLiteStore) -> TxConnection:
    conn = store._t._conn
    assert conn is not None
    return conn


def on_tx(fn: Callable[[TxConnection], None]) -> Callable[[sqlite3.Connection], None]:
    """``fn`` as the store's thread calls it: with its connection, a TxConnection."""
    return lambda c: fn(cast(TxConnection, c))


async def one_chain(store: SQLiteStore) -> int:
    """Every record follows the one before it, the head is the last, ``verify`` (keyed)
    passes. The number of records."""
    records = await store.audit_records(APP, limit=10_000)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash, after
    assert await store.audit_head(APP) == (records[-1].seq, records[-1].hash)
    report = await store.verify_audit(APP, key=audit.AuditKey(KEY))
    assert report == AuditReport(True, len(records)), report
    return len(records)


async def test_a_later_write_transaction_reads_no_head(store: SQLiteStore) -> None:
    """Alone on the file, the store reads an app's head once: every later audited
    transaction takes the one it committed (and still writes the head's rows)."""
    await busy(store, 1)
    statements: list[str] = []
    conn_of(store).set_trace_callback(statements.append)
    try:
        await busy(store, 2)
        await store.record_action(APP, "cli:alice", "run.retried", "r-1", {})
    finally:
        conn_of(store).set_trace_callback(None)
    assert not [s for s in statements if HEAD_READ in s]
    assert sum("PRAGMA data_version" in s for s in statements) == 7  # one a transaction
    assert heads(store.path)[1] == last_record(store.path)
    assert await one_chain(store) == 3 + 6 + 1


async def test_another_connections_appends_are_followed(store: SQLiteStore) -> None:
    """An older release's process (a connection of its own) appends between this
    store's transactions: each append of the store follows it, one chain. (Only while
    the gate is closed: an older process, which reads ``audit_head`` alone, keeps it.)"""
    store.lean_apps.discard(APP)
    await busy(store, 1)
    for n in range(3):
        older_append(store.path, f"older.{n}")
        await busy(store, 1)
        await store.record_action(APP, "cli:alice", "run.retried", f"r-{n}", {})
    assert await one_chain(store) == 3 + 3 * (1 + 3 + 1)


async def test_two_stores_on_one_file_keep_one_chain(store: SQLiteStore) -> None:
    """Two stores (two connections) appending in turn, as two workers do."""
    other = SQLiteStore(store.path)
    await other.open()
    other.set_audit_key(APP, audit.AuditKey(KEY))
    other.lean_apps.update(store.lean_apps)
    try:
        for _ in range(3):
            await busy(store, 1)
            await busy(other, 1)
    finally:
        await other.close()
    assert await one_chain(store) == 6 * 3


async def test_heads_moved_back_by_another_connection_are_read(store: SQLiteStore) -> None:
    """The tail cut and both heads moved back to the record before it, outside the
    store, between two of its transactions: the next append follows the moved heads,
    as it did when every append read them (the cut goes unseen without an exported
    head, as before: docs/security.md)."""
    await busy(store, 2)
    seq, _ = last_record(store.path)
    with sqlite3.connect(store.path) as conn:  # (the append-only triggers dropped first)
        rows = conn.execute("SELECT seq, prev_hash, hash FROM audit WHERE app=? AND seq=?",
                            (APP, seq - 1)).fetchone()
        conn.execute("DROP TRIGGER audit_no_delete")
        conn.execute("DELETE FROM audit WHERE app=? AND seq=?", (APP, seq))
        conn.execute("UPDATE audit_head SET seq=?, prev_hash=?, hash=? WHERE app=?",
                     (*rows, APP))
        conn.execute("UPDATE audit SET data=?, prev_hash=?, hash=? WHERE app=? || char(1) "
                     "AND seq=0", (str(rows[0]), rows[1], rows[2], APP))
    await store.record_action(APP, "cli:alice", "run.retried", "r-1", {})
    assert last_record(store.path)[0] == seq  # (not seq + 1: the moved head was read)
    assert await one_chain(store) == seq


async def test_a_record_forged_past_the_head_is_still_refused(store: SQLiteStore) -> None:
    await busy(store, 1)
    seq, hash_ = last_record(store.path)
    sql_rows: list[Any] = [APP, seq + 1, 1.0, "x", "forged", "t", "{}", hash_, "0" * 64]
    with sqlite3.connect(store.path) as conn:
        conn.execute("INSERT INTO audit (app, seq, time, actor, action, target, data, "
                     "prev_hash, hash) VALUES (?,?,?,?,?,?,?,?,?)", sql_rows)
    with pytest.raises(StoreCorrupt, match=f"record #{seq + 1} lies past its chain head"):
        await store.record_action(APP, "cli:alice", "run.retried", "r-1", {})
    assert sql(store.path, "SELECT count(*) FROM audit WHERE app=?", APP) == [(seq + 1,)]


async def test_a_commit_that_raises_leaves_the_head_unknown(store: SQLiteStore) -> None:
    """The heads a transaction wrote are known only once its COMMIT returned: one that
    raised (the transaction rolled back) leaves them to be read again, and so does a
    COMMIT run by a caller other than ``commit_write``."""
    await busy(store, 1)
    conn = conn_of(store)
    run, _ = await store.create_run(new_run(APP, status=RunStatus.RUNNING, owner="w1",
                                            fence=1))
    write = RunWrite(status=RunStatus.COMPLETED, result="1", release=True)

    class FailingCommit:
        def __init__(self, cursor: sqlite3.Cursor) -> None:
            self.cursor = cursor

        def execute(self, statement: str, *args: Any) -> sqlite3.Cursor:
            if statement == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error (a test's)")
            return self.cursor.execute(statement, *args)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.cursor, name)

    def failing(c: TxConnection) -> None:
        dml = c.dml
        c.dml = FailingCommit(dml)  # type: ignore[assignment]
        try:
            c.begin_write()
            assert store._commit_fenced(c, APP, run.run_id, 1, write)
            with pytest.raises(sqlite3.OperationalError):
                c.commit_write()
        finally:
            c.dml = dml
        assert APP not in c.known_heads
        c.execute("ROLLBACK")

    await store._t.read(on_tx(failing))
    await busy(store, 1)
    assert APP in conn.known_heads

    def commit_by_hand(c: TxConnection) -> None:
        c.begin_write()
        assert store._commit_fenced(c, APP, run.run_id, 1, write)
        c.before_commit()
        c.execute("COMMIT")
        assert APP not in c.known_heads

    await store._t.read(on_tx(commit_by_hand))
    await busy(store, 1)
    assert APP in conn.known_heads
    assert await one_chain(store) == 3 + 1 + 1 + 3 + 3
