"""The operator's reads while a worker holds many runs parked.

    python -m bench.operator_reads [--n 50000] [--store sqlite|postgres] [--waiters 50]

Parks ``--n`` runs in ``ctx.sleep(7200)`` (``App(park_after=0)``, created by
``app.start`` calls 1,000 in flight at once, as ``bench.memory``), and ``--waiters``
more in ``ctx.wait_for_event`` for an event that never comes (genuine stalls once
they wait longer than ``--older-than``). Then, with the worker still holding them, an
operator's client of the same store, its clock an hour ahead (so every parked run has
made no progress for an hour: the sleepers are not due, the waiters are stalled),
times each read of the operator: ``app.stalled`` (``cantata stalled``, ``GET
/api/stalled``), ``GET /api/overview``, ``GET /api/runs`` (newest first, and filtered by
status and by workflow), ``cantata queues``, ``cantata groups``, the trace of one
correlation id and ``/metrics``; each read three times, the best and worst reported.

On PostgreSQL each run is in a new schema that is never analyzed (the statistics of a
table that grew from empty: docs/performance.md, "A million parked runs").
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import shutil
import tempfile
import time
import uuid
from typing import Any

from bench.common import PG_URL, drop_schema

AHEAD = 3600.0


class Ahead:
    """The system clock, ``AHEAD`` seconds later."""

    def now(self) -> float:
        return time.time() + AHEAD

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


def build(name: str, store: str, **kw: Any) -> Any:
    from cantata import App, WorkflowContext

    app = App(name, store=store, **kw)

    @app.workflow
    async def sleeper(ctx: WorkflowContext, i: int) -> None:
        await ctx.sleep(2 * AHEAD)

    @app.workflow
    async def waiter(ctx: WorkflowContext, i: int) -> None:
        await ctx.wait_for_event("bench.never", match={"i": i}, timeout=4 * AHEAD)

    return app


async def timed(label: str, call: Any, out: list[tuple[str, float, float, str]]) -> None:
    times = []
    what = ""
    for _ in range(3):
        t0 = time.perf_counter()
        got = await call()
        times.append((time.perf_counter() - t0) * 1000)
        what = got if isinstance(got, str) else ""
    out.append((label, min(times), max(times), what))
    print(f"{label:<44} {min(times):9.1f} ms  (worst {max(times):.1f})  {what}", flush=True)


async def main(args: argparse.Namespace) -> None:
    import httpx

    from cantata.model.access import Role
    from cantata.server.auth import create_token

    name = f"ops-{uuid.uuid4().hex[:6]}"
    tmp = schema = None
    if args.store == "sqlite":
        tmp = tempfile.mkdtemp()
        url = f"sqlite:///{tmp}/ops.db"
    else:
        schema = f"ops_{uuid.uuid4().hex[:8]}"
        url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    worker = build(name, url, park_after=0.0)
    try:
        async with worker:
            t0 = time.perf_counter()
            for first in range(0, args.n, args.chunk):
                await asyncio.gather(*(worker.start("sleeper", i) for i in
                                       range(first, min(args.n, first + args.chunk))))
            await asyncio.gather(*(worker.start("waiter", i) for i in range(args.waiters)))
            want = args.n + args.waiters
            while (await worker.store.count_runs(name)).get("running", 0) < want:  # noqa: ASYNC110
                await asyncio.sleep(0.5)
            print(f"parked {args.n} + {args.waiters} waiters in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            await asyncio.sleep(2)  # every run evicted
            reader = build(name, url, clock=Ahead())
            async with reader.client():
                token = await create_token(reader.store, f"bench-{uuid.uuid4().hex[:6]}",
                                           Role.VIEWER)
                api = reader.asgi()
                head = {"Authorization": f"Bearer {token}"}
                out: list[tuple[str, float, float, str]] = []
                async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                             base_url="http://console") as http:

                    async def get(path: str) -> str:
                        r = await http.get(path, headers=head)
                        r.raise_for_status()
                        body: Any = (r.json() if "json" in r.headers["content-type"]
                                     else r.text)
                        if isinstance(body, dict):
                            body = body.get("stalled", body.get("runs", []))
                        elif not isinstance(body, list):
                            body = body.splitlines()
                        return f"{r.status_code}, {len(body)} items"

                    async def stalled() -> str:
                        got = await reader.stalled(older_than=args.older_than)
                        kinds: dict[str, int] = {}
                        for s in got:
                            kinds[s.reason] = kinds.get(s.reason, 0) + 1
                        return f"{len(got)} stalls {kinds}"

                    await get("/api/health")
                    cid = (await http.get("/api/runs?limit=1", headers=head)).json()[
                        "runs"][0]["correlation_id"]
                    async def candidates() -> str:
                        now = reader.clock.now()
                        kw = {"now": now} if "now" in inspect.signature(
                            reader.store.stale_correlations).parameters else {}
                        got = await reader.store.stale_correlations(
                            name, older_than=now - args.older_than, limit=100, **kw)
                        return f"{len(got)} correlation ids"

                    await timed("its candidates (stale_correlations)", candidates, out)
                    await timed("app.stalled (cantata stalled)", stalled, out)
                    await timed("GET /api/stalled", lambda: get("/api/stalled"), out)
                    await timed("GET /api/overview", lambda: get("/api/overview"), out)
                    await timed("GET /api/runs", lambda: get("/api/runs"), out)
                    await timed("GET /api/runs?status=failed",
                                lambda: get("/api/runs?status=failed"), out)
                    await timed("GET /api/runs?status=running",
                                lambda: get("/api/runs?status=running"), out)
                    await timed("GET /api/runs?workflow=waiter",
                                lambda: get("/api/runs?workflow=waiter"), out)
                    await timed("GET /api/queues", lambda: get("/api/queues"), out)
                    await timed("GET /api/groups", lambda: get("/api/groups"), out)
                    await timed("GET /api/trace/{cid}", lambda: get(f"/api/trace/{cid}"), out)
                    await timed("GET /metrics", lambda: get("/metrics"), out)

                    async def counts() -> str:
                        return f"{sum((await reader.store.count_runs(name)).values())} runs"

                    # (the console keeps the counts for a few seconds: their read alone)
                    await timed("the counts by status (count_runs)", counts, out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        if schema:  # (its 200,000 runs are not left on the server)
            await drop_schema(schema)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=50_000)
    p.add_argument("--waiters", type=int, default=50)
    p.add_argument("--chunk", type=int, default=1000)
    p.add_argument("--older-than", type=float, default=300.0)
    p.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    asyncio.run(main(p.parse_args()))
