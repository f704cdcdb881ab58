"""What a saga's commits write on SQLite (docs/performance.md, "Round twenty-four (saga,
SQLite)"), and a store of the version before (29) migrated with its audit chain.

Each page a commit changed is a WAL frame its COMMIT writes and syncs. Migration 0030
keeps each app's audit chain head as a row of `audit` right after the app's last
record (the append's record and the head it moves on one leaf, where `audit_head` was
one more b-tree in every audited commit) and drops `runs_live`, which no statement
reads.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import statistics
import struct
from collections import Counter
from pathlib import Path

import pytest

import cantata
from cantata import App
from cantata.cli import common
from cantata.cli.main import main
from cantata.model.access import Role, TokenRecord
from cantata.store import migrations
from cantata.store.sqlite import SQLiteStore
from tests.helpers import make_app

PAGE = 4096
FRAME = 24 + PAGE
WAL_HEADER = 32
KEY = "saga-pages-key-0123456789abcdef"


def _mx_frame(path: str) -> int:
    """The WAL's last committed frame (the WAL index header's mxFrame)."""
    fd = os.open(path + "-shm", os.O_RDONLY)
    try:
        return int(struct.unpack("=I", os.pread(fd, 4, 16))[0])
    finally:
        os.close(fd)


def _pages(path: str, first: int, last: int) -> list[int]:
    """The page numbers of WAL frames ``first`` to ``last`` (1-based, inclusive)."""
    with open(path + "-wal", "rb") as f:
        out = []
        for n in range(first, last + 1):
            f.seek(WAL_HEADER + (n - 1) * FRAME)
            out.append(struct.unpack(">I", f.read(4))[0])
        return out


def _saga_app(url: str) -> App:
    app = make_app(url, audit_key=KEY)

    @app.step
    async def one(n: int) -> int:
        return n + 1

    @app.step
    async def two(n: int) -> int:
        return n + 2

    @app.step
    async def three(n: int) -> int:
        return n + 3

    @app.workflow
    async def saga(ctx: cantata.WorkflowContext, n: int) -> int:
        return await ctx.run(three, await ctx.run(two, await ctx.run(one, n)))

    return app


async def _run_sagas(app: App, n: int, start: int = 0) -> None:
    async with app:
        for i in range(start, start + n):
            assert await (await app.start("saga", i)).result(timeout=30) == i + 6


async def test_a_saga_step_checkpoint_writes_its_audit_record_and_head_on_one_page(
    tmp_path: Path,
) -> None:
    """A step's checkpoint (its end, the next step begun) writes the run, its history,
    the step's attempts and one audit leaf holding the record and the chain's head: no
    `audit_head` page, and a run's creation and end no `runs_live` page."""
    path = str(tmp_path / "s.db")
    app = _saga_app(f"sqlite:///{path}")
    commits: list[list[int]] = []
    async with app:
        for i in range(120):
            before = _mx_frame(path)
            handle = await app.start("saga", i)
            assert await handle.result(timeout=30) == i + 6
            after = _mx_frame(path)
            if after > before:  # (a WAL that started over: skip)
                commits.append(_pages(path, before + 1, after))
    conn = sqlite3.connect(path)
    try:
        tree = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    finally:
        conn.close()
    named = [Counter(tree.get(p, "?") for p in pages) for pages in commits[40:]]
    assert len(named) >= 50
    assert not [n for n in named if "audit_head" in n or "runs_live" in n], named[:3]
    # (36 WAL pages at the median saga before migration 0030, 31 after; splits come
    # and go)
    assert statistics.median(sum(n.values()) for n in named) <= 33, named[:3]


# -- a version 29 store, migrated --------------------------------------------------------


