"""A SQLite audit chain whose head lives in the ``audit`` row ``(app || char(1), 0)``.

Each chain's head is kept there, right after the app's last record (docs/performance.md,
"Round twenty-four (saga, SQLite)", "Round twenty-five (saga, SQLite): the audit head
read from either layout" and "Round twenty-six (audit head)"): since SQLite schema 32
every audited commit moves it, and moves ``audit_head`` too while the app's gate is
closed (``store.lean_apps``: an older process may read ``audit_head`` alone). The head
is read from either place, whichever is further along. Each test writes a chain with
this release (its gate closed, or open), sets the head row to the chain's head by SQL and
``audit_head`` behind it or emptied (a file where the head row's writer went on without
an older process), then appends, verifies or tampers (the cases of
``test_audit_anchor.py`` and of the store contract's tamper tests, the head row moved
where they moved the ``audit_head`` row).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cantata.cli import common
from cantata.cli.main import main
from cantata.errors import StoreCorrupt
from cantata.model.records import AuditReport, RunWrite
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_ops import AUDIT_COLS
from cantata.testing.contract.support import forged_after, new_run
from tests.helpers import rehashed_plain

KEY = "audit-key-0123456789abcdef"
APP = "shop"

#: How ``audit_head`` is left once the head row is written: ``None`` emptied (a file a
#: later release migrated), else that many records behind the head row (one an older
#: process last moved before the later release's writes went on without it).
LAYOUTS = [pytest.param(None, id="audit_head-empty"), pytest.param(2, id="audit_head-behind")]


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    monkeypatch.setattr(common.console, "_width", 300)


@pytest.fixture(params=["gate-closed", "gate-open"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "c.db"))
    await s.open()
    s.set_audit_key(APP, audit.AuditKey(KEY))
    if request.param == "gate-open":  # no older process: audit_head is not written
        s.lean_apps.add(APP)
    try:
        yield s
    finally:
        await s.close()


def sql(store: SQLiteStore, statement: str, *args: Any) -> list[Any]:
    """Raw SQL on the store's file, on a connection of its own (an attacker's, or the
    later release's)."""
    with sqlite3.connect(store.path) as conn:
        return conn.execute(statement, args).fetchall()


def unprotected(store: SQLiteStore) -> None:
    sql(store, "DROP TRIGGER IF EXISTS audit_no_update")
    sql(store, "DROP TRIGGER IF EXISTS audit_no_delete")


async def busy(store: SQLiteStore, runs: int = 3) -> int:
    """``runs`` runs created and ended (3 records each); the records' count."""
    for _ in range(runs):
        run, _ = await store.create_run(new_run(APP))
        await store.commit_run(APP, run.run_id, 0, RunWrite(status=RunStatus.RUNNING))
        await store.commit_run(APP, run.run_id, 0, RunWrite(
            status=RunStatus.COMPLETED, result="1", release=True))
    return 3 * runs


def to_head_row(store: SQLiteStore, behind: int | None) -> tuple[int, str]:
    """The head of ``APP``'s chain (its last record) written as the head row writer
    writes it: the row ``(app || char(1), 0)`` of ``audit`` (its seq as text in
    ``data``, its ``prev_hash`` and ``hash``); ``audit_head`` emptied (``behind``
    ``None``) or set ``behind`` records back. Returns the head ``(seq, hash)``."""
    [(seq, prev_hash, hash_)] = sql(
        store, "SELECT seq, prev_hash, hash FROM audit WHERE app=? ORDER BY seq DESC LIMIT 1",
        APP)
    sql(store, "INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, "
        "hash) VALUES (? || char(1), 0, 0, 'cantata', 'audit.head', '', ?, ?, ?) "
        "ON CONFLICT (app, seq) DO UPDATE SET data=excluded.data, "
        "prev_hash=excluded.prev_hash, hash=excluded.hash", APP, str(seq), prev_hash, hash_)
    if behind is None:
        sql(store, "DELETE FROM audit_head WHERE app=?", APP)
    else:
        sql(store, "INSERT INTO audit_head (app, seq, prev_hash, hash) SELECT app, seq, "
            "prev_hash, hash FROM audit WHERE app=? AND seq=? ON CONFLICT (app) DO UPDATE "
            "SET seq=excluded.seq, prev_hash=excluded.prev_hash, hash=excluded.hash",
            APP, seq - behind)
    return seq, hash_


def move_head_row(store: SQLiteStore, seq: int) -> None:
    """Point the head row at record ``seq`` (the triggers dropped first)."""
    [(prev_hash, hash_)] = sql(
        store, "SELECT prev_hash, hash FROM audit WHERE app=? AND seq=?", APP, seq)
    sql(store, "UPDATE audit SET data=?, prev_hash=?, hash=? WHERE app=? || char(1) AND seq=0",
        str(seq), prev_hash, hash_, APP)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out + err


