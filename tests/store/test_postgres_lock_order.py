"""Two processes' writes of many of the same rows lock them in one order on PostgreSQL.

The relays of two worker processes mark many of the same events published (each
publishes what the other offered and has not marked yet), and two NATS consumers may
take deliveries of the same events. Each statement locked its rows in the order its
caller listed them: two that listed them in other orders deadlocked, and PostgreSQL
ended one after its ``deadlock_timeout`` (1 s), seen in the two-process chain benchmark
(docs/performance.md, "The by-key writes without IN"). The store writes them in key
order now.

Made certain here: a third connection holds the middle row while the two calls start,
one with the ids in order and one reversed, so that each has locked its half when the
row is let go.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from cantata import App, Event
from cantata.model.records import Declaration
from tests.helpers import lock_waits, with_schema

pytestmark = pytest.mark.postgres

APP = "order"
ROWS = 40

Call = Callable[[Any, list[str], str], Awaitable[Any]]
CALLS: dict[str, tuple[str, Call]] = {
    "mark_published": ("events WHERE app=$1 AND id=$2",
                       lambda store, ids, who: store.mark_published(APP, ids)),
    "take_deliveries": ("deliveries WHERE app=$1 AND grp='billing' AND event_id=$2",
                        lambda store, ids, who: store.take_deliveries(
                            APP, "billing", ids, who, stale_before=0.0)),
}


@pytest.mark.parametrize("name", sorted(CALLS))
async def test_two_writes_of_the_same_rows_in_opposite_orders_do_not_deadlock(
    postgres_url: str, pooled_schema: str, name: str
) -> None:
    where, call = CALLS[name]
    url = with_schema(postgres_url, pooled_schema)
    async with App(APP, store=url).client() as a, App(APP, store=url).client() as b:
        await a.store.declare(APP, [Declaration("handler", "billing", "order.placed")])
        events = [Event(type="order.placed", data={"n": i}) for i in range(ROWS)]
        await a.store.append_events(APP, events)
        ids = sorted(e.id for e in events)
        holder = await asyncpg.connect(postgres_url,
                                       server_settings={"search_path": pooled_schema})
        try:
            async with holder.transaction():
                held = await holder.fetch(f"SELECT 1 FROM {where} FOR UPDATE", APP,
                                          ids[ROWS // 2])
                assert len(held) == 1
                calls = [asyncio.ensure_future(call(a.store, ids, "w1")),
                         asyncio.ensure_future(call(b.store, ids[::-1], "w2"))]
                await lock_waits(holder, 2)
                started = time.monotonic()
            outcomes = await asyncio.gather(*calls, return_exceptions=True)
            took = time.monotonic() - started
        finally:
            await holder.close()
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        assert not errors, errors
        # (a deadlock is found after deadlock_timeout, 1 s, and one of the two ended)
        assert took < 0.9, f"{name} took {took:.2f} s once the row was let go"
        if name == "mark_published":
            [published] = await a.store._db.fetch(  # type: ignore[attr-defined]
                "SELECT count(*) FROM events WHERE app=$1 AND published", APP)
            assert published[0] == ROWS
