"""SQLite and PostgreSQL compare a wait's match in the query (find_events(match=...)):
a wait behind many events of its type reads only its candidates (docs/guarantees.md,
parked runs). That no event that matches is left out is the store contract's
(cantata.testing.contract.events)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cantata.store.base import Store
from cantata.store.factory import store_from_url
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import ev
from tests.helpers import with_schema


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'm.db'}"
    else:
        url = with_schema(request.getfixturevalue("postgres_url"),
                          request.getfixturevalue("pooled_schema"))
    opened = store_from_url(url)
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


async def test_a_match_reads_only_the_events_that_may_match(store: Store) -> None:
    events = [ev("t.m", {"order": i, "who": f"c{i % 7}", "at": {"desk": i % 3}})
              for i in range(2000)]
    events += [ev("t.m", "not a mapping"), ev("t.m", {"order": 5.0}),
               ev("t.m", {"order": True}), ev("t.m", {"order": "5"})]
    await store.append_events("shop", events)

    async def found(match: dict[str, object], limit: int = 5) -> list[object]:
        got = await store.find_events("shop", "t.m", since=0, exclude=[], limit=limit,
                                      match=match)
        return [e.data for e in got]

    assert await found({"order": 1234}) == [{"order": 1234, "who": "c2", "at": {"desk": 1}}]
    assert await found({"order": 1234, "who": "c3"}) == []
    assert len(await found({"who": "c3"}, limit=1000)) == 286
    assert len(await found({"who": "c3", "at.desk": 2}, limit=1000)) == 95
    # an int equal to a float (and 1 to True) is Python's match too
    assert await found({"order": 5}) == [{"order": 5, "who": "c5", "at": {"desk": 2}},
                                         {"order": 5.0}]
    # (PostgreSQL leaves a float there to Python, where the digits of the int wanted do
    # not rule it out first: a float is equal to an int as Python compares them, not as
    # the server's numeric does, 1.00000000000000000001 to 1)
    float5 = [{"order": 5.0}] if isinstance(store, PostgresStore) else []
    assert await found({"order": 1}) == [{"order": 1, "who": "c1", "at": {"desk": 1}},
                                         *float5, {"order": True}]
    # not compared in the query: every event of the type comes back, oldest first
    assert len(await found({"order": 1234.0}, limit=3000)) == 2004
    assert len(await found({"order": True}, limit=3000)) == 2004
