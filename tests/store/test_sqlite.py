"""The store contract on a SQLite file, plus what only a file can get wrong."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import sys
import textwrap
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from cantata.errors import StoreCorrupt
from cantata.model.event import Event
from cantata.model.records import AuditReport, RunRecord, RunWrite, TaskRecord
from cantata.model.status import RunStatus
from cantata.store import migrations
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_open import STORE_MARK, script_statements
from cantata.testing.contract.support import new_run

ROOT = Path(__file__).resolve().parents[2]


async def test_foreign_sqlite_file_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    with conn:
        conn.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT)")
        conn.execute("INSERT INTO customers (name) VALUES ('ada')")
    conn.close()
    before = path.read_bytes()
    with pytest.raises(StoreCorrupt, match="another application"):
        await SQLiteStore(str(path)).open()
    assert path.read_bytes() == before  # not even switched to WAL
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name FROM customers").fetchall() == [("ada",)]
    conn.close()


async def test_garbage_file_is_refused_and_left_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "garbage.db"
    garbage = b"this is not a database, just some text\n" * 200
    path.write_bytes(garbage)
    with pytest.raises(StoreCorrupt, match="not a usable SQLite database"):
        await SQLiteStore(str(path)).open()
    assert path.read_bytes() == garbage
    assert os.listdir(tmp_path) == ["garbage.db"]  # no -wal / -shm / -journal either


async def test_two_connections_on_one_file(tmp_path: Path) -> None:
    path = str(tmp_path / "shared.db")
    a, b = SQLiteStore(path), SQLiteStore(path)
    await a.open()
    await b.open()
    try:
        run, _ = await a.create_run(new_run("shop"))
        assert await b.get_run("shop", run.run_id) == run
        event: Event[Any] = Event("order.placed", {"n": 1})
        write = RunWrite(events=[event], status=RunStatus.RUNNING)
        await b.commit_run("shop", run.run_id, 0, write)
        assert await a.get_event("shop", event.id) == event
        stored = await a.get_run("shop", run.run_id)
        assert stored is not None and stored.status == RunStatus.RUNNING
    finally:
        await a.close()
        await b.close()


async def test_reopening_a_file_keeps_its_data(tmp_path: Path) -> None:
    path = str(tmp_path / "keep.db")
    first = SQLiteStore(path)
    await first.open()
    run, _ = await first.create_run(new_run("shop"))
    await first.close()
    second = SQLiteStore(path)
    await second.open()
    try:
        assert await second.get_run("shop", run.run_id) == run
    finally:
        await second.close()


def make_v1_store(path: Path, run: RunRecord) -> None:
    """A store file as Cantata with schema version 1 left it, holding ``run``."""
    script = resources.files("cantata.store").joinpath("migrations/sqlite/0001_initial.sql")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE cantata_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "INSERT INTO cantata_meta VALUES ('mark', ?), ('schema_version', '1')", (STORE_MARK,)
        )
        for statement in script_statements(script.read_text()):
            conn.execute(statement)
        conn.execute(
            "INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, created_at, "
            "updated_at) VALUES (?,?,?,?,?,?,?,?)",
            (run.app, run.run_id, run.workflow, str(run.status), run.args, run.correlation_id,
             run.created_at, run.updated_at),
        )
    finally:
        conn.close()


async def test_a_version_1_file_is_upgraded_in_place(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    old = new_run("shop")
    make_v1_store(path, old)
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert await store.get_run("shop", old.run_id) == old
        assert await store.verify_audit("shop") == AuditReport(True, 0)  # no history before v2
        await store.commit_run("shop", old.run_id, 0, RunWrite(
            tasks=[TaskRecord(f"{old.run_id}:inv.reserve#1", old.run_id, "inv.reserve#1",
                              "inv.reserve", "inventory", "[]")],
            status=RunStatus.RUNNING,
        ))
        assert len(await store.tasks_of_run("shop", old.run_id)) == 1
        [rec] = await store.audit_records("shop")
        assert (rec.seq, rec.action) == (1, "run.status")
        assert (await store.verify_audit("shop")).ok
        assert await store.apps() == ["shop"]
    finally:
        await store.close()
    assert_latest_version(path)


def assert_latest_version(path: Path) -> None:
    """The store file is at the schema version of this Cantata's migrations."""
    conn = sqlite3.connect(path)
    try:
        version = conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'")
        assert version.fetchone()[0] == str(migrations.latest("sqlite"))
    finally:
        conn.close()


