"""Where a chain's latency goes, hop by hop (docs/performance.md).

    python -m bench.chain_breakdown --store sqlite|postgres --broker nats|embedded [--n 100]

Runs the latency workload of ``bench.cantata_scenario`` (one order at a time) with the
store's and broker's delivery operations wrapped in timers, then prints, per hop (an
event committed -> the next group's handler committed), the median time of each stage:

- ``commit``: the transaction that stored the event (``append_events`` for the first
  event, the previous handler's ``settle_delivery`` otherwise);
- ``to publish``: commit -> the relay starts publishing it (NATS only: the relay's wake
  up and its ``unpublished_events`` read);
- ``publish ack``: the JetStream publish round trip;
- ``to receive``: publish acked (embedded, or handed off in the process: commit) -> the
  consumer has the message (NATS: the pull; embedded: the claim; local: the hand-off).

An event whose deliveries this worker held as it was stored reaches its handler by the
hand-off, and the relay publishes its copy later, off the chain's path: such events are
counted on their own line, and their publish stages are not in the hop's rows.
- ``to handler``: received -> the handler starts (NATS: the store's delivery lookup);
- ``handler``: the handler body;
- ``settle``: the handler's ``settle_delivery`` (its commit; the next hop's ``commit``).

A measuring tool, not a benchmark: the wrappers cost a few microseconds each.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from bench.common import BENCH_PREFIX, NATS_URL, PG_URL

T: dict[str, dict[str, float]] = defaultdict(dict)  # event id -> stage -> time


def _mark(event_id: str, stage: str) -> None:
    T[event_id].setdefault(stage, time.perf_counter())


def _mark_all(events: Iterable[Any], stage: str) -> None:
    for e in events:
        _mark(e.id, stage)


def _wrap(obj: Any, name: str, before: Any = None, after: Any = None) -> None:
    fn = getattr(obj, name)

    async def wrapped(*args: Any, **kw: Any) -> Any:
        if before:
            before(*args, **kw)
        out = await fn(*args, **kw)
        if after:
            after(out, *args, **kw)
        return out

    setattr(obj, name, wrapped)


def instrument(app: Any) -> None:
    from cantata.broker import nats_consumer
    from cantata.choreography import consumer

    store = app.store
    _wrap(store, "append_events",
          before=lambda _app, evs: _mark_all(evs, "commit_start"),
          after=lambda _o, _app, evs: _mark_all(evs, "committed"))

    _wrap(store, "append_held",  # (NATS: a published event this worker handles itself)
          before=lambda _app, evs, **k: _mark_all(evs, "commit_start"),
          after=lambda _o, _app, evs, **k: _mark_all(evs, "committed"))

    def settle_before(_app: str, _g: str, eid: str, s: Any) -> None:
        _mark(eid, "settle_start")
        for e in s.events:
            _mark(e.id, "commit_start")

    def settle_after(_o: Any, _app: str, _g: str, eid: str, s: Any) -> None:
        _mark(eid, "settled")
        for e in s.events:
            _mark(e.id, "committed")

    _wrap(store, "settle_delivery", before=settle_before, after=settle_after)
    broker = app._broker
    if broker.relays_outbox:
        _wrap(broker, "publish",
              before=lambda _app, evs, **k: _mark_all(evs, "publish_start"),
              after=lambda _o, _app, evs, **k: _mark_all(evs, "published"))
        init = nats_consumer.NatsMessage.__init__

        def msg_init(self: Any, *a: Any, **k: Any) -> None:
            init(self, *a, **k)
            if self.event is not None:
                _mark(self.event.id, "received")

        nats_consumer.NatsMessage.__init__ = msg_init  # type: ignore[method-assign]
    else:
        _wrap(store, "claim_deliveries",
              after=lambda out, *a, **k: _mark_all((d.event for d in out), "received"))
    run = consumer.Consumer._invoke

    async def invoke(self: Any, hdef: Any, msg: Any, event: Any, ctx: Any, retry: Any) -> Any:
        _mark(event.id, "received")  # a local hand-off has no broker receive
        _mark(event.id, "handler_start")
        return await run(self, hdef, msg, event, ctx, retry)

    consumer.Consumer._invoke = invoke  # type: ignore[method-assign]


STAGES = [
    ("commit", "commit_start", "committed"),
    ("to publish", "committed", "publish_start"),
    ("publish ack", "publish_start", "published"),
    ("to receive", None, "received"),
    ("to handler", "received", "handler_start"),
    ("handler", "handler_start", "settle_start"),
    ("settle", "settle_start", "settled"),
    ("hop total", "commit_start", "settled"),
]


def report(ids: list[str]) -> str:
    rows = defaultdict(list)
    local = 0
    for eid in ids:
        t = T.get(eid, {})
        # handed off in the process before the relay published it: publishing is off path
        handed = "received" in t and t.get("publish_start", float("inf")) > t["received"]
        local += handed
        for name, a, b in STAGES:
            if handed and name in ("to publish", "publish ack"):
                continue
            if a is None:
                a = "published" if "published" in t and not handed else "committed"
            if a in t and b in t:
                rows[name].append((t[b] - t[a]) * 1000)
    out = [f"events handed off in the process (publish off the path): {local} of {len(ids)}",
           "stage            median ms   p90 ms   n"]
    for name, _, _ in STAGES:
        v = sorted(rows.get(name, []))
        if v:
            out.append(f"{name:<16} {statistics.median(v):9.3f} {v[int(0.9 * (len(v) - 1))]:8.3f}"
                       f" {len(v):4d}")
    return "\n".join(out)


async def open_chain(a: argparse.Namespace, tag: str) -> tuple[Any, str]:
    """The chain scenario's app on ``a.store`` and ``a.broker``, serving, and its name
    (a fresh SQLite file, PostgreSQL schema or NATS stream: see :func:`close_chain`)."""
    from bench.cantata_app import make_app

    tmp = tempfile.mkdtemp(prefix=f"cantata-{tag}-")
    name = f"bench_{tag}_{uuid.uuid4().hex[:8]}"
    sep = "&" if "?" in PG_URL else "?"
    store = f"sqlite:///{tmp}/b.db" if a.store == "sqlite" else f"{PG_URL}{sep}schema={name}"
    broker = f"{NATS_URL}?prefix={BENCH_PREFIX}" if a.broker == "nats" else "embedded"
    app = make_app("chain", store, broker, name)
    await app.open(serve=True)
    return app, name


async def close_chain(app: Any, a: argparse.Namespace, name: str) -> None:
    """Close :func:`open_chain`'s app and drop its PostgreSQL schema and NATS stream."""
    from bench.common import drop_schema

    await app.close()
    if a.store == "postgres":
        await drop_schema(name)
    if a.broker == "nats":
        from bench.cantata_scenario import _drop_stream

        await _drop_stream(name)


