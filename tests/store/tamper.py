"""Raw-SQL tampering with the audit log, for each backend's ``tamper`` hook."""

from __future__ import annotations

import sqlite3
from dataclasses import astuple
from pathlib import Path

import asyncpg
import pytest

from cantata.model.records import AuditRecord
from cantata.store.base import Store
from cantata.store.sqlite_ops import AUDIT_COLS
from cantata.testing.contract import StoreContract
from cantata.testing.contract.support import forged_after, tampered


async def record(store: Store, app: str, seq: int) -> AuditRecord:
    [rec] = await store.audit_records(app, after_seq=seq - 1, limit=1)
    assert rec.seq == seq
    return rec


def sqlite_tamper(conn: sqlite3.Connection, app: str, rec: AuditRecord, how: str) -> None:
    """Bypass the append-only triggers (by dropping them) and change ``rec``."""
    if how == "forge":
        conn.execute(f"INSERT INTO audit (app, {AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
                     (app, *astuple(forged_after(rec))))
        return
    changes = tampered(rec, how)
    conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
    conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
    if changes is None:
        conn.execute("DELETE FROM audit WHERE app=? AND seq=?", (app, rec.seq))
    else:
        sets = ", ".join(f"{col}=?" for col in changes)
        conn.execute(
            f"UPDATE audit SET {sets} WHERE app=? AND seq=?", (*changes.values(), app, rec.seq)
        )


async def pg_tamper(url: str, schema: str, app: str, rec: AuditRecord, how: str) -> None:
    """Disable the append-only trigger for one transaction and change ``rec``."""
    changes = None if how == "forge" else tampered(rec, how)
    conn = await asyncpg.connect(url)
    table = f'"{schema}".audit'
    try:
        if how == "forge":  # an INSERT: the append-only trigger does not stop it
            await conn.execute(
                f"INSERT INTO {table} (app, {AUDIT_COLS}) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9)",
                app, *astuple(forged_after(rec)))
            return
        async with conn.transaction():
            await conn.execute(f"ALTER TABLE {table} DISABLE TRIGGER audit_append_only")
            if changes is None:
                await conn.execute(f"DELETE FROM {table} WHERE app=$1 AND seq=$2", app, rec.seq)
            else:
                sets = ", ".join(f"{col}=${i}" for i, col in enumerate(changes, 3))
                await conn.execute(
                    f"UPDATE {table} SET {sets} WHERE app=$1 AND seq=$2",
                    app, rec.seq, *changes.values(),
                )
            await conn.execute(f"ALTER TABLE {table} ENABLE TRIGGER audit_append_only")
    finally:
        await conn.close()


class SQLiteFileContract(StoreContract):
    """The store contract on a SQLite file of each test's own (``self.path``): the
    backend names only its store; tampering opens the file directly."""

    path: Path

    @pytest.fixture(autouse=True)
    def _db_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "cantata.db"

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        rec = await record(store, app, seq)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            sqlite_tamper(conn, app, rec, how)
        finally:
            conn.close()
