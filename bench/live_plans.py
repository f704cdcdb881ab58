"""Which index each PostgreSQL statement of live runs reads, with and without an index.

    python -m bench.live_plans [--index DEFINITION] [--parked 100000] [--ended 60000]

Fills ``runs`` of a new schema by SQL (``--parked`` runs parked in a sleep, ``--ended``
completed ones, 400 live runs that are not parked, 50 parked event waits, 20 flagged),
then runs every statement of the store whose condition on a live status an index of
live runs could serve under ``EXPLAIN ANALYZE``, each in a transaction rolled back:
first on the table never analyzed (as a store that grew from empty), then analyzed;
each once with ``--index`` (by default ``runs_live``, which schema 34 dropped), made
with the schema before the rows went in, and once with it dropped inside that
transaction.
Prints, per statement, the rows of ``runs`` it read (returned or filtered out), the
indexes it read them by and its execution time (docs/performance.md, "The operator's
reads with many runs parked").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Sequence
from typing import Any, cast

from bench.common import PG_URL

NOW = time.time()


class Explaining:
    """A connection on which each statement runs as ``EXPLAIN ANALYZE`` in a
    transaction rolled back at once (``drop``: an index dropped in it first)."""

    def __init__(self, conn: Any, drop: str | None) -> None:
        self.conn, self.drop = conn, drop
        self.plans: list[tuple[dict[str, Any], float]] = []

    async def _explain(self, sql: str, args: Sequence[Any]) -> None:
        tx = self.conn.transaction()
        await tx.start()
        try:
            if self.drop:
                await self.conn.execute(f"DROP INDEX {self.drop}")
            plan = await self.conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        finally:
            await tx.rollback()
        top = json.loads(plan)[0]
        self.plans.append((top["Plan"], top["Execution Time"]))

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        await self._explain(sql, args)
        return []

    async def fetchrow(self, sql: str, *args: Any) -> None:
        await self._explain(sql, args)

    async def execute(self, sql: str, *args: Any) -> None:
        await self._explain(sql, args)


def read(plan: dict[str, Any]) -> tuple[int, list[str]]:
    """Rows of ``runs`` a plan read (returned or filtered out) and the indexes used."""
    rows = 0
    used: set[str] = set()
    nodes = [(plan, "")]
    while nodes:
        node, parent = nodes.pop()
        relation = node.get("Relation Name", parent)
        nodes += [(child, relation) for child in node.get("Plans", [])]
        if relation != "runs":
            continue
        loops = node.get("Actual Loops", 1)
        rows += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                 + node.get("Rows Removed by Index Recheck", 0)) * loops
        if "Index Name" in node:
            used.add(node["Index Name"])
        elif node.get("Node Type") == "Seq Scan":
            used.add("(scan)")
    return rows, sorted(used)


async def statements(c: Explaining) -> list[tuple[str, int]]:
    """Run each statement on ``c``; (label, number of plans it made)."""
    from cantata.model.access import RunQuery
    from cantata.model.status import RunStatus
    from cantata.store import postgres_parking, postgres_writes
    from cantata.store.postgres_batch import Batch
    from cantata.store.postgres_console import runs_sql
    from cantata.store.postgres_operate import foreign_runs
    from cantata.store.postgres_ops import LIVE_SQL
    from cantata.store.postgres_pool import Conn
    from cantata.store.postgres_runs import _OLDEST_LIVE
    from cantata.store.postgres_trace import STALE_CORRELATIONS

    wf = ["saga", "sleeper", "waiter"]
    conn = cast(Conn, c)  # the store's functions call only what ``c`` has
    out: list[tuple[str, int]] = []

    async def one(label: str, call: Awaitable[Any]) -> None:
        n = len(c.plans)
        await call
        out.append((label, len(c.plans) - n))

    await one("claim_runs (pick, due)",
              postgres_writes.claim_runs(conn, Batch(), "a", "w2", wf, NOW, 10, now=NOW))
    await one("foreign_runs (version check)",
              foreign_runs(conn, "a", "w2", wf, ["v-other"], NOW, 10, now=NOW))
    await one("stale_correlations", c.fetch(STALE_CORRELATIONS, "a", NOW - 300, 100, NOW))
    await one("owned_runs", c.fetch(
        f"SELECT run_id, fence FROM runs WHERE app=$1 AND owner=$2 AND status IN {LIVE_SQL}",
        "a", "w1"))
    await one("request_cancel", c.execute(
        "UPDATE runs SET cancel_requested=true, updated_at=$3, wake_at=NULL, waits_for=NULL, "
        f"wait_match=NULL WHERE app=$1 AND run_id=$2 AND status IN {LIVE_SQL}",
        "a", "live-5", NOW))
    await one("oldest_live_run", c.fetchrow(_OLDEST_LIVE, "a"))
    for workflow, status in [("saga", "running"), ("sleeper", "running"),
                             ("waiter", "running"), (None, "running"), (None, "pending")]:
        sql, params = runs_sql("a", RunQuery(workflow=workflow, status=RunStatus(status),
                                             limit=50))
        await one(f"runs page (find_runs) workflow={workflow} status={status}",
                  c.fetch(sql, *params))
    await one("park_run", c.execute(postgres_parking.PARK, NOW, NOW + 10, None, None, "a",
                                    "live-5", 1))
    await one("next_wake", c.fetchrow(postgres_parking.NEXT_WAKE, "a", NOW, wf))
    return out


async def fill(conn: Any, parked: int, ended: int) -> None:
    cols = ("INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, "
            "created_at, updated_at, owner, wake_at, waits_for, wait_match, flagged, version) ")
    rows = [  # (id prefix, workflow, status, how many, created, owner, wake_at, waits, flagged)
        ("sleep", "sleeper", "running", parked, NOW - 3600, None, NOW + 7200, False, False),
        ("done", "saga", "completed", ended, NOW - 7200, None, None, False, False),
        ("live", "saga", "running", 300, NOW - 60, "w1", None, False, False),
        ("new", "saga", "pending", 100, NOW - 1, None, None, False, False),
        ("wait", "waiter", "running", 50, NOW - 3000, None, NOW + 99999, True, False),
        ("flag", "saga", "failed", 20, NOW - 5000, None, None, False, True),
    ]
    for prefix, workflow, status, n, at, owner, wake, waits, flagged in rows:
        await conn.execute(
            cols + f"SELECT 'a', '{prefix}-'||i, $1, $2, '[]', 'c-{prefix}-'||i, "
            "$3::float8+i*0.001, $3::float8+i*0.001, $4, $5, "
            "CASE WHEN $6 THEN 'bench.never i' END, CASE WHEN $6 THEN '['||i||']' END, $7, "
            "'v1' FROM generate_series(1, $8::int) i",
            workflow, status, at, owner, wake, waits, flagged, n,
        )
    await conn.execute(
        "INSERT INTO workers (app, worker_id, started_at, heartbeat_at, info, lease) "
        "VALUES ('a', 'w1', $1::float8, $1::float8, '{}', 10)", NOW)


async def main(args: argparse.Namespace) -> None:
    import asyncpg

    from cantata import App

    schema = f"live_plans_{uuid.uuid4().hex[:8]}"
    async with App("a", store=f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
                   ).client():
        pass  # the schema, migrated
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'SET search_path TO "{schema}"')
        await conn.execute("ALTER TABLE runs SET (autovacuum_enabled = false)")
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {args.index}")
        await fill(conn, args.parked, args.ended)
        for label in ("never analyzed", "analyzed"):
            if label == "analyzed":
                await conn.execute("ANALYZE runs")
            print(f"== {label}")
            found: dict[str, list[list[tuple[dict[str, Any], float]]]] = {}
            for drop in (None, args.index.split()[0]):
                c = Explaining(conn, drop)
                at = 0
                for name, n in await statements(c):
                    found.setdefault(name, []).append(c.plans[at:at + n])
                    at += n
            for name, (kept, dropped) in found.items():
                def fmt(plans: list[tuple[dict[str, Any], float]]) -> str:
                    return "; ".join(f"{read(p)[0]} rows by {', '.join(read(p)[1])}, {t:.2f} ms"
                                     for p, t in plans)
                print(f"{name}\n   with the index: {fmt(kept)}\n"
                      f"   without it:     {fmt(dropped)}", flush=True)
    finally:
        await conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        await conn.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--index", default="runs_live ON runs (app, workflow, created_at) WHERE "
                   "status IN ('pending', 'running', 'compensating')",
                   help="the index to compare (CREATE INDEX IF NOT EXISTS ...)")
    p.add_argument("--parked", type=int, default=100_000)
    p.add_argument("--ended", type=int, default=60_000)
    asyncio.run(main(p.parse_args()))