async def main_async(a: argparse.Namespace) -> None:
    from bench.cantata_app import TERMINAL
    from cantata import Hook

    app, name = await open_chain(a, "bd")
    instrument(app)
    hop_ids: list[str] = []
    totals = []
    ended: dict[int, asyncio.Future[None]] = {}
    emitted: list[Any] = []  # this order's events, as their handlers' settlements commit

    class Ends(Hook):
        """An order ends when its terminal event's settlement commits (as in
        bench.cantata_scenario: no store read, no wait for a notification)."""

        def emitted(self, events: Any, origin: str) -> None:
            for e in events:
                emitted.append(e)
                if e.type in TERMINAL:
                    fut = ended.get(e.data.get("order"))
                    if fut is not None and not fut.done():
                        fut.set_result(None)

    app.add_hook(Ends())
    try:
        for order in range(1, a.n + 1):
            emitted.clear()
            fut = ended[order] = asyncio.get_running_loop().create_future()
            t0 = time.perf_counter()
            ev = await app.publish("order.placed", {"order": order})
            await asyncio.wait_for(fut, 30)
            totals.append((time.perf_counter() - t0) * 1000)
            del ended[order]
            if order > 10:  # after a warm-up; a terminal event has no handler: no hop
                hop_ids.append(ev.id)
                hop_ids.extend(e.id for e in emitted if e.type not in TERMINAL and e.id != ev.id)
    finally:
        await close_chain(app, a, name)
    print(f"{a.store}+{a.broker}: end-to-end p50 {statistics.median(totals):.3f} ms "
          f"over {len(totals)} orders (3 hops each)")
    print(report(hop_ids))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--broker", choices=["embedded", "nats"], default="nats")
    ap.add_argument("--n", type=int, default=100)
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
