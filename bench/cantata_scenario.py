"""One Cantata scenario in this process (the runner starts one process per scenario).

    python -m bench.cantata_scenario saga|chain throughput|latency \
        --store sqlite|postgres --broker embedded|nats [--n N]

- saga throughput: ``app.start`` N runs at once (``asyncio.gather``: the caller does not
  wait for one start before the next, which is how an asyncio service submits work),
  then await every result. ``--submit loop`` awaits each ``app.start`` before the next
  instead, as the DBOS peer's loop of ``DBOS.start_workflow`` does (a start returns once
  the run is durably stored, so that loop is bound by one commit round trip per start).
- saga latency: N runs one after another, each awaited (after 20 warm-up runs).
- chain throughput: publish N ``order.placed`` at once (``--submit loop``: one after
  another), then wait until the handlers of this
  process have completed 3 N deliveries (each completion commits before it counts), and
  check in the store that N terminal events (``shipment.created`` or
  ``inventory.released``) are there with the right split.
- chain latency: publish one ``order.placed``, wait until its terminal event is in the
  store (woken by the store's commit notifications, looked up with ``find_events``).

Fresh state every time: a new SQLite file in a temporary folder, or a new PostgreSQL
schema (dropped at the end, as is the NATS stream).

``--processes N``: this process only submits and counts, and
``cantata worker --processes N`` serves (bench/workers.py): the saga's runs and the
chain's terminal events are counted in the store (the results and handlers are in the
workers), and the result adds each worker process's CPU use.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from typing import Any

from bench.common import (
    BENCH_PREFIX,
    LATENCY_N,
    NATS_URL,
    PG_DURABILITY,
    PG_URL,
    SQLITE_DURABILITY,
    THROUGHPUT_N,
    WARMUP,
    count_outcomes,
    cpu_counts,
    cpu_seconds,
    current_cpu,
    drop_schema,
    emit,
    expected_outcomes,
    latency_summary,
    max_rss_mb,
    now,
    sched_since,
    sched_waits,
    throughput_summary,
    unavailable,
)
from bench.workers import Workers

RESULT_TIMEOUT = 300.0


def _durability(store: str, broker: str) -> str:
    d = SQLITE_DURABILITY if store == "sqlite" else PG_DURABILITY
    if broker == "nats":
        d += "; NATS JetStream file store (server default sync: every 2 min)"
    return d


async def _until(done: Any, what: str) -> None:
    """Poll ``done()`` (a coroutine function) every 10 ms until true."""
    deadline = now() + RESULT_TIMEOUT
    while not await done():
        if now() > deadline:
            raise TimeoutError(f"{what} after {RESULT_TIMEOUT} s")
        await asyncio.sleep(0.01)


def _worker_cpu(a: argparse.Namespace, since: dict[int, float] | None,
                wall: float) -> dict[str, Any]:
    """Each worker process's CPU use over the measurement (``since``: at its start)."""
    if a.workers is None or since is None:
        return {}
    used = a.workers.cpu()
    return {"worker_cpu_util": [round((used[p] - since.get(p, 0.0)) / wall, 3)
                                for p in used]}


async def _ended_runs(app: Any) -> dict[str, int]:
    counts = await app.store.count_runs(app.name)
    return {"completed": counts.get("completed", 0),
            "compensated": counts.get("compensated", 0)}


_ENDS_BY_WORKER = (
    "SELECT actor, count(*) FROM {audit} WHERE app = {p1} AND action = 'run.status' "
    "AND (data LIKE '%\"status\":\"completed\"%' OR data LIKE '%\"status\":\"compensated\"%') "
    "GROUP BY actor")


async def _ends_by_worker(a: argparse.Namespace, app_name: str) -> dict[str, int]:
    """Runs each worker ended so far (its final checkpoint's audit record names it): how
    evenly ``--processes N`` shares a burst (docs/performance.md, "All cores")."""
    if a.store == "sqlite":
        def count() -> dict[str, int]:
            c = sqlite3.connect(f"file:{a.db_path}?mode=ro", uri=True)
            try:
                sql = _ENDS_BY_WORKER.format(audit="audit", p1="?")
                return {str(r[0]): int(r[1]) for r in c.execute(sql, (app_name,))}
            finally:
                c.close()

        return await asyncio.to_thread(count)
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        sql = _ENDS_BY_WORKER.format(audit=f'"{a.schema}".audit', p1="$1")
        return {str(r[0]): int(r[1]) for r in await conn.fetch(sql, app_name)}
    finally:
        await conn.close()


