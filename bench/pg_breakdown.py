"""Where a PostgreSQL write transaction spends its time: one Cantata scenario, with
every statement of the store's writer timed by kind.

    python -m bench.pg_breakdown saga latency [--n 200] [--broker embedded|nats]

Runs ``bench.cantata_scenario`` on PostgreSQL in this process, then prints, per kind of
statement (its first words), the total time, the count and the mean, and the same for
whole transactions. It is what shows that a checkpoint on PostgreSQL is bound by round
trips (BEGIN, the checkpoint statement, the audit append, NOTIFY + COMMIT with its WAL
flush), not by CPU: see docs/performance.md. The last line gives the statements sent
per transaction (each a round trip: ``fetchmany`` pipelines its rows) and the server
CPU time of the writer's connections (read from ``/proc``: the server must run on this
machine), which do not depend on how busy the machine is.
"""

from __future__ import annotations

import collections
import os
import runpy
import sys
import time
from typing import Any

from cantata.store import postgres_batch

_TIMED = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")
total: collections.Counter[str] = collections.Counter()
count: collections.Counter[str] = collections.Counter()


class _Timed:
    """A connection whose statements add their time to ``total`` by kind."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in _TIMED:
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                sql = args[0] if args and isinstance(args[0], str) else ""
                kind = f"{name}: {' '.join(sql.split())[:40]}"
                total[kind] += time.perf_counter() - started
                count[kind] += 1

        return timed


# The CPU time (user + system, clock ticks) of the server processes behind the
# writer's connections, when each was first and last seen: what the writes cost the
# server whatever else keeps the machine busy (it must run on this machine).
_cpu_first: dict[int, int] = {}
_cpu_last: dict[int, int] = {}
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _server_cpu(pid: int) -> None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    _cpu_first.setdefault(pid, ticks)
    _cpu_last[pid] = ticks


def _install() -> None:
    transaction = postgres_batch.BatchWriter._transaction

    async def timed_transaction(self: Any, c: Any, todo: Any, grouped: bool) -> Any:
        pid = c.get_server_pid()
        _server_cpu(pid)
        started = time.perf_counter()
        try:
            return await transaction(self, _Timed(c), todo, grouped)
        finally:
            total["whole transaction"] += time.perf_counter() - started
            count["whole transaction"] += 1
            count["operations"] += len(todo)
            _server_cpu(pid)

    postgres_batch.BatchWriter._transaction = timed_transaction  # type: ignore[method-assign]


def report() -> str:
    lines = [f"{'total s':>8} {'count':>6} {'mean ms':>8}  statement"]
    for kind, seconds in total.most_common():
        lines.append(f"{seconds:8.3f} {count[kind]:6d} {1e3 * seconds / count[kind]:8.3f}  {kind}")
    txs = count["whole transaction"]
    if txs:
        sent = sum(n for kind, n in count.items() if ":" in kind)
        cpu = sum(_cpu_last[p] - _cpu_first[p] for p in _cpu_last) / _TICK
        lines.append(
            f"round trips (statements sent) per transaction: {sent / txs:.2f}; operations "
            f"per transaction: {count['operations'] / txs:.2f}; server CPU of the writer's "
            f"connections: {cpu:.2f} s ({1e3 * cpu / txs:.3f} ms per transaction)"
        )
    return "\n".join(lines)


def main() -> None:
    _install()
    sys.argv = ["bench.cantata_scenario", *sys.argv[1:], "--store", "postgres"]
    try:
        runpy.run_module("bench.cantata_scenario", run_name="__main__")
    finally:
        print(report())


if __name__ == "__main__":
    main()
