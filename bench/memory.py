"""Memory of many waiting workflows: N runs parked at once in one worker process.

    python -m bench.memory sleep|wait [--n 10000] [--store sqlite|postgres]

``sleep``: each run is parked in ``ctx.sleep(3600)``; ``wait``: in
``ctx.wait_for_event("bench.release", match={"i": i}, timeout=3600)``. A run counts as
waiting once the store has it RUNNING: its first checkpoint, which records the timer
or the wait, has committed. Then the process's RSS (VmRSS) is read, and its CPU use is
measured over a few idle seconds (what the waiting costs). Reports one BENCH-RESULT line.
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

from bench.common import PG_URL, cpu_seconds, emit, max_rss_mb, now, rss_mb, unavailable

IDLE_WINDOW_S = 5.0


def build(name: str, store: str) -> Any:
    from cantata import App, Router, WorkflowContext

    router = Router()

    @router.workflow
    async def sleeper(ctx: WorkflowContext, i: int) -> None:
        await ctx.sleep(3600)

    @router.workflow
    async def waiter(ctx: WorkflowContext, i: int) -> None:
        await ctx.wait_for_event("bench.release", match={"i": i}, timeout=3600)

    app = App(name, store=store)
    app.include(router)
    return app, {"sleep": sleeper, "wait": waiter}


async def run(a: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="cantata-mem-")
    store = f"sqlite:///{tmp}/mem.db" if a.store == "sqlite" else PG_URL
    try:
        app, wfs = build(f"bench_mem_{uuid.uuid4().hex[:10]}", store)
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
            t_started = now() - t0
            deadline = now() + a.timeout
            while True:
                running = len(await app.list_runs(status="running", limit=a.n + 1))
                if running >= a.n:
                    break
                if now() > deadline:
                    raise TimeoutError(f"only {running} of {a.n} runs waiting after {a.timeout} s")
                await asyncio.sleep(0.25)
            t_waiting = now() - t0
            await asyncio.sleep(1.0)
            gc.collect()
            rss_waiting = rss_mb()
            cpu0, w0 = cpu_seconds(), now()
            await asyncio.sleep(IDLE_WINDOW_S)
            idle_cpu = (cpu_seconds() - cpu0) / (now() - w0)
            in_process = len(app.engine.executions)
            tasks = len(asyncio.all_tasks())
        finally:
            t_close = now()
            await app.close()
            close_s = now() - t_close
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "n": a.n,
        "rss_before_mb": round(rss_before, 1),
        "rss_waiting_mb": round(rss_waiting, 1),
        "kb_per_workflow": round((rss_waiting - rss_before) * 1024 / a.n, 2),
        "max_rss_mb": round(max_rss_mb(), 1),
        "start_s": round(t_started, 2),
        "all_waiting_s": round(t_waiting, 2),
        "idle_cpu_util": round(idle_cpu, 3),
        "executions_in_process": in_process,
        "asyncio_tasks": tasks,
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
    a = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t = time.time()
    res = asyncio.run(run(a))
    emit(system="cantata", scenario="memory", variant=f"{a.store}+embedded", workload=a.mode,
         ok=True, wall_s=round(time.time() - t, 2), **res)


if __name__ == "__main__":
    main()