async def test_the_audit_log_refuses_updates_and_deletes(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "a.db"))
    await store.open()
    try:
        await store.create_run(new_run("shop"))
        for sql in ("UPDATE audit SET actor='mallory'", "DELETE FROM audit"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                await store._t.write(lambda c, sql=sql: c.execute(sql))  # type: ignore[misc]
        assert (await store.verify_audit("shop")) == AuditReport(True, 1)
    finally:
        await store.close()


OPENER = textwrap.dedent(
    """
    import asyncio, sys, time
    from cantata.store.sqlite import SQLiteStore
    from cantata.testing.contract.support import new_run

    async def main(path, start_at):
        time.sleep(max(0.0, start_at - time.time()))
        store = SQLiteStore(path)
        await store.open()
        await store.create_run(new_run("shop"))
        await store.close()

    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    """
)


@pytest.mark.slow
async def test_processes_opening_one_new_file_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "race.db")
    start_at = time.time() + 1.0  # every process is past its imports by then
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", OPENER, path, str(start_at),
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(8)
    ]
    for proc in procs:
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
    store = SQLiteStore(path)
    await store.open()
    try:
        assert len(await store.list_runs("shop")) == 8
    finally:
        await store.close()


SLOW_CREATOR = textwrap.dedent(
    """
    import asyncio, sys, time
    from cantata.store import sqlite_open
    from cantata.store.sqlite import SQLiteStore
    from cantata.testing.contract.support import new_run

    set_up = sqlite_open._set_up

    def stalled(*args, **kwargs):  # a creator the machine holds up for seconds
        sqlite_open._set_up = set_up
        time.sleep(2.5)
        return set_up(*args, **kwargs)

    sqlite_open._set_up = stalled

    async def main(path):
        store = SQLiteStore(path)
        await store.open()
        await store.create_run(new_run("shop"))
        await store.close()

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.mark.slow
async def test_a_store_being_created_is_never_seen_empty_by_another_process(
    tmp_path: Path,
) -> None:
    """A process creating a new store that is held up between the file's creation and
    its first page (a loaded machine) does not make another process opening the same
    path refuse it as an emptied store: the store appears whole or not at all."""
    path = tmp_path / "race.db"
    slow = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SLOW_CREATOR, str(path),
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    # the slow creator has begun (its file, or its draft, exists) and is held up
    deadline = time.monotonic() + 30
    while not any(n.startswith((".race.db.", "race.db")) for n in os.listdir(tmp_path)):
        assert time.monotonic() < deadline, "the slow creator never began"
        await asyncio.sleep(0.02)
    quick = await asyncio.create_subprocess_exec(
        sys.executable, "-c", OPENER, str(path), "0",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    for proc in (quick, slow):
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".")] == []  # no draft left
    store = SQLiteStore(str(path))
    await store.open()
    try:
        assert len(await store.list_runs("shop")) == 2
    finally:
        await store.close()


async def test_a_failing_write_in_a_group_commit_undoes_only_itself(tmp_path: Path) -> None:
    """Writes queued together share one transaction; one that fails (after writing) is
    undone alone, the others commit, and the audit chain they extend stays whole."""
    from cantata.store import audit, sqlite_ops
    from cantata.store.sqlite_open import connect
    from cantata.store.sqlite_thread import ConnectionThread

    path = tmp_path / "batch.db"
    commits: list[set[str]] = []
    thread = ConnectionThread(lambda: connect(str(path), "sqlite://batch", "FULL"),
                              commits.append, "test-batch")
    thread.start()
    gate = threading.Event()

    def blocker(c: sqlite3.Connection) -> None:
        gate.wait(5)

    def good(n: int) -> Any:
        def op(c: sqlite3.Connection) -> int:
            c.execute("INSERT INTO cantata_meta VALUES (?, 'x')", (f"good{n}",))
            sqlite_ops.audit_append(c, "a", ("t", "test.good", str(n), {}))
            return n
        return op

    def bad(c: sqlite3.Connection) -> None:
        c.execute("INSERT INTO cantata_meta VALUES ('bad', 'x')")
        sqlite_ops.audit_append(c, "a", ("t", "test.bad", "-", {}))
        raise ValueError("this operation fails after writing")

    try:
        first = asyncio.ensure_future(thread.write(blocker, "x"))
        await asyncio.sleep(0.05)  # the thread is now inside the blocker's batch
        queued = [asyncio.ensure_future(thread.write(op, "c")) for op in (good(1), bad, good(2))]
        await asyncio.sleep(0.05)
        gate.set()
        await first
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert results[0] == 1 and results[2] == 2
        assert isinstance(results[1], ValueError)
        keys = await thread.read(
            lambda c: [r[0] for r in c.execute("SELECT key FROM cantata_meta").fetchall()]
        )
        assert "good1" in keys and "good2" in keys and "bad" not in keys
        records = await thread.read(lambda c: sqlite_ops.audit_records(c, "a", 0, 100))
        assert [r.action for r in records] == ["test.good", "test.good"]
        head = await thread.read(lambda c: sqlite_ops.audit_head(c, "a"))
        assert head == (2, records[-1].hash)
        assert audit.record_hash(records[1]) == records[1].hash
        assert records[1].prev_hash == records[0].hash
    finally:
        gate.set()
        thread.stop()


async def test_a_version_19_file_indexes_attributes_without_triggers(tmp_path: Path) -> None:
    """Migration 0020 drops the history triggers that indexed attributes; the writes
    index them instead: the attributes set before the upgrade are found as before, and
    those set after it too (a later value replacing the earlier)."""
    from cantata.testing.contract.operate import attrs

    path = tmp_path / "old.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        old, _ = await store.create_run(new_run("shop", owner="w1"))
        await store.commit_run("shop", old.run_id, old.fence, RunWrite(
            entries=[attrs("set_attributes#1", 1, customer="c1")]))
    finally:
        await store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    try:  # as version 19 left it: the triggers index the attributes
        for line in ("history_attrs_insert AFTER INSERT", "history_attrs_update AFTER UPDATE"):
            name, when = line.split(" ", 1)
            conn.execute(
                f"CREATE TRIGGER IF NOT EXISTS {name} {when} ON history "
                "WHEN NEW.kind = 'attrs' AND NEW.detail IS NOT NULL BEGIN "
                "INSERT INTO run_attributes (app, run_id, name, value) "
                "SELECT NEW.app, NEW.run_id, j.key, CAST(j.value AS TEXT) "
                "FROM json_each(NEW.detail) j WHERE true "
                "ON CONFLICT (app, run_id, name) DO UPDATE SET value = excluded.value; END"
            )
        conn.execute("UPDATE cantata_meta SET value='19' WHERE key='schema_version'")
    finally:
        conn.close()
    store = SQLiteStore(str(path))
    await store.open()
    try:
        new, _ = await store.create_run(new_run("shop", owner="w1"))
        await store.commit_run("shop", new.run_id, new.fence, RunWrite(entries=[
            attrs("set_attributes#1", 1, customer="c2", tier="gold"),
            attrs("set_attributes#2", 2, tier="silver"),
        ]))
        assert await store.run_attributes("shop", [old.run_id, new.run_id]) == {
            old.run_id: {"customer": "c1"},
            new.run_id: {"customer": "c2", "tier": "silver"},
        }
        found = await store.find_runs("shop", attributes={"tier": "silver"})
        assert [r.run_id for r in found] == [new.run_id]
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute(
            "SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name='history'"
        ).fetchall() == []
    finally:
        conn.close()
    assert_latest_version(path)
