"""SQLite compares a wait's match in the query (find_events(match=...)): a wait behind
many events of its type reads only its candidates (docs/guarantees.md, parked runs)."""

from __future__ import annotations

from pathlib import Path

from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import ev


async def test_a_match_reads_only_the_events_that_may_match(tmp_path: Path) -> None:
    store = SQLiteStore(str(tmp_path / "m.db"))
    await store.open()
    try:
        events = [ev("t.m", {"order": i, "who": f"c{i % 7}"}) for i in range(2000)]
        events.append(ev("t.m", "not a mapping"))
        await store.append_events("shop", events)

        async def found(match: dict[str, object], limit: int = 5) -> list[object]:
            got = await store.find_events("shop", "t.m", since=0, exclude=[], limit=limit,
                                          match=match)
            return [e.data for e in got]

        assert await found({"order": 1234}) == [{"order": 1234, "who": "c2"}]
        assert await found({"order": 1234, "who": "c3"}) == []
        assert len(await found({"who": "c3"}, limit=1000)) == 286
        # not compared in the query: every event of the type comes back, oldest first
        assert len(await found({"order": 1234.0}, limit=3000)) == 2001
        assert len(await found({"order": True}, limit=3000)) == 2001
    finally:
        await store.close()
