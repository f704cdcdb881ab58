"""Huge and deep transactions: the trace stays bounded, fast, and still finds the stalls."""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from cantata import Event
from cantata.model import codec
from cantata.model.records import Declaration
from cantata.observability.bound import MAX_DEPTH
from cantata.observability.stalled import stalls_of
from cantata.observability.trace import MAX_NODES, TraceNode, build_trace, render_timeline
from cantata.store.base import Settlement
from tests.helpers import make_app

APP = "shop"


def handler(group: str, pattern: str, name: str, emits: list[str]) -> Declaration:
    return Declaration("handler", group, pattern, None,
                       codec.dumps({"handler": name, "emits": emits}))


def depth(node: TraceNode) -> int:
    deepest, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in n.children)
    return deepest


def rendered_lines(root: TraceNode) -> list[str]:
    out = io.StringIO()
    Console(file=out, width=140, color_system=None).print(render_timeline(root))
    return out.getvalue().splitlines()


async def test_ten_thousand_events_are_summarised(tmp_path: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path}/big.db")
    async with app.client():
        store = app.store
        await store.declare(APP, [
            handler("fanout", "bulk.start", "fan_out", ["bulk.item"]),
            handler("sink", "bulk.item", "sink", []),
        ])
        root_event: Event[dict[str, Any]] = Event(type="bulk.start", data={},
                                                  source=f"cantata/{APP}")
        root_event = dataclasses.replace(root_event, correlation_id=root_event.id)
        await store.append_events(APP, [root_event])
        items = [
            Event(type="bulk.item", data={"i": i}, source=f"cantata/{APP}/fanout",
                  correlation_id=root_event.id, causation_id=root_event.id)
            for i in range(9_999)
        ]
        # the fanout handler emitted 9 999 events in one transaction; nobody sinks them
        assert await store.settle_delivery(APP, "fanout", root_event.id,
                                           Settlement("done", 1, events=items))

        started = time.perf_counter()
        root = await build_trace(store, APP, root_event.id)
        took = time.perf_counter() - started
        partial = await build_trace(store, APP, root_event.id, limit=500)

    notice = partial.children[-1]
    assert notice.ref == "truncated" and "beyond the first 500" in notice.name
    assert took < 5.0, f"build_trace took {took:.2f} s"
    nodes = list(root.walk())
    assert len(nodes) <= MAX_NODES + 100
    [fanout] = root.children  # no truncation notice: all 10 000 records were read
    assert (fanout.kind, fanout.group, fanout.status) == ("handler", "fanout", "completed")
    summaries = [c for c in fanout.children if c.elided]
    assert len(summaries) == 1
    assert summaries[0].name.startswith("… 9 9") and "more events" in summaries[0].name
    shown = [c for c in fanout.children if not c.elided]
    assert len(shown) + summaries[0].elided // 2 == 9_999

    started = time.perf_counter()
    lines = rendered_lines(root)
    assert time.perf_counter() - started < 5.0
    assert len(lines) < 400
    assert any("more events" in line for line in lines)

    stalls = stalls_of(root, 0, time.time() + 1)
    assert stalls and {(s.reason, s.node.group) for s in stalls} == {("unhandled_event", "sink")}


async def test_a_very_deep_causal_chain_is_cut_not_crashed() -> None:
    app = make_app("memory://")
    async with app.client():
        store = app.store
        await store.declare(APP, [handler("relay", "chain.link", "relay", ["chain.link"])])
        first = Event(type="chain.link", data={"n": 0}, source=f"cantata/{APP}")
        first = dataclasses.replace(first, correlation_id=first.id)
        chain = [first]
        for n in range(1, 3_000):
            chain.append(Event(type="chain.link", data={"n": n}, source=f"cantata/{APP}/relay",
                               correlation_id=first.id, causation_id=chain[-1].id))
        await store.append_events(APP, chain)
        root = await build_trace(store, APP, first.id)

    assert depth(root) <= MAX_DEPTH + 1
    cut = [n for n in root.walk() if n.elided]
    assert len(cut) == 1 and "deeper than the trace shows" in cut[0].name
    assert len(rendered_lines(root)) < 200
    # every relay delivery is still pending, including those below the cut
    stalls = stalls_of(root, 0, time.time() + 1)
    assert len(stalls) == 3_000
    assert {s.node.group for s in stalls} == {"relay"}


async def test_records_that_cause_each_other_do_not_loop() -> None:
    app = make_app("memory://")
    async with app.client():
        a: Event[dict[str, Any]] = Event(type="x.a", data={}, id="a", source=f"cantata/{APP}",
                                         correlation_id="loop", causation_id="b")
        b: Event[dict[str, Any]] = Event(type="x.b", data={}, id="b", source=f"cantata/{APP}",
                                         correlation_id="loop", causation_id="a")
        await app.store.append_events(APP, [a, b])
        root = await build_trace(app.store, APP, "loop")
    assert sorted(n.ref or "" for n in root.walk()) == ["a", "b"]
