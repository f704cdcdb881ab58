"""Where a PostgreSQL write transaction spends its time: one Cantata scenario, with
every statement of the store's writer timed by kind.

    python -m bench.pg_breakdown saga latency [--n 200] [--broker embedded|nats]

Runs ``bench.cantata_scenario`` on PostgreSQL in this process, then prints, per kind of
statement (its first words), the total time, the count and the mean, and the same for
whole transactions. It is what shows that a checkpoint on PostgreSQL is bound by round
trips (BEGIN, the checkpoint statement, the audit append, NOTIFY + COMMIT with its WAL
flush), not by CPU: see docs/performance.md.
"""

from __future__ import annotations

import collections
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


def _install() -> None:
    transaction = postgres_batch.BatchWriter._transaction

    async def timed_transaction(self: Any, c: Any, todo: Any, grouped: bool) -> Any:
        started = time.perf_counter()
        try:
            return await transaction(self, _Timed(c), todo, grouped)
        finally:
            total["whole transaction"] += time.perf_counter() - started
            count["whole transaction"] += 1

    postgres_batch.BatchWriter._transaction = timed_transaction  # type: ignore[method-assign]


def report() -> str:
    lines = [f"{'total s':>8} {'count':>6} {'mean ms':>8}  statement"]
    for kind, seconds in total.most_common():
        lines.append(f"{seconds:8.3f} {count[kind]:6d} {1e3 * seconds / count[kind]:8.3f}  {kind}")
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
