"""What a queue claim costs past a held-back backlog, and how soon a new key's run begins.

    python -m bench.partition_claim --store sqlite|postgres [--keys 1] [--waiting 100000]
        [--claims 30] [--explain] [--latency]

Fills a new store's ``queue_runs`` by SQL with ``--waiting`` runs waiting in queue ``q``
(``concurrency=1``, partitioned) across ``--keys`` keys (interleaved), every key with
one run in progress: each key is at its limit, so a claim's first page (500 runs, best
first) is all held back. Then, ``--claims`` times, a run of a new key is queued (by the
store's API) and one claim is timed: it must find that run past the backlog (the
claim's time: median and p90). Also timed: a claim that finds nothing (no new key;
before schema SQLite 29 / PostgreSQL 38 such a claim walked the backlog and then
spaced such walks 1 to 8 s apart). PostgreSQL's tables are analyzed first.

``--explain`` prints the plans of the read of the partitions' heads (SQLite: EXPLAIN
QUERY PLAN; PostgreSQL: EXPLAIN ANALYZE, rows of ``queue_runs`` read). ``--latency``
measures, with a worker, the time from ``app.start`` of a new key's run queued behind
700 runs of a key at its limit to its step's begin (docs/flow-control.md, partitions).
Prints one summary line per measurement.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import statistics
import tempfile
import time
import uuid
from typing import Any

from bench.common import PG_URL

APP, QUEUE, WF = "bench", "q", "wf"


def _rows(waiting: int, keys: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """(waiting rows, rows in progress) of ``queue_runs``, for SQL inserts."""
    base = int((time.time() - 3600) * 1e6)
    held = [(APP, f"busy-{k}", QUEUE, WF, f"key-{k:05d}", 0, base - 1, time.time(), False)
            for k in range(keys)]
    waits = [(APP, f"wait-{i:07d}", QUEUE, WF, f"key-{i % keys:05d}", 0, base + i, None, False)
             for i in range(waiting)]
    return waits, held


async def _fill(store_kind: str, url: str, path: str, waiting: int, keys: int) -> None:
    waits, held = _rows(waiting, keys)
    cols = "app, run_id, queue, workflow, partition_key, priority, seq, began_at, done"
    if store_kind == "sqlite":
        with sqlite3.connect(path) as c:
            c.executemany(f"INSERT INTO queue_runs ({cols}) VALUES (?,?,?,?,?,?,?,?,?)",
                          [(*r[:8], int(r[8])) for r in waits + held])
        return
    import asyncpg

    schema = url.rsplit("schema=", 1)[1]
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.copy_records_to_table("queue_runs", schema_name=schema,
                                         records=waits + held, columns=cols.split(", "))
        await conn.execute(f'ANALYZE "{schema}".queue_runs')
    finally:
        await conn.close()


async def claims(a: argparse.Namespace) -> None:
    from cantata.model.flow import QueueEntry, QueueSpec
    from cantata.store.factory import store_from_url
    from cantata.testing.contract.support import new_run

    name = f"bench_claim_{uuid.uuid4().hex[:10]}"
    path = f"{tempfile.mkdtemp(prefix='cantata-bench-')}/claim.db"
    sep = "&" if "?" in PG_URL else "?"
    url = f"sqlite:///{path}" if a.store == "sqlite" else f"{PG_URL}{sep}schema={name}"
    store = store_from_url(url)
    await store.open()
    try:
        await store.declare_queue(APP, QueueSpec(QUEUE, concurrency=1), worker_id="w",
                                  stale_before=0)
        await _fill(a.store, url, path, a.waiting, a.keys)
        found: list[float] = []
        idle: list[float] = []
        missed = 0  # claims that did not find the new key's run
        for i in range(a.claims):
            t = time.perf_counter()
            claim = await store.claim_queued_runs(APP, "w", QUEUE, [WF], now=time.time(),
                                                  limit=50)
            idle.append(time.perf_counter() - t)
            assert claim.runs == [], claim.runs
            at = time.time()  # (queued behind the backlog)
            run, _ = await store.create_queued_run(new_run(APP, created_at=at, updated_at=at),
                                                   QueueEntry(QUEUE, partition=f"new-{i}"))
            t = time.perf_counter()
            claim = await store.claim_queued_runs(APP, "w", QUEUE, [WF], now=time.time(),
                                                  limit=50)
            found.append(time.perf_counter() - t)
            if [r.run_id for r in claim.runs] != [run.run_id]:
                missed += 1
                await asyncio.sleep(8.5)  # (an older version's claims read on later)
                t = time.perf_counter()
                claim = await store.claim_queued_runs(APP, "w", QUEUE, [WF],
                                                      now=time.time(), limit=50)
                found[-1] = time.perf_counter() - t  # (the claim that found it)
                assert [r.run_id for r in claim.runs] == [run.run_id], claim.runs
        print(f"{a.store}, {a.waiting} waiting across {a.keys} key(s) at their limit, "
              f"{a.claims} claims: finding a new key's run p50 "
              f"{statistics.median(found) * 1e3:.2f} ms p90 {_p90(found) * 1e3:.2f} ms; "
              f"finding none p50 {statistics.median(idle) * 1e3:.2f} ms p90 "
              f"{_p90(idle) * 1e3:.2f} ms; {missed} claims of {a.claims} did not find it",
              flush=True)
        if a.explain:
            await _explain(a.store, store, url, path)
    finally:
        await store.close()
        if a.store == "postgres":
            import asyncpg

            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await conn.close()


def _p90(xs: list[float]) -> float:
    return sorted(xs)[int(len(xs) * 0.9) - 1 if len(xs) >= 10 else -1]


async def _explain(kind: str, store: Any, url: str, path: str) -> None:
    from cantata.model.flow import QueueEntry
    from cantata.testing.contract.support import new_run

    if kind == "sqlite":
        from cantata.store import sqlite_flow

        with sqlite3.connect(path) as c:
            keys = sqlite_flow.partition_keys(c, APP, QUEUE, None, 600)
            print(f"  skip scan: {len(keys)} keys read")
            sql = sqlite_flow.heads_sql(False, "?", "", 500)
            args = (json.dumps(keys[:500]), APP, APP, QUEUE, WF, 1)
            for row in c.execute(f"EXPLAIN QUERY PLAN {sql}", args):
                print("  heads:", row[3])
            keys_sql = ("WITH RECURSIVE k(p) AS (SELECT (SELECT min(x.partition_key) FROM "
                        "queue_runs x INDEXED BY queue_runs_waiting_key WHERE x.app=? AND "
                        "x.queue=? AND x.began_at IS NULL AND x.partition_key >= '') UNION ALL "
                        "SELECT (SELECT min(x.partition_key) FROM queue_runs x INDEXED BY "
                        "queue_runs_waiting_key WHERE x.app=? AND x.queue=? AND x.began_at IS "
                        "NULL AND x.partition_key > k.p) FROM k WHERE k.p IS NOT NULL LIMIT 600) "
                        "SELECT p FROM k")
            for row in c.execute(f"EXPLAIN QUERY PLAN {keys_sql}", (APP, QUEUE, APP, QUEUE)):
                print("  keys:", row[3])
        return
    from cantata.store import postgres_flow

    class Explaining:
        def __init__(self, conn: Any) -> None:
            self.conn, self.label = conn, ""

        async def fetch(self, sql: str, *args: Any) -> list[Any]:
            plan = json.loads(await self.conn.fetchval(
                f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args))[0]
            rows, used = _read(plan["Plan"])
            print(f"  {self.label}: {rows} rows of queue_runs read, by {sorted(used)}, "
                  f"{plan['Execution Time']:.2f} ms")
            return list(await self.conn.fetch(sql, *args))

    async with store._db.conn() as conn:
        ex = Explaining(conn)
        ex.label = "skip scan of the keys"
        keys = await postgres_flow.partition_keys(ex, APP, QUEUE, None, 600)  # type: ignore[arg-type]
        ex.label = "first page (500 waiting runs, best first)"
        await ex.fetch(f"SELECT q.run_id, q.partition_key {postgres_flow._WAITING} AND "
                       'q.workflow = ANY($3::text[]) ORDER BY q.seq, q.run_id COLLATE "C" '
                       "LIMIT 500", APP, QUEUE, [WF])
        at = time.time()
        await store.create_queued_run(new_run(APP, created_at=at, updated_at=at),
                                      QueueEntry(QUEUE, partition="zz-new"))
        keys = await postgres_flow.partition_keys(conn, APP, QUEUE, None, 600)
        ex.label = f"heads of {min(len(keys), 500)} keys"
        await ex.fetch(postgres_flow.heads_sql('q.seq, q.run_id COLLATE "C"', "", 500),
                       APP, QUEUE, [WF], keys[:500], 1)


def _read(plan: dict[str, Any]) -> tuple[int, set[str]]:
    rows, used = 0, set()
    nodes = [(plan, "")]
    while nodes:
        node, parent = nodes.pop()
        relation = node.get("Relation Name", parent)
        nodes += [(child, relation) for child in node.get("Plans", [])]
        if relation != "queue_runs":
            continue
        loops = node.get("Actual Loops", 1)
        rows += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * loops
        if "Index Name" in node:
            used.add(node["Index Name"])
        elif node.get("Node Type") == "Seq Scan":
            used.add("(seq scan)")
    return rows, used


async def _one_latency(url: str) -> float:
    """Seconds from the start of a new key's run, behind 700 runs of a key at its limit
    (``concurrency=1``), to its step's begin, in a new store."""
    from cantata import App, WorkflowContext

    app = App("lat", store=url)
    app.queue("q", concurrency=1)
    begun: dict[str, float] = {}
    gate, first_began = asyncio.Event(), asyncio.Event()

    @app.step
    async def work(key: str) -> str:
        begun[key] = time.monotonic()
        if key == "A0":
            first_began.set()
            await gate.wait()
        return key

    @app.workflow(queue="q")
    async def job(ctx: WorkflowContext, key: str) -> str:
        out: str = await ctx.run(work, key)
        return out

    async with app:
        first = await app.start(job, "A0", partition="A")
        await first_began.wait()
        backlog = [await app.start(job, f"A{i}", partition="A") for i in range(1, 701)]
        await asyncio.sleep(3.5)  # (claims read past A's page meanwhile, finding nothing)
        started = time.monotonic()
        other = await app.start(job, "B", partition="B")
        await other.result(timeout=60)
        gate.set()
        await first.result(timeout=60)
        for h in backlog:
            await h.cancel()
    return begun["B"] - started


