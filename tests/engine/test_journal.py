"""Replay equivalence of the journal (engine/journal.py), as a property.

A random program of durable calls (recorded values, steps, emits, waits, timers,
``set_value``) runs once through a :class:`Journal`; its committed history is then
replayed through a fresh journal, whole or cut by a crash at any commit. The replay
must make the same calls under the same keys, return what was recorded (values and
events drawn anew only where nothing durable recorded them), begin exactly the calls
history has no final outcome for, and end with the same history.

The runtime under the journal is an in-memory implementation of its interface
(``runtime.JournalRuntime``), as ``cantata check-replay``'s dry run is; the whole
engine on a real store is covered by ``test_properties.py`` and ``test_replay.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from cantata.engine.journal import FINAL, Journal, Save
from cantata.engine.runtime import Watch
from cantata.model import codec
from cantata.model.parking import Parking
from cantata.model.records import (
    EntryKind,
    EntryStatus,
    HistoryEntry,
    RunRecord,
    RunWrite,
)
from cantata.model.status import RunStatus


class Crash(Exception):
    """The process died during this commit: nothing of it was stored."""


class MemoryRuntime:
    """The journal's runtime interface over a dict of committed entries."""

    def __init__(self, name: str, crash_at: int | None = None) -> None:
        self.run = RunRecord("r1", "app", "wf", RunStatus.RUNNING, "[]", 0.0, 0.0, "r1")
        self.name = name
        self.crash_at = crash_at
        self.stored: dict[str, HistoryEntry] = {}
        self.pending: list[HistoryEntry] = []
        self.commits = 0
        self.draws = 0
        self.began: list[str] = []  # keys of the calls that began here (not replayed)
        self.executed: list[str] = []  # step keys whose body ran here

    def draw(self) -> str:
        """Something that differs on every execution (a clock, a random, an event)."""
        self.draws += 1
        return f"{self.name}-{self.draws}"

    def now(self) -> float:
        return 0.0

    async def commit(self, write: RunWrite) -> None:
        entries, self.pending = [*self.pending, *write.entries], []
        self.commits += 1
        if self.crash_at is not None and self.commits >= self.crash_at:
            raise Crash()
        for e in entries:  # a snapshot: the journal goes on changing its entries
            self.stored[e.key] = dataclasses.replace(e)

    def defer(self, write: RunWrite) -> None:
        self.pending.extend(write.entries)

    def hold(self, entry: HistoryEntry) -> None:
        self.pending.append(entry)

    async def wait_until(
        self,
        wake_at: float | None,
        wake: Callable[[], Awaitable[bool]] | None = None,
        *,
        poll: bool = True,
        park: Parking | None = None,
        interrupt: str = "raise",
    ) -> None:
        if wake is not None:
            assert await wake()

    @contextlib.contextmanager
    def watching(self, watch: Watch | None) -> Iterator[None]:
        yield

    def cancel_pending(self) -> bool:
        return False

    def interrupted(self) -> bool:
        return False

    def check_interrupt(self) -> None:
        pass

    def new_call(self, key: str) -> None:
        self.began.append(key)


def transform(name: str, x: int) -> int:
    return {"inc": x + 1, "double": x * 2}[name]


async def perform(j: Journal, rt: MemoryRuntime, op: tuple[Any, ...]) -> tuple[str, Any]:
    """One durable call, made the way ``ctx`` makes it; returns (key, result)."""
    kind = op[0]
    if kind == "value":  # ctx.now / random / uuid
        call = j.lookup(EntryKind.VALUE, op[1])
        if call.entry is not None:
            return call.key, codec.loads(call.entry.result)
        value = rt.draw()
        j.record(call, EntryStatus.COMPLETED, save=Save.WITH_NEXT, result=codec.dumps(value))
        return call.key, value
    if kind == "step":  # ctx.run: an attempt commits, its result waits for the next write
        call = await j.replay_or_begin(
            EntryKind.STEP, op[1], key=j.next_key(op[1]), check_resumed=True
        )
        if call.replayed:
            assert call.entry is not None
            return call.key, codec.loads(call.entry.result)
        entry = call.entry if call.entry is not None else j.record(call, EntryStatus.RUNNING)
        await rt.commit(RunWrite(entries=[entry]))  # the attempt's start
        rt.executed.append(call.key)
        out = transform(op[1], op[2])
        await j.settle(entry, EntryStatus.COMPLETED, save=Save.SOON, result=codec.dumps(out))
        return call.key, out
    if kind == "emit":
        call = await j.replay_or_begin(EntryKind.EMIT, op[1], base=f"emit:{op[1]}")
        if call.entry is not None:
            return call.key, codec.loads(call.entry.result)
        event = f"{op[1]}@{call.key}"  # the event id derives from the key: deterministic
        await j.begin(call, EntryStatus.COMPLETED, result=codec.dumps(event))
        return call.key, event
    if kind == "wait":  # the event found is whatever arrived: not deterministic
        call = await j.replay_or_begin(EntryKind.WAIT, op[1], base=f"wait:{op[1]}")
        if call.replayed:
            assert call.entry is not None
            return call.key, codec.loads(call.entry.result)
        entry = call.entry or await j.begin(call, EntryStatus.WAITING)
        found: list[dict[str, str]] = []

        async def look() -> bool:
            found.append({"id": rt.draw()})  # an event, as the store gives it
            return True

        await j.await_final(entry, look, watch=Watch("event", op[1]), poll=False)
        await j.settle(entry, EntryStatus.COMPLETED, result=codec.dumps(found[0]))
        return call.key, found[0]
    if kind == "sleep":
        call = await j.replay_or_begin(EntryKind.SLEEP, "sleep")
        if not call.replayed:
            entry = call.entry or await j.begin(call, EntryStatus.WAITING, wake_at=0.0)
            await j.await_final(entry)
            await j.settle(entry, EntryStatus.COMPLETED, save=Save.WITH_NEXT)
        return call.key, None
    assert kind == "set_value"
    call = await j.replay_or_begin(EntryKind.SET_VALUE, op[1], base=f"set_value:{op[1]}")
    if call.entry is None:
        await j.begin(call, EntryStatus.COMPLETED, result=codec.dumps(op[2]))
    return call.key, None


