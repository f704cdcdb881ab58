"""The store contract on ``memory://`` (SQLite's private in-memory database)."""

from __future__ import annotations

from cantata.store.base import Store
from cantata.store.factory import store_from_url
from tests.contract.store_contract import StoreContract
from tests.contract.store_support import new_run


class TestMemoryStore(StoreContract):
    shares_database = False  # every memory:// store is a private database

    async def make_store(self) -> Store:
        return store_from_url("memory://")


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
