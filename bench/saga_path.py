"""A SQLite saga's critical path, segment by segment (docs/performance.md).

    python -m bench.saga_path [--n 400]

Runs the order saga one run at a time (as the latency workload of
``bench.cantata_scenario``) on a fresh SQLite store in this process, and stamps the
moments its critical path passes through (wrappers around the store's connection
thread: no change to the store): ``app.start`` called, a write submitted, the batch
taken on the event loop, ``BEGIN IMMEDIATE``, ``COMMIT`` sent, ``COMMIT`` returned,
the writes' futures answered, ``app.start`` returned, the result received. For the
runs that completed without compensation and passed the same stamps in the same order
(a claim or a heartbeat of the worker may fall inside a run: those runs are left out),
it prints the p50 of each segment, and the run's p50 split into:

- ``COMMIT``: the four commits (their WAL writes and fsyncs);
- ``statements``: ``BEGIN IMMEDIATE`` up to the ``COMMIT``;
- ``engine``: from a commit's answer to the next write (the step's body, the
  journal, the checkpoint's records), and ``app.start``'s own work before its write
  and after the last commit;
- ``event loop``: a write waiting for its turn, the futures answered, the caller woken.

``sqlite_breakdown saga`` gives each transaction's pages; this gives what lies
between the transactions. A measuring tool, not a benchmark: each stamp costs about
half a microsecond.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

from bench.common import WARMUP, fails

Stamps = list[tuple[str, float]]

# (from, to) -> (kind of time, what happens there)
SEGMENTS: dict[tuple[str, str], tuple[str, str]] = {
    ("start", "submit"): ("engine", "app.start until its run record is written"),
    ("submit", "flush"): ("event loop", "the write waits for the loop's next turn"),
    ("submit", "started"): ("event loop", "app.start returns (its write answered)"),
    ("started", "flush"): ("event loop", "the write waits for the loop's next turn"),
    ("flush", "begin"): ("event loop", "the batch taken"),
    ("begin", "commit_at"): ("statements", "BEGIN IMMEDIATE and the statements"),
    ("commit_at", "committed"): ("COMMIT", "COMMIT: WAL frames and fsync"),
    ("committed", "resolved"): ("event loop", "the writes' futures answered"),
    ("resolved", "submit"): ("engine", "the next step: body, journal, checkpoint"),
    ("resolved", "end"): ("engine", "the result to the caller"),
}
KINDS = ("COMMIT", "statements", "engine", "event loop")


class Stamper:
    """Stamps the critical path's moments into ``self.stamps`` while ``on``."""

    def __init__(self) -> None:
        self.stamps: Stamps = []
        self.on = False

    def mark(self, name: str) -> None:
        if self.on:
            self.stamps.append((name, time.perf_counter()))

    def install(self) -> None:
        from cantata.store.sqlite_thread import ConnectionThread, TxConnection

        mark = self.mark

        def around(cls: Any, name: str, before: str | None, after: str | None) -> None:
            fn: Callable[..., Any] = getattr(cls, name)

            def wrapped(*args: Any, **kwargs: Any) -> Any:
                if before is not None:
                    mark(before)
                out = fn(*args, **kwargs)
                if after is not None:
                    mark(after)
                return out

            setattr(cls, name, wrapped)

        write = ConnectionThread.write

        def submitted(self: ConnectionThread, fn: Any, *channels: str) -> Any:
            mark("submit")
            return write(self, fn, *channels)

        ConnectionThread.write = submitted  # type: ignore[method-assign]
        around(ConnectionThread, "_flush", "flush", None)
        around(ConnectionThread, "_run_writes", None, "committed")
        around(ConnectionThread, "_resolve", None, "resolved")
        around(TxConnection, "begin_write", "begin", None)
        around(TxConnection, "before_commit", None, "commit_at")


async def _runs(path: str, n: int, stamper: Stamper) -> list[Stamps]:
    from bench.cantata_app import make_app, order_saga
    from cantata import WorkflowCompensated

    app = make_app("saga", f"sqlite:///{path}", "embedded", f"bench_sp_{uuid.uuid4().hex[:8]}")
    runs = []
    async with app:
        for o in [*WARMUP, *range(1, n + 1)]:
            stamper.stamps = []
            stamper.on = True
            stamper.mark("start")
            handle = await app.start(order_saga, o)
            stamper.mark("started")
            with contextlib.suppress(WorkflowCompensated):
                await handle.result(timeout=60)
            stamper.mark("end")
            stamper.on = False
            if o not in WARMUP and not fails(o):
                runs.append(stamper.stamps)
    return runs


def path(n: int) -> str:
    tmp = tempfile.mkdtemp(prefix="cantata-saga-path-")
    stamper = Stamper()
    stamper.install()
    try:
        runs = asyncio.run(_runs(f"{tmp}/b.db", n, stamper))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report(runs)


def report(runs: list[Stamps]) -> str:
    shapes = collections.Counter(tuple(name for name, _ in r) for r in runs)
    if not shapes:
        return "no run completed"
    shape, count = shapes.most_common(1)[0]
    same = [r for r in runs if tuple(name for name, _ in r) == shape]
    out = [f"SQLite saga, one run at a time: {count} of {len(runs)} completed runs passed "
           "the same stamps (p50 µs of each segment)"]
    sums: list[dict[str, float]] = [dict.fromkeys(KINDS, 0.0) for _ in same]
    tx = 0  # the transaction a segment belongs to
    for i in range(1, len(shape)):
        a, b = shape[i - 1], shape[i]
        kind, what = SEGMENTS.get((a, b), ("event loop", f"{a} -> {b}"))
        tx += kind == "statements"
        took = [r[i][1] - r[i - 1][1] for r in same]
        for run_sums, t in zip(sums, took, strict=True):
            run_sums[kind] = run_sums.get(kind, 0.0) + t
        number = f" (transaction {tx})" if kind in ("COMMIT", "statements") else ""
        out.append(f"  {statistics.median(took) * 1e6:7.1f}  {kind:<10}  {what}{number}")
    total = statistics.median(r[-1][1] - r[0][1] for r in same) * 1e6
    parts = ", ".join(f"{k} {statistics.median(x[k] for x in sums) * 1e6:.0f}"
                      for k in KINDS)
    out.append(f"  the run: {total:.0f} µs p50 = {parts} (p50 of each kind's sum)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400)
    print(path(ap.parse_args().n))


if __name__ == "__main__":
    main()