async def _saga(app: Any, a: argparse.Namespace) -> dict[str, Any]:
    from bench.cantata_app import order_saga
    from cantata import WorkflowCompensated

    async def outcome(handle: Any) -> str:
        try:
            value = await handle.result(timeout=RESULT_TIMEOUT)
        except WorkflowCompensated:
            return "compensated"
        return str(value)

    for o in WARMUP:
        await outcome(await app.start(order_saga, o))
    orders = list(range(1, a.n + 1))
    if a.workload == "throughput":
        wcpu0 = a.workers.cpu() if a.workers is not None else None
        ends0 = await _ends_by_worker(a, app.name) if a.workers is not None else {}
        share: dict[str, Any] = {}
        cpu0, t0 = cpu_seconds(), now()
        if a.submit == "loop":
            handles = [await app.start(order_saga, o) for o in orders]
        else:
            handles = await asyncio.gather(*(app.start(order_saga, o) for o in orders))
        t_sub = now() - t0
        if a.workers is None:
            outs = [await outcome(h) for h in handles]
            got = count_outcomes(outs)
        else:  # the runs end in the workers: count them in the store
            before = expected_outcomes(WARMUP)

            async def all_ended() -> bool:
                return bool(sum((await _ended_runs(app)).values()) >= len(WARMUP) + a.n)

            await _until(all_ended, "not every run ended")
            ended = await _ended_runs(app)
            got = {k: ended[k] - before[k] for k in ended}
            by_worker = await _ends_by_worker(a, app.name)
            ends = {w: n - ends0.get(w, 0) for w, n in by_worker.items()}
            share = {"ended_by_worker": sorted(ends.values(), reverse=True)}
        wall = now() - t0
        cpu = cpu_seconds() - cpu0
        return {**throughput_summary(a.n, wall), "submit_s": round(t_sub, 3),
                "cpu_s": round(cpu, 3), "cpu_util": round(cpu / wall, 3),
                **_worker_cpu(a, wcpu0, wall), **share,
                "outcomes": got, "expected": expected_outcomes(orders)}
    lat, outs, cpus = [], [], []
    waits = sched_waits()
    cpu0, t_all = cpu_seconds(), now()
    for o in orders:
        t0 = now()
        outs.append(await outcome(await app.start(order_saga, o)))
        lat.append(now() - t0)
        cpus.append(current_cpu())  # (after the order's time is taken)
    wall = now() - t_all
    cpu = cpu_seconds() - cpu0
    return {**latency_summary(lat), "cpu_util": round(cpu / wall, 3), **sched_since(waits),
            "cpus": cpu_counts(cpus),
            "outcomes": count_outcomes(outs), "expected": expected_outcomes(orders)}


# The chain's orders awaited by number: their terminal events resolve these, through the
# ``Ends`` hook or, with ``--end handler``, the driver's own handlers (``add_end_handlers``).
ENDED: dict[int, asyncio.Future[None]] = {}


def add_end_handlers(app: Any) -> None:
    """``--end handler``: the driver sees an order's end as a user of the public API
    would, with a handler of a group of its own for each terminal event (one more
    delivery and settlement per order than the hook, which sees the terminal event as its
    emitter's settlement commits it)."""
    from bench.cantata_app import TERMINAL

    async def end(event: Any) -> None:
        fut = ENDED.get(event.data.get("order"))
        if fut is not None and not fut.done():
            fut.set_result(None)

    for t in TERMINAL:
        app.on(t, group="driver")(end)


