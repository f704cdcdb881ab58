"""What one PostgreSQL round trip costs by how the caller paces it (docs/performance.md,
round twenty-seven (saga, PostgreSQL)).

    python -m bench.pg_wake [--n 400] [--rounds 2] [--gap-us 500] [--spin-us 0]

On one connection, interleaved in rounds: ``SELECT 1``, a one-row ``INSERT`` into a
table of its own committed with ``synchronous_commit`` on (its WAL flushed before the
answer) and the same ``INSERT`` with it off for the connection meanwhile (no flush
waited for), each one statement, paced three ways:

- ``back-to-back``: the next call sent as soon as the last one is answered;
- ``idle gap``: ``asyncio.sleep(gap)`` before each call, the process asleep meanwhile
  (as a caller whose next write comes after a wait);
- ``busy gap``: ``gap`` of CPU spent before each call (as the engine's work between a
  saga's writes: the step's body, its journal, the next checkpoint's arguments).

A round trip is the driver's send, the server process woken, its execution (and, for
the first ``INSERT``, the WAL's ``fdatasync``), the answer and this process woken. On
a virtual machine whose idle CPUs halt, each of those wake-ups costs more after an idle
gap than back to back; the difference between the rows is what the pacing, not the
work, costs. ``--spin-us N`` runs the event loop with a selector that polls for up to
``N`` µs before it blocks (this process' CPU kept awake: what that buys and costs is
in the round; Cantata does not do it).

The table: p50 and mean of each, in µs. Server: ``BENCH_POSTGRES`` or the local one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import selectors
import statistics
import time
from typing import Any

from bench.common import PG_URL

CALLS = {  # the statement, and synchronous_commit for the connection meanwhile
    "SELECT 1": ("SELECT 1", "on"),
    "INSERT, flushed": ("INSERT INTO bench_wake (v) VALUES (1)", "on"),
    "INSERT, not flushed": ("INSERT INTO bench_wake (v) VALUES (1)", "off"),
}
PACINGS = ("back-to-back", "idle gap", "busy gap")


class SpinSelector(selectors.EpollSelector):
    """Polls for up to ``spin`` seconds before a blocking wait."""

    def __init__(self, spin: float) -> None:
        super().__init__()
        self.spin = spin

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None or timeout > 0:
            limit = self.spin if timeout is None else min(self.spin, timeout)
            end = time.perf_counter() + limit
            while True:
                ready = super().select(0)
                if ready or time.perf_counter() >= end:
                    break
            if ready:
                return ready
            if timeout is not None:
                timeout = max(0.0, timeout - limit)
        return super().select(timeout)


async def measure(n: int, rounds: int, gap: float) -> dict[tuple[str, str], list[float]]:
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    times: dict[tuple[str, str], list[float]] = {}
    # a table of its own (not TEMP: a temporary table's rows are not WAL-logged, so
    # its commits flush nothing), dropped at the end
    table = f"bench_wake_{os.getpid()}"
    try:
        await conn.execute(f"CREATE TABLE {table} (v int)")
        for _ in range(rounds):
            for name, (sql, sync) in CALLS.items():
                await conn.execute(f"SET synchronous_commit = {sync}")
                sql = sql.replace("bench_wake", table)
                for pacing in PACINGS:
                    got = times.setdefault((name, pacing), [])
                    for _ in range(n):
                        if pacing == "idle gap":
                            await asyncio.sleep(gap)
                        elif pacing == "busy gap":
                            end = time.perf_counter() + gap
                            while time.perf_counter() < end:
                                pass
                        started = time.perf_counter()
                        await conn.execute(sql)
                        got.append(time.perf_counter() - started)
    finally:
        await conn.execute("RESET synchronous_commit")
        await conn.execute(f"DROP TABLE IF EXISTS {table}")
        await conn.close()
    return times


def table(times: dict[tuple[str, str], list[float]]) -> str:
    lines = [f"{'call':<22}" + "".join(f"{p:>22}" for p in PACINGS),
             f"{'':<22}" + "".join(f"{'p50 / mean µs':>22}" for _ in PACINGS)]
    for name in CALLS:
        cells = []
        for pacing in PACINGS:
            got = times[(name, pacing)]
            p50, mean = statistics.median(got) * 1e6, statistics.mean(got) * 1e6
            cells.append(f"{p50:>13.0f} / {mean:<6.0f}")
        lines.append(f"{name:<22}" + "".join(f"{c:>22}" for c in cells))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=400, help="calls of each kind per round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--gap-us", type=float, default=500.0)
    ap.add_argument("--spin-us", type=float, default=0.0)
    a = ap.parse_args()
    loop: asyncio.AbstractEventLoop
    if a.spin_us > 0:
        loop = asyncio.SelectorEventLoop(SpinSelector(a.spin_us / 1e6))
    else:
        loop = asyncio.new_event_loop()
    try:
        times = loop.run_until_complete(measure(a.n, a.rounds, a.gap_us / 1e6))
    finally:
        loop.close()
    spin = f", event loop polling up to {a.spin_us:.0f} µs" if a.spin_us > 0 else ""
    print(f"{a.rounds} rounds of {a.n} calls each, gap {a.gap_us:.0f} µs{spin}")
    print(table(times))


if __name__ == "__main__":
    main()
