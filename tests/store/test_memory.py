"""The store contract on ``memory://`` (SQLite's private in-memory database)."""

from __future__ import annotations

from cantata.store.factory import store_from_url
from cantata.testing.contract.support import new_run


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
