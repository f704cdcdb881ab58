"""What waiting for a step's slot costs the store, and how soon a freed slot is taken
(a measuring tool, not a test).

    python -m bench.slot_wait [--store sqlite|postgres] [--waiters 6] [--hold 5]
                              [--jitter 0.2] [--workers 2] [--remote] [--rounds 1]

A step declared ``concurrency=1`` whose body sleeps ``--hold`` seconds (and up to
``--jitter`` more, at random, so that releases fall at any phase of a waiter's
polling); ``--waiters``
+ 1 runs call it at once, spread over ``--workers`` worker Apps sharing one store (each
its own worker id and store connection, as separate processes would have; in one
process so that their clocks and counts are one). So one run holds the slot and the
others wait, in line, for ``hold`` seconds at a time. With ``--remote`` the step
belongs to another service (``ctx.run("inventory.hold", ...)``): its calls wait for
the slot as tasks, at the workers serving that service.

Printed:

- **store requests/s while waiting**: every call of a store method by any of the
  workers (a request: one round trip or transaction), counted from 0.5 s after a body
  began to 0.5 s before it ended, while the others wait; the total (the workers'
  background polls included), and the slot wait's own requests: ``acquire_slot``,
  and for a task its looks at its run (``get_run``, ``load_history``); per method with
  ``--verbose``;
- **wake-up latency**: from the release of the slot (the return of the holder's
  ``release_slot``, its commit) to the next body's start, p50 and max.

docs/flow-control.md reports the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import inspect
import logging
import random
import statistics
import tempfile
import time
import uuid
from typing import Any

from bench.common import PG_URL

HOLD_MARGIN = 0.5  # seconds left out at each end of a hold (the hand-over's own requests)
# The requests of the slot wait itself (a task's waiter looks at its run too).
SLOT_WAIT = ("acquire_slot", "get_run", "load_history")


class Counter:
    """Counts the store calls of every worker, by method, with their times."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, str]] = []
        self.released: list[float] = []

    def wrap(self, store: Any) -> None:
        """Count each call of ``store``'s public coroutine methods (on the instance)."""
        for name in dir(type(store)):
            if name.startswith("_"):
                continue
            method = getattr(store, name, None)
            if not inspect.iscoroutinefunction(method):
                continue
            setattr(store, name, self._counted(name, method))

    def _counted(self, name: str, method: Any) -> Any:
        async def counted(*args: Any, **kw: Any) -> Any:
            self.calls.append((time.monotonic(), name))
            out = await method(*args, **kw)
            if name == "release_slot":
                self.released.append(time.monotonic())
            return out

        return counted

    def between(self, start: float, end: float) -> collections.Counter[str]:
        return collections.Counter(n for t, n in self.calls if start <= t < end)


def make_workers(url: str, n: int, hold: float, jitter: float, remote: bool,
                 began: list[tuple[float, str]]) -> list[Any]:
    """``n`` worker Apps of one app; the step ``hold`` (one at a time) notes its begins.
    With ``remote``, the first ``n - 1`` serve the workflow (service ``orders``) and the
    last the step (service ``inventory``); otherwise every worker serves both."""
    from cantata import App, WorkflowContext

    apps = []
    for i in range(n):
        serves_step = not remote or i == n - 1
        serves_wf = not remote or i < n - 1
        app = App("slotbench", store=url, broker="embedded", shutdown_grace=1.0,
                  services=(["inventory"] if serves_step else []) +
                           (["orders"] if serves_wf else []))
        if serves_step:
            @app.step(name="hold", service="inventory" if remote else None, concurrency=1)
            async def hold_step(key: str) -> str:
                began.append((time.monotonic(), key))
                await asyncio.sleep(hold + random.uniform(0, jitter))
                return key
        if serves_wf:
            @app.workflow(name="call", service="orders" if remote else None)
            async def call(ctx: WorkflowContext, key: str) -> str:
                return str(await ctx.run("inventory.hold" if remote else "hold", key))
        apps.append(app)
    return apps


