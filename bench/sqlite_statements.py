"""What a SQLite write transaction's statements cost, counted under callgrind.

    python -m bench.sqlite_statements checkpoint K [--no-attempts]
    python -m bench.sqlite_statements bind ints|nones K
    python -m bench.sqlite_statements cursor connection|cursor K

``checkpoint``: ``K`` middle checkpoints of one run (two history rows, the step that
ended and the next begun, their two attempts, one audit record), each its own write
transaction straight on the store's connection: ``BEGIN IMMEDIATE``, the fenced
checkpoint (``SQLiteRuns._commit_fenced``), ``TxConnection.before_commit``, ``COMMIT``,
with no event loop in between. It prints the statements of one (counted with a trace
callback over the first ten, which are outside nothing else) and the CPU time of each.
``bind``: ``K`` INSERTs of ten parameters, all ``1`` or all ``None``, into a table in
memory. ``cursor``: ``K`` UPDATEs of one row by its key, by ``Connection.execute`` (a
cursor made for each) or by one cursor's ``execute``.

Each is a count when run under callgrind twice with two values of ``K``: the
difference of the two totals over the difference of ``K`` is the instructions of one
(the start-up is the same in both), e.g. with the store on ``tmpfs``::

    TMPDIR=/dev/shm valgrind --tool=callgrind python -m bench.sqlite_statements checkpoint 200
    TMPDIR=/dev/shm valgrind --tool=callgrind python -m bench.sqlite_statements checkpoint 1200

(the history and the WAL grow as they would; both runs pass the same WAL checkpoints
per 1,000 transactions). See docs/performance.md, round twenty-five (saga, SQLite).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import tempfile
import time

from cantata.model.records import Attempt, EntryKind, EntryStatus, HistoryEntry, RunWrite
from cantata.model.status import RunStatus
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import new_run


def checkpoint(k: int, attempts: bool) -> str:
    folder = tempfile.mkdtemp(prefix="cantata-statements-")
    store = SQLiteStore(f"{folder}/s.db")
    run = new_run("stmts", status=RunStatus.RUNNING, owner="w1", fence=1)

    async def set_up() -> None:
        await store.open()
        await store.create_run(run)

    asyncio.run(set_up())
    conn = store._t._conn
    assert conn is not None
    at = time.time()

    def write(i: int) -> RunWrite:
        return RunWrite(
            entries=[
                HistoryEntry(f"s{i}#1", EntryKind.STEP, f"s{i}", EntryStatus.COMPLETED, i,
                             '{"x":1}', attempts=1, started_at=at, ended_at=at),
                HistoryEntry(f"s{i + 1}#1", EntryKind.STEP, f"s{i + 1}", EntryStatus.RUNNING,
                             i + 1, attempts=1, started_at=at),
            ],
            attempts=([Attempt(f"s{i}#1", 1, at, at), Attempt(f"s{i + 1}#1", 1, at)]
                      if attempts else []),
        )

    writes = [write(i) for i in range(1, k + 1)]  # (made before: not the store's work)
    statements: list[str] = []
    began = time.thread_time()
    for n, w in enumerate(writes):
        conn.set_trace_callback(statements.append if n < 10 else None)
        conn.begin_write()
        if not store._commit_fenced(conn, run.app, run.run_id, 1, w):
            raise RuntimeError("the fence did not hold")
        conn.before_commit()
        conn.execute("COMMIT")
    spent = (time.thread_time() - began) / k * 1e6
    conn.set_trace_callback(None)
    asyncio.run(store.close())
    return (f"{len(statements) / 10:.1f} statements a checkpoint, {spent:.1f} µs of CPU each "
            f"(not a count: run under callgrind)")


def bind(kind: str, k: int) -> str:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("CREATE TABLE t (a, b, c, d, e, f, g, h, i, j)")
    params = (1,) * 10 if kind == "ints" else (None,) * 10
    for _ in range(k):
        c.execute("INSERT INTO t VALUES (?,?,?,?,?,?,?,?,?,?)", params)
    return f"{k} INSERTs of ten {kind}"


def cursor(how: str, k: int) -> str:
    c = sqlite3.connect(":memory:", isolation_level=None)
    c.execute("CREATE TABLE t (a PRIMARY KEY, b)")
    c.execute("INSERT INTO t VALUES (1, 1)")
    run = c.execute if how == "connection" else c.cursor().execute
    for i in range(k):
        run("UPDATE t SET b=? WHERE a=1", (i,))
    return f"{k} UPDATEs by {how}.execute"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_statements")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("k", type=int)
    p.add_argument("--no-attempts", action="store_true")
    p = sub.add_parser("bind")
    p.add_argument("kind", choices=["ints", "nones"])
    p.add_argument("k", type=int)
    p = sub.add_parser("cursor")
    p.add_argument("how", choices=["connection", "cursor"])
    p.add_argument("k", type=int)
    args = parser.parse_args()
    if args.what == "checkpoint":
        print(checkpoint(args.k, not args.no_attempts))
    elif args.what == "bind":
        print(bind(args.kind, args.k))
    else:
        print(cursor(args.how, args.k))


if __name__ == "__main__":
    main()
