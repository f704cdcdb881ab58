"""The store contract on ``memory://`` (SQLite's private in-memory database)."""

from __future__ import annotations

from cantata.store.base import Store
from cantata.store.factory import store_from_url
from cantata.store.sqlite import SQLiteStore
from tests.contract.store_contract import StoreContract
from tests.contract.store_support import new_run
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


async def test_memory_stores_are_private() -> None:
    a, b = store_from_url("memory://"), store_from_url("memory://")
    await a.open()
    await b.open()
    try:
        run, _ = await a.create_run(new_run("shop"))
        assert await b.get_run("shop", run.run_id) is None
    finally:
        await a.close()
        await b.close()


async def test_every_store_has_its_own_identity() -> None:
    a, b = store_from_url("memory://"), store_from_url("memory://")
    await a.open()
    await b.open()
    try:
        assert await a.identity() != await b.identity()
    finally:
        await a.close()
        await b.close()
