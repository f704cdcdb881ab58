"""The journal of one run: every durable call of a workflow replays or begins here.

Replay determinism rests on one sequence (docs/architecture.md, "How a run flows"),
written once, in :meth:`Journal.replay_or_begin`:

1. the call takes the next key of its name (``name#occurrence``);
2. a key found in history is consumed, and the recorded outcome is the call's;
3. a key not found is a new call, allowed only once every recorded result has been
   replayed: otherwise the code changed under the run (``NonDeterminismError``);
4. the new call's entry takes the next sequence number and is committed as the
   call asks (:class:`Save`).

A call that waits (a timer, an event, a child, a remote step) then waits with
:meth:`Journal.await_final` and records its outcome with :meth:`Journal.settle`.
Steps run their attempts in ``steps.py`` once their entry is begun here.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, NoReturn

from cantata.errors import NonDeterminismError, StoreError
from cantata.model import codec
from cantata.model.event import Event
from cantata.model.parking import Parking
from cantata.model.records import EntryKind, EntryStatus, HistoryEntry, RunWrite, TaskRecord

from .signals import _StoreFailed
from .wait_look import recorded_floors

if TYPE_CHECKING:
    from .runtime import Interrupt, JournalRuntime, Watch
    from .wait_look import Floor

FINAL = (EntryStatus.COMPLETED, EntryStatus.FAILED)
# Recorded values and markers: not calls of the workflow's code path, so a new call
# does not wait for them to be replayed (a ctx.now() may be added or dropped freely).
NOT_CALLS = frozenset({EntryKind.VALUE, EntryKind.COMPENSATION, EntryKind.PATCH, EntryKind.ATTRS})
# Also not awaited by the end of the workflow: a timer may be left behind by a branch.
NOT_AWAITED_AT_END = NOT_CALLS | {EntryKind.SLEEP}
#: Loop turns without a replayed call after which sibling branches count as stuck.
IDLE_TURNS = 8


class Save(Enum):
    """When a new entry is committed."""

    NOW = "now"  # before the call returns (it has effects, or waits)
    SOON = "soon"  # with the run's next write, or on its own once the workflow yields
    WITH_NEXT = "with_next"  # with the run's next write (a value: no effect to protect)
    NOT_YET = "not_yet"  # by the caller (a step: with its first attempt)


# Enum members used on every step, as module constants: on Python 3.11 an enum
# class's attribute (``EntryStatus.RUNNING``) goes through ``EnumType.__getattr__``'s
# slow attribute hook, ~0.23 µs against ~0.01 µs for a global (docs/performance.md,
# round twenty-five).
_NOW, _SOON, _WITH_NEXT, _NOT_YET = Save.NOW, Save.SOON, Save.WITH_NEXT, Save.NOT_YET


@dataclass(slots=True)
class Call:
    """One durable call's place in the journal: its key, and its entry once known."""

    key: str
    kind: EntryKind
    name: str
    entry: HistoryEntry | None  # as recorded; None for a new call until it is begun

    @property
    def replayed(self) -> bool:
        """History holds this call's outcome: the call returns (or raises) it."""
        return self.entry is not None and self.entry.status in FINAL


