"""What a PostgreSQL saga writes: WAL bytes, rows and index entries, round trips.

    python -m bench.pg_saga_wal [--n 200] [--url postgresql://...] [--statements]
        [--waldump DATADIR] [--no-checkpoint]

Runs the order saga (``bench.cantata_app``) one run at a time, as the latency workload
of ``bench.cantata_scenario`` does, on a fresh schema of the server at ``--url``
(default ``BENCH_POSTGRES``) with the embedded broker, after 20 warm-up runs (an app
of their own) and a ``CHECKPOINT`` (so that both revisions of an A/B start with the
same full-page images to write; ``--no-checkpoint`` leaves it out: on a server other
work writes to, the checkpoint flushes everyone's pages, a minute on a busy disk, and
the WAL figure is not one to compare anyway). Prints per saga (the mean over ``n``, one in ten
compensated as in the workload):

- the WAL bytes (the server's WAL insert position before and after: the whole server,
  so run it on a server nothing else writes to, e.g. a private one: ``initdb``,
  ``pg_ctl start``, ``autovacuum=off``);
- each table's rows inserted, updated and updated HOT (``pg_stat_user_tables`` of the
  schema: an update that is not HOT writes an entry in every index of its table);
- the statements the store sent (asyncpg's calls, each a round trip), by their first
  words;
- with ``--statements``, where the server has ``pg_stat_statements`` (preloaded, the
  extension made, a superuser), each statement's execution time per saga, the
  functions' nested statements included (``pg_stat_statements.track = all``). It resets
  the server's statistics first and counts everyone's statements: a private server.

With ``--waldump DATADIR`` (the private server's data folder, readable here) it also
runs ``pg_waldump`` over the measured range and sums the WAL records' bytes by the
relation they touch (tables and indexes of the schema by name; full-page images
counted apart). See docs/performance.md ("Round twenty-four (saga, PostgreSQL)").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import glob
import re
import subprocess
import uuid
from typing import Any

import asyncpg

from bench.common import PG_URL, WARMUP

_CALLS = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")


def _count_calls(counts: collections.Counter[str], on: list[bool]) -> None:
    """Count the statements sent through asyncpg while ``on[0]``, by their first words."""
    from asyncpg.connection import Connection

    for name in _CALLS:
        fn = getattr(Connection, name)

        def wrapped(self: Any, query: str, *args: Any, __fn: Any = fn, **kw: Any) -> Any:
            if on[0]:
                words = " ".join(str(query).split()[:2])[:48]
                counts[words] += 1
            return __fn(self, query, *args, **kw)

        setattr(Connection, name, wrapped)


async def _one(url: str, sql: str) -> Any:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetch(sql)
    finally:
        await conn.close()


async def _tables(url: str, schema: str) -> dict[str, tuple[int, int, int]]:
    rows = await _one(url, "SELECT relname, n_tup_ins, n_tup_upd, n_tup_hot_upd "
                           f"FROM pg_stat_user_tables WHERE schemaname = '{schema}'")
    return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def _reset_statements(url: str) -> bool:
    """Reset pg_stat_statements if the server has it (``shared_preload_libraries``,
    the extension created in the database, a superuser)."""
    try:
        await _one(url, "SELECT pg_stat_statements_reset()")
    except asyncpg.PostgresError:
        return False
    return True


async def _statements(url: str, n: int) -> list[str]:
    rows = await _one(url, "SELECT calls, total_exec_time, query FROM pg_stat_statements "
                           f"WHERE calls >= {n // 4} ORDER BY total_exec_time DESC LIMIT 16")
    return [f"    {r[1] * 1000 / n:7.1f} {r[0] / n:5.2f} {r[1] * 1000 / r[0]:7.1f}  "
            f"{' '.join(r[2].split())[:70]}" for r in rows]


async def main_async(n: int, url: str, waldump: str | None, stats: bool = False,
                     checkpoint: bool = True) -> str:
    from bench.cantata_app import make_app, order_saga
    from cantata import WorkflowCompensated

    name = f"bench_sw_{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in url else "?"
    store = f"{url}{sep}schema={name}"
    counts: collections.Counter[str] = collections.Counter()
    on = [False]
    _count_calls(counts, on)

    lsn: list[int] = []

    async def sagas(orders: list[int], measure: bool) -> None:
        # A fresh app each time: closing it ends its connections, whose backends then
        # report their table counts (an idle one may keep them for up to 10 s).
        app = make_app("saga", store, "embedded", name)
        async with app:
            if measure and checkpoint:  # (the app's opening written first)
                await _one(url, "CHECKPOINT")
            if measure:
                lsn.append(int((await _one(url, "SELECT pg_current_wal_insert_lsn()"))[0][0]))
            on[0] = measure
            for o in orders:
                handle = await app.start(order_saga, o)
                with contextlib.suppress(WorkflowCompensated):
                    await handle.result(timeout=60)
            on[0] = False
            if measure:
                lsn.append(int((await _one(url, "SELECT pg_current_wal_insert_lsn()"))[0][0]))

    try:
        await sagas(WARMUP, False)
        await asyncio.sleep(0.5)
        t0 = await _tables(url, name)
        statements = stats and await _reset_statements(url)
        await sagas(list(range(1, n + 1)), True)
        before, after = lsn
        await asyncio.sleep(0.5)
        t1 = await _tables(url, name)
        server = await _statements(url, n) if statements else []
        relmap = {r[0]: r[1] for r in await _one(
            url, "SELECT pg_relation_filenode(c.oid), c.relname FROM pg_class c "
                 f"JOIN pg_namespace s ON s.oid = c.relnamespace WHERE s.nspname = '{name}'")}
    finally:
        with contextlib.suppress(Exception):
            await _one(url, f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    out = [f"{n} sagas, one at a time: {(after - before) / n:.0f} WAL bytes per saga"]
    out.append("  rows per saga: table inserted / updated / of them HOT")
    for t in sorted(t1):
        a, b = t0.get(t, (0, 0, 0)), t1[t]
        d = [(b[i] - a[i]) / n for i in range(3)]
        if any(d):
            out.append(f"    {t:<16} {d[0]:5.2f} / {d[1]:5.2f} / {d[2]:5.2f}")
    out.append(f"  statements per saga (asyncpg calls): {sum(counts.values()) / n:.2f}")
    for words, c in counts.most_common():
        out.append(f"    {c / n:5.2f}  {words}")
    if server:
        out.append("  the server's execution per saga (pg_stat_statements, nested statements "
                   "included: µs per saga, calls per saga, µs per call):")
        out.extend(server)
    if waldump:
        out.append(_waldump(waldump, _lsn(before), _lsn(after), relmap, n))
    return "\n".join(out)


def _lsn(pos: int) -> str:
    """A WAL position as pg_waldump reads it (asyncpg gives a pg_lsn as an int)."""
    return f"{pos >> 32:X}/{pos & 0xFFFFFFFF:X}"


def _waldump(datadir: str, start: str, end: str, relmap: dict[int, str], n: int) -> str:
    """The WAL records of [start, end) summed by the relation they touch."""
    exe = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_waldump"))[-1]
    text = subprocess.run([exe, "-p", f"{datadir}/pg_wal", "-s", start, "-e", end],
                          capture_output=True, text=True, check=False).stdout
    by: collections.Counter[str] = collections.Counter()
    fpi: collections.Counter[str] = collections.Counter()
    recs: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"rmgr: (\w+)\s+len \(rec/tot\):\s+(\d+)/\s*(\d+).*?desc: (\w+)", line)
        if not m:
            continue
        rel = re.search(r"rel \d+/\d+/(\d+)", line)
        what = relmap.get(int(rel.group(1)), "other") if rel else f"({m.group(1)})"
        key = f"{what} {m.group(1)}/{m.group(4)}"
        by[key] += int(m.group(3))
        recs[key] += 1
        if "FPW" in line or "fpw" in line:
            fpi[key] += int(m.group(3)) - int(m.group(2))
    lines = ["  WAL by relation and record (bytes per saga, records per saga, of it FPI):"]
    for key, b in by.most_common():
        lines.append(f"    {b / n:8.0f} {recs[key] / n:6.2f}  {fpi[key] / n:6.0f}  {key}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200, help="sagas")
    ap.add_argument("--url", default=PG_URL)
    ap.add_argument("--waldump", default=None, help="the server's data folder")
    ap.add_argument("--statements", action="store_true",
                    help="each statement's server time (resets pg_stat_statements)")
    ap.add_argument("--no-checkpoint", dest="checkpoint", action="store_false",
                    help="no CHECKPOINT before the measured sagas (a shared server)")
    a = ap.parse_args()
    print(asyncio.run(main_async(a.n, a.url, a.waldump, a.statements, a.checkpoint)))


if __name__ == "__main__":
    main()