async def one(store_kind: str, waiters: int, hold: float, jitter: float, workers: int,
              remote: bool) -> dict[str, Any]:
    schema = f"bench_slots_{uuid.uuid4().hex[:10]}"
    tmp = tempfile.mkdtemp(prefix="cantata-bench-")
    sep = "&" if "?" in PG_URL else "?"
    url = (f"sqlite:///{tmp}/slots.db" if store_kind == "sqlite"
           else f"{PG_URL}{sep}schema={schema}")
    began: list[tuple[float, str]] = []
    counter = Counter()
    apps = make_workers(url, max(workers, 2 if remote else 1), hold, jitter, remote,
                        began)
    try:
        for app in apps:
            await app.open(serve=True)
            counter.wrap(app.store)
        starters = [a for a in apps if "call" in a.router.workflows] or apps
        handles = []
        for i in range(waiters + 1):
            handles.append(await starters[i % len(starters)].start("call", f"r{i}"))
        results = [await h.result(timeout=hold * (waiters + 2) + 60) for h in handles]
        assert sorted(results) == sorted(f"r{i}" for i in range(waiters + 1)), results
    finally:
        for app in reversed(apps):
            await app.close()
        if store_kind == "postgres":
            import asyncpg

            conn = await asyncpg.connect(PG_URL)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()
    starts = sorted(t for t, _ in began)
    # Each hold but the last has runs waiting behind it (with no waiter: the one hold,
    # the baseline of a worker that serves a run and waits for nothing).
    windows = [(s + HOLD_MARGIN, s + hold - HOLD_MARGIN) for s in starts[:-1] or starts]
    counted: collections.Counter[str] = collections.Counter()
    for a, b in windows:
        counted += counter.between(a, b)
    seconds = sum(b - a for a, b in windows)
    latencies = []
    for s in starts[1:]:
        before = [r for r in counter.released if r <= s]
        if before:
            latencies.append(s - before[-1])
    return {
        "per_s": sum(counted.values()) / seconds,
        "slot_per_s": sum(counted[k] for k in SLOT_WAIT) / seconds,
        "by_method": {k: v / seconds for k, v in counted.most_common()},
        "wake_p50": statistics.median(latencies) if latencies else 0.0,
        "wake_max": max(latencies, default=0.0),
        "samples": len(latencies),
        "waits": latencies,
    }


async def main_async(a: argparse.Namespace) -> None:
    rows = []
    waits: list[float] = []
    for r in range(a.rounds):
        res = await one(a.store, a.waiters, a.hold, a.jitter, a.workers, a.remote)
        rows.append(res)
        waits += res["waits"]
        print(f"round {r + 1}: {res['per_s']:6.1f} store requests/s while waiting "
              f"({res['slot_per_s']:.1f} of the slot wait); wake-up p50 "
              f"{1000 * res['wake_p50']:.0f} ms, max {1000 * res['wake_max']:.0f} ms "
              f"({res['samples']} hand-overs)", flush=True)
        if a.verbose:
            for name, rate in res["by_method"].items():
                print(f"    {name:28s} {rate:6.2f}/s")
    kind = "remote" if a.remote else "local"
    print(f"{a.store}, {kind} step, {a.waiters} waiting runs, {a.workers} workers: "
          f"{statistics.median(x['per_s'] for x in rows):.1f} store requests/s while "
          f"waiting ({statistics.median(x['slot_per_s'] for x in rows):.1f} of the slot wait), "
          f"wake-up p50 {1000 * statistics.median(waits):.0f} ms over {len(waits)} hand-overs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="postgres")
    ap.add_argument("--waiters", type=int, default=6, help="runs waiting behind the holder")
    ap.add_argument("--hold", type=float, default=5.0, help="seconds each body holds the slot")
    ap.add_argument("--jitter", type=float, default=0.2,
                    help="up to this much longer, at random (a release at any phase of a "
                         "poll)")
    ap.add_argument("--workers", type=int, default=2, help="worker Apps sharing the store")
    ap.add_argument("--remote", action="store_true",
                    help="the step is another service's (its calls wait as tasks)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="requests per store method")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("cantata").setLevel(logging.ERROR)
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
