"""A keyed audit chain and an exported head: every kind of rewrite is detected.

Each test builds a log through a real app, exports the signed head with the CLI,
tampers with raw SQL (append-only triggers disabled, as an attacker with the
database's credentials would), then runs ``cantata audit verify``.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from cantata import App
from cantata.cli import common
from cantata.cli.main import main
from tests.helpers import rehashed_plain

KEY = "audit-key-0123456789abcdef"


@pytest.fixture(autouse=True)
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.delenv("CANTATA_STORE", raising=False)
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    monkeypatch.setattr(common.console, "_width", 300)


class Db:
    """Raw SQL on the store, as an attacker with the database's credentials."""

    def __init__(self, url: str, run: Callable[[str, tuple[Any, ...]], Any], dialect: str):
        self.url, self._run, self.dialect = url, run, dialect

    async def sql(self, statement: str, *args: Any) -> Any:
        if self.dialect == "postgres":
            n = iter(range(1, 100))
            statement = "".join(f"${next(n)}" if ch == "?" else ch for ch in statement)
        return await self._run(statement, args)

    async def set_head(self, app: str, hash_: str, seq: int | None = None) -> None:
        """Move ``app``'s recorded chain head (its seq too, if given): on SQLite both
        of its rows, ``audit_head``'s and the head row of ``audit`` keyed (app ||
        char(1), 0) (schema 32: every commit moves that row, ``audit_head`` only while
        an older process may read it), as an attacker who knows the layout would."""
        if seq is None:
            await self.sql("UPDATE audit_head SET hash=? WHERE app=?", hash_, app)
        else:
            await self.sql("UPDATE audit_head SET seq=?, hash=? WHERE app=?", seq, hash_, app)
        if self.dialect == "sqlite":
            await self.sql("UPDATE audit SET hash=?, data=coalesce(?, data) WHERE app=? "
                           "AND seq=0", hash_, None if seq is None else str(seq), app + "\x01")

    async def delete_head(self, app: str) -> None:
        await self.sql("DELETE FROM audit_head WHERE app=?", app)
        if self.dialect == "sqlite":
            await self.sql("DELETE FROM audit WHERE app=? AND seq=0", app + "\x01")

    async def unprotected(self) -> None:
        if self.dialect == "postgres":
            await self.sql("ALTER TABLE audit DISABLE TRIGGER audit_append_only")
        else:
            await self.sql("DROP TRIGGER IF EXISTS audit_no_update")
            await self.sql("DROP TRIGGER IF EXISTS audit_no_delete")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Db]:
    if request.param == "sqlite":
        path = tmp_path / "c.db"

        async def run_sqlite(statement: str, args: tuple[Any, ...]) -> Any:
            with sqlite3.connect(path) as conn:
                return conn.execute(statement, args).fetchall()

        yield Db(f"sqlite:///{path}", run_sqlite, "sqlite")
        return
    base: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")

    async def run_pg(statement: str, args: tuple[Any, ...]) -> Any:
        conn = await asyncpg.connect(base, server_settings={"search_path": schema})
        try:
            return await conn.fetch(statement, *args)
        finally:
            await conn.close()

    yield Db(f"{base}?schema={schema}", run_pg, "postgres")


