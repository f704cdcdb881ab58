"""Why one sitting's latency rounds differ: the order a sitting runs in, and what shares a
latency run's window.

    python -m bench.latency_order order --store sqlite|postgres [--rounds 3] [--n 300]
    python -m bench.latency_order window --store sqlite|postgres [--n 300] [--no-replan]

``order``: the saga's latency (``bench.cantata_scenario saga latency``) measured alone,
right after the saga's throughput run of 2,000 on the same store (what a sitting of
``python -m bench`` runs before it), and after that throughput run and the runner's
settling (``sync`` and a PostgreSQL ``CHECKPOINT``, ``bench/__main__.py``), interleaved,
``--rounds`` times, each in its own process. Prints one line a run: the load average,
the p50, p10 and p90, the median of the series' last third over its first third
(drift), how many sagas took more than twice the p50, and what the process waited for a
CPU while others ran (``run_delay_ms``: the machine's other work).

``window``: one latency run in this process, with what shares its measured window
counted. SQLite: the reads the store's connection thread ran and the writes made on the
loop, by caller; the loop's flushes that found the connection in the thread's hands and
how long their writes waited; the sagas during which the WAL file grew. PostgreSQL: the
pool's ``DISCARD PLANS`` among the measured sagas, the server's WAL counters over the
window (``pg_stat_wal``) and, where the server has ``pg_stat_statements`` (preloaded,
``track = all``, ``track_planning = on``, the extension made), its statements' calls,
plannings and planning and execution time over the window (it resets them): the whole
server's, so use a private one through ``BENCH_POSTGRES``. ``--no-replan`` turns the
pool's ``DISCARD PLANS`` off for the run (``postgres_pool._REPLAN_FIRST`` out of
reach). See docs/performance.md ("latency swings").
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench.common as common

ROOT = Path(__file__).resolve().parent.parent


def scenario(workload: str, store: str, n: int) -> dict[str, Any] | None:
    """``bench.cantata_scenario saga WORKLOAD`` in its own process: its result."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "bench.cantata_scenario", "saga", workload,
                        "--store", store, "--broker", "embedded", "--n", str(n)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    for line in p.stdout.splitlines():
        if line.startswith(common.RESULT_PREFIX):
            return dict(json.loads(line[len(common.RESULT_PREFIX):]))
    print(f"{workload} failed: {p.stderr.strip()[-300:]}", file=sys.stderr)
    return None


