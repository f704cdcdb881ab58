"""The store contract on a SQLite file (what only a file can get wrong: tests/store)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from cantata.store.base import Store
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract import StoreContract
from tests.store.tamper import record, sqlite_tamper


class TestSQLiteStore(StoreContract):
    path: Path

    @pytest.fixture(autouse=True)
    def _db_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "cantata.db"

    async def make_store(self) -> Store:
        return SQLiteStore(str(self.path))  # the shipped default: synchronous=FULL

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        rec = await record(store, app, seq)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            sqlite_tamper(conn, app, rec, how)
        finally:
            conn.close()
