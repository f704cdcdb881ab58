"""Storage faults on PostgreSQL: a read-only server reads and refuses writes in one line.

(``default_transaction_read_only=on`` in the URL makes every session read-only, as
on a hot standby.)
"""

from __future__ import annotations

import pytest

from cantata import StoreReadOnly
from cantata.model.event import Event
from cantata.store.postgres import PostgresStore
from tests.helpers import with_schema

pytestmark = pytest.mark.postgres

READ_ONLY = "&default_transaction_read_only=on"


async def test_a_read_only_server_reads_and_refuses_writes(
    postgres_url: str, pooled_schema: str
) -> None:
    url = with_schema(postgres_url, pooled_schema)
    store = PostgresStore(url)
    await store.open()
    event = Event("order.placed", {"n": 1})
    try:
        await store.append_events("shop", [event])
    finally:
        await store.close()
    standby = PostgresStore(url + READ_ONLY)
    await standby.open()  # a current schema is only read
    try:
        assert await standby.get_event("shop", event.id) == event
        assert await standby.apps() == ["shop"]
        with pytest.raises(StoreReadOnly, match=r"read-only.*reading works"):
            await standby.append_events("shop", [Event("order.placed", {"n": 2})])
    finally:
        await standby.close()


async def test_a_read_only_server_cannot_create_a_store(
    postgres_url: str, fresh_schema: str
) -> None:
    store = PostgresStore(with_schema(postgres_url, fresh_schema) + READ_ONLY)
    with pytest.raises(StoreReadOnly, match="CREATE SCHEMA"):
        await store.open()