def describe(res: dict[str, Any]) -> str:
    """One run's series in a line."""
    s = res["series_ms"]
    p50 = statistics.median(s)
    q = sorted(s)
    third = max(len(s) // 3, 1)
    drift = statistics.median(s[-third:]) / statistics.median(s[:third])
    spikes = sum(1 for x in s if x > 2 * p50)
    return (f"p50 {p50:6.2f} p10 {q[len(q) // 10]:6.2f} p90 {q[9 * len(q) // 10]:6.2f} ms, "
            f"last/first third {drift:4.2f}, {spikes:3d} above 2x p50, "
            f"waited for a CPU {res.get('run_delay_ms', 0):7.0f} ms of {sum(s) / 1e3:5.2f} s")


def order(a: argparse.Namespace) -> None:
    from bench.__main__ import settle

    for rnd in range(1, a.rounds + 1):
        for mode in ("alone", "after", "settled"):
            if mode != "alone":
                scenario("throughput", a.store, 2000)
            if mode == "settled":
                settle()
            load = os.getloadavg()[0]
            stamp = time.strftime("%H:%M:%S")
            res = scenario("latency", a.store, a.n)
            if res is not None:
                print(f"round {rnd} {mode:8} {stamp} load {load:5.2f}  {describe(res)}",
                      flush=True)


# -- window -------------------------------------------------------------------------------


class Window:
    """The scenario's measured window, as its calls of ``cpu_seconds`` and ``now`` mark
    it: ``now`` is read at the window's start, at each saga's start and end, and at the
    end."""

    def __init__(self) -> None:
        self.on = False
        self.nows: list[float] = []
        self.hooks: list[Any] = []  # called at each ``now`` in the window
        self.result: dict[str, Any] = {}

    def install(self) -> None:
        reading, emit = common.cpu_seconds, common.emit

        def cpu_seconds() -> float:
            self.on = not self.on
            return reading()

        def now() -> float:
            t = time.perf_counter()
            if self.on:
                self.nows.append(t)
                for hook in self.hooks:
                    hook()
            return t

        def grab(**row: Any) -> dict[str, Any]:
            self.result.update(row)
            return emit(**row)

        common.cpu_seconds, common.now, common.emit = cpu_seconds, now, grab

    def sagas(self) -> list[tuple[float, float]]:
        """(start, end) of each measured saga."""
        inner = self.nows[1:-1]
        return list(zip(inner[0::2], inner[1::2], strict=False))


def _sqlite_counts(w: Window) -> Any:
    from cantata.store import sqlite_thread as st

    reads: collections.Counter[str] = collections.Counter()
    writes: collections.Counter[str] = collections.Counter()
    waits: list[float] = []
    began: dict[int, float] = {}
    submit, write, flush = (st.ConnectionThread._submit, st.ConnectionThread.write,
                            st.ConnectionThread._flush)

    def counted_submit(self: Any, fn: Any) -> Any:  # (reads handed to the thread)
        if w.on:
            reads[getattr(fn, "__qualname__", repr(fn))] += 1
        return submit(self, fn)

    def counted_write(self: Any, fn: Any, *channels: str) -> Any:
        if w.on:
            writes[getattr(fn, "__qualname__", repr(fn))] += 1
        return write(self, fn, *channels)

    def timed_flush(self: Any) -> None:
        flush(self)
        if not w.on:
            return
        if self._pending and self._flush_due and self._lock.locked():
            began.setdefault(id(self), time.perf_counter())
        elif not self._pending and id(self) in began:
            waits.append((time.perf_counter() - began.pop(id(self))) * 1e6)

    st.ConnectionThread._submit = counted_submit  # type: ignore[method-assign]
    st.ConnectionThread.write = counted_write  # type: ignore[method-assign]
    st.ConnectionThread._flush = timed_flush  # type: ignore[method-assign]
    folders: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def noted_mkdtemp(*args: Any, **kw: Any) -> str:
        folder: str = mkdtemp(*args, **kw)
        folders.append(folder)
        return folder

    tempfile.mkdtemp = noted_mkdtemp  # type: ignore[assignment]
    wal: list[int] = []

    def wal_size() -> None:
        try:
            wal.append(os.stat(f"{folders[0]}/bench.db-wal").st_size)
        except (OSError, IndexError):
            wal.append(-1)

    w.hooks.append(wal_size)

    def report() -> None:
        print("reads in the connection's thread, by caller:", file=sys.stderr)
        for name, k in reads.most_common():
            print(f"  {k:6d} {name}", file=sys.stderr)
        print("writes on the loop, by caller:", file=sys.stderr)
        for name, k in writes.most_common():
            print(f"  {k:6d} {name}", file=sys.stderr)
        print(f"flushes that found the connection in the thread's hands: {len(waits)}; "
              f"their writes waited (us): {sorted(round(x) for x in waits)}", file=sys.stderr)
        sizes = wal[1:-1]
        grew = [i for i in range(len(sizes) // 2) if sizes[2 * i + 1] > sizes[2 * i]]
        print(f"the WAL file grew during {len(grew)} of {len(sizes) // 2} sagas "
              f"({grew[:30]}{' ...' if len(grew) > 30 else ''}); largest {max(wal)} bytes",
              file=sys.stderr)

    return report


def _psql(sql: str) -> str:
    return subprocess.run(["psql", common.PG_URL, "-Atc", sql], capture_output=True,
                          text=True, timeout=60).stdout.strip()


def _pg_stat_wal() -> list[int]:
    out = _psql("SELECT wal_records, wal_fpi, wal_bytes, wal_sync FROM pg_stat_wal")
    return [int(x) for x in out.split("|")] if out else []


_PLANNING = ("SELECT sum(calls), sum(plans), round(sum(total_plan_time)::numeric, 1), "
             "round(sum(total_exec_time)::numeric, 1) FROM pg_stat_statements "
             "WHERE query NOT LIKE '%pg_stat_statements%'")


def _postgres_counts(w: Window, replan: bool) -> Any:
    from asyncpg.connection import Connection

    if not replan:
        import cantata.store.postgres_pool as pool

        pool._REPLAN_FIRST = 1e9

    discards: list[float] = []
    execute = Connection.execute

    async def noted_execute(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        if query.startswith("DISCARD PLANS") and w.on:
            discards.append(time.perf_counter())
        return await execute(self, query, *args, **kw)

    Connection.execute = noted_execute  # type: ignore[method-assign]
    stats: list[list[int]] = []
    planning: list[str] = []
    reading = common.cpu_seconds

    def marked() -> float:
        stats.append(_pg_stat_wal())
        if len(stats) == 1:
            _psql("SELECT pg_stat_statements_reset()")
        else:
            planning.append(_psql(_PLANNING))
        return reading()

    common.cpu_seconds = marked

    def report() -> None:
        sagas = w.sagas()
        series = w.result.get("series_ms", [])
        hit = [i for t in discards for i, (a, b) in enumerate(sagas) if a <= t <= b]
        near = {j for i in hit for j in range(i, min(i + 6, len(series)))}
        print(f"DISCARD PLANS in the window: {len(discards)}, during sagas {hit}; median of "
              f"those sagas and the 5 after each "
              f"{statistics.median([series[j] for j in near]) if near else float('nan'):.3f} "
              f"ms, of the others "
              f"{statistics.median([x for j, x in enumerate(series) if j not in near]):.3f}",
              file=sys.stderr)
        if len(stats) >= 2 and stats[0] and stats[1]:
            d = [b - a for a, b in zip(stats[0], stats[1], strict=True)]
            print(f"server WAL over the window: {d[0]} records, {d[1]} full-page images, "
                  f"{d[2]} bytes, {d[3]} syncs", file=sys.stderr)
        if planning and planning[0]:
            calls, plans, plan_ms, exec_ms = planning[0].split("|")
            print(f"server statements over the window (pg_stat_statements): {calls} calls, "
                  f"{plans} plannings, {plan_ms} ms planning, {exec_ms} ms executing"
                  f"{'' if replan else ' (no DISCARD PLANS)'}", file=sys.stderr)

    return report


def window(a: argparse.Namespace) -> None:
    w = Window()
    w.install()  # (before the counters: they wrap what it installed)
    report = _sqlite_counts(w) if a.store == "sqlite" else _postgres_counts(w, a.replan)
    sys.argv = ["bench.cantata_scenario", "saga", "latency", "--store", a.store,
                "--broker", "embedded", "--n", str(a.n)]
    runpy.run_module("bench.cantata_scenario", run_name="__main__")
    print(describe(w.result), file=sys.stderr)
    report()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["order", "window"])
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--no-replan", dest="replan", action="store_false",
                    help="window, PostgreSQL: no DISCARD PLANS during the run")
    a = ap.parse_args()
    order(a) if a.what == "order" else window(a)


if __name__ == "__main__":
    main()
