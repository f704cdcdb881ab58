"""A fresh SQLite store's sagas, one after another, by window of 20 (docs/performance.md,
round thirty-three).

    python -m bench.saga_windows [--n 220] [--runs 8] [--dir /var/tmp]

Each run opens a new store (as a sitting's latency row does, and a worker after a
restart), runs ``--n`` sagas one at a time and prints the median of each window of 20
in ms: the first is the sitting's warm-up, the next its first measured orders. The
last line gives, over the runs, the median of each window and of orders 20 on (what a
sitting measures). Hold it on one CPU (``taskset -c 1``) to leave out where the
scheduler puts the process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import tempfile
import time
import uuid

WINDOW = 20


async def _one(folder: str, n: int) -> list[float]:
    from bench.cantata_app import make_app, order_saga
    from cantata import WorkflowCompensated

    path = tempfile.mkdtemp(prefix="cantata-saga-windows-", dir=folder)
    app = make_app("saga", f"sqlite:///{path}/b.db", "embedded", f"bench_sw_{uuid.uuid4().hex[:8]}")
    took: list[float] = []
    try:
        async with app:
            for order in range(1, n + 1):
                began = time.perf_counter()
                handle = await app.start(order_saga, order)
                with contextlib.suppress(WorkflowCompensated):
                    await handle.result(timeout=60)
                took.append((time.perf_counter() - began) * 1e3)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return took


def windows(took: list[float]) -> list[float]:
    return [statistics.median(took[i:i + WINDOW]) for i in range(0, len(took), WINDOW)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=220)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    a = ap.parse_args()
    runs = []
    for _ in range(a.runs):
        took = asyncio.run(_one(a.dir, a.n))
        runs.append(took)
        print(" ".join(f"{w:.2f}" for w in windows(took)))
    by_window = [statistics.median(ws) for ws in zip(*(windows(t) for t in runs), strict=False)]
    measured = statistics.median(statistics.median(t[WINDOW:]) for t in runs)
    print(f"median by window: {' '.join(f'{w:.2f}' for w in by_window)}; "
          f"orders {WINDOW} on: {measured:.2f} ms")


if __name__ == "__main__":
    main()
