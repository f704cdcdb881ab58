"""SQLite's audit chain head as this release writes it (docs/performance.md, "Round
twenty-six (audit head)").

Every audited commit moves the app's head row of ``audit`` (keyed ``(app || char(1),
0)``, beside the app's last record). While the app's gate is closed (``app not in
store.lean_apps``: a process of an older Cantata may still append) it moves the
``audit_head`` row too, which such a process reads and moves alone; once the gate is
open it leaves ``audit_head`` where it is, and a saga's commits write no page of it.
Readers take whichever head is further along, so the chain stays one across both
kinds of writers and across the gate opening and closing.
"""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import pytest

import cantata
from cantata.cli import common
from cantata.cli.main import main
from cantata.model.records import AuditReport, RunWrite
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.common import StoreBase
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_ops import AUDIT_COLS
from cantata.testing.contract.support import new_run
from tests.helpers import make_app
from tests.store.wal_frames import frame_pages, mx_frame

KEY = "audit-key-0123456789abcdef"
APP = "shop"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    monkeypatch.setattr(common.console, "_width", 300)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "c.db"))
    await s.open()
    s.set_audit_key(APP, audit.AuditKey(KEY))
    try:
        yield s
    finally:
        await s.close()


def sql(path: str, statement: str, *args: Any) -> list[Any]:
    with sqlite3.connect(path) as conn:
        return conn.execute(statement, args).fetchall()


def heads(path: str) -> tuple[tuple[int, str] | None, tuple[int, str] | None]:
    """``APP``'s head as ``audit_head`` holds it, and as its head row in ``audit`` does
    (``(seq, hash)``; ``None``: no such row)."""
    old = sql(path, "SELECT seq, hash FROM audit_head WHERE app=?", APP)
    row = sql(path, "SELECT CAST(data AS INTEGER), hash FROM audit WHERE app=? || char(1) "
              "AND seq=0", APP)
    return (old[0] if old else None), (row[0] if row else None)


def last_record(path: str) -> tuple[int, str]:
    [(seq, hash_)] = sql(path, "SELECT seq, hash FROM audit WHERE app=? ORDER BY seq DESC "
                         "LIMIT 1", APP)
    return seq, hash_


