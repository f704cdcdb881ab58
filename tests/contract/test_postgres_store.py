"""The store contract on PostgreSQL (what only a server can get wrong: tests/store).

Every test session works in its own schema (dropped at the end, see
``pg_session_url`` in tests/conftest.py) and every test in its own random app.
"""

from __future__ import annotations

import pytest

from cantata.store.base import Store
from cantata.store.postgres import PostgresStore
from cantata.testing.contract import StoreContract
from tests.store.tamper import pg_tamper, record

pytestmark = pytest.mark.postgres


class TestPostgresStore(StoreContract):
    url: str

    @pytest.fixture(autouse=True)
    def _url(self, pg_session_url: str) -> None:
        self.url = pg_session_url

    async def make_store(self) -> Store:
        return PostgresStore(self.url)

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        assert isinstance(store, PostgresStore)
        rec = await record(store, app, seq)
        await pg_tamper(self.url.split("?")[0], store._db.schema, app, rec, how)
