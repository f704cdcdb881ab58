"""What the console's change feed reads of the store (docs/console.md, "Live changes"):
a look that finds nothing new is one read, not a read of the audit head besides; and a
record forged past the head, taken out while the feed reads it and its seq taken by a
genuine append, is never streamed (the race a head read after the records alone lets
through), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

from cantata import App
from cantata.server.stream import Change, ChangeFeed
from cantata.store.base import Store
from cantata.testing.contract.support import forged_after
from tests.helpers import eventually
from tests.server.test_stream import _tamper
from tests.store.tamper import record


class Reads:
    """The store, with a count of the feed's reads of it by method, and a hook run
    after each read of audit records (before the feed sees them) until it returns
    true."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self.calls: Counter[str] = Counter()
        self.after_records: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def audit_head_seq(self, app: str) -> int:
        self.calls["audit_head_seq"] += 1
        return await self._store.audit_head_seq(app)

    async def audit_records(self, app: str, **kw: Any) -> Any:
        self.calls["audit_records"] += 1
        records = await self._store.audit_records(app, **kw)
        if self.after_records is not None and await self.after_records(records):
            self.after_records = None
        return records


def drain(queue: asyncio.Queue[Change | None]) -> list[Change]:
    out = []
    while not queue.empty():
        change = queue.get_nowait()
        assert change is not None, "the feed dropped its client"
        out.append(change)
    return out


async def test_a_look_that_finds_nothing_new_reads_the_store_once(store_url: str) -> None:
    async with App("shop", store=store_url).client() as app:
        await app.store.record_action("shop", "token:ann", "schedule.paused", "nightly", {})
        reads = Reads(app.store)

        async def store_of() -> Store:
            return reads

        feed = ChangeFeed(store_of, "shop", interval=0.02)
        async with feed.subscribe() as queue:
            await eventually(lambda: reads.calls["audit_records"] >= 3, timeout=10)
            idle = reads.calls.copy()
            await eventually(lambda: reads.calls["audit_records"] >= idle["audit_records"] + 10,
                             timeout=10)
            looks = reads.calls["audit_records"] - idle["audit_records"]
            heads = reads.calls["audit_head_seq"] - idle["audit_head_seq"]
            assert heads == 0, f"{heads} reads of the head in {looks} looks finding nothing"
            # and a change still arrives, the head read once it is there
            await app.store.record_action("shop", "token:ann", "schedule.resumed",
                                          "nightly", {})
            await eventually(lambda: not queue.empty(), timeout=10)
            [change] = drain(queue)
            assert (change.kind, change.data["action"]) == ("schedule", "resumed")


async def test_a_forged_record_swapped_for_a_genuine_one_mid_read_is_not_streamed(
    store_url: str,
) -> None:
    async with App("shop", store=store_url).client() as app:
        await app.store.record_action("shop", "token:ann", "schedule.paused", "nightly", {})
        reads = Reads(app.store)

        async def store_of() -> Store:
            return reads

        feed = ChangeFeed(store_of, "shop", interval=0.02)
        async with feed.subscribe() as queue:
            await eventually(lambda: reads.calls["audit_records"] >= 2, timeout=10)
            head = await app.store.audit_head_seq("shop")
            last = await record(app.store, "shop", head)
            forged = forged_after(last)  # "nightly was retried", past the head
            swapped = asyncio.Event()

            async def swap(records: list[Any]) -> bool:
                # once the feed has read the forgery, before it reads anything more, the
                # forgery is taken out and a genuine append takes its seq
                if not records:
                    return False
                assert [(r.seq, r.hash) for r in records] == [(forged.seq, forged.hash)]
                await _tamper(app.store, store_url, forged, "delete")
                await app.store.record_action("shop", "token:ann", "schedule.resumed",
                                              "nightly", {})
                swapped.set()
                return True

            reads.after_records = swap
            await _tamper(app.store, store_url, last, "forge")
            await asyncio.wait_for(swapped.wait(), 10)
            await eventually(lambda: not queue.empty(), timeout=10)
            await asyncio.sleep(0.2)  # (ten more looks: nothing else comes)
            changes = drain(queue)
            assert [(c.seq, c.kind, c.data.get("action")) for c in changes] == [
                (forged.seq, "schedule", "resumed")], changes