def older_append(path: str, action: str) -> None:
    """One record appended as a Cantata older than this release does (and as every
    release before round twenty-five read it): the head read from ``audit_head`` alone,
    the record inserted and ``audit_head`` moved, in one write transaction of its own."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT seq, hash FROM audit_head WHERE app=?", (APP,)).fetchone()
        now = time.time()
        seq, text, prev, hash_ = audit.next_link(
            None if row is None else (row[0], row[1]), now, "cli:older", action, "t", {},
            audit.AuditKey(KEY))
        conn.execute(f"INSERT INTO audit (app, {AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                     (APP, seq, now, "cli:older", action, "t", text, prev, hash_))
        conn.execute("INSERT INTO audit_head (app, seq, prev_hash, hash) VALUES (?,?,?,?) "
                     "ON CONFLICT (app) DO UPDATE SET seq=excluded.seq, "
                     "prev_hash=excluded.prev_hash, hash=excluded.hash", (APP, seq, prev, hash_))
        conn.execute("COMMIT")
    finally:
        conn.close()


async def busy(store: SQLiteStore, runs: int = 2) -> None:
    """``runs`` runs created and ended (3 records each, in 3 write transactions)."""
    for _ in range(runs):
        run, _ = await store.create_run(new_run(APP))
        await store.commit_run(APP, run.run_id, 0, RunWrite(status=RunStatus.RUNNING))
        await store.commit_run(APP, run.run_id, 0, RunWrite(
            status=RunStatus.COMPLETED, result="1", release=True))


async def verify_cli(capsys: pytest.CaptureFixture[str], path: str) -> tuple[int, str]:
    code = await asyncio.to_thread(
        main, ["audit", "verify", "--store", f"sqlite:///{path}", "--app", APP])
    out, err = capsys.readouterr()
    return code, out + err


async def check_one_chain(store: SQLiteStore, capsys: pytest.CaptureFixture[str]) -> int:
    """Every record follows the one before it; ``verify`` (store and CLI, keyed) passes.
    The number of records."""
    records = await store.audit_records(APP, limit=10_000)
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    for before, after in itertools.pairwise(records):
        assert after.prev_hash == before.hash, after
    assert await store.audit_head(APP) == (records[-1].seq, records[-1].hash)
    report = await store.verify_audit(APP, key=audit.AuditKey(KEY))
    assert report == AuditReport(True, len(records)), report
    code, out = await verify_cli(capsys, store.path)
    assert code == 0 and "chain intact (keyed)" in out, out
    return len(records)


async def test_gate_closed_an_older_writer_between_appends_keeps_one_chain(
    store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    assert APP not in store.lean_apps  # the gate is closed by default
    await busy(store)
    assert heads(store.path) == (last_record(store.path),) * 2  # both heads moved
    older_append(store.path, "older.one")
    older_append(store.path, "older.two")
    # the older writer moved audit_head alone: the head row is two records behind
    old, row = heads(store.path)
    assert old == last_record(store.path) and row is not None and row[0] == old[0] - 2
    await busy(store, 1)  # this release appends after the older writer's records
    await store.record_action(APP, "cli:alice", "run.retried", "r-1", {})
    assert heads(store.path) == (last_record(store.path),) * 2
    older_append(store.path, "older.three")  # and the older writer after this release's
    await busy(store, 1)
    assert heads(store.path) == (last_record(store.path),) * 2
    n = await check_one_chain(store, capsys)
    assert n == 6 + 2 + 3 + 1 + 1 + 3
    actions = [r.action for r in await store.audit_records(APP, limit=100)]
    assert actions.count("older.one") == actions.count("older.three") == 1


async def test_the_gate_opening_and_closing_keeps_one_chain(
    store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    """Open, ``audit_head`` is left behind and the head row moves alone; closed again,
    the next append continues from the head row and moves both again."""
    await busy(store, 1)
    closed_at = last_record(store.path)
    store.lean_apps.add(APP)
    await busy(store)
    await store.record_action(APP, "cli:alice", "run.retried", "r-1", {})
    assert heads(store.path) == (closed_at, last_record(store.path))
    await check_one_chain(store, capsys)
    store.lean_apps.discard(APP)
    await busy(store, 1)
    assert heads(store.path) == (last_record(store.path),) * 2
    assert await check_one_chain(store, capsys) == 3 + 6 + 1 + 3
    # what an older writer beside the closed gate reads is the head again
    older_append(store.path, "older.one")
    await busy(store, 1)
    assert await check_one_chain(store, capsys) == 13 + 1 + 3


async def test_a_store_lean_from_the_start_has_no_audit_head_row(
    store: SQLiteStore, capsys: pytest.CaptureFixture[str]
) -> None:
    store.lean_apps.add(APP)
    await busy(store)
    await store.record_action(APP, "cli:alice", "token.created", "t", {"role": "admin"})
    assert heads(store.path) == (None, last_record(store.path))
    assert await check_one_chain(store, capsys) == 7
    assert APP in await store.apps()


def _saga_app(url: str) -> cantata.App:
    app = make_app(url, audit_key=KEY)

    @app.step
    async def one(n: int) -> int:
        return n + 1

    @app.step
    async def two(n: int) -> int:
        return n + 2

    @app.workflow
    async def saga(ctx: cantata.WorkflowContext, n: int) -> int:
        result: int = await ctx.run(two, await ctx.run(one, n))
        return result

    return app


async def test_a_sagas_commits_with_the_gate_open_write_no_audit_head_page(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Gate open, no saga's commits write a page of `audit_head` (before schema 32
    every audited commit wrote one: ~1 a commit), the head row is the head, and the
    chain verifies (store and CLI, keyed). (The gate is opened by hand: the engine's
    own gate opens it at the worker's first heartbeat when no older worker is there.
    The gate closed is tested without an engine, above.)"""
    path = str(tmp_path / "s.db")
    app = _saga_app(f"sqlite:///{path}")
    commits: list[list[int]] = []
    async with app:
        cast(StoreBase, app.store).lean_apps.add(APP)
        for i in range(50):
            before = mx_frame(path)
            assert await (await app.start("saga", i)).result(timeout=30) == i + 3
            after = mx_frame(path)
            if after > before:  # (a WAL that started over: skip)
                commits.append(frame_pages(path, before + 1, after))
        with sqlite3.connect(path) as conn:
            tree = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
        named = [Counter(tree.get(p, "?") for p in pages) for pages in commits[5:]]
        assert len(named) >= 30
        assert not [n for n in named if "audit_head" in n], named[:3]
        assert all(n["audit"] >= 1 for n in named), named[:3]
        old, row = heads(path)
        assert row == last_record(path) and (old is None or old[0] < row[0])
        report = await app.store.verify_audit(APP, key=audit.AuditKey(KEY))
        assert report.ok and report.records == row[0], report
    code, out = await verify_cli(capsys, path)
    assert code == 0 and "chain intact (keyed)" in out, out


