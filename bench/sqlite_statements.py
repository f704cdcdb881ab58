"""What a SQLite write transaction's statements cost, counted under callgrind.

    python -m bench.sqlite_statements checkpoint K [--no-attempts] [--lean]
    python -m bench.sqlite_statements create K [--no-attempts] [--lean]
    python -m bench.sqlite_statements bind ints|nones K
    python -m bench.sqlite_statements cursor connection|cursor K
    python -m bench.sqlite_statements head none|audit_head|both|row|both-upsert|row-upsert K

``checkpoint``: ``K`` middle checkpoints of one run (two history rows, the step that
ended and the next begun, their two attempts, one audit record), each its own write
transaction straight on the store's connection: ``BEGIN IMMEDIATE``, the fenced
checkpoint (``SQLiteRuns._commit_fenced``), ``TxConnection.commit_write`` (its
``before_commit``, then ``COMMIT``),
with no event loop in between (``--lean``: the app's gate open, ``store.lean_apps``, so
that the audit head's ``audit_head`` row is not written: docs/performance.md, round
twenty-six (audit head)). It prints the statements of one (counted with a trace
callback over the first ten, which are outside nothing else) and the CPU time of each.
``create``: ``K`` runs created the same way, each with its first checkpoint (the first
step begun, its attempt) in its write transaction (``SQLiteRuns._create``), as a worker
starting a run it executes at once writes it.
``bind``: ``K`` INSERTs of ten parameters, all ``1`` or all ``None``, into a table in
memory. ``cursor``: ``K`` UPDATEs of one row by its key, by ``Connection.execute`` (a
cursor made for each) or by one cursor's ``execute``. ``head``: ``K`` write transactions
on a store's connection, each one audit record and then the chain head's writes as
``TxConnection.before_commit`` makes them: ``audit_head`` alone (what releases before
SQLite schema 32 wrote), ``both`` (the head row of ``audit`` and ``audit_head``: the
gate closed), ``row`` (the head row alone: the gate open), the head row by an upsert
instead of a REPLACE (``-upsert``), or ``none`` (the record alone, the baseline).

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
from cantata.store.sqlite_ops import AUDIT_COLS
from cantata.testing.contract.support import new_run


def checkpoint(k: int, attempts: bool, lean: bool = False) -> str:
    folder = tempfile.mkdtemp(prefix="cantata-statements-")
    store = SQLiteStore(f"{folder}/s.db")
    if lean:
        store.lean_apps.add("stmts")
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
        conn.commit_write()
    spent = (time.thread_time() - began) / k * 1e6
    conn.set_trace_callback(None)
    asyncio.run(store.close())
    return (f"{len(statements) / 10:.1f} statements a checkpoint, {spent:.1f} µs of CPU each "
            f"(not a count: run under callgrind)")


def create(k: int, attempts: bool, lean: bool = False) -> str:
    folder = tempfile.mkdtemp(prefix="cantata-statements-")
    store = SQLiteStore(f"{folder}/s.db")
    if lean:
        store.lean_apps.add("stmts")
    asyncio.run(store.open())
    conn = store._t._conn
    assert conn is not None
    at = time.time()
    runs = [new_run("stmts", status=RunStatus.RUNNING, owner="w1", fence=1)
            for _ in range(k)]  # (made before: not the store's work)
    firsts = [RunWrite(
        entries=[HistoryEntry("s1#1", EntryKind.STEP, "s1", EntryStatus.RUNNING, 1,
                              attempts=1, started_at=at)],
        attempts=[Attempt("s1#1", 1, at)] if attempts else [],
    ) for _ in range(k)]
    statements: list[str] = []
    began = time.thread_time()
    for n, (run, first) in enumerate(zip(runs, firsts, strict=True)):
        conn.set_trace_callback(statements.append if n < 10 else None)
        conn.begin_write()
        store._create(conn, run, first)
        conn.commit_write()
    spent = (time.thread_time() - began) / k * 1e6
    conn.set_trace_callback(None)
    asyncio.run(store.close())
    return (f"{len(statements) / 10:.1f} statements a creation, {spent:.1f} µs of CPU each "
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


def head(how: str, k: int) -> str:
    from cantata.store.sqlite_open import connect
    from cantata.store.sqlite_thread import HEAD_MARK, UPSERT_HEAD, UPSERT_HEAD_ROW

    upsert_row = ("INSERT INTO audit (app, seq, time, actor, action, target, data, prev_hash, "
                  "hash) VALUES (?, 0, 0, 'cantata', 'audit.head', '', ?, ?, ?) ON CONFLICT "
                  "(app, seq) DO UPDATE SET data=excluded.data, prev_hash=excluded.prev_hash, "
                  "hash=excluded.hash")
    row_sql = upsert_row if how.endswith("-upsert") else UPSERT_HEAD_ROW
    kind = how.removesuffix("-upsert")
    folder = tempfile.mkdtemp(prefix="cantata-statements-")
    c = connect(f"{folder}/h.db", f"sqlite:///{folder}/h.db", "OFF")
    run, h = c.dml.execute, "ab" * 32
    began = time.thread_time()
    for seq in range(1, k + 1):
        c.begin_write()
        run(f"INSERT INTO audit (app, {AUDIT_COLS}) VALUES (?,?,?,?,?,?,?,?,?)",
            ("app", seq, 0.0, "worker:w1", "run.checkpoint", "r", "{}", h, h))
        if kind in ("both", "row"):
            run(row_sql, ("app" + HEAD_MARK, seq, h, h))
        if kind in ("both", "audit_head"):
            run(UPSERT_HEAD, ("app", seq, h, h))
        run("COMMIT")
    spent = (time.thread_time() - began) / k * 1e6
    c.close()
    return f"{k} audited commits, head written as {how}: {spent:.1f} µs of CPU each"


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sqlite_statements")
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("checkpoint")
    p.add_argument("k", type=int)
    p.add_argument("--no-attempts", action="store_true")
    p.add_argument("--lean", action="store_true")
    p = sub.add_parser("create")
    p.add_argument("k", type=int)
    p.add_argument("--no-attempts", action="store_true")
    p.add_argument("--lean", action="store_true")
    p = sub.add_parser("bind")
    p.add_argument("kind", choices=["ints", "nones"])
    p.add_argument("k", type=int)
    p = sub.add_parser("cursor")
    p.add_argument("how", choices=["connection", "cursor"])
    p.add_argument("k", type=int)
    p = sub.add_parser("head")
    p.add_argument("how", choices=["none", "audit_head", "both", "row", "both-upsert",
                                    "row-upsert"])
    p.add_argument("k", type=int)
    args = parser.parse_args()
    if args.what == "checkpoint":
        print(checkpoint(args.k, not args.no_attempts, args.lean))
    elif args.what == "create":
        print(create(args.k, not args.no_attempts, args.lean))
    elif args.what == "bind":
        print(bind(args.kind, args.k))
    elif args.what == "head":
        print(head(args.how, args.k))
    else:
        print(cursor(args.how, args.k))


if __name__ == "__main__":
    main()
