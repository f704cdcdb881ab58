"""This machine's limits under the benchmark's figures, with the clients Cantata uses.

    python -m bench.limits [sqlite] [postgres] [nats] [--n 2000] [--each-cpu]

- ``sqlite``: a file in the system's temporary folder (where the benchmark's stores
  are), WAL, ``synchronous=FULL``: one small row per transaction, one after another
  (commits/s and the p50 of one), and 100 rows per transaction (rows/s); measured
  after 1,100 commits, once the WAL is written over from its start (as in a
  benchmark's measured sagas, docs/performance.md, round twenty-eight).
- ``postgres``: asyncpg on ``BENCH_POSTGRES`` (server defaults: ``fsync``,
  ``synchronous_commit`` on): one small ``INSERT`` per transaction on one connection,
  one after another (commits/s, p50), the same on 8 connections at once (commits/s),
  and a ``SELECT 1`` round trip (p50: the wire and the server, without a WAL flush).
- ``--each-cpu``: the ``sqlite`` figures once with this process held on each CPU in
  turn (``os.sched_setaffinity``), and the CPUs that took the disks' interrupts
  (``/proc/interrupts``): a thread asleep in ``fdatasync`` on a CPU other than the one
  the completion's interrupt reaches is woken from there, which on a virtual machine
  whose idle CPUs halt costs tens of microseconds a commit (docs/performance.md,
  "Figures").
- ``nats``: nats-py on ``BENCH_NATS``, a JetStream stream on file storage: a publish
  awaiting its ack, one after another (msgs/s, p50), then publishes with acks awaited
  in batches of 256 and the messages consumed by a pull consumer, each acked
  (msgs/s each).

Each figure is the floor (or ceiling) of one resource alone, with nothing of
Cantata's around it: how far a benchmark figure is from the machine's limit
(docs/performance.md, "Figures"). No timing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import statistics
import tempfile
import time
import uuid

from bench.common import NATS_URL, PG_URL, disk_interrupt_cpus

PAYLOAD = b'{"order": 12345, "event": "inventory.reserved", "sku": "A-1"}'


def _p50_us(samples: list[float]) -> float:
    return statistics.median(samples) * 1e6


def disk_interrupts() -> str:
    found = disk_interrupt_cpus()
    return "the disks' interrupts: " + (
        ", ".join(f"CPU{cpu} {n:,}" for cpu, n in found.items()) or "none in /proc/interrupts")


def sqlite_each_cpu(n: int) -> list[str]:
    before = os.sched_getaffinity(0)
    lines = [disk_interrupts()]
    try:
        for cpu in sorted(before):
            os.sched_setaffinity(0, {cpu})
            lines += [f"on CPU{cpu}: {line}" for line in sqlite_limits(n)]
    finally:
        os.sched_setaffinity(0, before)
    return lines


def sqlite_limits(n: int) -> list[str]:
    folder = tempfile.mkdtemp(prefix="cantata-limits-")
    path = os.path.join(folder, "limits.db")
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
        for _ in range(1100):  # past the first checkpoint: the WAL is written over
            conn.execute("INSERT INTO t (body) VALUES (?)", (PAYLOAD,))
        one: list[float] = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("INSERT INTO t (body) VALUES (?)", (PAYLOAD,))
            conn.execute("COMMIT")
            one.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        batches = max(1, n // 10)
        t1 = time.perf_counter()
        for _ in range(batches):
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT INTO t (body) VALUES (?)", [(PAYLOAD,)] * 100)
            conn.execute("COMMIT")
        rows_per_s = batches * 100 / (time.perf_counter() - t1)
    finally:
        conn.close()
        shutil.rmtree(folder, ignore_errors=True)
    return [
        f"sqlite (WAL, synchronous=FULL, {tempfile.gettempdir()}): 1 row a transaction "
        f"{n / wall:,.0f} commits/s, p50 {_p50_us(one):.0f} µs; "
        f"100 rows a transaction {rows_per_s:,.0f} rows/s",
    ]


async def postgres_limits(n: int) -> list[str]:
    import asyncpg

    table = f"cantata_limits_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f"CREATE TABLE {table} (id bigserial PRIMARY KEY, body bytea)")
        insert = f"INSERT INTO {table} (body) VALUES ($1)"
        ping: list[float] = []
        for _ in range(min(n, 1000)):
            s = time.perf_counter()
            await conn.fetchval("SELECT 1")
            ping.append(time.perf_counter() - s)
        one: list[float] = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            await conn.execute(insert, PAYLOAD)
            one.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        others = [await asyncpg.connect(PG_URL) for _ in range(8)]
        try:
            async def writer(c: asyncpg.Connection) -> None:
                for _ in range(n // 8):
                    await c.execute(insert, PAYLOAD)

            t1 = time.perf_counter()
            await asyncio.gather(*(writer(c) for c in others))
            eight = (n // 8) * 8 / (time.perf_counter() - t1)
        finally:
            for c in others:
                await c.close()
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
    return [
        f"postgres (asyncpg, fsync and synchronous_commit on): SELECT 1 p50 "
        f"{_p50_us(ping):.0f} µs; 1 INSERT a transaction on 1 connection "
        f"{n / wall:,.0f} commits/s, p50 {_p50_us(one):.0f} µs; on 8 connections "
        f"{eight:,.0f} commits/s",
    ]


async def nats_limits(n: int) -> list[str]:
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    stream = f"CANTATA_LIMITS_{uuid.uuid4().hex[:8].upper()}"
    subject = f"cantata-limits.{stream.lower()}"
    await js.add_stream(name=stream, subjects=[subject])
    try:
        one: list[float] = []
        t0 = time.perf_counter()
        for _ in range(n):
            s = time.perf_counter()
            await js.publish(subject, PAYLOAD, stream=stream)
            one.append(time.perf_counter() - s)
        wall = time.perf_counter() - t0
        t1 = time.perf_counter()
        for start in range(0, n, 256):
            await asyncio.gather(*(js.publish(subject, PAYLOAD, stream=stream)
                                   for _ in range(min(256, n - start))))
        batched = n / (time.perf_counter() - t1)
        sub = await js.pull_subscribe(subject, durable="limits", stream=stream)
        got = 0
        t2 = time.perf_counter()
        while got < 2 * n:
            for msg in await sub.fetch(256, timeout=5):
                await msg.ack()
                got += 1
        consumed = got / (time.perf_counter() - t2)
    finally:
        await js.delete_stream(stream)
        await nc.close()
    return [
        f"nats (JetStream, file storage): publish awaiting its ack {n / wall:,.0f} msgs/s, "
        f"p50 {_p50_us(one):.0f} µs; acks awaited 256 at a time {batched:,.0f} msgs/s; "
        f"pull consumer, each acked {consumed:,.0f} msgs/s",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("what", nargs="*", help="sqlite, postgres, nats (default: all three)")
    ap.add_argument("--n", type=int, default=2000, help="operations per figure")
    ap.add_argument("--each-cpu", action="store_true",
                    help="sqlite: once on each CPU, and where the disks' interrupts go")
    a = ap.parse_args()
    what = a.what or ["sqlite", "postgres", "nats"]
    unknown = sorted(set(what) - {"sqlite", "postgres", "nats"})
    if unknown:
        ap.error(f"unknown limit {', '.join(unknown)}: name sqlite, postgres or nats")
    lines: list[str] = []
    if "sqlite" in what:
        lines += sqlite_each_cpu(a.n) if a.each_cpu else sqlite_limits(a.n)
    if "postgres" in what:
        lines += asyncio.run(postgres_limits(a.n))
    if "nats" in what:
        lines += asyncio.run(nats_limits(a.n))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
