"""``python -m bench.attention``: the overview's "failed in the last hour" on a big store.

    python -m bench.attention [--runs 100000] [--store sqlite|postgres] [--reads 200]

Builds the store ``bench.console`` builds (``bench.many_runs``: SQL inserts, 3 % of the
runs failed, spread over 30 days) in a temporary SQLite file or a PostgreSQL schema of
its own (dropped after), then times in process, each ``--reads`` times: ``attention_counts`` (the
overview's dead letters and last hour's failures) and, where the code has it, the page
``GET /api/runs?failed_since=`` reads (``RunQuery(failed_since=...)``); p50 and p90 in
ms, and what each found; on PostgreSQL also the attention query's execution time in the
server (``EXPLAIN ANALYZE``), without the round trip. Reports; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import PG_URL, drop_schema
from bench.console import percentile
from bench.many_runs import APP, build_postgres, build_sqlite
from cantata.model.access import RunQuery
from cantata.store.factory import store_from_url


async def timed(reads: int, read: Any) -> tuple[float, float, Any]:
    for _ in range(5):  # (warm)
        got = await read()
    took = []
    for _ in range(reads):
        t = time.perf_counter()
        got = await read()
        took.append((time.perf_counter() - t) * 1000)
    return percentile(took, 50), percentile(took, 90), got


async def measure(url: str, reads: int) -> list[str]:
    store = store_from_url(url)
    await store.open()
    try:
        hour_ago = time.time() - 3600
        lines = []
        p50, p90, got = await timed(reads, lambda: store.attention_counts(
            APP, failed_since=hour_ago))
        lines.append(f"attention_counts: p50 {p50:.3f} ms, p90 {p90:.3f} ms ({got})")
        if any(f.name == "failed_since" for f in dataclasses.fields(RunQuery)):
            q = RunQuery(failed_since=hour_ago, limit=51)
            p50, p90, got = await timed(reads, lambda: store.query_runs(APP, q))
            lines.append(f"query_runs(failed_since=an hour ago): p50 {p50:.3f} ms, "
                         f"p90 {p90:.3f} ms ({len(got)} runs)")
        if url.startswith("postgresql"):  # the server's own time, without the round trip
            lines.append(await server_time(url, hour_ago, reads))
        return lines
    finally:
        await store.close()


async def server_time(url: str, hour_ago: float, reads: int) -> str:
    """The attention query's execution time in the server (``EXPLAIN ANALYZE``), p50."""
    import asyncpg
    import orjson

    from cantata.store.postgres_console import ATTENTION

    schema = url.rpartition("schema=")[2]
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        took = []
        for _ in range(reads):
            plan = await conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {ATTENTION}", APP,
                                       hour_ago)
            took.append(orjson.loads(plan)[0]["Execution Time"])
        return (f"attention query in the server: p50 {percentile(took, 50):.3f} ms, "
                f"p90 {percentile(took, 90):.3f} ms")
    finally:
        await conn.close()


async def main_async(args: argparse.Namespace) -> None:
    if args.store == "sqlite":
        with tempfile.TemporaryDirectory() as folder:
            url = await build_sqlite(Path(folder) / "attention.db", args.runs)
            lines = await measure(url, args.reads)
    else:
        schema = f"bench_attention_{uuid.uuid4().hex[:8]}"
        try:
            url = await build_postgres(args.runs, schema)
            lines = await measure(url, args.reads)
        finally:
            await drop_schema(schema)
    print(f"{args.store}, {args.runs:,} runs:")
    for line in lines:
        print(f"  {line}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--runs", type=int, default=100_000)
    p.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    p.add_argument("--reads", type=int, default=200)
    asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    main()
