"""News of events wakes only the in-memory waits it may end (engine/event_waits.py).

Waking every wait of a type for every event (and, on a store's notification, every
wait of every type) made each event cost a look per waiting run: 300 runs waiting
for their own keyed event took 63 s to be sent their 300 events at 100 a second,
~100 store reads per event.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cantata import App, WorkflowContext
from cantata.engine.event_waits import EventWaits, Wants
from cantata.model.event import Event, match_data
from tests.helpers import with_schema

from .helpers import make_app


class _Waiting:
    """What EventWaits wakes: an execution's ``wakeup``."""

    def __init__(self) -> None:
        self.wakeup = asyncio.Event()


# (no NaN: an event's data is JSON, which has none, and a publish refuses it)
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 3),
                     st.sampled_from([0.0, 1.0, -2.0, 1.5]), st.sampled_from(["a", "b", "1"]))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=2)
                       | st.dictionaries(st.sampled_from(["x", "y"]), inner, max_size=2),
                       max_leaves=4)
_keys = st.sampled_from(["a", "b", "a.x", "a.y"])
_datas = st.one_of(st.dictionaries(st.sampled_from(["a", "b", "c"]), _values, max_size=3),
                   _values)


@settings(max_examples=300, deadline=None)
@given(matches=st.lists(st.dictionaries(_keys, _values, max_size=2), min_size=1, max_size=4),
       datas=st.lists(_datas, max_size=4))
def test_news_wakes_exactly_the_waits_an_event_matches(
    matches: list[dict[str, Any]], datas: list[Any]
) -> None:
    """As ``ctx.wait_for_event`` compares (match_data): a wait is woken if one of the
    events matches it, and only then (1 and 1.0 and True alike; a list or mapping
    compared as a value)."""
    waits = EventWaits()
    waiting = [_Waiting() for _ in matches]
    for w, match in zip(waiting, matches, strict=True):
        waits.add("t", w, Wants(match))  # type: ignore[arg-type]
    events = [Event(type="t", data=d) for d in datas]
    waits.wake("t", events)
    for w, match in zip(waiting, matches, strict=True):
        assert w.wakeup.is_set() == any(match_data(e.data, match) for e in events), (
            match, datas)
    for w, match in zip(waiting, matches, strict=True):
        waits.remove("t", w, Wants(match))  # type: ignore[arg-type]
    assert not waits and waits.waiting("t") == 0


def test_two_waits_of_one_run_for_the_same_event_are_both_registered() -> None:
    """A run waits twice for the same match (asyncio.gather): one wait ending leaves
    the other registered, woken by its event."""
    waits, run = EventWaits(), _Waiting()
    for _ in range(2):
        waits.add("t", run, Wants({"k": [1]}))  # type: ignore[arg-type]
        waits.add("t", run, Wants({"k": 1}))  # type: ignore[arg-type]
    waits.remove("t", run, Wants({"k": [1]}))  # type: ignore[arg-type]
    waits.remove("t", run, Wants({"k": 1}))  # type: ignore[arg-type]
    assert waits.waiting("t") == 1
    waits.wake("t", [Event(type="t", data={"k": 1.0})])
    assert run.wakeup.is_set()
    run.wakeup.clear()
    waits.wake("t", [Event(type="t", data={"k": [1]})])
    assert run.wakeup.is_set()
    waits.remove("t", run, Wants({"k": [1]}))  # type: ignore[arg-type]
    waits.remove("t", run, Wants({"k": 1}))  # type: ignore[arg-type]
    assert not waits


def test_a_wait_by_event_id_or_for_any_event_and_news_without_events() -> None:
    waits = EventWaits()
    by_id, anyone, keyed = _Waiting(), _Waiting(), _Waiting()
    waits.add("t", by_id, Wants(event_id="e-2"))  # type: ignore[arg-type]
    waits.add("t", anyone, Wants())  # type: ignore[arg-type]
    waits.add("t", keyed, Wants({"k": 1}))  # type: ignore[arg-type]
    waits.wake("t", [Event(type="t", data={"k": 2}, id="e-1")])
    assert (by_id.wakeup.is_set(), anyone.wakeup.is_set(), keyed.wakeup.is_set()) == (
        False, True, False)
    waits.wake("t", [Event(type="t", data={"k": 2}, id="e-2")])
    assert by_id.wakeup.is_set() and not keyed.wakeup.is_set()
    waits.wake("t", None)  # (a read that may have left events out)
    assert keyed.wakeup.is_set()
    waits.remove("t", keyed, Wants({"k": 1}))  # type: ignore[arg-type]
    waits.remove("t", by_id, Wants(event_id="e-2"))  # type: ignore[arg-type]
    waits.remove("t", anyone, Wants())  # type: ignore[arg-type]
    assert not waits


def _build(url: str, **kw: Any) -> App:
    app = make_app(url, "waits", **kw)

    @app.workflow
    async def waits_for(ctx: WorkflowContext, key: int) -> int:
        event = await ctx.wait_for_event("order.paid", match={"order": key})
        return int(event.data["order"])

    return app


def _count_reads(app: App) -> dict[str, int]:
    store: Any = app.store
    counted = {"reads": 0}
    find_events = store.find_events

    async def counting(*args: Any, **kw: Any) -> Any:
        counted["reads"] += 1
        return await find_events(*args, **kw)

    store.find_events = counting
    return counted


async def _wait_in_memory(app: App, n: int) -> list[Any]:
    handles = [await app.start("waits_for", i) for i in range(n)]
    # every run in its wait (its first look made), none parked (park_after 60 s)
    deadline = time.monotonic() + 20
    while app.engine.event_waits.waiting("order.paid") < n:
        assert time.monotonic() < deadline, "the runs never all waited"
        await asyncio.sleep(0.05)
    return handles


async def test_an_event_published_here_wakes_only_its_wait(sqlite_url: str) -> None:
    """60 runs wait in memory for their own event; each event published in this
    process wakes its run alone (the store's notification of the commit only has the
    watch loop read what came: one read for the type), not all 60 to look again."""
    n = 60
    async with _build(sqlite_url, poll_interval=0.2) as app:
        handles = await _wait_in_memory(app, n)
        counted = _count_reads(app)
        for i in range(n):
            await app.publish("order.paid", {"order": i})
            await asyncio.sleep(0.01)
        assert [await h.result(timeout=30) for h in handles] == list(range(n))
    # each event: its wait's look, and the watch loop's read of the type (fewer when
    # reads gather events); every wait looking at every event was ~n per event
    assert counted["reads"] <= 3 * n, counted


@pytest.mark.postgres
async def test_another_processs_event_wakes_its_wait_at_once(
    postgres_url: str, pooled_schema: str
) -> None:
    """On PostgreSQL a worker hears that another process committed events, not which:
    its watch loop reads the new events of the waited types at once and wakes the
    waits they match, within a poll interval of 5 s by far, and the other waits are
    not woken to look."""
    url = with_schema(postgres_url, pooled_schema)
    n = 30
    client = _build(url, poll_interval=5.0)
    await client.open(serve=False)
    try:
        async with _build(url, poll_interval=5.0) as app:
            handles = await _wait_in_memory(app, n)
            counted = _count_reads(app)
            took = []
            for i, h in enumerate(handles):
                began = time.monotonic()
                await client.publish("order.paid", {"order": i})
                assert await h.result(timeout=10) == i
                took.append(time.monotonic() - began)
        assert max(took) < 2.5, took
        assert counted["reads"] <= 4 * n, counted
    finally:
        await client.close()

