"""The store contract on ``memory://`` (SQLite's private in-memory database)."""

from __future__ import annotations

from cantata.store.base import Store
from cantata.store.factory import store_from_url
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract import StoreContract
from tests.store.tamper import record, sqlite_tamper


class TestMemoryStore(StoreContract):
    shares_database = False  # every memory:// store is a private database
    transactional = False  # nor can it share its transaction with a service's tables

    async def make_store(self) -> Store:
        return store_from_url("memory://")

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        # The private database is reachable only through the store's own connection.
        assert isinstance(store, SQLiteStore)
        rec = await record(store, app, seq)
        await store._t.write(lambda c: sqlite_tamper(c, app, rec, how))