class Journal:
    """A run's history as its workflow replays it, and the calls it adds."""

    def __init__(self, runtime: JournalRuntime) -> None:
        # Weak: the runtime (the run's execution) holds this journal, and a cycle of the
        # two would keep a run's whole state alive after its end until the garbage
        # collector finds it (docs/performance.md, round nineteen).
        self.rt: JournalRuntime = weakref.proxy(runtime)
        self.history: dict[str, HistoryEntry] = {}
        self.consumed: set[str] = set()  # keys replayed or recorded by this execution
        self.consumed_events: set[str] = set()  # ids of events a wait of the run took
        # where the next wait of a kind reads from (engine/wait_look.py)
        self.wait_floors: dict[tuple[str, str], Floor] = {}
        self.counters: dict[str, int] = {}
        self.next_seq = 1
        self.divergence: NonDeterminismError | None = None

    def load(self, entries: Iterable[HistoryEntry]) -> None:
        """Take the stored history (before the workflow runs)."""
        waits, took = [], {}
        for e in entries:
            self.history[e.key] = e
            self.next_seq = max(self.next_seq, e.seq + 1)
            if e.kind == EntryKind.WAIT:
                waits.append(e)
                if e.status == EntryStatus.COMPLETED and e.result:
                    event_id = codec.loads(e.result).get("id")
                    self.consumed_events.add(str(event_id))
                    if isinstance(event_id, str):
                        took[e.key] = event_id
        if waits:
            self.wait_floors = recorded_floors(waits, took)

    # -- the sequence ------------------------------------------------------------------

    def next_key(self, base: str) -> str:
        n = self.counters.get(base, 0) + 1
        self.counters[base] = n
        return f"{base}#{n}"

    def next_recorded(self, base: str) -> bool:
        """Whether the next call of ``base`` (the key :meth:`next_key` gives next) is in
        history, without taking its key."""
        return f"{base}#{self.counters.get(base, 0) + 1}" in self.history

    def lookup(
        self, kind: EntryKind, name: str, *, base: str | None = None, key: str | None = None
    ) -> Call:
        """Steps 1-2 only: the call's key and its recorded entry (consumed), without the
        new-call check. For recorded values, which replay wherever they stand."""
        if key is None:
            key = self.next_key(name if base is None else base)
        entry = self.history.get(key)
        if entry is not None:
            self.consumed.add(key)
        return Call(key, kind, name, entry)

    async def replay_or_begin(
        self,
        kind: EntryKind,
        name: str,
        *,
        base: str | None = None,
        key: str | None = None,
        check: bool = True,
        check_resumed: bool = False,
    ) -> Call:
        """Steps 1-3: the call's key, its recorded entry, or the right to begin it.

        A new call (``call.entry is None``) is begun with :meth:`begin`. ``check``:
        run the new-call check (compensations do not: they run after the code path).
        ``check_resumed``: a call in flight is resumed only if every call recorded
        before it was replayed first (a step about to run again, see
        :meth:`check_replayed_before`).
        """
        call = self.lookup(kind, name, base=base, key=key)
        entry = call.entry
        if entry is None:
            if check:
                await self.check_new_call(call.key)
        elif check_resumed and entry.status not in FINAL:
            await self.check_replayed_before(entry)
        return call

    def replay_or_begin_now(self, kind: EntryKind, name: str, key: str, check: bool) -> Call | None:
        """:meth:`replay_or_begin` of a call whose key is taken (``check_resumed`` as
        ``check``) without a coroutine, when nothing is to be awaited (the usual case:
        every recorded call replayed, or the call recorded and final); ``None``: await
        :meth:`replay_or_begin` instead (it looks the call up again: that is idempotent).
        Two coroutines fewer on every step (docs/performance.md, round twenty-five)."""
        # (lookup of a taken key, inline: one call fewer on every step)
        entry = self.history.get(key)
        if entry is not None:
            self.consumed.add(key)
        call = Call(key, kind, name, entry)
        if entry is None:
            if check:
                rt = self.rt
                if rt.cancel_pending() or (self.history
                                           and len(self.consumed) < len(self.history)):
                    return None
                rt.new_call(key)
        elif check and entry.status not in FINAL:
            return None
        return call

    def record(
        self, call: Call, status: EntryStatus, *, save: Save = Save.NOT_YET, **fields: Any
    ) -> HistoryEntry:
        """Step 4 without waiting: a new call's entry, with the next sequence number,
        committed later as ``save`` says (``SOON``, ``WITH_NEXT`` or ``NOT_YET``)."""
        entry = HistoryEntry(call.key, call.kind, call.name, status, seq=self.next_seq, **fields)
        self.next_seq += 1
        self.history[call.key] = entry
        self.consumed.add(call.key)
        call.entry = entry
        if save is not _NOT_YET:  # (a step's: committed by its caller, no call here)
            self._save(entry, save)
        return entry

    async def begin(
        self,
        call: Call,
        status: EntryStatus,
        *,
        events: Sequence[Event[Any]] = (),
        tasks: Sequence[TaskRecord] = (),
        **fields: Any,
    ) -> HistoryEntry:
        """Step 4: a new call's entry, committed now (with ``events`` and ``tasks``)."""
        entry = self.record(call, status, **fields)
        await self.rt.commit(RunWrite(entries=[entry], events=list(events), tasks=list(tasks)))
        return entry

    def _save(self, entry: HistoryEntry, save: Save) -> None:
        assert save is not _NOW, "a commit needs an await: Journal.begin or settle"
        if save is _SOON:
            self.rt.defer(RunWrite(entries=[entry]))
        elif save is _WITH_NEXT:
            self.rt.hold(entry)

    # -- waiting calls -----------------------------------------------------------------

    async def await_final(
        self,
        entry: HistoryEntry,
        look: Callable[[], Awaitable[bool]] | None = None,
        *,
        watch: Watch | None = None,
        poll: bool = True,
        park: Parking | None = None,
        interrupt: Interrupt = "raise",
    ) -> None:
        """Wait until the entry's ``wake_at`` (a timer, a timeout), an interrupt, or
        ``look()`` finds the outcome; ``watch`` names what wakes the run on news (an
        event type, a run or task id), ``poll`` whether ``look`` is also tried on a
        timer; ``park`` what wakes the run if it is evicted meanwhile
        (engine/parking.py); ``interrupt`` what a cancel or deadline does (raised,
        or see :meth:`JournalRuntime.wait_until`)."""
        with self.rt.watching(watch):
            try:
                if interrupt == "raise":  # (the default of every runtime)
                    await self.rt.wait_until(entry.wake_at, look, poll=poll, park=park)
                else:
                    await self.rt.wait_until(entry.wake_at, look, poll=poll, park=park,
                                             interrupt=interrupt)
            except StoreError as exc:
                # ``look()`` met a store outage (or a store slower than its driver's
                # timeouts): not the workflow's failure, which its code could catch and
                # compensate; the run goes on from its history.
                raise _StoreFailed(exc) from exc

    async def settle(
        self,
        entry: HistoryEntry,
        status: EntryStatus,
        *,
        save: Save = Save.NOW,
        **fields: Any,
    ) -> None:
        """Record the outcome of a call that waited, and commit it as ``save`` says."""
        entry.status, entry.ended_at = status, self.rt.now()
        for name, value in fields.items():
            setattr(entry, name, value)
        if save is Save.NOW:
            await self.rt.commit(RunWrite(entries=[entry]))
        else:
            self._save(entry, save)

    # -- the checks --------------------------------------------------------------------

    async def check_new_call(self, key: str) -> None:
        """A call not in history: every recorded result must have been replayed first."""
        rt = self.rt
        if rt.cancel_pending():
            # A replay of a run that was cancelled meets the cancellation where the
            # first execution did: at its first call not in history (before cleanup).
            rt.check_interrupt()
        if not self.history or len(self.consumed) >= len(self.history):
            rt.new_call(key)
            return
        left = await self.siblings_replayed(lambda: self._unreplayed(NOT_CALLS, final_only=True))
        if left and key not in self.history:
            self.diverged(len(self.consumed) + 1, left[0].key, key)
        rt.new_call(key)

    async def check_replayed_before(self, entry: HistoryEntry) -> None:
        """A step in flight is about to run again: every call recorded before it must
        have been replayed first, or the code changed under it (a call before it was
        deleted or moved) and running it again would act on a diverged history."""
        if self._unreplayed(NOT_CALLS, before=entry.seq):
            left = await self.siblings_replayed(
                lambda: self._unreplayed(NOT_CALLS, before=entry.seq))
            if left:
                self.diverged(left[0].seq, left[0].key, entry.key)

    async def siblings_replayed(
        self, left: Callable[[], list[HistoryEntry]]
    ) -> list[HistoryEntry]:
        """Give sibling branches (``asyncio.gather``, task groups) the loop turns they
        take to replay their recorded calls, as long as they make progress: a replayed
        step of a branch runs in a task of its own (engine/branches.py), a few turns
        each. What ``left`` still finds unreplayed then (a divergence)."""
        idle = 0
        while True:
            before = len(self.consumed)
            await asyncio.sleep(0)
            found = left()
            if not found:
                return found
            idle = 0 if len(self.consumed) > before else idle + 1
            if idle >= IDLE_TURNS:
                return found

    def check_all_replayed(self) -> None:
        """The workflow returned: every recorded call must have been replayed."""
        if len(self.consumed) >= len(self.history):  # all of them (consumed is a subset)
            return
        left = self._unreplayed(NOT_AWAITED_AT_END, final_only=True)
        if left:
            raise NonDeterminismError(
                self.rt.run.run_id,
                len(self.consumed) + 1,
                left[0].key,
                "the end of the workflow",
            )

    def position(self, key: str) -> int:
        """The 1-based place of recorded call ``key`` among the recorded calls."""
        calls = sorted((e for e in self.history.values() if e.kind not in NOT_CALLS),
                       key=lambda e: e.seq)
        return next((i for i, e in enumerate(calls, 1) if e.key == key), len(calls))

    def has_unreplayed_calls(self) -> bool:
        """History holds calls (not compensations or markers) not replayed yet."""
        return any(
            k not in self.consumed and e.kind not in (EntryKind.COMPENSATION, EntryKind.PATCH)
            for k, e in self.history.items()
        )

    def diverged(
        self, position: int, recorded: str, current: str, detail: str | None = None
    ) -> NoReturn:
        err = NonDeterminismError(self.rt.run.run_id, position, recorded, current,
                                  detail=detail)
        self.divergence = err
        raise err

    def _unreplayed(
        self,
        skip: frozenset[EntryKind],
        *,
        final_only: bool = False,
        before: int | None = None,
    ) -> list[HistoryEntry]:
        return sorted(
            (
                e
                for k, e in self.history.items()
                if k not in self.consumed
                and e.kind not in skip
                and (not final_only or e.status in FINAL)
                and (before is None or e.seq < before)
            ),
            key=lambda e: e.seq,
        )
