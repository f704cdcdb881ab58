"""Where a saga's latency goes on SQLite, and what a commit costs on this disk.

    python -m bench.sqlite_breakdown saga [--n 300]

Runs the order saga one run at a time (the latency workload of
``bench.cantata_scenario``, after its warm-up) in this process on a fresh SQLite store,
with the store's write transactions timed (wrappers around ``TxConnection.begin_write``
and ``before_commit`` and ``ConnectionThread._run_writes``: no change to the store).
For the runs that completed (four transactions each: the run created with its first
step begun, each step's end with the next one's start, the last step's end with the
run's), it prints the p50 of each transaction's statements (``BEGIN`` to the
``COMMIT``) and ``COMMIT``, its WAL frames (the ``mxFrame`` of the WAL index, read
from the ``-shm`` file after each transaction) and the b-trees they belong to (the
page of each frame read from the WAL, named by ``dbstat`` once the run is over), then
the run's p50 split into commits, statements and the rest (the engine, the event
loop and the benchmark's own awaits).

    python -m bench.sqlite_breakdown chain [--n 300] [--broker nats|embedded]

The same for the chain's latency workload (``bench.cantata_scenario chain latency``):
for the orders that wrote four transactions (``app.publish`` and three hops, each a
handler's settlement), each transaction's statements, ``COMMIT``, WAL pages (p50 and
mean) and the pages of each b-tree per order.

    python -m bench.sqlite_breakdown disk [--rounds 200]

The disk's floor under those commits: what a commit of ``k`` pages costs without
SQLite. A file in the same kind of folder (the system's temporary folder, as the
benchmark's stores) gets ``k`` frames as SQLite's WAL writes them (a 24-byte header
and a 4,096-byte page, two ``pwrite`` calls each, one after another in the file,
wrapping within 8 MB as a reused WAL does) and one ``fdatasync``; ``k`` = 1, 2, 5, 9,
13, 20, interleaved over the rounds. It prints each p50 and the least-squares line
through them: a base per commit and a cost per page.

A measuring tool, not a benchmark: the wrappers cost about a microsecond a
transaction. See docs/performance.md ("What bounds each figure").
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import os
import shutil
import sqlite3
import statistics
import struct
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bench.common import WARMUP, fails

PAGE = 4096
FRAME_HEADER = 24
WAL_HEADER = 32
SIZES = (1, 2, 5, 9, 13, 20)


@dataclass(slots=True)
class Tx:
    """One write transaction of the store, as the wrappers saw it."""

    begin: float
    commit_at: float = 0.0
    end: float = 0.0
    frames: list[int] = field(default_factory=list)  # page numbers of its WAL frames


class Recorder:
    """Times the store's write transactions and reads their WAL frames."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.txs: list[Tx] = []
        self._shm: int | None = None
        self._wal: int | None = None
        self._last = 0  # mxFrame after the previous transaction

    def _mx_frame(self) -> int:
        if self._shm is None:
            self._shm = os.open(self.path + "-shm", os.O_RDONLY)
            self._wal = os.open(self.path + "-wal", os.O_RDONLY)
        # The WAL index header: mxFrame is its u32 at byte 16, in the machine's order.
        return int(struct.unpack("=I", os.pread(self._shm, 4, 16))[0])

    def _frames(self, first: int, last: int) -> list[int]:
        assert self._wal is not None
        last = min(last, (os.fstat(self._wal).st_size - WAL_HEADER) // (FRAME_HEADER + PAGE))
        pages = []
        for i in range(first, last):  # frame i (0-based) starts after the WAL header
            head = os.pread(self._wal, 4, WAL_HEADER + i * (FRAME_HEADER + PAGE))
            pages.append(int.from_bytes(head, "big"))
        return pages

    def install(self) -> None:
        from cantata.store.sqlite_thread import ConnectionThread, TxConnection

        begin, before, run_writes = (
            TxConnection.begin_write, TxConnection.before_commit, ConnectionThread._run_writes
        )
        rec = self

        def begin_write(conn: TxConnection) -> None:
            rec.txs.append(Tx(time.perf_counter()))
            begin(conn)

        def before_commit(conn: TxConnection) -> None:
            before(conn)
            if rec.txs:
                rec.txs[-1].commit_at = time.perf_counter()

        def timed_writes(self: ConnectionThread, conn: TxConnection, writes: list[Any],
                         begun: bool) -> set[str]:
            out = run_writes(self, conn, writes, begun)
            tx = rec.txs[-1] if rec.txs else None
            if tx is not None and not tx.end:
                tx.end = time.perf_counter()
                mx = rec._mx_frame()
                # A WAL that started over holds only this transaction's frames.
                first = rec._last if mx >= rec._last else 0
                tx.frames = rec._frames(first, mx)
                rec._last = mx
            return out

        TxConnection.begin_write = begin_write  # type: ignore[method-assign,assignment]
        TxConnection.before_commit = before_commit  # type: ignore[method-assign,assignment]
        ConnectionThread._run_writes = timed_writes  # type: ignore[method-assign]

    def btrees(self) -> dict[int, str]:
        """Page number -> the table or index it belongs to (``dbstat``)."""
        c = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        try:
            return dict(c.execute("SELECT pageno, name FROM dbstat").fetchall())
        except sqlite3.OperationalError:  # a build without the dbstat table
            return {}
        finally:
            c.close()


class RawWal:
    """A file written as a reused WAL is: frames over blocks written before (a file
    that grows, or fills a sparse hole, makes ``fdatasync`` journal its new size or
    blocks too, twice the cost), wrapping within 8 MB."""

    SPAN = 8 * 1024 * 1024

    def __init__(self, folder: str) -> None:
        fd, self.path = tempfile.mkstemp(prefix="cantata-disk-", dir=folder)
        self.fd = fd
        os.pwrite(fd, b"\0" * self.SPAN, 0)
        os.fsync(fd)
        self.pos = WAL_HEADER
        self._header, self._page = b"h" * FRAME_HEADER, b"p" * PAGE

    def commit(self, pages: int) -> float:
        """Write ``pages`` frames and fdatasync: the seconds it took."""
        t0 = time.perf_counter()
        for _ in range(pages):
            if self.pos + FRAME_HEADER + PAGE > self.SPAN:
                self.pos = WAL_HEADER
            os.pwrite(self.fd, self._header, self.pos)
            os.pwrite(self.fd, self._page, self.pos + FRAME_HEADER)
            self.pos += FRAME_HEADER + PAGE
        os.fdatasync(self.fd)
        return time.perf_counter() - t0

    def close(self) -> None:
        os.close(self.fd)
        os.unlink(self.path)


def _us(xs: list[float]) -> str:
    return f"{statistics.median(xs) * 1e6:6.0f} µs"


async def run_sagas(
    path: str, n: int, after_each: Callable[[], object] | None = None
) -> list[tuple[float, float, int]]:
    """Run the warm-up and ``n`` sagas one at a time on a fresh app over the SQLite file
    ``path``: (start, end, order) of each measured one; ``after_each`` called after each
    saga (its time is not the saga's)."""
    from bench.cantata_app import make_app, order_saga
    from cantata import WorkflowCompensated

    app = make_app("saga", f"sqlite:///{path}", "embedded", f"bench_sb_{uuid.uuid4().hex[:8]}")
    spans = []
    async with app:
        for o in [*WARMUP, *range(1, n + 1)]:
            t0 = time.perf_counter()
            handle = await app.start(order_saga, o)
            with contextlib.suppress(WorkflowCompensated):
                await handle.result(timeout=60)
            spans.append((t0, time.perf_counter(), o))
            if after_each is not None:
                after_each()
    return spans[len(WARMUP):]


def saga(n: int, keep: bool = False) -> str:
    tmp = tempfile.mkdtemp(prefix="cantata-breakdown-")
    try:
        return _saga(tmp, n, keep)
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


def _saga(tmp: str, n: int, keep: bool) -> str:
    path = f"{tmp}/b.db"
    rec = Recorder(path)
    rec.install()
    raw, disk_5 = RawWal(tmp), list[float]()
    try:
        # after each saga, a raw commit of 5 pages (a middle transaction's)
        spans = asyncio.run(run_sagas(path, n, lambda: disk_5.append(raw.commit(5))))
    finally:
        raw.close()
    names = rec.btrees()
    txs = sorted((t for t in rec.txs if t.end), key=lambda t: t.begin)
    begins = [t.begin for t in txs]
    per: dict[int, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    trees: dict[int, collections.Counter[tuple[str, ...]]] = collections.defaultdict(
        collections.Counter)
    totals: dict[str, list[float]] = collections.defaultdict(list)
    for t0, t1, order in spans:
        if fails(order):
            continue  # a compensated run writes more transactions
        mine = txs[bisect.bisect_left(begins, t0):bisect.bisect_right(begins, t1)]
        if len(mine) != 4:
            continue  # a claim or heartbeat of the worker fell inside: not this shape
        sql = commit = 0.0
        for i, tx in enumerate(mine):
            per[i]["sql"].append(tx.commit_at - tx.begin)
            per[i]["commit"].append(tx.end - tx.commit_at)
            per[i]["frames"].append(len(tx.frames))
            trees[i][tuple(sorted(names.get(p, "?") for p in tx.frames))] += 1
            sql += tx.commit_at - tx.begin
            commit += tx.end - tx.commit_at
        totals["run"].append(t1 - t0)
        totals["commit"].append(commit)
        totals["sql"].append(sql)
        totals["rest"].append(t1 - t0 - sql - commit)
    if not totals["run"]:
        return "no completed run had the expected four transactions"
    what = ("run created, step 1 begun", "step 1 ended, step 2 begun",
            "step 2 ended, step 3 begun", "step 3 ended, run completed")
    out = [f"SQLite saga, one run at a time: {len(totals['run'])} completed runs of {n} "
           f"(p50 of each{'; ' + path if keep else ''})"]
    for i, label in enumerate(what):
        p = per[i]
        common = trees[i].most_common(1)[0][0] if trees[i] else ()
        out.append(f"  transaction {i + 1} ({label}): statements {_us(p['sql'])}, COMMIT "
                   f"{_us(p['commit'])}, {statistics.median(p['frames']):.0f} WAL pages")
        if common:
            out.append(f"    pages: {', '.join(common)}")
    out.append(f"  the run: {_us(totals['run'])} = commits {_us(totals['commit'])} + "
               f"statements {_us(totals['sql'])} + the rest {_us(totals['rest'])} "
               "(engine, event loop, the benchmark's awaits; p50s of each sum)")
    out.append(f"  the disk alone between runs, 5 pages and fdatasync: {_us(disk_5[len(WARMUP):])}"
               " (python -m bench.sqlite_breakdown disk: its cost by pages)")
    return "\n".join(out)


async def _chains(path: str, broker: str, n: int) -> list[tuple[float, float, int]]:
    """Run the chain's warm-up and ``n`` orders one at a time, each ended when its
    terminal event's settlement commits (as bench.cantata_scenario): (start, end, order)."""
    from bench.cantata_app import TERMINAL, make_app
    from bench.common import BENCH_PREFIX, NATS_URL
    from cantata import Hook

    name = f"bench_sc_{uuid.uuid4().hex[:8]}"
    url = f"{NATS_URL}?prefix={BENCH_PREFIX}" if broker == "nats" else "embedded"
    app = make_app("chain", f"sqlite:///{path}", url, name)
    ended: dict[int, asyncio.Future[None]] = {}

    class Ends(Hook):
        def emitted(self, events: Any, origin: str) -> None:
            for e in events:
                fut = ended.get(e.data.get("order")) if e.type in TERMINAL else None
                if fut is not None and not fut.done():
                    fut.set_result(None)

    app.add_hook(Ends())
    spans = []
    try:
        async with app:
            for o in [*WARMUP, *range(1, n + 1)]:
                fut = ended[o] = asyncio.get_running_loop().create_future()
                t0 = time.perf_counter()
                await app.publish("order.placed", {"order": o})
                await asyncio.wait_for(fut, 60)
                spans.append((t0, time.perf_counter(), o))
                del ended[o]
    finally:
        if broker == "nats":
            from bench.cantata_scenario import _drop_stream

            await _drop_stream(name)
    return spans[len(WARMUP):]


def chain(n: int, broker: str) -> str:
    tmp = tempfile.mkdtemp(prefix="cantata-breakdown-")
    try:
        path = f"{tmp}/b.db"
        rec = Recorder(path)
        rec.install()
        spans = asyncio.run(_chains(path, broker, n))
        names = rec.btrees()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    txs = sorted((t for t in rec.txs if t.end), key=lambda t: t.begin)
    begins = [t.begin for t in txs]
    per: dict[int, dict[str, list[float]]] = collections.defaultdict(
        lambda: collections.defaultdict(list))
    trees: dict[int, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    orders = 0
    for t0, t1, _order in spans:
        mine = txs[bisect.bisect_left(begins, t0):bisect.bisect_right(begins, t1)]
        if len(mine) != 4:
            continue  # a batch of the relay's marks or a heartbeat fell inside
        orders += 1
        for i, tx in enumerate(mine):
            per[i]["sql"].append(tx.commit_at - tx.begin)
            per[i]["commit"].append(tx.end - tx.commit_at)
            per[i]["frames"].append(len(tx.frames))
            trees[i].update(names.get(p, "?") for p in tx.frames)
    if not orders:
        return "no order had the expected four transactions"
    what = ("app.publish", "hop 1 (inventory)", "hop 2 (payment)", "hop 3 (shipping)")
    out = [f"SQLite + {broker} chain, one order at a time: {orders} of {n} orders with four "
           "write transactions (p50 of each; WAL pages: p50 / mean)"]
    for i, label in enumerate(what):
        p = per[i]
        mean = statistics.mean(p["frames"])
        out.append(f"  transaction {i + 1} ({label}): statements {_us(p['sql'])}, COMMIT "
                   f"{_us(p['commit'])}, {statistics.median(p['frames']):.0f} / {mean:.2f} "
                   "WAL pages")
        cells = ", ".join(f"{t} {c / orders:.2f}" for t, c in trees[i].most_common())
        out.append(f"    pages per order: {cells}")
    return "\n".join(out)


def disk(rounds: int) -> str:
    raw = RawWal(tempfile.gettempdir())
    got: dict[int, list[float]] = {k: [] for k in SIZES}
    try:
        for _ in range(rounds):
            for k in SIZES:
                got[k].append(raw.commit(k))
    finally:
        raw.close()
    p50 = {k: statistics.median(v) * 1e6 for k, v in got.items()}
    slope, base = _fit(list(p50), list(p50.values()))
    cells = ", ".join(f"{k}: {p50[k]:.0f}" for k in SIZES)
    return (f"a commit of k pages without SQLite ({rounds} rounds, p50 µs by k): {cells}\n"
            f"  least squares: {base:.0f} µs a commit + {slope:.1f} µs a page")


def _fit(xs: list[int], ys: list[float]) -> tuple[float, float]:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs)
    return slope, my - slope * mx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    s = sub.add_parser("saga")
    s.add_argument("--n", type=int, default=300)
    s.add_argument("--keep", action="store_true", help="keep the store (its path is printed)")
    c = sub.add_parser("chain")
    c.add_argument("--n", type=int, default=300)
    c.add_argument("--broker", choices=["nats", "embedded"], default="nats")
    d = sub.add_parser("disk")
    d.add_argument("--rounds", type=int, default=200)
    a = ap.parse_args()
    if a.what == "saga":
        print(saga(a.n, a.keep))
    elif a.what == "chain":
        print(chain(a.n, a.broker))
    else:
        print(disk(a.rounds))


if __name__ == "__main__":
    main()
