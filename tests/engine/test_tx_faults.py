"""A transactional step's own SQL meeting a full disk or a read-only database: a
condition of the store, not the step's failure. The step is given Cantata's error
(``StoreFull``, ``StoreReadOnly``); letting it through is an outage as at the step's
checkpoint: no attempt charged, nothing compensated, the step runs again once the
store takes writes (docs/workflow-api.md). Real server errors: PostgreSQL's SQLSTATE
53100 and 25006, SQLite's SQLITE_FULL and SQLITE_READONLY."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cantata import StoreError, StoreFull, StoreReadOnly, Tx
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from tests.engine.test_store_stalls import check_booked, tx_app
from tests.helpers import with_schema


async def disk_full(tx: Tx) -> None:
    if tx.dialect == "postgresql":  # the server's own error class: disk_full
        await tx.execute("DO $$ BEGIN RAISE EXCEPTION 'could not extend file: No space "
                         "left on device' USING ERRCODE = '53100'; END $$")
        return
    # SQLite: the file may not grow past the pages it has (SQLITE_FULL)
    row = await tx.fetchone("PRAGMA page_count")
    most = await tx.fetchone("PRAGMA max_page_count")
    assert row is not None and most is not None
    await tx.execute(f"PRAGMA max_page_count = {int(row[0])}")
    try:
        await tx.execute("INSERT INTO bookings (n) VALUES (zeroblob(4000000))")
    finally:
        await tx.execute(f"PRAGMA max_page_count = {int(most[0])}")


async def read_only(tx: Tx) -> None:
    if tx.dialect == "postgresql":  # (SQLSTATE 25006: read_only_sql_transaction)
        await tx.execute("SET TRANSACTION READ ONLY")
        await tx.execute("INSERT INTO bookings (n) VALUES (0)")
        return
    await tx.execute("PRAGMA query_only = ON")  # (SQLITE_READONLY)
    try:
        await tx.execute("INSERT INTO bookings (n) VALUES (0)")
    finally:
        await tx.execute("PRAGMA query_only = OFF")


FAULTS = {"disk-full": (disk_full, StoreFull), "read-only": (read_only, StoreReadOnly)}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def tx_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return SQLiteStore(str(tmp_path / "faults.db"))
    postgres_url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("fresh_schema")
    return PostgresStore(with_schema(postgres_url, schema))


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_a_full_or_read_only_store_under_a_steps_sql_is_an_outage_not_its_failure(
    tx_store: Any, fault: str
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    met: list[BaseException] = []
    meet, expected = FAULTS[fault]

    async def once(tx: Tx) -> None:
        if ran.count("book") == 1:  # its first run only: then the store takes writes
            try:
                await meet(tx)
            except Exception as exc:
                met.append(exc)
                raise
            raise AssertionError(f"the step's SQL met no {fault} store")

    app = tx_app(tx_store, seen, ran, in_step=once)
    async with app:
        handle = await app.start("booking", 6)
        assert await handle.result(timeout=20) == "booked, 1 booking(s)", seen
        # the step was given Cantata's error, naming the store's condition
        assert [type(e) for e in met] == [expected], met
        assert isinstance(met[0], StoreError)
        # run again once the store took writes; its first run was not charged
        assert ran == ["reserve", "book", "book"], ran
        await check_booked(app, handle.run_id, seen, ran, booked=6)