def _as_version_29(path: Path) -> None:
    """Take a store of this release back to what schema 29 held: each app's chain head a
    row of `audit_head`, `runs_live`, the append-only triggers of schema 2."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN")
        conn.execute("DROP TRIGGER audit_no_update")
        conn.execute("DROP TRIGGER audit_no_delete")
        conn.execute("DROP TRIGGER audit_head_moved")
        conn.execute(
            "INSERT INTO audit_head (app, seq, prev_hash, hash) SELECT substr(app, 1, "
            "length(app) - 1), CAST(data AS INTEGER), prev_hash, hash FROM audit WHERE seq=0")
        conn.execute("DELETE FROM audit WHERE seq=0")
        conn.execute(
            "CREATE INDEX runs_live ON runs (app, workflow) "
            "WHERE (status='pending' OR status='running' OR status='compensating')")
        for n, script in sorted(migrations.scripts("sqlite").items()):
            if n == 2:  # its triggers, as they were
                text = script.read_text()
                for name in ("audit_no_update", "audit_no_delete"):
                    start = text.index(f"CREATE TRIGGER IF NOT EXISTS {name}")
                    conn.execute(text[start:text.index("END;", start) + 4])
        conn.execute("UPDATE cantata_meta SET value='29' WHERE key='schema_version'")
        conn.execute("COMMIT")
    finally:
        conn.close()


async def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out + err


async def test_a_version_29_store_keeps_its_audit_chain_across_the_migration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The chain's head moves into `audit` with its seq and hash: a head exported before
    the upgrade still verifies, appends go on from it, `verify` finds the chain intact
    and a forged record past the head is still reported; the emptied `audit_head`
    refuses the write of a Cantata older than the store."""
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    monkeypatch.setattr(common.console, "_width", 300)
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    await _run_sagas(_saga_app(url), 3)
    # (the head as `cantata audit head` signs it: the same seq and hash at schema 29)
    code, exported = await _cli(capsys, "audit", "head", "--store", url, "--app", "shop")
    assert code == 0, exported
    (tmp_path / "head.json").write_text(exported)
    _as_version_29(path)
    with sqlite3.connect(path) as conn:
        [(seq, _hash)] = conn.execute("SELECT seq, hash FROM audit_head").fetchall()
        assert seq == conn.execute("SELECT max(seq) FROM audit WHERE app='shop'").fetchone()[0]
        assert f'"seq":{seq},' in exported and _hash in exported

    await _run_sagas(_saga_app(url), 2, start=3)  # migrates to the latest version

    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'"
                            ).fetchone()[0] == str(migrations.latest("sqlite"))
        assert not conn.execute("SELECT * FROM audit_head").fetchall()
        assert not conn.execute(
            "SELECT 1 FROM sqlite_master WHERE name='runs_live'").fetchall()
        last = conn.execute("SELECT max(seq) FROM audit WHERE app='shop'").fetchone()[0]
        assert last > seq  # appended after the migrated head, no gap
        with pytest.raises(sqlite3.IntegrityError, match="restart it with the Cantata"):
            conn.execute("INSERT INTO audit_head (app, seq, prev_hash, hash) VALUES "
                         "('shop', ?, 'x', 'y')", (last + 1,))
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE audit SET actor='x' WHERE app='shop' AND seq=1")
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("DELETE FROM audit WHERE app='shop' AND seq=?", (last,))
    code, out = await _cli(capsys, "audit", "verify", "--store", url, "--app", "shop",
                           "--head", str(tmp_path / "head.json"))
    assert code == 0 and "chain intact (keyed)" in out, out
    store = SQLiteStore(str(path))  # an app with nothing but its audit chain is listed
    await store.open()
    try:
        await store.create_token(TokenRecord("ops", Role.VIEWER, "0" * 64, 1.0),
                                 apps=["audited"])
        assert await store.apps() == ["audited", "shop"]
        assert (await store.audit_head("audited"))[0] == 1  # type: ignore[index]
    finally:
        await store.close()

    with sqlite3.connect(path) as conn:  # a record appended behind Cantata's back
        row = conn.execute("SELECT time, actor, action, target, data, prev_hash, hash FROM "
                           "audit WHERE app='shop' AND seq=?", (last,)).fetchone()
        conn.execute("INSERT INTO audit (app, seq, time, actor, action, target, data, "
                     "prev_hash, hash) VALUES ('shop', ?, ?, ?, ?, ?, ?, ?, ?)",
                     (last + 1, *row))
    code, out = await _cli(capsys, "audit", "verify", "--store", url, "--app", "shop")
    assert code == 1 and f"record #{last + 1} of app 'shop' lies past the chain's head" in out, out
