"""Backends from other packages: found by URL scheme, proved by the contract suites.

``site/`` holds a tiny third-party package (``tinybackend``) with its entry points,
as pip would install it.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Broker, ConfigurationError, Event, Hook, Store
from cantata.broker.factory import broker_from_url
from cantata.store.factory import store_from_url
from cantata.testing.contract import StoreContract
from tests.store.tamper import record, sqlite_tamper

SITE = str(Path(__file__).parent / "site")


@pytest.fixture(autouse=True)
def installed() -> Iterator[None]:
    sys.path.insert(0, SITE)
    try:
        yield
    finally:
        sys.path.remove(SITE)
        sys.modules.pop("tinybackend", None)


class TestTinyStore(StoreContract):
    """The whole store contract, on a store found through its entry point."""

    path: Path

    @pytest.fixture(autouse=True)
    def _db_path(self, tmp_path: Path) -> None:
        self.path = tmp_path / "tiny.db"

    async def make_store(self) -> Store:
        store = store_from_url(f"tiny:///{self.path}")
        assert type(store).__name__ == "TinyStore"
        return store

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        rec = await record(store, app, seq)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            sqlite_tamper(conn, app, rec, how)
        finally:
            conn.close()


async def test_an_app_runs_on_backends_from_entry_points(tmp_path: Path) -> None:
    app = App("shop", store=f"tiny:///{tmp_path}/a.db", broker="tinybus://", poll_interval=0.05)
    seen: list[Any] = []

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any]) -> None:
        seen.append(event.data)

    async with app:
        assert isinstance(app.store, Store) and isinstance(app._broker, Broker)
        await app.publish("order.placed", {"id": 1})
        for _ in range(200):
            if seen:
                break
            import asyncio

            await asyncio.sleep(0.02)
    assert seen == [{"id": 1}]


def test_a_factory_that_makes_no_store_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"not a cantata\.Store"):
        store_from_url("broken://x")


def test_unknown_schemes_name_the_installed_ones() -> None:
    with pytest.raises(ConfigurationError, match=r"tiny://"):
        store_from_url("nope://x")
    with pytest.raises(ConfigurationError, match=r"unknown broker URL .* tinybus://"):
        broker_from_url("nope://x")


def test_the_seams_are_public() -> None:
    assert Hook.__module__ == "cantata.engine.hooks"
    assert {"Store", "Broker", "Hook"} <= set(__import__("cantata").__all__)
