"""A run's waits read on from where the last wait of their kind took its event
(engine/wait_look.py), and still take what ``ctx.wait_for_event`` promises: the first
matching event since the run started that no other wait of the run took.

Before the floors, a run looping over ``wait_for_event`` read every event of the type
since it started at each wait: its 2,000th wait on PostgreSQL read 4,000 events and
left out 2,000 ids (52 s for 2,000 waits, 6 ms a wait and growing).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cantata import App, WorkflowContext
from cantata.engine import wait_look
from cantata.model import codec
from cantata.model.event import match_data
from cantata.model.records import EntryKind, EntryStatus, HistoryEntry
from tests.helpers import with_schema

from .helpers import make_app

# A wait: (type, match); events: (type, k).
_MATCHES: list[dict[str, Any] | None] = [None, {"k": 1}, {"k": 2}, {"k": 1.0}]
_waits = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from(_MATCHES)),
                  min_size=1, max_size=8)
_events = st.lists(st.tuples(st.sampled_from(["a", "b"]), st.sampled_from([1, 2, 3])),
                   max_size=10)


def _expected(waits: list[tuple[str, Any]], events: list[tuple[str, int]]
              ) -> tuple[list[int], list[tuple[str, int]]]:
    """What each wait takes (an event's index), the events appended so that every wait
    has one: the first event in publish order of its type that it matches and no
    earlier wait took."""
    events = list(events)
    while True:
        taken: list[int] = []
        for kind, match in waits:
            found = next((i for i, (t, k) in enumerate(events)
                          if i not in taken and kind == t
                          and match_data({"k": k, "n": i}, match)), None)
            if found is None:
                wanted = match["k"] if match else 3
                events.append((kind, int(wanted)))
                break
            taken.append(found)
        else:
            return taken, events


def _build(url: str, **kw: Any) -> App:
    app = make_app(url, "floors", **kw)

    @app.workflow
    async def waits(ctx: WorkflowContext, prefix: str, plan: list[list[Any]]) -> list[int]:
        await ctx.wait_for_event(f"go{prefix}.go")
        got = []
        for kind, match in plan:
            event = await ctx.wait_for_event(f"{prefix}.{kind}", match=match, timeout=20)
            got.append(int(event.data["n"]))
        return got

    return app


def _count_floor_looks(app: App) -> dict[str, int]:
    store: Any = app.store
    counted = {"floor": 0, "full": 0}
    find_events = store.find_events

    async def counting(*args: Any, **kw: Any) -> Any:
        if "match" in kw and args[1] != "gor.go":  # (a wait's look; no trigger here)
            counted["floor" if kw.get("after") is not None else "full"] += 1
        return await find_events(*args, **kw)

    store.find_events = counting
    return counted


@pytest.fixture(params=["memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The stores (their own find_events): memory, a SQLite file, PostgreSQL."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    return with_schema(request.getfixturevalue("postgres_url"),
                       request.getfixturevalue("pooled_schema"))


def test_waits_take_the_first_event_they_match_in_the_log(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Against a model of the promise, on every store: waits of kinds that repeat,
    overlap (``1`` and ``1.0``, none) or not, with their events published before the
    run's waits begin, while they wait, or both; the run kept in memory or parked in
    each wait and resumed from its history. (A worker per example: its loop runs only
    while the example does.)"""
    # (no margin: a floor's read as narrow as it can be; the default minute only adds)
    monkeypatch.setattr(wait_look, "LATE", 0.0)
    counted = {"floor": 0}

    @settings(max_examples=20, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(waits=_waits, events=_events, go_at=st.integers(0, 12), park=st.booleans())
    # (waits of another kind between those of one kind, taking events out of order;
    # parked in each wait and resumed from history, or not)
    @example(waits=[("a", {"k": 2}), ("a", {"k": 1}), ("a", {"k": 1})],
             events=[("a", 1), ("a", 2), ("a", 1)], go_at=0, park=True)
    @example(waits=[("a", {"k": 1}), ("a", None), ("a", {"k": 1})],
             events=[("b", 1), ("a", 2), ("a", 1), ("a", 1)], go_at=2, park=False)
    def check(waits: list[tuple[str, Any]], events: list[tuple[str, int]], go_at: int,
              park: bool) -> None:
        # park: parked at once in each wait, resumed from history (floors from it)
        taken, events = _expected(waits, events)
        go_at = min(go_at, len(events))
        prefix = f"p{uuid.uuid4().hex[:8]}"

        async def one() -> list[int]:
            async with _build(url, **({"park_after": 0.0} if park else {})) as app:
                seen = _count_floor_looks(app)
                handle = await app.start("waits", prefix, [list(w) for w in waits])
                for i, (t, k) in enumerate(events):
                    if i == go_at:
                        await app.publish(f"go{prefix}.go", {})
                    await app.publish(f"{prefix}.{t}", {"k": k, "n": i})
                if go_at == len(events):
                    await app.publish(f"go{prefix}.go", {})
                got = list(await handle.result(timeout=60))
            counted["floor"] += seen["floor"]
            return got

        assert asyncio.run(one()) == taken, (waits, events, go_at, park)

    check()
    assert counted["floor"] > 0  # (the floors were used)


async def test_a_floor_whose_event_was_deleted_reads_from_the_runs_start(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event the last wait of a kind took is gone (deleted by hand): what follows it
    in the log is read from the run's start, not lost."""
    monkeypatch.setattr(wait_look, "LATE", 0.0)
    async with _build(sqlite_url) as app:
        handle = await app.start("waits", "d", [["a", {"k": 1}], ["b", None], ["a", {"k": 1}]])
        for n in (0, 1):
            await app.publish("d.a", {"k": 1, "n": n})
        await app.publish("god.go", {})
        await asyncio.sleep(0.5)  # (the first wait took n=0, the second waits)
        path = sqlite_url.removeprefix("sqlite:///")
        with sqlite3.connect(path) as db:
            deleted = db.execute(
                "DELETE FROM events WHERE type='d.a' AND json_extract(data, '$.n')=0").rowcount
        assert deleted == 1
        await app.publish("d.b", {"n": 2})
        assert await handle.result(timeout=30) == [0, 2, 1]



def _wait(seq: int, status: EntryStatus, started: float, ended: float | None,
          event_id: str | None = None, match: dict[str, Any] | None = None,
          detail: dict[str, Any] | None = None) -> HistoryEntry:
    return HistoryEntry(
        key=f"wait:t.a#{seq}", kind=EntryKind.WAIT, name="t.a", status=status, seq=seq,
        started_at=started, ended_at=ended,
        result=None if event_id is None else codec.dumps({"id": event_id}),
        detail=codec.dumps(detail if detail is not None
                           else {"type": "t.a", "match": match or {}, "timeout": None}))


def _recorded_floors(waits: list[HistoryEntry]) -> dict[tuple[str, str], Any]:
    """:func:`wait_look.recorded_floors` given the ids the waits took, as the journal
    reads them."""
    took = {w.key: codec.loads(w.result)["id"] for w in waits if w.result}
    return wait_look.recorded_floors(waits, took)


def test_recorded_floors_are_the_last_completed_wait_of_each_kind() -> None:
    done = EntryStatus.COMPLETED
    floors = _recorded_floors([
        _wait(1, done, 10.0, 11.0, "e1", {"k": 1}),
        _wait(2, done, 12.0, 13.0, "e2", {"k": 1}),
        _wait(3, done, 14.0, 15.0, "e3"),
        _wait(4, EntryStatus.FAILED, 16.0, 17.0),  # (timed out: took nothing)
        _wait(5, EntryStatus.WAITING, 18.0, None, match={"k": 1}),  # (the one resumed)
    ])
    assert {k: (f.event_id, f.began) for k, f in floors.items()} == {
        wait_look.kind_of("t.a", {"k": 1}): ("e2", 12.0),
        wait_look.kind_of("t.a", None): ("e3", 14.0),
    }


def test_no_recorded_floor_where_an_unfinished_wait_began_before_it_ended() -> None:
    """That wait may have taken an event in memory (not recorded) which the floor's
    wait then passed over: free again after the resume, it must still be found."""
    done = EntryStatus.COMPLETED
    floors = _recorded_floors([
        _wait(1, done, 10.0, 11.0, "e1"),
        _wait(2, EntryStatus.WAITING, 12.0, None, match={"k": 2}),  # (began before 3 ended)
        _wait(3, done, 12.5, 14.0, "e3", {"k": 1}),
    ])
    assert {k: f.event_id for k, f in floors.items()} == {
        wait_look.kind_of("t.a", None): "e1"}  # (ended before the unfinished one began)


def test_a_choreographed_sagas_wait_gives_no_floor() -> None:
    """It takes its event by id, not the first of a match in the log."""
    floors = _recorded_floors([_wait(
        1, EntryStatus.COMPLETED, 10.0, 11.0, "e1",
        detail={"type": "t.a", "match": {"run_id": "r"}})])
    assert floors == {}


async def test_a_parked_run_reads_on_from_its_recorded_floor(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run parked between its waits is resumed from its history for each event: its
    waits read on from the event the last one took, and take each event in turn."""
    monkeypatch.setattr(wait_look, "LATE", 0.0)
    async with _build(sqlite_url, park_after=0.0) as app:
        counted = _count_floor_looks(app)
        plan = [["a", {"k": 1}]] * 4
        handle = await app.start("waits", "r", plan)
        await app.publish("gor.go", {})
        for n in range(4):
            await _parked(app, n + 1)
            await app.publish("r.a", {"k": 2, "n": 100 + n})
            await app.publish("r.a", {"k": 1, "n": n})
        assert await handle.result(timeout=30) == [0, 1, 2, 3]
    # Only the first wait read from the run's start (as it began, as it parked, as it
    # was resumed); each later one, resumed from history, read on from its floor.
    assert counted["full"] <= 3 and counted["floor"] >= 3, counted


async def _parked(app: App, times: int) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while app.engine.metrics.parked < times:
        assert asyncio.get_running_loop().time() < deadline, "the run never parked"
        await asyncio.sleep(0.02)


async def test_a_floors_margin_never_reaches_before_the_run_began(store_url: str) -> None:
    """An event of the kind published just before the run started is no wait's, floor
    or not (the floor's minute of margin stops at the run's start)."""
    async with _build(store_url) as app:
        await app.publish("s.a", {"k": 1, "n": 0})
        handle = await app.start("waits", "s", [["a", {"k": 1}], ["a", {"k": 1}]])
        await app.publish("gos.go", {})
        for n in (1, 2):
            await app.publish("s.a", {"k": 1, "n": n})
        assert await handle.result(timeout=30) == [1, 2]


async def test_a_forked_runs_waits_take_no_event_from_before_it_began(
    sqlite_url: str
) -> None:
    """A fork copies the source's recorded waits, but it began later: its next wait of
    a kind takes an event published since the fork began, not one between the
    source's wait and the fork (a copied floor is no floor of the fork's)."""
    app = make_app(sqlite_url, "floors")

    @app.step
    async def mark(n: int) -> int:
        return n

    @app.workflow
    async def twice(ctx: WorkflowContext) -> list[int]:
        first = await ctx.wait_for_event("f.a", match={"k": 1})
        await ctx.run(mark, 0)
        second = await ctx.wait_for_event("f.a", match={"k": 1}, timeout=20)
        return [int(first.data["n"]), int(second.data["n"])]

    async with app:
        source = await app.start(twice)
        for n in (0, 1):
            await app.publish("f.a", {"k": 1, "n": n})
        assert await source.result(timeout=30) == [0, 1]
        await app.publish("f.a", {"k": 1, "n": 2})  # (before the fork)
        forked = await app.fork(source.run_id, from_step="mark#1")
        await asyncio.sleep(0.3)
        await app.publish("f.a", {"k": 1, "n": 3})
        assert await forked.result(timeout=30) == [0, 3]