@pytest.mark.parametrize("lean", [False, True], ids=["gate-closed", "gate-open"])
async def test_a_tail_cut_with_audit_head_alone_moved_back_is_detected(
    store: SQLiteStore, lean: bool
) -> None:
    """Moving back the `audit_head` row alone (as it was the whole head before schema
    32) no longer hides a tail cut: the head row still names the last record."""
    if lean:
        store.lean_apps.add(APP)
    await busy(store)
    n, _ = last_record(store.path)
    sql(store.path, "DROP TRIGGER IF EXISTS audit_no_delete")
    sql(store.path, "DELETE FROM audit WHERE app=? AND seq > ?", APP, n - 2)
    sql(store.path, "INSERT INTO audit_head (app, seq, prev_hash, hash) SELECT app, seq, "
        "prev_hash, hash FROM audit WHERE app=? AND seq=? ON CONFLICT (app) DO UPDATE SET "
        "seq=excluded.seq, prev_hash=excluded.prev_hash, hash=excluded.hash", APP, n - 2)
    report = await store.verify_audit(APP, key=audit.AuditKey(KEY))
    assert (report.ok, report.first_bad_seq) == (False, n - 1), report
    assert report.reason is not None and "missing" in report.reason, report


async def test_a_version_30_store_gets_head_rows_and_keeps_audit_head(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Migration 0032 on a store as releases before it left it (the head in
    `audit_head` alone, records append-only to the last row): each head copied into its
    head row, `audit_head` kept and still taking an older writer's rows, the head row
    movable, the chain one."""
    path = str(tmp_path / "c.db")
    s = SQLiteStore(path)
    await s.open()
    s.set_audit_key(APP, audit.AuditKey(KEY))
    await busy(s)
    await s.close()
    with sqlite3.connect(path) as conn:  # back to schema 30's layout
        conn.execute("DELETE FROM audit WHERE seq=0")
        for trigger in ("update", "delete"):
            conn.execute(f"DROP TRIGGER audit_no_{trigger}")
            conn.execute(f"CREATE TRIGGER audit_no_{trigger} BEFORE {trigger.upper()} ON audit "
                         "BEGIN SELECT RAISE(ABORT, 'the Cantata audit log is append-only'); "
                         "END")
        conn.execute("UPDATE cantata_meta SET value='30' WHERE key='schema_version'")
    assert heads(path) == (last_record(path), None)
    s = SQLiteStore(path)
    await s.open()
    s.set_audit_key(APP, audit.AuditKey(KEY))
    try:
        assert await s.audit_head_seq(APP) == 6  # (opened: migrated)
        assert heads(path) == (last_record(path),) * 2
        older_append(path, "older.one")  # audit_head still takes an older writer's rows
        await busy(s, 1)
        assert heads(path) == (last_record(path),) * 2
        assert await check_one_chain(s, capsys) == 6 + 1 + 3
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            sql(path, "UPDATE audit SET actor='mallory' WHERE app=? AND seq=2", APP)
    finally:
        await s.close()
