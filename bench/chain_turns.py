"""What the event loop runs during each order of the chain's latency workload.

    python -m bench.chain_turns --store sqlite --broker nats [--n 200] [--timeline]

Runs the chain's latency workload (one order at a time, after 20 warm-up orders, each
ended when its terminal event's settlement commits, as in ``bench.cantata_scenario``)
with every handle the event loop runs and every ``select`` timed (as
``bench.loop_top`` does), and prints, per kind of handle, its mean time per order,
its median over the orders and how many ran per order. Everything the loop runs
while an order is under way is on that order's path (a hop's commit holds the loop
for its fsync), so a turn that is not the hop's own shows here. ``--timeline`` adds
the median order's handles in order (start offset and duration, µs). Set ``TMPDIR``
to a tmpfs (``/dev/shm``) to see the path without the disk's fsync. See
docs/performance.md (round twenty-one).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import selectors
import statistics
import time
from typing import Any

from bench.loop_top import _name

Record = tuple[float, float, str]  # start, end, what
RECORDS: list[Record] = []
_on = [False]


def _install() -> None:
    run = asyncio.Handle._run

    def timed_run(self: asyncio.Handle) -> None:
        if not _on[0]:
            return run(self)
        started = time.perf_counter()
        try:
            run(self)
        finally:
            RECORDS.append((started, time.perf_counter(), _name(self)))

    selector = selectors.DefaultSelector
    select = selector.select

    def timed_select(self: Any, timeout: float | None = None) -> Any:
        if not _on[0]:
            return select(self, timeout)
        started = time.perf_counter()
        try:
            return select(self, timeout)
        finally:
            RECORDS.append((started, time.perf_counter(),
                            "select (poll)" if timeout == 0 else "select (wait)"))

    asyncio.Handle._run = timed_run  # type: ignore[method-assign]
    selector.select = timed_select  # type: ignore[method-assign]


async def _orders(a: argparse.Namespace) -> list[tuple[float, float]]:
    """Run the workload; the (start, end) of each measured order."""
    from bench.cantata_app import TERMINAL
    from bench.chain_breakdown import open_chain
    from cantata import Hook

    app, name = await open_chain(a, "turns")
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
        for order in range(1, a.n + 21):
            fut = ended[order] = asyncio.get_running_loop().create_future()
            _on[0] = order > 20
            started = time.perf_counter()
            await app.publish("order.placed", {"order": order})
            await asyncio.wait_for(fut, 30)
            if _on[0]:
                spans.append((started, time.perf_counter()))
            _on[0] = False
            del ended[order]
    finally:
        from bench.chain_breakdown import close_chain

        await close_chain(app, a, name)
    return spans


def report(spans: list[tuple[float, float]], timeline: bool) -> str:
    records = sorted(RECORDS)
    latencies = [(end - start) * 1e3 for start, end in spans]
    per_order: dict[str, list[float]] = collections.defaultdict(lambda: [0.0] * len(spans))
    counts: collections.Counter[str] = collections.Counter()
    middle = sorted(range(len(spans)), key=lambda k: latencies[k])[len(spans) // 2]
    lines = [f"p50 {statistics.median(latencies):.3f} ms over {len(spans)} orders",
             f"{'mean µs':>8} {'median':>8} {'per order':>9}  handle"]
    i = 0
    steps = []
    for k, (start, end) in enumerate(spans):
        while i < len(records) and records[i][0] < start:
            i += 1
        while i < len(records) and records[i][0] <= end:
            began, ended, what = records[i]
            per_order[what][k] += (min(ended, end) - began) * 1e6
            counts[what] += 1
            if k == middle:
                steps.append(f"{(began - start) * 1e6:8.1f} {(ended - began) * 1e6:7.1f}  {what}")
            i += 1
    for what, values in sorted(per_order.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"{sum(values) / len(spans):8.1f} {statistics.median(values):8.1f} "
                     f"{counts[what] / len(spans):9.2f}  {what}")
    if timeline:
        lines += [f"the median order ({latencies[middle]:.3f} ms): start µs, duration µs",
                  *steps]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--broker", choices=["embedded", "nats"], default="nats")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--timeline", action="store_true")
    a = ap.parse_args()
    _install()
    print(report(asyncio.run(_orders(a)), a.timeline))


if __name__ == "__main__":
    main()