async def execute(
    program: list[tuple[Any, ...]], rt: MemoryRuntime, history: dict[str, HistoryEntry]
) -> list[tuple[str, Any]]:
    """Run ``program`` over ``history`` until it ends (then commit what is held) or the
    runtime crashes; returns (key, result) per call made."""
    j = Journal(rt)
    j.load(dataclasses.replace(e) for e in history.values())
    out: list[tuple[str, Any]] = []
    with contextlib.suppress(Crash):
        for op in program:
            out.append(await perform(j, rt, op))
        j.check_all_replayed()  # as the engine does when the workflow returns
        await rt.commit(RunWrite())
    return out


ops = st.one_of(
    st.tuples(st.just("value"), st.sampled_from(["now", "random", "uuid"])),
    st.tuples(st.just("step"), st.sampled_from(["inc", "double"]), st.integers(-50, 50)),
    st.tuples(st.just("emit"), st.sampled_from(["order.placed", "order.paid"])),
    st.tuples(st.just("wait"), st.sampled_from(["order.placed", "parcel.sent"])),
    st.tuples(st.just("sleep")),
    st.tuples(st.just("set_value"), st.sampled_from(["stage", "total"]), st.integers(0, 9)),
)
programs = st.lists(ops, min_size=1, max_size=12)
DETERMINISTIC = ("step", "emit", "sleep", "set_value")


def shape(history: dict[str, HistoryEntry]) -> list[tuple[Any, ...]]:
    return sorted((e.seq, e.key, e.kind, e.name, e.status) for e in history.values())


@settings(max_examples=100, deadline=None)
@given(program=programs)
def test_replaying_a_whole_history_repeats_every_call_and_begins_none(
    program: list[tuple[Any, ...]],
) -> None:
    first = MemoryRuntime("first")
    recorded = asyncio.run(execute(program, first, {}))
    assert len(recorded) == len(program)
    # every call began, but recorded values (ctx.now...): they skip the new-call check
    assert first.began == [
        k for (k, _), op in zip(recorded, program, strict=True) if op[0] != "value"
    ]

    replay = MemoryRuntime("replay")
    again = asyncio.run(execute(program, replay, first.stored))
    assert again == recorded  # same keys, same results, in the same order
    assert replay.began == [] and replay.executed == [] and replay.draws == 0
    assert replay.stored == {}  # nothing written but the final (empty) commit
    assert all(e.status in FINAL for e in first.stored.values())


@settings(max_examples=200, deadline=None)
@given(program=programs, data=st.data())
def test_replaying_after_a_crash_at_any_commit_is_equivalent(
    program: list[tuple[Any, ...]], data: st.DataObject
) -> None:
    clean = MemoryRuntime("clean")
    reference = asyncio.run(execute(program, clean, {}))
    crash_at = data.draw(st.integers(1, clean.commits), label="crash_at")

    crashed = MemoryRuntime("crashed", crash_at=crash_at)
    asyncio.run(execute(program, crashed, {}))
    durable = dict(crashed.stored)

    resumed = MemoryRuntime("resumed")
    after = asyncio.run(execute(program, resumed, durable))

    # The same calls under the same keys, and the same history in the end.
    assert [k for k, _ in after] == [k for k, _ in reference]
    assert shape(durable | resumed.stored) == shape(clean.stored)
    for (key, value), (_, expected), op in zip(after, reference, program, strict=True):
        entry = durable.get(key)
        if entry is not None and entry.status in FINAL and op[0] not in ("sleep", "set_value"):
            # Recorded: the replay returns what the first execution got.
            assert value == codec.loads(entry.result)
            assert key not in resumed.began
        if op[0] in DETERMINISTIC:
            assert value == expected
    # Recorded outcomes are reused; every other call begins (or resumes) again.
    done = {k for k, e in durable.items() if e.status in FINAL}
    assert resumed.began == [
        k
        for (k, _), op in zip(after, program, strict=True)
        if op[0] != "value" and k not in durable
    ]
    steps = [k for (k, _), op in zip(after, program, strict=True) if op[0] == "step"]
    assert resumed.executed == [k for k in steps if k not in done]
    # A step whose result was durable before the crash ran once in all.
    assert all(crashed.executed.count(k) == 1 for k in done.intersection(steps))
