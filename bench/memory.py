"""Memory of many waiting workflows: N runs parked at once in one worker process.

    python -m bench.memory sleep|wait [--n 10000] [--store sqlite|postgres]
        [--park-after S|none] [--hot K] [--sample 1000]

``sleep``: each run is parked in ``ctx.sleep(3600)``; ``wait``: in
``ctx.wait_for_event("bench.release", match={"i": i}, timeout=3600)``. A run counts as
waiting once the store has it RUNNING: its first checkpoint, which records the timer
or the wait, has committed. Then the process's RSS (VmRSS) is read, and its CPU use is
measured over a few idle seconds (what the waiting costs). Reports one BENCH-RESULT line.

``--park-after S`` (``App(park_after=S)``, docs/architecture.md, parking) evicts a
run from memory once it has waited S seconds (``0``: at once) and resumes it from its
history when it wakes; ``none`` keeps every run in memory (the engine before parking).
With parking, the runs are created by many concurrent ``app.start`` calls (``--chunk``
in flight), each of which runs until its wait and is evicted; then ``--sample`` more
runs wake while the N stay parked, and the wake-up latency is reported: ``sleep``,
from the timer's due time to the first instant the resumed workflow runs again
(``ctx.now()`` after the sleep); ``wait``, from ``app.publish`` of the matching event
to that instant.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import shutil
import tempfile
import time
import uuid
from typing import Any

from bench.common import (
    PG_URL,
    cpu_seconds,
    emit,
    latency_summary,
    max_rss_mb,
    now,
    rss_mb,
    unavailable,
)

IDLE_WINDOW_S = 5.0


def build(name: str, store: str, park_after: float | None, hot: int) -> Any:
    from cantata import App, Router, WorkflowContext

    router = Router()

    @router.workflow
    async def sleeper(ctx: WorkflowContext, i: int) -> None:
        await ctx.sleep(3600)

    @router.workflow
    async def waiter(ctx: WorkflowContext, i: int) -> None:
        await ctx.wait_for_event("bench.release", match={"i": i}, timeout=3600)

    @router.workflow
    async def timed_sleeper(ctx: WorkflowContext, due: float) -> float:
        await ctx.sleep(max(0.0, due - ctx.now().timestamp()))
        return ctx.now().timestamp() - due  # how late it woke

    @router.workflow
    async def timed_waiter(ctx: WorkflowContext, i: int) -> float:
        ev = await ctx.wait_for_event("bench.wake", match={"i": i}, timeout=3600)
        return ctx.now().timestamp() - float(ev.data["sent"])

    app = App(name, store=store, park_after=park_after, hot_runs=hot)
    app.include(router)
    return app, {"sleep": sleeper, "wait": waiter, "timed_sleep": timed_sleeper,
                 "timed_wait": timed_waiter}


async def waiting_count(app: Any) -> int:
    counts = await app.store.count_runs(app.name)
    return int(counts.get("running", 0))


async def wake_latency(app: Any, wfs: dict[str, Any], mode: str, sample: int) -> dict[str, Any]:
    """Wake ``sample`` runs while the others stay parked: seconds late, as p50/p99."""
    if mode == "sleep":
        base = time.time() + 5.0 + sample / 500  # all parked before the first is due
        handles = await _start_all(app, wfs["timed_sleep"],
                                   [base + 10.0 * k / sample for k in range(sample)], 200)
    else:
        ids = list(range(10**9, 10**9 + sample))
        handles = await _start_all(app, wfs["timed_wait"], ids, 200)
        while await waiting_count(app) < app_runs(app) + sample:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        await asyncio.sleep(1.0)
        for i in ids:  # spread over ~10 s, so each wake is measured on its own
            await app.publish("bench.wake", {"i": i, "sent": time.time()})
            await asyncio.sleep(10.0 / sample)
    late = await asyncio.gather(*(h.result(timeout=600) for h in handles))
    summary = latency_summary([float(x) for x in late])
    return {f"wake_{k}": v for k, v in summary.items()}


_N = 0


def app_runs(app: Any) -> int:
    return _N


async def _start_all(app: Any, wf: Any, args: list[Any], chunk: int) -> list[Any]:
    handles: list[Any] = []
    for start in range(0, len(args), chunk):
        handles += await asyncio.gather(*(app.start(wf, a) for a in args[start:start + chunk]))
    return handles


async def run(a: argparse.Namespace) -> dict[str, Any]:
    global _N
    _N = a.n
    tmp = tempfile.mkdtemp(prefix="cantata-mem-")
    store = f"sqlite:///{tmp}/mem.db" if a.store == "sqlite" else PG_URL
    park_after = None if a.park_after == "none" else float(a.park_after)
    extra: dict[str, Any] = {}
    try:
        app, wfs = build(f"bench_mem_{uuid.uuid4().hex[:10]}", store, park_after, a.hot)
        try:
            await app.open(serve=True)
        except Exception as exc:
            unavailable(f"cannot open the {a.store} store: {type(exc).__name__}: {exc}")
        try:
            gc.collect()
            rss_before = rss_mb()
            wf = wfs[a.mode]
            t0 = now()
            for start in range(0, a.n, a.chunk):
                await asyncio.gather(*(app.start(wf, i) for i in range(start,
                                                                       min(a.n, start + a.chunk))))
                if a.n >= 100_000 and start % 100_000 == 0:
                    print(f"# {start} started, {now() - t0:.0f} s, RSS {rss_mb():.0f} MB",
                          flush=True)
            t_started = now() - t0
            deadline = now() + a.timeout
            while True:
                running = await waiting_count(app)
                if running >= a.n:
                    break
                if now() > deadline:
                    raise TimeoutError(f"only {running} of {a.n} runs waiting after {a.timeout} s")
                await asyncio.sleep(0.25 if a.n <= 100_000 else 2.0)
            t_waiting = now() - t0
            await asyncio.sleep(1.0)
            gc.collect()
            rss_waiting = rss_mb()
            cpu0, w0 = cpu_seconds(), now()
            await asyncio.sleep(IDLE_WINDOW_S)
            idle_cpu = (cpu_seconds() - cpu0) / (now() - w0)
            in_process = len(app.engine.executions)
            tasks = len(asyncio.all_tasks())
            parked = app.engine.metrics.parked
            if a.sample and park_after is not None:
                extra = await wake_latency(app, wfs, a.mode, a.sample)
                extra["wake_sample"] = a.sample
                gc.collect()
                extra["rss_after_wakes_mb"] = round(rss_mb(), 1)
        finally:
            t_close = now()
            await app.close()
            close_s = now() - t_close
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "n": a.n,
        "park_after": a.park_after,
        "hot_runs": a.hot,
        "rss_before_mb": round(rss_before, 1),
        "rss_waiting_mb": round(rss_waiting, 1),
        "kb_per_workflow": round((rss_waiting - rss_before) * 1024 / a.n, 2),
        "max_rss_mb": round(max_rss_mb(), 1),
        "start_s": round(t_started, 2),
        "starts_per_s": round(a.n / t_started, 1),
        "all_waiting_s": round(t_waiting, 2),
        "idle_cpu_util": round(idle_cpu, 3),
        "executions_in_process": in_process,
        "parked": parked,
        "asyncio_tasks": tasks,
        **extra,
        "close_s": round(close_s, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["sleep", "wait"])
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--chunk", type=int, default=500, help="app.start calls in flight at once")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--park-after", default="none",
                    help="App(park_after=...): seconds, or 'none' to keep runs in memory")
    ap.add_argument("--hot", type=int, default=10_000, help="App(hot_runs=...)")
    ap.add_argument("--sample", type=int, default=1000,
                    help="runs woken to measure the wake-up latency (with parking)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t = time.time()
    res = asyncio.run(run(a))
    variant = f"{a.store}+embedded" + ("" if a.park_after == "none" else
                                       f", park_after={a.park_after}")
    emit(system="cantata", scenario="memory", variant=variant, workload=a.mode,
         ok=True, wall_s=round(time.time() - t, 2), **res)


if __name__ == "__main__":
    main()
