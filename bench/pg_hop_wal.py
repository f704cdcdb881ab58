"""What a choreographed hop writes to PostgreSQL's WAL.

    python -m bench.pg_hop_wal [--n 300] [--url postgresql://...]

On a fresh schema of the server at ``--url`` (default ``BENCH_POSTGRES``), ``n``
orders written through the store as the chain's latency workload writes them, one
after another: the append of the first event, held for the first group, then three
handlers' settlements ``done``, each emitting one event, held for the next group but
the last (each write the store's one statement, ``cantata_settle_one``; ``cantata_settle_hop``
since migration 0042), after a ``CHECKPOINT`` (so
that both revisions of an A/B start with the same full-page images to write). Prints
the WAL bytes per order (the server's WAL insert position before and after), which
counts the whole server: run it on a server nothing else writes to (a private one:
``initdb``, ``pg_ctl start``, ``autovacuum=off``), where the figure does not depend on
how busy the machine is. See docs/performance.md ("Round twenty-two (chain)").
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import asyncpg

from bench.common import PG_URL

CHAIN = (("inventory", "order.placed"), ("payment", "inventory.reserved"),
         ("shipping", "payment.charged"))


async def _lsn(url: str) -> int:
    """The server's WAL insert position (bytes)."""
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT pg_current_wal_insert_lsn() - '0/0'::pg_lsn"))
    finally:
        await conn.close()


async def main_async(orders: int, url: str) -> str:
    from cantata.model.event import Event
    from cantata.model.records import Declaration
    from cantata.store.base import Settlement
    from cantata.store.postgres import PostgresStore

    schema = f"bench_wal_{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in url else "?"
    store = PostgresStore(f"{url}{sep}schema={schema}")
    await store.open()
    try:
        await store.declare("shop", [Declaration("handler", g, t) for g, t in CHAIN])

        async def chain(count: int) -> None:
            """``count`` orders: the append of the first event (held for the first
            group), then each group's settlement, emitting the next event held for the
            next group (the last one emits the first type again, not held for anyone:
            every settlement writes one event, as a hop does)."""
            for o in range(count):
                first = Event(CHAIN[0][1], {"n": o})
                await store.append_held("shop", [first], hold_for="w1",
                                        hold=[(CHAIN[0][0], first.id)], wake=False)
                event = first
                for i, (group, _type) in enumerate(CHAIN):
                    last = i + 1 == len(CHAIN)
                    nxt = CHAIN[0] if last else CHAIN[i + 1]
                    emitted = Event(nxt[1], {"n": o}, correlation_id=first.id,
                                    causation_id=event.id)
                    await store.settle_delivery("shop", group, event.id, Settlement(
                        "done", 1, events=[emitted], hold_for=None if last else "w1",
                        hold=[] if last else [(nxt[0], emitted.id)], wake=False))
                    event = emitted

        await chain(20)  # warm-up: the functions' plans, the tables' first pages
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()
        before = await _lsn(url)
        await chain(orders)
        after = await _lsn(url)
    finally:
        await store.close()
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()
    return (f"{orders} orders (an append and {len(CHAIN)} settlements each): "
            f"{(after - before) / orders:.0f} WAL bytes per order")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=300, help="orders")
    ap.add_argument("--url", default=PG_URL)
    a = ap.parse_args()
    print(asyncio.run(main_async(a.n, a.url)))


if __name__ == "__main__":
    main()