async def _chain(app: Any, a: argparse.Namespace) -> dict[str, Any]:
    from bench.cantata_app import HANDLERS_PER_ORDER, TERMINAL, terminal_type
    from cantata import Hook

    store = app.store
    woke = asyncio.Event()
    store.add_listener(lambda channel: woke.set())

    async def terminal_of(order: int, since: float) -> bool:
        evs = await store.find_events(app.name, terminal_type(order), since=since, exclude=[],
                                      limit=50)
        return any(e.data.get("order") == order for e in evs)

    ended = ENDED
    terminal = set(TERMINAL)

    class Ends(Hook):
        """The terminal events as their handler's settlement commits them (in-process
        workers): the end of an order, seen without a store read."""

        def emitted(self, events: Any, origin: str) -> None:
            for e in events:
                if e.type in terminal:
                    fut = ended.get(e.data.get("order"))
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    if a.workers is None and a.end == "hook":
        app.add_hook(Ends())

    async def one(order: int) -> None:
        if a.workers is None:
            fut = ended[order] = asyncio.get_running_loop().create_future()
            await app.publish("order.placed", {"order": order})
            try:
                await asyncio.wait_for(fut, RESULT_TIMEOUT)
            except TimeoutError:
                raise TimeoutError(
                    f"order {order}: no terminal event in {RESULT_TIMEOUT} s") from None
            finally:
                del ended[order]
            return
        since = time.time()
        await app.publish("order.placed", {"order": order})
        deadline = now() + RESULT_TIMEOUT
        while True:
            woke.clear()
            if await terminal_of(order, since):
                return
            if now() > deadline:
                raise TimeoutError(f"order {order}: no terminal event in {RESULT_TIMEOUT} s")
            with contextlib.suppress(TimeoutError):
                # Workers in other processes: a SQLite commit of theirs wakes nothing here.
                await asyncio.wait_for(woke.wait(), 0.05 if a.workers is None else 0.002)

    async def outcomes_since(since: float, orders: list[int]) -> dict[str, Any]:
        got: dict[str, int] = {}
        wanted = set(orders)
        for t in TERMINAL:
            evs = await store.find_events(app.name, t, since=since, exclude=[],
                                          limit=10 * len(orders) + 100)
            got[t] = len({e.data["order"] for e in evs if e.data.get("order") in wanted})
        return {"completed": got["shipment.created"], "compensated": got["inventory.released"]}

    for o in WARMUP:
        await one(o)
    orders = list(range(1, a.n + 1))
    if a.workload == "throughput":
        base = app.metrics.handled
        target = base + (HANDLERS_PER_ORDER + (a.end == "handler")) * a.n
        since = time.time()
        # the warm-up's terminal events, counted before the orders go out: the workers
        # may end some of them while the rest are still being published
        warm = await _terminal_count(a, app.name) if a.workers is not None else 0
        wcpu0 = a.workers.cpu() if a.workers is not None else None
        cpu0, t0 = cpu_seconds(), now()
        if a.submit == "loop":
            for o in orders:
                await app.publish("order.placed", {"order": o})
        else:  # at once, as the FastStream peer's driver does
            await asyncio.gather(*(app.publish("order.placed", {"order": o}) for o in orders))
        t_sub = now() - t0
        deadline = t0 + RESULT_TIMEOUT
        if a.workers is not None:  # the handlers run in the workers: count in the store
            async def all_ended() -> bool:
                return bool(await _terminal_count(a, app.name) >= warm + a.n)

            await _until(all_ended, "not every order reached its terminal event")
            target = app.metrics.handled  # nothing to wait for here
        while app.metrics.handled < target:
            if now() > deadline:
                raise TimeoutError(
                    f"only {app.metrics.handled - base} of {target - base} handler completions "
                    f"after {RESULT_TIMEOUT} s"
                )
            woke.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woke.wait(), 0.005)
        wall = now() - t0
        cpu = cpu_seconds() - cpu0
        res = {**throughput_summary(a.n, wall), "events_per_s": round(4 * a.n / wall, 2),
               "submit_s": round(t_sub, 3), "cpu_s": round(cpu, 3),
               "cpu_util": round(cpu / wall, 3), **_worker_cpu(a, wcpu0, wall)}
    else:
        lat, cpus = [], []
        since = time.time()
        cpu0, t_all = cpu_seconds(), now()
        for o in orders:
            t0 = now()
            await one(o)
            lat.append(now() - t0)
            cpus.append(current_cpu())  # (after the order's time is taken)
        cpu = cpu_seconds() - cpu0
        res = {**latency_summary(lat), "cpu_util": round(cpu / (now() - t_all), 3),
               "cpus": cpu_counts(cpus)}
    res["outcomes"] = await outcomes_since(since, orders)
    res["expected"] = expected_outcomes(orders)
    return res


async def _terminal_count(a: argparse.Namespace, app_name: str) -> int:
    """Terminal events of the chain in the store (one indexed count)."""
    from bench.cantata_app import TERMINAL

    if a.store == "sqlite":
        def count() -> int:
            c = sqlite3.connect(f"file:{a.db_path}?mode=ro", uri=True)
            try:
                return int(c.execute(
                    "SELECT count(*) FROM events WHERE app = ? AND type IN (?, ?)",
                    (app_name, *TERMINAL)).fetchone()[0])
            finally:
                c.close()

        return await asyncio.to_thread(count)
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        n = await conn.fetchval(
            f'SELECT count(*) FROM "{a.schema}".events WHERE app = $1 AND type = ANY($2)',
            app_name, list(TERMINAL))
    finally:
        await conn.close()
    return int(n)