async def populate(url: str, runs: int = 3, key: str | None = KEY) -> None:
    """``runs`` runs of a shop app keyed with ``key`` (``None``: the environment's keys)."""
    app = App("shop", store=url, audit_key=key, poll_interval=0.05)

    @app.step
    def pay(x: int) -> int:
        return x

    @app.workflow
    async def order(ctx: Any, x: int) -> int:
        result: int = await ctx.run(pay, x)
        return result

    async with app:
        for i in range(runs):
            await (await app.start(order, i)).result(timeout=20)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The CLI runs its own event loop: run it in a thread, as from a shell."""
    code = await asyncio.to_thread(main, list(args))
    out, err = capsys.readouterr()
    return code, out + err


async def export(capsys: pytest.CaptureFixture[str], url: str, path: Path) -> None:
    code, out = await cli(capsys, "audit", "head", "--store", url)
    assert code == 0, out
    await asyncio.to_thread(path.write_text, out)


async def test_an_untouched_keyed_log_verifies_with_its_head(
    db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await populate(db.url)
    head = tmp_path / "head.json"
    await export(capsys, db.url, head)
    await populate(db.url, runs=1)  # the log grows after the export: still fine
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--head", str(head))
    assert code == 0, out
    assert "chain intact (keyed)" in out


async def test_a_tail_deleted_with_the_head_updated_is_detected(
    db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await populate(db.url)
    head = tmp_path / "head.json"
    await export(capsys, db.url, head)
    [(last,)] = await db.sql("SELECT max(seq) FROM audit WHERE app='shop'")
    await db.unprotected()
    await db.sql("DELETE FROM audit WHERE app='shop' AND seq > ?", last - 2)
    [(seq, h)] = await db.sql("SELECT seq, hash FROM audit WHERE app='shop' AND seq=?", last - 2)
    await db.set_head("shop", h, seq)
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--head", str(head))
    assert code == 1 and "TAMPERED" in out and "deleted after the export" in out, out


async def test_everything_deleted_is_detected(
    db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await populate(db.url)
    head = tmp_path / "head.json"
    await export(capsys, db.url, head)
    await db.unprotected()
    await db.sql("DELETE FROM audit WHERE app='shop'")
    await db.delete_head("shop")
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--head", str(head))
    assert code == 1 and "TAMPERED" in out, out
    # even without the exported head: runs exist, their records are gone
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--app", "shop")
    assert code == 1 and "no run.created audit record" in out, out


async def test_a_chain_rehashed_without_the_key_is_detected(
    db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Change record #2 and recompute every hash with plain SHA-256, head included."""
    await populate(db.url)
    head = tmp_path / "head.json"
    await export(capsys, db.url, head)
    rows = await db.sql(
        "SELECT seq, time, actor, action, target, data FROM audit WHERE app='shop' ORDER BY seq"
    )
    await db.unprotected()
    for actor, prev, h, seq in (forged := rehashed_plain(rows)):
        await db.sql("UPDATE audit SET actor=?, prev_hash=?, hash=? WHERE app='shop' AND seq=?",
                     actor, prev, h, seq)
    prev = forged[-1][2]
    await db.set_head("shop", prev)
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--app", "shop")
    assert code == 1 and "TAMPERED" in out, out
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--head", str(head))
    assert code == 1 and "rewritten after the export" in out, out


async def test_a_deleted_run_row_is_detected(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    await populate(db.url)
    [(run_id,)] = await db.sql("SELECT run_id FROM runs WHERE app='shop' LIMIT 1")
    await db.sql("DELETE FROM history WHERE app='shop' AND run_id=?", run_id)
    await db.sql("DELETE FROM runs WHERE app='shop' AND run_id=?", run_id)
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--app", "shop")
    assert code == 1 and f"run(s) {run_id}" in out and "deleted" in out, out


async def test_a_run_inserted_with_a_back_dated_creation_is_detected(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    """A run older than the log's first record is no excuse in a store that had its
    log from the start (only an upgraded store's older runs are: migration 0022/0029)."""
    await populate(db.url)
    if db.dialect == "postgres":
        cols = [r[0] for r in await db.sql(
            "SELECT column_name FROM information_schema.columns WHERE table_name='runs' "
            "AND table_schema=current_schema() AND is_generated='NEVER' "  # (failed_at)
            "ORDER BY ordinal_position")]
    else:
        cols = [r[1] for r in await db.sql("PRAGMA table_info(runs)")]
    picked = ", ".join({"run_id": "'forged-1970'", "created_at": "0", "idempotency_key":
                        "NULL"}.get(c, c) for c in cols)
    await db.sql(f"INSERT INTO runs ({', '.join(cols)}) SELECT {picked} FROM runs "
                 "WHERE app='shop' LIMIT 1")
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--app", "shop")
    assert code == 1 and "forged-1970" in out and "no run.created audit record" in out, out


async def test_a_keyed_chain_checked_without_its_key_is_not_called_tampered(
    db: Db, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    await populate(db.url)
    for key in (None, "another-key-0123456789abcdef"):
        if key is None:
            monkeypatch.delenv("CANTATA_AUDIT_KEY")
        else:
            monkeypatch.setenv("CANTATA_AUDIT_KEY", key)
        code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--app", "shop")
        assert code == 1 and "TAMPERED" not in out, out
        assert "cannot be verified" in out and "set CANTATA_AUDIT_KEY" in out, out
    # one record changed: with the key it is tampering (without it, still unverifiable)
    await db.unprotected()
    await db.sql("UPDATE audit SET actor='mallory' WHERE app='shop' AND seq=2")
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--app", "shop")
    assert code == 1 and "TAMPERED at record #2" in out, out


async def test_head_needs_the_key(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("CANTATA_AUDIT_KEY")
    code, out = await cli(capsys, "audit", "head", "--store", f"sqlite:///{tmp_path}/x.db")
    assert code == 1 and "CANTATA_AUDIT_KEY" in out


async def test_a_forged_head_file_is_refused(
    db: Db, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await populate(db.url)
    head = tmp_path / "head.json"
    await export(capsys, db.url, head)
    head.write_text(head.read_text().replace('"seq":', '"seq":1000+').replace("1000+", "1"))
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--head", str(head))
    assert code == 1 and "signature does not verify" in out, out
