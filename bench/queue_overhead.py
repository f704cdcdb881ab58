"""The cost of a queue on the order saga's throughput (a benchmark, not a test).

    python -m bench.queue_overhead [--store sqlite|postgres] [--n 1000] [--rounds 3]

Each round measures the saga throughput scenario of ``bench.cantata_scenario`` (N
runs started at once, then every result awaited, in a fresh store) twice, in
alternating order: plain ``app.start``, and ``app.start(..., queue="orders")``
through a queue whose limit (``concurrency=N``) never holds a run back, so the
figure is the cost of the mechanism: the queue row, the store-side claim that
counts and admits, and the hand-over to the worker. Prints the median of each and
the overhead (docs/flow-control.md reports it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import tempfile
import uuid
from typing import Any

from bench.common import PG_URL, WARMUP, now


async def one(store_kind: str, n: int, queued: bool) -> float:
    """Runs per second of one measurement, in a fresh store."""
    from bench.cantata_app import make_app, order_saga
    from cantata import WorkflowCompensated

    name = f"bench_queue_{uuid.uuid4().hex[:10]}"
    tmp = tempfile.mkdtemp(prefix="cantata-bench-")
    sep = "&" if "?" in PG_URL else "?"
    store = (f"sqlite:///{tmp}/bench.db" if store_kind == "sqlite"
             else f"{PG_URL}{sep}schema={name}")
    app = make_app("saga", store, "embedded", name)
    app.queue("orders", concurrency=n + len(WARMUP))
    opts: dict[str, Any] = {"queue": "orders"} if queued else {}

    async def outcome(handle: Any) -> str:
        try:
            return str(await handle.result(timeout=300))
        except WorkflowCompensated:
            return "compensated"

    await app.open(serve=True)
    try:
        for o in WARMUP:
            await outcome(await app.start(order_saga, o, **opts))
        t0 = now()
        handles = await asyncio.gather(*(app.start(order_saga, o, **opts)
                                         for o in range(1, n + 1)))
        outs = [await outcome(h) for h in handles]
        wall = now() - t0
        assert outs.count("completed") + outs.count("compensated") == n, outs[:5]
        return n / wall
    finally:
        await app.close()
        if store_kind == "postgres":
            import asyncpg

            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await conn.close()


async def main_async(a: argparse.Namespace) -> None:
    plain: list[float] = []
    queued: list[float] = []
    for r in range(a.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        for queue in order:
            rate = await one(a.store, a.n, queue)
            (queued if queue else plain).append(rate)
            print(f"round {r + 1}: {'queue   ' if queue else 'no queue'} {rate:8.1f} runs/s",
                  flush=True)
    p, q = statistics.median(plain), statistics.median(queued)
    print(f"{a.store}, n={a.n}, {a.rounds} rounds: no queue {p:.1f} runs/s, queue {q:.1f} "
          f"runs/s, overhead {100 * (1 - q / p):.1f} %")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cantata").setLevel(logging.ERROR)
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
