"""A store of many runs, built with SQL (bulk inserts / COPY, not ``app.start``).

Five workflows, 90 % completed, 5 % compensated, 3 % failed, 2 % running, spread over
30 days, one run in ten with a 3-step history and attempts: what ``bench.console`` and
``bench.attention`` measure the console's reads on.
"""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import PG_URL, drop_schema
from cantata.store.factory import store_from_url

APP = "bench"
WORKFLOWS = ["place_order", "refund_order", "ship_order", "sync_stock", "send_invoice"]
DAYS = 30

Rows = list[tuple[Any, ...]]


def rows(n: int, seed: int = 7) -> Iterator[tuple[Any, ...]]:
    """``runs`` rows in creation order (ids begin with their time, as real ids do)."""
    rnd = random.Random(seed)
    start = time.time() - DAYS * 86400
    step = DAYS * 86400 / n
    for i in range(n):
        at = start + i * step
        ms = int(at * 1000)
        run_id = f"{(ms & 0xFFFF_FFFF_FFFF) << 80 | rnd.getrandbits(80):032x}"
        r = rnd.random()
        status = ("completed" if r < 0.90 else "compensated" if r < 0.95
                  else "failed" if r < 0.98 else "running")
        error = None if status in ("completed", "running") else "ValueError: card declined"
        result = '{"status": "shipped"}' if status == "completed" else None
        key = f"order-{i}" if i % 2 == 0 else None
        yield (APP, run_id, WORKFLOWS[i % len(WORKFLOWS)], status, f'[{{"id": {i}}}]', result,
               error, key, None, run_id if i % 5 else f"corr-{i // 5}", None, None, None, at,
               at + 1.5, None, False, None, 0, False)


def history_of(run: tuple[Any, ...]) -> tuple[Rows, Rows]:
    run_id, at = run[1], run[13]
    entries, attempts = [], []
    for seq, name in enumerate(("reserve", "charge", "ship"), 1):
        key = f"{name}#1"
        entries.append((APP, run_id, key, seq, "step", name, "completed", '{"ok": true}', None,
                        None, 1, at + seq * 0.1, at + seq * 0.1 + 0.05, None, None))
        attempts.append((APP, run_id, key, 1, at + seq * 0.1, at + seq * 0.1 + 0.05, None, None))
    return entries, attempts


def batches(n: int, size: int) -> Iterator[tuple[Rows, Rows, Rows]]:
    """The rows of :func:`rows` (``n`` runs) and their histories and attempts, ``size``
    runs at a time."""
    batch: Rows = []
    hist: Rows = []
    atts: Rows = []
    for i, row in enumerate(rows(n)):
        batch.append(row)
        if i % 10 == 0:
            e, a = history_of(row)
            hist += e
            atts += a
        if len(batch) == size:
            yield batch, hist, atts
            batch, hist, atts = [], [], []
    if batch:
        yield batch, hist, atts


# The columns ``rows`` fills, by name: later migrations add columns with defaults.
RUN_COLUMNS = ("app", "run_id", "workflow", "status", "args", "result", "error",
               "idempotency_key", "args_hash", "correlation_id", "causation_id",
               "parent_run_id", "service", "created_at", "updated_at", "deadline_at",
               "cancel_requested", "owner", "fence", "flagged")
RUN_MARKS = ",".join("?" * len(RUN_COLUMNS))


async def build_sqlite(path: Path, n: int) -> str:
    """A SQLite store of ``n`` runs at ``path``; its URL."""
    url = f"sqlite:///{path}"
    store = store_from_url(url)
    await store.open()  # creates and migrates
    await store.close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("BEGIN")
    for batch, hist, atts in batches(n, 50_000):
        conn.executemany(f"INSERT INTO runs ({','.join(RUN_COLUMNS)}) VALUES ({RUN_MARKS})",
                         batch)
        conn.executemany(f"INSERT INTO history VALUES ({','.join('?' * 15)})", hist)
        conn.executemany(f"INSERT INTO attempts VALUES ({','.join('?' * 8)})", atts)
    conn.execute("COMMIT")
    conn.close()
    return url


def postgres_url(schema: str) -> str:
    """The store URL of ``schema`` at ``PG_URL``."""
    return f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"


async def build_postgres(n: int, schema: str) -> str:
    """A PostgreSQL store of ``n`` runs in ``schema`` (made anew, analyzed); its URL."""
    import asyncpg

    await drop_schema(schema)
    url = postgres_url(schema)
    store = store_from_url(url)
    await store.open()  # creates and migrates
    await store.close()
    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
    try:
        for batch, hist, atts in batches(n, 100_000):
            await conn.copy_records_to_table("runs", records=batch, columns=list(RUN_COLUMNS))
            await conn.copy_records_to_table("history", records=hist)
            await conn.copy_records_to_table("attempts", records=atts)
        await conn.execute("ANALYZE runs; ANALYZE history; ANALYZE attempts")
    finally:
        await conn.close()
    return url
