"""A SQLite queue claim reads only the rows that can matter: the waiting ones (in the
order of the queue, migration 0025) and those in progress, never every row the
app's queues ever had (SQLite keeps no statistics to choose an index by)."""

from __future__ import annotations

import sqlite3
import statistics
import time
from pathlib import Path

import pytest

from cantata.model.flow import QueueEntry, QueueSpec
from cantata.store import migrations
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import new_run
from tests.store.test_sqlite import assert_latest_version

APP = "shop"
FINISHED = 50_000


def add_finished_rows(path: Path, n: int) -> None:
    """``n`` ended runs that began in queue ``q`` long ago, written past the store."""
    now = time.time() - 86_400
    with sqlite3.connect(path) as c:
        cols = [r[1] for r in c.execute("PRAGMA table_info(runs)")]
        [template] = c.execute("SELECT * FROM runs LIMIT 1").fetchall()
        row = dict(zip(cols, template, strict=True))
        runs, queued = [], []
        for i in range(n):
            at = now + i * 0.001
            row.update(run_id=f"old-{i:06d}", status="completed", idempotency_key=None,
                       created_at=at, owner=None)
            runs.append(tuple(row[k] for k in cols))
            queued.append((APP, f"old-{i:06d}", "q", "wf", "", 0, int(at * 1e6), at + 1, 1))
        c.executemany(f"INSERT INTO runs ({', '.join(cols)}) VALUES "
                      f"({', '.join('?' * len(cols))})", runs)
        c.executemany("INSERT INTO queue_runs (app, run_id, queue, workflow, partition_key, "
                      "priority, seq, began_at, done) VALUES (?,?,?,?,?,?,?,?,?)", queued)


async def median_claim(store: SQLiteStore, rounds: int = 30) -> float:
    """Seconds a claim takes that admits nothing (the queue's slots are taken)."""
    took = []
    for _ in range(rounds):
        t = time.perf_counter()
        claim = await store.claim_queued_runs(APP, "w", "q", ["wf"], now=time.time(), limit=50)
        took.append(time.perf_counter() - t)
        assert claim.runs == [] and claim.waiting
    return statistics.median(took)


@pytest.mark.slow
async def test_a_claim_does_not_slow_down_with_finished_rows(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(str(path))
    await store.open()
    try:
        # Without priorities (its order is the one that had no index), per worker.
        await store.declare_queue(APP, QueueSpec("q", concurrency=2, per_worker=2),
                                  worker_id="w", stale_before=0)
        for _ in range(5):
            await store.create_queued_run(new_run(APP), QueueEntry("q"))
        claim = await store.claim_queued_runs(APP, "w", "q", ["wf"], now=time.time(), limit=50)
        assert len(claim.runs) == 2
        empty = await median_claim(store)
    finally:
        await store.close()
    add_finished_rows(path, FINISHED)
    store = SQLiteStore(str(path))
    await store.open()
    try:
        full = await median_claim(store)
    finally:
        await store.close()
    # The same few rows to read either way (a claim read all 50,000 in ~25 ms).
    assert full < 3 * empty + 0.002, f"{full * 1e3:.2f} ms vs {empty * 1e3:.2f} ms"


async def test_a_version_24_store_gets_the_index_of_the_waiting_order(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SQLiteStore(str(path))
    await store.open()
    await store.declare_queue(APP, QueueSpec("q", concurrency=1), worker_id="w",
                              stale_before=0)
    ids = [(await store.create_queued_run(new_run(APP), QueueEntry("q")))[0].run_id
           for _ in range(3)]
    await store.close()
    with sqlite3.connect(path) as c:  # as version 24 left it
        c.execute("DROP INDEX queue_runs_waiting_seq")
        c.execute("UPDATE cantata_meta SET value='24' WHERE key='schema_version'")
    assert migrations.latest("sqlite") >= 25
    store = SQLiteStore(str(path))
    await store.open()
    try:
        claim = await store.claim_queued_runs(APP, "w", "q", ["wf"], now=time.time(), limit=50)
        assert [r.run_id for r in claim.runs] == ids[:1]  # oldest first
    finally:
        await store.close()
    assert_latest_version(path)
