"""The console's runs filtered by code version (``GET /api/runs?version=V``, ``cantata runs
--version V``): the plan and the time of a page, with and without an index.

    python -m bench.version_filter [--runs 100000] [--store sqlite|postgres|both]
                                   [--index DEFINITION]

Builds a store of ``--runs`` runs with SQL (``bench.many_runs``: 30 days of five
workflows, 90 % completed), then pins them to ten code versions deployed one after the
other (``v0`` the oldest tenth of the runs by creation, ``v9`` the newest) and 20 of the
oldest tenth to ``v-rare`` (runs a rollback left behind, say). Then reads, by the
store's own statement (``runs_sql`` of each store), the first page (50 runs) of
``v9``, ``v0``, ``v-rare`` and of a version no run has, and a second page of ``v0``
by cursor: each once with ``--index`` (made with ``CREATE INDEX IF NOT EXISTS`` if the
schema does not have it) and once with it dropped in a transaction rolled back
afterwards. Prints each read's plan, the rows of ``runs`` it read (PostgreSQL; SQLite
says only which index) and its time (the best of 5). PostgreSQL's table is analyzed
(``bench.many_runs``); docs/performance.md, "Round twenty-six (fixes)".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import PG_URL, drop_schema
from bench.live_plans import read
from bench.many_runs import APP, build_postgres, build_sqlite
from cantata.model.access import RunQuery

VERSIONS = 10
SCHEMA = "bench_version_filter"
INDEX = "runs_version ON runs (app, version, created_at, run_id) WHERE version IS NOT NULL"
PG_INDEX = ('runs_version ON runs (app, version, created_at, run_id COLLATE "C") '
            "WHERE version IS NOT NULL")

# Versions by creation: the tenth of the span a run was created in ({whole}: the whole
# part of a positive number, as each dialect writes it).
PIN = ("UPDATE runs SET version = 'v' || {whole} FROM (SELECT min(created_at) AS lo, "
       "max(created_at) AS hi FROM runs) s")
TENTH = f"(created_at - lo) * {VERSIONS} / (hi - lo + 1e-6)"
SQLITE_PIN = PIN.format(whole=f"CAST({TENTH} AS INTEGER)")
PG_PIN = PIN.format(whole=f"floor({TENTH})::int")
RARE = ("UPDATE runs SET version = 'v-rare' WHERE run_id IN (SELECT run_id FROM runs "
        "WHERE version = 'v0' ORDER BY run_id LIMIT 20)")


def queries(cursor: tuple[float, str] | None) -> dict[str, RunQuery]:
    out = {
        "v9 (the newest tenth), first page": RunQuery(version="v9", limit=51),
        "v0 (the oldest tenth), first page": RunQuery(version="v0", limit=51),
        "v-rare (20 runs among the oldest), first page": RunQuery(version="v-rare", limit=51),
        "a version no run has": RunQuery(version="v-none", limit=51),
    }
    if cursor is not None:
        out["v0, second page (cursor)"] = RunQuery(version="v0", after=cursor, limit=51)
    return out


def sqlite_reads(path: Path, index: str) -> list[str]:
    from cantata.store.sqlite_console import runs_sql

    # (no statement cache: a plan cached with the index would be shown without it)
    conn = sqlite3.connect(path, isolation_level=None, cached_statements=0)
    conn.execute(f"CREATE INDEX IF NOT EXISTS {index}")
    name = index.split()[0]
    last = conn.execute(
        "SELECT created_at, run_id FROM runs WHERE version='v0' "
        "ORDER BY created_at DESC, run_id DESC LIMIT 1 OFFSET 49").fetchone()
    out = []
    for label, q in queries(tuple(last) if last else None).items():
        sql, params = runs_sql(APP, q)
        for kept in (True, False):
            conn.execute("BEGIN")
            try:
                if not kept:
                    conn.execute(f"DROP INDEX {name}")
                plan = "; ".join(str(r[-1]) for r in
                                 conn.execute("EXPLAIN QUERY PLAN " + sql, params))
                times = []
                for _ in range(5):
                    t0 = time.perf_counter()
                    found = conn.execute(sql, params).fetchall()
                    times.append((time.perf_counter() - t0) * 1000)
            finally:
                conn.execute("ROLLBACK")
            out.append(f"{label}, {'with' if kept else 'without'} {name}: {len(found)} runs, "
                       f"{min(times):.2f} ms (median {statistics.median(times):.2f}): {plan}")
    conn.execute("BEGIN")
    try:  # what the migration's CREATE INDEX takes, writes of the store waiting meanwhile
        conn.execute(f"DROP INDEX {name}")
        t0 = time.perf_counter()
        conn.execute(f"CREATE INDEX {index}")
        out.append(f"building {name}: {(time.perf_counter() - t0) * 1000:.0f} ms")
    finally:
        conn.execute("ROLLBACK")
    conn.close()
    return out


async def postgres_reads(index: str) -> list[str]:
    import asyncpg

    from cantata.store.postgres_console import runs_sql

    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": SCHEMA})
    out = []
    try:
        await conn.execute(f"CREATE INDEX IF NOT EXISTS {index}")
        await conn.execute("ANALYZE runs")
        name = index.split()[0]
        last = await conn.fetchrow(
            "SELECT created_at, run_id FROM runs WHERE version='v0' "
            'ORDER BY created_at DESC, run_id COLLATE "C" DESC LIMIT 1 OFFSET 49')
        for label, q in queries((last[0], last[1]) if last else None).items():
            sql, params = runs_sql(APP, q)
            for kept in (True, False):
                tx = conn.transaction()
                await tx.start()
                try:
                    if not kept:
                        await conn.execute(f"DROP INDEX {name}")
                    times: list[float] = []
                    used: list[str] = []
                    rows = 0
                    for _ in range(5):
                        plan = await conn.fetchval(
                            f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *params)
                        top = json.loads(plan)[0]
                        times.append(top["Execution Time"])
                        rows, used = read(top["Plan"])
                    t0 = time.perf_counter()
                    found = await conn.fetch(sql, *params)
                    client = (time.perf_counter() - t0) * 1000
                finally:
                    await tx.rollback()
                out.append(f"{label}, {'with' if kept else 'without'} {name}: {len(found)} "
                           f"runs, {rows} rows of runs read by {', '.join(used)}, "
                           f"{min(times):.2f} ms on the server (median "
                           f"{statistics.median(times):.2f}; {client:.2f} ms at the client)")
        tx = conn.transaction()
        await tx.start()
        try:  # what the migration's CREATE INDEX takes, writes of runs waiting meanwhile
            await conn.execute(f"DROP INDEX {name}")
            t0 = time.perf_counter()
            await conn.execute(f"CREATE INDEX {index}")
            out.append(f"building {name}: {(time.perf_counter() - t0) * 1000:.0f} ms")
        finally:
            await tx.rollback()
    finally:
        await conn.close()
    return out


async def main(args: argparse.Namespace) -> None:
    if args.store in ("sqlite", "both"):
        tmp = Path(tempfile.mkdtemp(prefix="cantata-version-filter-"))
        try:
            path = tmp / "runs.db"
            await build_sqlite(path, args.runs)
            conn = sqlite3.connect(path, isolation_level=None)
            conn.execute(SQLITE_PIN)
            conn.execute(RARE)
            conn.close()
            print(f"== SQLite, {args.runs} runs")
            for line in sqlite_reads(path, args.index):
                print(line, flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if args.store in ("postgres", "both"):
        import asyncpg

        await build_postgres(args.runs, SCHEMA)
        pg = await asyncpg.connect(PG_URL, server_settings={"search_path": SCHEMA})
        try:
            await pg.execute(PG_PIN)
            await pg.execute(RARE)
        finally:
            await pg.close()
        try:
            print(f"== PostgreSQL, {args.runs} runs")
            for line in await postgres_reads(args.pg_index):
                print(line, flush=True)
        finally:
            await drop_schema(SCHEMA)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    p.add_argument("--index", default=INDEX, help="SQLite: CREATE INDEX IF NOT EXISTS ...")
    p.add_argument("--pg-index", default=PG_INDEX, help="PostgreSQL: the same")
    asyncio.run(main(p.parse_args()))
