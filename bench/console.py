"""``python -m bench.console``: the console's latency on a big store, and its SSE fan-out.

    python -m bench.console [--runs 1000000] [--store sqlite|postgres|both]
                            [--requests 300] [--sse 100,500,1000,2000] [--reuse]
                            [--traffic RUNS_PER_S [--traffic-seconds 10]
                             [--traffic-clients 20]]

Builds a store of ``--runs`` runs with SQL (``bench.many_runs``: bulk inserts / COPY, not
``app.start``; five workflows, 90 % completed, 5 % compensated, 3 % failed, 2 % running,
spread over 30 days, one run in ten with a 3-step history and attempts). Then serves it with
``cantata serve`` (a separate process) and measures, over HTTP with a bearer token, the
p50/p99 of pages of runs (first page, deep pages by cursor, each filter) and of the run
detail; prints the query plans the pages use; and counts how many server-sent-event
clients one server feeds with every change arriving within 2 s; with ``--traffic``, the
events and bytes a second each client of a busy app's stream gets (every kind, and the
kinds the runs table and the overview ask for) and the server's CPU. Reports; asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench.common import PG_URL
from bench.many_runs import APP, build_postgres, build_sqlite, postgres_url
from cantata.model.access import Role, RunQuery
from cantata.server.auth import create_token
from cantata.store.factory import store_from_url

ROOT = Path(__file__).resolve().parents[1]


# -- plans ------------------------------------------------------------------------------------

QUERIES = {
    "first page": RunQuery(limit=51),
    "deep page": RunQuery(after=(time.time() - 15 * 86400, "f" * 32), limit=51),
    "status=failed": RunQuery(status=None, limit=51),
    "workflow": RunQuery(workflow="ship_order", limit=51),
    "idempotency_key": RunQuery(idempotency_key="order-500000", limit=51),
    "correlation_id": RunQuery(correlation_id="corr-12345", limit=51),
}


def sqlite_plans(path: Path) -> dict[str, str]:
    from cantata.model.status import RunStatus
    from cantata.store.sqlite_console import runs_sql

    conn = sqlite3.connect(path)
    out = {}
    for label, q in QUERIES.items():
        if label == "status=failed":
            q = RunQuery(status=RunStatus.FAILED, limit=51)
        sql, params = runs_sql(APP, q)
        plan = conn.execute("EXPLAIN QUERY PLAN " + sql, params).fetchall()
        out[label] = "; ".join(str(r[-1]) for r in plan)
    conn.close()
    return out


async def postgres_plans(url: str) -> dict[str, str]:
    import asyncpg

    from cantata.model.status import RunStatus
    from cantata.store.postgres_console import runs_sql

    conn = await asyncpg.connect(PG_URL, server_settings={"search_path": "bench_console"})
    out = {}
    try:
        for label, q in QUERIES.items():
            if label == "status=failed":
                q = RunQuery(status=RunStatus.FAILED, limit=51)
            sql, params = runs_sql(APP, q)
            plan = await conn.fetch("EXPLAIN " + sql, *params)
            out[label] = " / ".join(r[0].strip() for r in plan[:3])
    finally:
        await conn.close()
    return out


# -- the server and its clients -----------------------------------------------------------------


class Served:
    """``cantata serve`` on the store, in its own process."""

    def __init__(self, url: str) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.url = url

    def __enter__(self) -> Served:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cantata", "serve", "--store", self.url, "--app", APP,
             "--port", str(self.port), "--stream-interval", "0.2"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 300  # a loaded machine, a big store to open
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                if httpx.get(f"{self.base}/api/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        raise RuntimeError(f"cantata serve did not start: {err[-2000:]}")

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def measure(client: httpx.Client, paths: list[str]) -> tuple[float, float]:
    took = []
    for path in paths:
        t = time.perf_counter()
        r = client.get(path)
        took.append((time.perf_counter() - t) * 1000)
        assert r.status_code == 200, (path, r.status_code, r.text[:200])
    return percentile(took, 50), percentile(took, 99)


def latencies(base: str, token: str, n: int, sample_ids: list[str]) -> dict[str, tuple[float,
                                                                                      float]]:
    h = {"Authorization": f"Bearer {token}"}
    out: dict[str, tuple[float, float]] = {}
    with httpx.Client(base_url=base, headers=h, timeout=30) as c:
        for _ in range(20):  # warm up connections and caches
            c.get("/api/runs")
        out["first page (50)"] = measure(c, ["/api/runs?limit=50"] * n)
        cursors: list[str] = []
        page = c.get("/api/runs?limit=50").json()
        while len(cursors) < n and page["next_cursor"]:
            cursors.append(page["next_cursor"])
            page = c.get(f"/api/runs?limit=50&cursor={page['next_cursor']}").json()
        out["next pages by cursor"] = measure(c, [f"/api/runs?limit=50&cursor={x}"
                                                  for x in cursors])
        deep = c.get(f"/api/runs?limit=50&until={time.time() - 15 * 86400}").json()
        out["page 15 days back (until=)"] = measure(
            c, [f"/api/runs?limit=50&until={time.time() - 15 * 86400}"] * n)
        cursor = deep["next_cursor"]
        out["deep page by cursor"] = measure(c, [f"/api/runs?limit=50&cursor={cursor}"] * n)
        out["status=failed"] = measure(c, ["/api/runs?limit=50&status=failed"] * n)
        out["workflow=ship_order"] = measure(c, ["/api/runs?limit=50&workflow=ship_order"] * n)
        out["workflow+status=compensated"] = measure(
            c, ["/api/runs?limit=50&workflow=ship_order&status=compensated"] * n)
        out["idempotency_key"] = measure(
            c, [f"/api/runs?idempotency_key=order-{2 * random.randrange(400_000)}"
                for _ in range(n)])
        out["correlation_id"] = measure(
            c, [f"/api/runs?correlation_id=corr-{random.randrange(150_000)}" for _ in range(n)])
        out["run detail"] = measure(c, [f"/api/runs/{random.choice(sample_ids)}"
                                        for _ in range(n)])
        out["overview"] = measure(c, ["/api/overview"] * n)
    return out


async def overview_parts(url: str, reads: int = 40) -> list[str]:
    """``GET /api/overview`` read in process (httpx over ASGI, no network) ``reads``
    times, and the store reads it is made of, each timed alone: p50 and p90 in ms."""
    from cantata import App
    from cantata.observability.stalled import find_stalls

    app = App(APP, store=url)
    parts: dict[str, list[float]] = {"GET /api/overview (in process)": [],
                                     "counts by status (kept 2 s by the console)": [],
                                     "stalled (find_stalls, limit 100)": [],
                                     "attention counts (attention_counts)": []}
    async with app.client():
        token = await create_token(app.store, f"parts-{time.time()}", Role.VIEWER)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.asgi()),
                                     base_url="http://console",
                                     headers={"Authorization": f"Bearer {token}"}) as c:
            for _ in range(5):
                assert (await c.get("/api/overview")).status_code == 200
            for _ in range(reads):
                steps: list[Callable[[], Awaitable[object]]] = [
                    lambda: c.get("/api/overview"),
                    lambda: app.store.count_runs(APP),
                    lambda: find_stalls(app.store, APP, older_than=300, now=time.time(),
                                        limit=100),
                    lambda: app.store.attention_counts(APP, failed_since=time.time() - 3600)]
                for took, step in zip(parts.values(), steps, strict=True):
                    t = time.perf_counter()
                    await step()
                    took.append((time.perf_counter() - t) * 1000)
    return [f"{label}: p50 {percentile(v, 50):.2f} ms, p90 {percentile(v, 90):.2f} ms"
            for label, v in parts.items()]


async def sse_capacity(url: str, base: str, token: str, sizes: list[int]) -> list[str]:
    """For each client count: do all clients get 20 changes, each within 2 s?"""
    store = store_from_url(url)
    await store.open()
    lines = []
    try:
        for size in sizes:
            got: list[list[float]] = [[] for _ in range(size)]
            ready = [asyncio.Event() for _ in range(size)]
            limits = httpx.Limits(max_connections=size + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=None, limits=limits) as client:

                async def listen(i: int, ready: list[asyncio.Event] = ready,
                                 got: list[list[float]] = got) -> None:
                    h = {"Authorization": f"Bearer {token}"}
                    async with client.stream("GET", f"{base}/api/stream", headers=h) as r:
                        async for line in r.aiter_lines():
                            if line.startswith(": connected"):
                                ready[i].set()
                            elif line.startswith("data: "):
                                got[i].append(time.monotonic())

                tasks = [asyncio.create_task(listen(i)) for i in range(size)]
                try:
                    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in ready)), 120)
                except TimeoutError:
                    lines.append(f"{size} clients: could not all connect within 120 s")
                    for t in tasks:
                        t.cancel()
                    break
                sent = []
                for k in range(20):
                    sent.append(time.monotonic())
                    await store.record_action(APP, "bench", "run.status", f"run-{k}",
                                              {"status": "running"})
                    await asyncio.sleep(0.1)
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and min(len(g) for g in got) < 20:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
                lags = [g[k] - sent[k] for g in got for k in range(min(len(g), 20))]
                complete = sum(1 for g in got if len(g) >= 20)
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            p99 = percentile(lags, 99) if lags else float("nan")
            ok = complete == size and p99 < 2.0
            lines.append(f"{size} clients: {complete}/{size} got all 20 changes, lag p50 "
                         f"{statistics.median(lags) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms"
                         f" -> {'fed' if ok else 'NOT fed'}")
            if not ok:
                break
    finally:
        await store.close()
    return lines


# What a busy app records for each run, in order (the audit log the stream follows):
# its creation, its start, three steps ending, two handlers handling its events, its end.
RUN_LIFE: list[tuple[str, dict[str, Any]]] = [
    ("run.created", {"workflow": "place_order"}), ("run.status", {"status": "running"}),
    ("run.checkpoint", {"completed": ["reserve#1"], "failed": []}),
    ("delivery.done", {}), ("run.checkpoint", {"completed": ["charge#1"], "failed": []}),
    ("delivery.done", {}), ("run.checkpoint", {"completed": ["ship#1"], "failed": []}),
    ("run.status", {"status": "completed"})]
# The streams measured: every kind (the default, what every page asked for before
# ?kinds=), and what the runs table and the overview ask for now.
STREAMS = {"every kind (default)": None, "runs table (run,step)": "run,step",
           "overview (run,dead_letter,worker)": "run,dead_letter,worker"}


def cpu_seconds(pid: int) -> float:
    """User and system CPU seconds of process ``pid`` so far (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def stream_traffic(url: str, served: Served, token: str, rate: float, seconds: float,
                         clients: int) -> list[str]:
    """A busy app: ``rate`` runs a second, each recording :data:`RUN_LIFE`, for
    ``seconds``, with ``clients`` clients of each of :data:`STREAMS`. Per client of
    each: events and bytes a second; and the server's CPU over the window."""
    store = store_from_url(url)
    await store.open()
    got = {label: [[0, 0] for _ in range(clients)] for label in STREAMS}
    ready = asyncio.Event()
    connected = 0
    limits = httpx.Limits(max_connections=len(STREAMS) * clients + 10,
                          max_keepalive_connections=0)

    async def listen(kinds: str | None, tally: list[int]) -> None:
        nonlocal connected
        h = {"Authorization": f"Bearer {token}"}
        params = {"kinds": kinds} if kinds else None
        async with http.stream("GET", f"{served.base}/api/stream", headers=h,
                               params=params) as r:
            async for line in r.aiter_lines():
                if line.startswith(": connected"):
                    connected += 1
                    if connected == len(STREAMS) * clients:
                        ready.set()
                tally[0] += line.startswith("event: ")
                tally[1] += len(line.encode()) + 1

    try:
        async with httpx.AsyncClient(timeout=None, limits=limits) as http:
            tasks = [asyncio.create_task(listen(kinds, got[label][i]))
                     for label, kinds in STREAMS.items() for i in range(clients)]
            await asyncio.wait_for(ready.wait(), 120)
            for tallies in got.values():
                for t in tallies:
                    t[0] = t[1] = 0
            cpu0, t0 = cpu_seconds(served.proc.pid), time.monotonic()
            n = 0
            while time.monotonic() - t0 < seconds:
                n += 1
                for action, data in RUN_LIFE:
                    target = f"run-{n}" if action != "delivery.done" else f"emails:evt-{n}"
                    await store.record_action(APP, "worker:bench", action, target, data)
                await asyncio.sleep(max(0.0, t0 + n / rate - time.monotonic()))
            await asyncio.sleep(1.0)  # (the last changes reach the clients)
            took = time.monotonic() - t0
            cpu = cpu_seconds(served.proc.pid) - cpu0
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await store.close()
    lines = [f"{n} runs in {seconds:.0f} s ({n * len(RUN_LIFE) / seconds:.0f} changes/s), "
             f"{clients} clients of each stream; server CPU {cpu / took * 100:.0f}% of a "
             f"core, {cpu / n * 1000:.1f} ms a run"]
    figures = [f"runs={n}", f"cpu_pct={cpu / took * 100:.1f}",
               f"cpu_ms_per_run={cpu / n * 1000:.2f}"]
    for label, tallies in got.items():
        events = statistics.median(t[0] for t in tallies)
        size = statistics.median(t[1] for t in tallies)
        lines.append(f"{label}: {events / took:.0f} events/s, {size / took / 1024:.1f} KiB/s "
                     f"a client ({events / n:.2f} events, {size / n:.0f} bytes a run)")
        figures += [f"{label.split()[0]}_events_per_run={events / n:.2f}",
                    f"{label.split()[0]}_bytes_per_run={size / n:.0f}"]
    lines.append("BENCH-TRAFFIC " + " ".join(figures))
    return lines


async def existing(url: str, n: int) -> bool:
    """True when the store at ``url`` already holds the ``n`` runs of a previous build."""
    store = store_from_url(url)
    try:
        await store.open()
    except Exception:
        return False
    try:
        return sum((await store.count_runs(APP)).values()) == n
    finally:
        await store.close()


async def one(kind: str, n: int, requests: int, sse: list[int], workdir: Path,
              reuse: bool, traffic: tuple[float, float, int] | None = None) -> None:
    t = time.perf_counter()
    if kind == "sqlite":
        path = workdir / "console-bench.db"
        url = f"sqlite:///{path}"
        if not (reuse and path.exists() and await existing(url, n)):
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)  # noqa: ASYNC240
            url = await build_sqlite(path, n)
        plans = sqlite_plans(path)
    else:
        url = postgres_url("bench_console")
        if not (reuse and await existing(url, n)):
            url = await build_postgres(n, "bench_console")
        plans = await postgres_plans(url)
    built = time.perf_counter() - t
    store = store_from_url(url)
    await store.open()
    token = await create_token(store, f"bench-{int(time.time())}", Role.ADMIN)
    sample = [r.run_id for r in await store.query_runs(APP, RunQuery(limit=500))]
    await store.close()
    print(f"\n## {kind}: {n:,} runs (built in {built:.0f} s)\n")
    print("query plans:")
    for label, plan in plans.items():
        print(f"  {label:16} {plan}")
    with Served(url) as served:
        if requests:
            results = await asyncio.to_thread(latencies, served.base, token, requests, sample)
            load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"\nlatency over HTTP ({requests} requests each; target p50 < 20 ms, p99 "
                  f"< 100 ms; load average before: {load} on {os.cpu_count()} cores):")
            print("| request | p50 ms | p99 ms |\n|---|---:|---:|")
            for label, (p50, p99) in results.items():
                print(f"| {label} | {p50:.1f} | {p99:.1f} |")
        if requests:
            print("\nthe overview's parts, in process:")
            for line in await overview_parts(url):
                print(f"  {line}")
        if traffic:
            print("\nthe live stream on a busy app:")
            for line in await stream_traffic(url, served, token, *traffic):
                print(f"  {line}")
        if sse:
            print("\nserver-sent events (one server, 20 changes 100 ms apart):")
            for line in await sse_capacity(url, served.base, token, sse):
                print(f"  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--sse", default="100,500,1000,2000",
                        help="client counts to try, comma-separated ('' to skip)")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--traffic", type=float, default=0.0, metavar="RUNS_PER_S",
                        help="measure the live stream of a busy app of this many runs a "
                             "second (each 8 changes; 0: not measured)")
    parser.add_argument("--traffic-seconds", type=float, default=10.0)
    parser.add_argument("--traffic-clients", type=int, default=20,
                        help="clients of each stream measured")
    parser.add_argument("--reuse", action="store_true",
                        help="keep a store of the same size built by an earlier run")
    args = parser.parse_args()
    sse = [int(x) for x in args.sse.split(",") if x.strip()]
    kinds = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    for kind in kinds:
        traffic = ((args.traffic, args.traffic_seconds, args.traffic_clients)
                   if args.traffic else None)
        asyncio.run(one(kind, args.runs, args.requests, sse, args.dir, args.reuse, traffic))


if __name__ == "__main__":
    main()