async def _drop_stream(app_name: str) -> None:
    import nats

    from cantata.broker.nats_names import Names

    nc = await nats.connect(NATS_URL)
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(Names(app_name, BENCH_PREFIX).stream)
    finally:
        await nc.close()


async def main_async(a: argparse.Namespace) -> None:
    from bench.cantata_app import make_app

    tmp = tempfile.mkdtemp(prefix="cantata-bench-")
    name = f"bench_{a.kind}_{uuid.uuid4().hex[:10]}"
    schema = name  # PostgreSQL: a schema of its own, dropped at the end (a fresh database)
    sep = "&" if "?" in PG_URL else "?"
    store = f"sqlite:///{tmp}/bench.db" if a.store == "sqlite" else f"{PG_URL}{sep}schema={schema}"
    broker = "embedded" if a.broker == "embedded" else f"{NATS_URL}?prefix={BENCH_PREFIX}"
    a.db_path, a.schema, a.workers = f"{tmp}/bench.db", schema, None
    # A client of worker processes looks for its runs' ends often (its own poll).
    app = make_app(a.kind, store, broker, name,
                   poll_interval=0.005 if a.processes else 0.2)
    if a.kind == "chain" and a.end == "handler":
        add_end_handlers(app)
    try:
        try:
            await app.open(serve=not a.processes)
        except Exception as exc:
            unavailable(f"cannot open {a.store} store + {a.broker} broker: "
                        f"{type(exc).__name__}: {exc}")
        try:
            async with contextlib.AsyncExitStack() as stack:
                if a.processes:
                    a.workers = await stack.enter_async_context(
                        Workers(a.kind, store, broker, name, a.processes, a.max_runs))
                res = await (_saga(app, a) if a.kind == "saga" else _chain(app, a))
                if a.workers is not None:
                    res["processes"] = a.processes
                    if a.max_runs is not None:
                        res["max_runs"] = a.max_runs
            res["orphans"] = sum(app.metrics.orphans.values())
        finally:
            await app.close()
        extra: dict[str, Any] = {}
        if a.store == "sqlite":
            c = sqlite3.connect(f"{tmp}/bench.db")
            extra["sqlite_journal_mode"] = c.execute("PRAGMA journal_mode").fetchone()[0]
            c.close()
        ok = res["outcomes"] == res["expected"]
        emit(system="cantata", scenario=a.kind, variant=f"{a.store}+{a.broker}",
             workload=a.workload, ok=ok, durability=_durability(a.store, a.broker),
             app=name, max_rss_mb=round(max_rss_mb(), 1), **res, **extra)
        if not ok:
            raise SystemExit(f"wrong outcomes: {res['outcomes']} != {res['expected']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if a.store == "postgres":
            with contextlib.suppress(Exception):
                await drop_schema(schema)
        if a.broker == "nats":
            with contextlib.suppress(Exception):
                await _drop_stream(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=["saga", "chain"])
    ap.add_argument("workload", choices=["throughput", "latency"])
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--broker", choices=["embedded", "nats"], default="embedded")
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--end", choices=["hook", "handler"], default="hook",
                    help="chain: see an order's end through a hook on its terminal event's "
                         "settlement (default), or a handler of the driver's own group")
    ap.add_argument("--processes", type=int, default=0,
                    help="serve with `cantata worker --processes N` in other processes "
                         "(0: this process serves, as before)")
    ap.add_argument("--max-runs", type=int, default=None,
                    help="with --processes: `cantata worker --max-runs N` (default: the "
                         "app's max_runs)")
    ap.add_argument("--submit", choices=["at-once", "loop"], default="at-once",
                    help="throughput: start all runs (publish all orders) at once, or one "
                         "after another")
    a = ap.parse_args()
    a.n = a.n or (THROUGHPUT_N if a.workload == "throughput" else LATENCY_N)
    logging.basicConfig(level=os.environ.get("BENCH_LOG", "WARNING"))
    # Compensated runs log at INFO; keep the run quiet unless asked.
    logging.getLogger("cantata").setLevel(os.environ.get("BENCH_LOG", "WARNING"))
    # Nothing consumes the chain's terminal events, so Cantata warns once per event
    # ("orphan event"); they are counted in the result (``orphans``) instead.
    logging.getLogger("cantata.orphans").setLevel(logging.ERROR)
    asyncio.run(main_async(a))


if __name__ == "__main__":
    main()