async def export(capsys: pytest.CaptureFixture[str], store: SQLiteStore, path: Path) -> None:
    code, out = await cli(capsys, "audit", "head", "--store", f"sqlite:///{store.path}",
                          "--app", APP)
    assert code == 0, out
    await asyncio.to_thread(path.write_text, out)


async def verify(capsys: pytest.CaptureFixture[str], store: SQLiteStore,
                 *more: str) -> tuple[int, str]:
    return await cli(capsys, "audit", "verify", "--store", f"sqlite:///{store.path}",
                     "--app", APP, *more)


# -- read as it is, then appended to ----------------------------------------------------


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_the_head_row_is_the_head_and_no_record(
    store: SQLiteStore, behind: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    n = await busy(store)
    head = to_head_row(store, behind)
    assert head[0] == n
    assert await store.audit_head(APP) == head
    assert await store.audit_head_seq(APP) == n
    records = await store.audit_records(APP, limit=1000)
    assert [r.seq for r in records] == list(range(1, n + 1))  # the head row left out
    assert await store.audit_records(APP, after_seq=n) == []
    assert [r.seq for r in await store.audit_records(APP + "\x01", after_seq=-1)] == [0]
    assert await store.verify_audit(APP, key=audit.AuditKey(KEY)) == AuditReport(True, n)
    code, out = await verify(capsys, store)
    assert code == 0 and "chain intact (keyed)" in out, out


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_appends_continue_the_chain_from_the_head_row(
    store: SQLiteStore, behind: int | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = await busy(store)
    exported = tmp_path / "head.json"
    await export(capsys, store, exported)
    seq, hash_ = to_head_row(store, behind)
    await busy(store, 1)
    await store.record_action(APP, "cli:alice", "run.retried", "r-1", {})
    records = await store.audit_records(APP, limit=1000)
    assert [r.seq for r in records] == list(range(1, n + 5))
    assert records[seq].prev_hash == hash_  # record #n+1 follows the head row's
    # the head row is the head again; audit_head is too while the gate is closed, and
    # stays where it was left once it is open
    assert sql(store, "SELECT CAST(data AS INTEGER), hash FROM audit WHERE app=? || char(1) "
               "AND seq=0", APP) == [(n + 4, records[-1].hash)]
    assert sql(store, "SELECT seq, hash FROM audit_head WHERE app=?", APP) == (
        [(n + 4, records[-1].hash)] if APP not in store.lean_apps
        else [] if behind is None else [(seq - behind, records[seq - behind - 1].hash)])
    assert await store.audit_head(APP) == (n + 4, records[-1].hash)
    assert await store.verify_audit(APP, key=audit.AuditKey(KEY)) == AuditReport(True, n + 4)
    code, out = await verify(capsys, store, "--head", str(exported))
    assert code == 0 and "chain intact (keyed)" in out, out
    await export(capsys, store, exported)  # the head exported is the further one
    assert json.loads(exported.read_text())["seq"] == n + 4


async def test_an_app_whose_head_is_only_a_head_row_is_listed(store: SQLiteStore) -> None:
    await store.record_action("quiet", "cli:alice", "token.created", "t", {"role": "admin"})
    sql(store, "INSERT OR IGNORE INTO audit (app, seq, time, actor, action, target, data, "
        "prev_hash, hash) SELECT app || char(1), 0, 0, 'cantata', 'audit.head', '', "
        "CAST(seq AS TEXT), prev_hash, hash FROM audit_head WHERE app='quiet'")
    sql(store, "DELETE FROM audit_head WHERE app='quiet'")
    apps = await store.apps()
    assert "quiet" in apps and not any("\x01" in a for a in apps)


# -- tampering: the cases of test_audit_anchor.py and the contract, head row moved -------


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_a_tail_deleted_with_the_head_row_moved_is_detected(
    store: SQLiteStore, behind: int | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    n = await busy(store)
    exported = tmp_path / "head.json"
    await export(capsys, store, exported)
    to_head_row(store, behind)
    unprotected(store)
    sql(store, "DELETE FROM audit WHERE app=? AND seq > ?", APP, n - 2)
    move_head_row(store, n - 2)
    if behind is not None:  # audit_head is at n - 2 already: the cut is consistent
        assert sql(store, "SELECT seq FROM audit_head WHERE app=?", APP) == [(n - 2,)]
    code, out = await verify(capsys, store, "--head", str(exported))
    assert code == 1 and "TAMPERED" in out and "deleted after the export" in out, out


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_a_tail_cut_without_the_head_row_moved_is_detected(
    store: SQLiteStore, behind: int | None
) -> None:
    n = await busy(store)
    to_head_row(store, behind)
    unprotected(store)
    sql(store, "DELETE FROM audit WHERE app=? AND seq = ?", APP, n)
    report = await store.verify_audit(APP, key=audit.AuditKey(KEY))
    assert (report.ok, report.first_bad_seq) == (False, n), report
    assert report.reason is not None and "missing" in report.reason
    assert f"whose head is #{n}" in report.reason


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_everything_deleted_is_detected(
    store: SQLiteStore, behind: int | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await busy(store)
    exported = tmp_path / "head.json"
    await export(capsys, store, exported)
    to_head_row(store, behind)
    unprotected(store)
    sql(store, "DELETE FROM audit WHERE app IN (?, ? || char(1))", APP, APP)
    sql(store, "DELETE FROM audit_head WHERE app=?", APP)
    code, out = await verify(capsys, store, "--head", str(exported))
    assert code == 1 and "TAMPERED" in out, out
    code, out = await verify(capsys, store)
    assert code == 1 and "no run.created audit record" in out, out


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_a_chain_rehashed_without_the_key_is_detected(
    store: SQLiteStore, behind: int | None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Record #2 changed, every hash recomputed with plain SHA-256, the head row's too."""
    await busy(store)
    exported = tmp_path / "head.json"
    await export(capsys, store, exported)
    to_head_row(store, behind)
    rows = sql(store, "SELECT seq, time, actor, action, target, data FROM audit WHERE app=? "
               "ORDER BY seq", APP)
    unprotected(store)
    for actor, prev, h, seq in rehashed_plain(rows):
        sql(store, "UPDATE audit SET actor=?, prev_hash=?, hash=? WHERE app=? AND seq=?",
            actor, prev, h, APP, seq)
    move_head_row(store, rows[-1][0])
    code, out = await verify(capsys, store)
    assert code == 1 and "TAMPERED" in out, out
    code, out = await verify(capsys, store, "--head", str(exported))
    assert code == 1 and "rewritten after the export" in out, out


@pytest.mark.parametrize("behind", LAYOUTS)
@pytest.mark.parametrize("how", ["data", "rehash", "delete"])
async def test_tampering_with_the_last_record_is_detected(
    store: SQLiteStore, behind: int | None, how: str
) -> None:
    n = await busy(store)
    to_head_row(store, behind)
    unprotected(store)
    if how == "delete":
        sql(store, "DELETE FROM audit WHERE app=? AND seq=?", APP, n)
    else:
        sql(store, "UPDATE audit SET actor='mallory' WHERE app=? AND seq=?", APP, n)
        if how == "rehash":  # its own hash recomputed (with the key, even)
            [(prev, time, action, target, data)] = sql(
                store, "SELECT prev_hash, time, action, target, data FROM audit WHERE app=? "
                "AND seq=?", APP, n)
            h = audit.chain_hash(prev, n, audit.tail(time, "mallory", action, target, data),
                                 audit.AuditKey(KEY))
            sql(store, "UPDATE audit SET hash=? WHERE app=? AND seq=?", h, APP, n)
    report = await store.verify_audit(APP, key=audit.AuditKey(KEY))
    assert (report.ok, report.first_bad_seq) == (False, n), report


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_a_changed_record_is_detected(
    store: SQLiteStore, behind: int | None, capsys: pytest.CaptureFixture[str]
) -> None:
    await busy(store)
    to_head_row(store, behind)
    unprotected(store)
    sql(store, "UPDATE audit SET actor='mallory' WHERE app=? AND seq=2", APP)
    code, out = await verify(capsys, store)
    assert code == 1 and "TAMPERED at record #2" in out, out


@pytest.mark.parametrize("behind", LAYOUTS)
async def test_a_record_forged_past_both_heads_is_detected_and_refuses_appends(
    store: SQLiteStore, behind: int | None
) -> None:
    n = await busy(store)
    head = to_head_row(store, behind)
    [last] = await store.audit_records(APP, after_seq=n - 1, limit=1)
    forged = forged_after(last)
    sql(store, f"INSERT INTO audit (app, {AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
        APP, forged.seq, forged.time, forged.actor, forged.action, forged.target,
        forged.data, forged.prev_hash, forged.hash)
    for exported in (None, head):
        report = await store.verify_audit(APP, key=audit.AuditKey(KEY), head=exported)
        assert (report.ok, report.first_bad_seq, report.records) == (False, n + 1, n), report
        assert report.reason is not None and f"past the chain's head (#{n})" in report.reason
    with pytest.raises(StoreCorrupt, match=rf"record #{n + 1} lies past its chain head"):
        await store.create_run(new_run(APP))
    assert len(await store.audit_records(APP, limit=1000)) == n + 1  # nothing appended