async def latency(a: argparse.Namespace) -> None:
    """:func:`_one_latency`, ``--claims`` rounds."""
    took = []
    for r in range(a.claims):
        name = f"bench_lat_{uuid.uuid4().hex[:10]}"
        sep = "&" if "?" in PG_URL else "?"
        url = (f"sqlite:///{tempfile.mkdtemp(prefix='cantata-bench-')}/lat.db"
               if a.store == "sqlite" else f"{PG_URL}{sep}schema={name}")
        took.append(await _one_latency(url))
        print(f"round {r + 1}: {took[-1] * 1e3:.0f} ms", flush=True)
        if a.store == "postgres":
            import asyncpg

            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await conn.close()
    print(f"{a.store}: a new key's run behind 700 held back, start to begin, {len(took)} "
          f"rounds: p50 {statistics.median(took) * 1e3:.0f} ms, max {max(took) * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--keys", type=int, default=1)
    ap.add_argument("--waiting", type=int, default=100_000)
    ap.add_argument("--claims", type=int, default=30)
    ap.add_argument("--explain", action="store_true")
    ap.add_argument("--latency", action="store_true")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cantata").setLevel(logging.ERROR)
    asyncio.run(latency(a) if a.latency else claims(a))


if __name__ == "__main__":
    main()
