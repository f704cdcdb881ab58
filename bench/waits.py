"""Many runs waiting for their own keyed event: what it costs to wake them.

    python -m bench.waits backlog --store sqlite|postgres [--runs 1000] [--events 20000]
    python -m bench.waits memory --store sqlite|postgres [--runs 300] [--rate 100]
    python -m bench.waits loop --store sqlite|postgres [--waits 2000] [--gap 61]

``backlog``: ``--runs`` runs park in ``ctx.wait_for_event("t.m", match={"order": i})``
(no timeout); every worker stops; a client stores ``--events`` other events of that
type and then the runs' own; a new worker starts and resumes them all. Reports the
time until the last ends and the process's peak RSS before and after
(docs/performance.md, "Round thirty-one (waits)").

``memory``: ``--runs`` runs wait in memory (not parked) for their own event, and the
worker's own process publishes their events at ``--rate`` a second. Reports the time
until the last ends and how many times the store was asked for events
(``find_events``): each event woke every wait of its type to read the store, before
``engine/event_waits.py``.

``loop``: one run waits ``--waits`` times in a row for an event of one kind
(``match={"who": "a"}``), an entity's loop; the worker's process publishes that many
events for it, each followed by one for another entity (``{"who": "b"}``), as fast as
it can. Reports the time until the run ends: before engine/wait_look.py each wait read
every event of the type since the run began, and so the n-th wait cost n reads' worth.
With ``--gap S``: half of the events, a pause of S seconds, then the other half, timed
alone (from 61 s on, the second half's waits read on from their floors: events stored
a minute before a floor are behind it).

Reports one BENCH-RESULT line. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
import uuid
from typing import Any

import cantata
from cantata import App

from .common import PG_URL, drop_schema, emit, max_rss_mb, unavailable


def build(name: str, store: str, **options: Any) -> App:
    app = App(name, store=store, **options)

    @app.workflow
    async def waits(ctx: cantata.WorkflowContext, key: int) -> int:
        event = await ctx.wait_for_event("t.m", match={"order": key})
        return int(event.data["order"])

    return app


async def backlog(store: str, name: str, runs: int, events: int) -> dict[str, Any]:
    async with build(name, store, park_after=0.0) as app:
        handles = [await app.start("waits", i) for i in range(runs)]
        deadline = time.monotonic() + 300
        while app.engine.metrics.parked < runs:  # (every run in its wait, parked)
            if time.monotonic() > deadline:
                unavailable(f"only {app.engine.metrics.parked} of {runs} runs parked")
            await asyncio.sleep(0.1)
    async with build(name, store).client() as client:
        for i in range(events):
            await client.publish("t.m", {"order": runs + i, "pad": "x" * 100})
        for i in range(runs):
            await client.publish("t.m", {"order": i})
    await asyncio.sleep(1.5)  # (older than the second a look reads again by the clock)
    rss = max_rss_mb()
    began = time.perf_counter()
    async with build(name, store) as app:
        for handle in handles:
            await app.get_handle(handle.run_id).result(timeout=3600)
    return {"seconds": round(time.perf_counter() - began, 2),
            "max_rss_mb_before": round(rss, 1), "max_rss_mb_after": round(max_rss_mb(), 1)}


async def in_memory(store: str, name: str, runs: int, rate: float) -> dict[str, Any]:
    async with build(name, store, poll_interval=0.2) as app:
        handles = [await app.start("waits", i) for i in range(runs)]
        deadline = time.monotonic() + 300
        while app.engine.event_waits.waiting("t.m") < runs:
            if time.monotonic() > deadline:
                unavailable("the runs never all waited")
            await asyncio.sleep(0.05)
        reads = 0
        store_obj: Any = app.store
        find_events = store_obj.find_events

        async def counted(*args: Any, **kw: Any) -> Any:
            nonlocal reads
            reads += 1
            return await find_events(*args, **kw)

        store_obj.find_events = counted
        began = time.perf_counter()
        for i in range(runs):
            await app.publish("t.m", {"order": i, "pad": "x" * 100})
            await asyncio.sleep(1 / rate)
        for handle in handles:
            await handle.result(timeout=3600)
        return {"seconds": round(time.perf_counter() - began, 2), "find_events": reads,
                "floor_seconds": round(runs / rate, 2)}


async def loop(store: str, name: str, waits: int, gap: float) -> dict[str, Any]:
    app = App(name, store=store)
    halfway, first = asyncio.Event(), waits // 2 if gap else 0

    @app.workflow
    async def entity(ctx: cantata.WorkflowContext, n: int) -> int:
        total = 0
        for _ in range(n):
            event = await ctx.wait_for_event("t.tick", match={"who": "a"})
            total += int(event.data["v"])
            if total >= first:
                halfway.set()
        return total

    async def send(count: int) -> None:
        for _ in range(count):
            await app.publish("t.tick", {"who": "a", "v": 1})
            await app.publish("t.tick", {"who": "b", "v": 1})

    out: dict[str, Any] = {}
    async with app:
        handle = await app.start(entity, waits)
        began = time.perf_counter()
        if first:
            # Half of them, then a pause: the second half's waits are those of a run
            # older than a minute (a floor's margin), behind the first half's events.
            await send(first)
            await halfway.wait()
            out["first_half_seconds"] = round(time.perf_counter() - began, 2)
            await asyncio.sleep(gap)
            began = time.perf_counter()
        await send(waits - first)
        out["publish_seconds"] = round(time.perf_counter() - began, 2)
        assert await handle.result(timeout=3600) == waits
    out["seconds"] = round(time.perf_counter() - began, 2)
    return out


async def main(a: argparse.Namespace) -> None:
    name = f"bench_waits_{uuid.uuid4().hex[:8]}"
    schema = None
    if a.store == "sqlite":
        store = f"sqlite:///{tempfile.mkdtemp(prefix='cantata-waits-')}/waits.db"
    else:
        schema = name
        store = f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}"
    try:
        if a.mode == "backlog":
            got = await backlog(store, name, a.runs or 1000, a.events)
        elif a.mode == "loop":
            got = await loop(store, name, a.waits, a.gap)
        else:
            got = await in_memory(store, name, a.runs or 300, a.rate)
    finally:
        if schema is not None:
            await drop_schema(schema)
    emit(system="cantata-waits", mode=a.mode, store=a.store, runs=a.runs, events=a.events,
         rate=a.rate, waits=a.waits, gap=a.gap, **got)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.waits", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["backlog", "memory", "loop"])
    parser.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--runs", type=int, default=0, help="default 1000 / 300")
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--waits", type=int, default=2000)
    parser.add_argument("--gap", type=float, default=0.0,
                        help="loop: a pause after half of the waits (61: past a minute)")
    asyncio.run(main(parser.parse_args()))
