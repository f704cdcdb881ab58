"""The store contract on a SQLite file (what only a file can get wrong: tests/store)."""

from __future__ import annotations

from cantata.store.base import Store
from cantata.store.sqlite import SQLiteStore
from tests.store.tamper import SQLiteFileContract


class TestSQLiteStore(SQLiteFileContract):
    async def make_store(self) -> Store:
        return SQLiteStore(str(self.path))  # the shipped default: synchronous=FULL
