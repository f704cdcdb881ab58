"""What the audit chain costs a burst of checkpoints (not a test: run it by hand).

    python -m tests.store.audit_cost [postgresql://…] [--commits 2000] [--tasks 8]

Each of ``--tasks`` concurrent tasks commits checkpoints that complete one step
(so every commit writes an audit record) on its own run. Rounds alternate between
the real store and the same store with the audit append stubbed out; every round
uses a fresh app, so each chain starts empty; ``--spread`` gives every task an app
of its own, which separates the cost of the audit statement from the cost of
serializing one app's chain.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable
from typing import Any

from cantata.model.codec import new_id
from cantata.model.records import RunWrite
from cantata.store import postgres_ops, sqlite_ops
from cantata.store.base import Store
from cantata.store.factory import store_from_url
from cantata.testing.contract.support import entry, new_run


async def burst(store: Store, commits: int, tasks: int, spread: bool = False) -> float:
    """``spread``: every task in an app of its own (no chain shared between tasks)."""
    apps = [f"cost-{new_id()[-8:]}" for _ in range(tasks if spread else 1)]
    runs = [(await store.create_run(new_run(apps[i % len(apps)])))[0] for i in range(tasks)]
    per_task = commits // tasks

    async def worker(app: str, run_id: str) -> None:
        for i in range(per_task):
            await store.commit_run(app, run_id, 0, RunWrite(entries=[entry(f"s{i}#1", i + 1)]))

    started = time.perf_counter()
    await asyncio.gather(*(worker(r.app, r.run_id) for r in runs))
    elapsed = time.perf_counter() - started
    if stubbed is None:
        for app in apps:
            report = await store.verify_audit(app)
            assert report.ok and report.records == (tasks + per_task * tasks) // len(apps)
    return elapsed


stubbed: Callable[..., Any] | None = None


async def main() -> None:
    global stubbed
    parser = argparse.ArgumentParser()
    parser.add_argument("url", nargs="?", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--commits", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--spread", action="store_true", help="one app per task")
    args = parser.parse_args()
    url = args.url
    scratch = url.startswith("postgres") and "schema=" not in url
    if scratch:
        url += ("&" if "?" in url else "?") + "schema=cantata_audit_cost"
    ops: Any = postgres_ops if url.startswith("postgres") else sqlite_ops
    real = ops.audit_append

    async def noop_async(*_: Any) -> None:
        return None

    def noop(*_: Any) -> None:
        return None

    fake = noop_async if ops is postgres_ops else noop
    store = store_from_url(url)
    await store.open()
    times: dict[str, list[float]] = {"audit": [], "no audit": []}
    try:
        await burst(store, 200, args.tasks)  # warm up the pool and the caches
        for _ in range(args.rounds):
            for label in ("no audit", "audit"):
                stubbed = fake if label == "no audit" else None
                ops.audit_append = stubbed or real
                times[label].append(await burst(store, args.commits, args.tasks, args.spread))
    finally:
        ops.audit_append = real
        await store.close()
        if scratch:
            import asyncpg

            conn = await asyncpg.connect(args.url)
            await conn.execute("DROP SCHEMA IF EXISTS cantata_audit_cost CASCADE")
            await conn.close()
    base = statistics.median(times["no audit"])
    for label, ts in times.items():
        med = statistics.median(ts)
        print(
            f"{label:9} median {med:.3f} s ({args.commits / med:,.0f} commits/s, "
            f"x{med / base:.2f}), best {min(ts):.3f} s ({args.commits / min(ts):,.0f} "
            f"commits/s, x{min(ts) / min(times['no audit']):.2f}); "
            f"runs {', '.join(f'{t:.2f}' for t in ts)}"
        )


if __name__ == "__main__":
    asyncio.run(main())
