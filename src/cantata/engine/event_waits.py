"""The waits for events of runs in this worker's memory, and which of them news wakes.

A run in ``ctx.wait_for_event`` (or a choreographed saga waiting for its end) that is
not parked sits in :meth:`RunExecution.wait_until`: its ``look`` reads the store for
a matching event each time the run is woken. Waking every wait of a type for every
event of it (or of any type) made each event cost one look per waiting run: 300 runs
waiting for their own keyed event held a worker's loop with ~100 looks per event
published, and publishing took 20 times as long. Here each wait registers what it wants
(a filter on the event: its match, or its event id), and news wakes only the waits
that one of the new events may satisfy:

- an event committed in this process: at once, from the events themselves
  (``Engine.events_appended``);
- an event another process committed (or one this process committed by a path that
  does not tell the engine): the watch loop reads the new events of each waited type
  (:meth:`EventWaits.poll`), at once when a store that hears other processes
  (PostgreSQL) says events were committed, and every ``poll_interval`` anyway.

A filter only narrows whom news wakes: a woken wait still looks for itself (its
``look``, in the log's order, with every check), and a read that may have left
events out (a page full, a read not made yet) wakes every wait of the type.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cantata.model.event import MISSING, Event, match_data, value_at

if TYPE_CHECKING:
    from .engine import Engine
    from .runner import RunExecution

@dataclass(frozen=True, slots=True)
class Wants:
    """What a wait wants of an event of its type: its data to match ``match`` (as
    ``ctx.wait_for_event`` compares, :func:`~cantata.model.event.match_data`), or to be
    the event ``event_id``; neither: any event of the type."""

    match: Mapping[str, Any] | None = None
    event_id: str | None = None


#: The most new events of a type one poll reads; a fuller page wakes every wait of it.
PAGE = 1000


class _OfType:
    """The waits for one event type, indexed by what they want (kept as waits come and
    go, so that news costs a lookup per event, not a comparison per wait): each index
    counts an execution's registrations (two waits of a run may want the same)."""

    __slots__ = ("any", "by_id", "compared", "executions", "keyed")

    def __init__(self) -> None:
        self.executions: dict[RunExecution, int] = {}
        self.any: dict[RunExecution, int] = {}
        self.by_id: dict[str, dict[RunExecution, int]] = {}
        # the match's keys -> their values -> the executions that want them
        self.keyed: dict[tuple[str, ...], dict[tuple[Any, ...], dict[RunExecution, int]]] = {}
        self.compared: list[tuple[RunExecution, Mapping[str, Any]]] = []  # not hashable

    def change(self, execution: RunExecution, wants: Wants, by: int) -> None:
        _count(self.executions, execution, by)
        if wants.event_id is not None:
            _count(self.by_id, wants.event_id, by, execution)
        elif not wants.match:
            _count(self.any, execution, by)
        else:
            values = tuple(wants.match.values())
            if _hashable(values):
                keys = tuple(wants.match)
                by_value = self.keyed.setdefault(keys, {})
                _count(by_value, values, by, execution)
                if not by_value:
                    del self.keyed[keys]
            elif by > 0:
                self.compared.append((execution, wants.match))
            else:
                self.compared.remove((execution, wants.match))

    def wake(self, events: Sequence[Event[Any]]) -> None:
        woken: set[RunExecution] = set(self.any)
        for ev in events:
            woken.update(self.by_id.get(ev.id, ()))
        for keys, by_value in self.keyed.items():
            for ev in events:
                found = _values(ev.data, keys)
                if found is not None:
                    woken.update(by_value.get(found, ()))
        for execution, match in self.compared:
            if execution not in woken and any(match_data(ev.data, match) for ev in events):
                woken.add(execution)
        for execution in woken:
            execution.wakeup.set()


class EventWaits:
    """The in-memory waits of one engine, by event type, and where its polls got to."""

    def __init__(self) -> None:
        self._by_type: dict[str, _OfType] = {}
        self._checked: dict[str, float] = {}  # when each type's last poll began
        self._seen: dict[str, set[str]] = {}  # the ids it read (read again: overlap)
        self._position: int | None = None  # the log position read as the last poll began

    def __bool__(self) -> bool:
        return bool(self._by_type)

    def waiting(self, event_type: str) -> int:
        """How many runs here wait for events of ``event_type``."""
        of_type = self._by_type.get(event_type)
        return 0 if of_type is None else len(of_type.executions)

    def add(self, event_type: str, execution: RunExecution, wants: Wants) -> None:
        self._by_type.setdefault(event_type, _OfType()).change(execution, wants, 1)

    def remove(self, event_type: str, execution: RunExecution, wants: Wants) -> None:
        of_type = self._by_type.get(event_type)
        if of_type is not None:
            of_type.change(execution, wants, -1)
            if not of_type.executions:
                del self._by_type[event_type]

    def wake(self, event_type: str, events: Sequence[Event[Any]] | None) -> None:
        """Wake the waits of ``event_type`` that one of ``events`` may satisfy; with
        ``None`` (news whose events are not known), every wait of the type."""
        of_type = self._by_type.get(event_type)
        if of_type is None:
            return
        if events is None:
            for execution in of_type.executions:
                execution.wakeup.set()
        elif events:
            of_type.wake(events)

    def wake_for(self, events: Sequence[Event[Any]]) -> None:
        """:meth:`wake` for events of any types (committed in this process)."""
        if not self._by_type:
            return
        by_type: dict[str, list[Event[Any]]] = {}
        for ev in events:
            if ev.type in self._by_type:
                by_type.setdefault(ev.type, []).append(ev)
        for event_type, of_type in by_type.items():
            self.wake(event_type, of_type)

    async def begin(self, engine: Engine) -> None:
        """Where the first poll reads from: the log's end now (the watch loop's start,
        before any run here waits), so that an event another process commits before
        the first poll is read by it whatever its writer's clock."""
        if self._position is None:
            self._position = await engine.store.log_position(engine.app)

    async def poll(self, engine: Engine, reached: int) -> None:
        """Read the events of each waited type stored since the last poll and wake the
        waits they may satisfy. "Since" is the log's order (what was stored after the
        position read as the last poll began, whatever the writer's clock), and what
        was stored in the last second by this worker's clock (a write under way as
        the position was read may come before it in the log). ``reached``: the log's
        position read before this poll (the watch loop's, shared with the look for
        parked waits), where the next one goes on from."""
        if not self._by_type:
            self._position = reached
            return
        store, app = engine.store, engine.app
        now = time.time()
        position = self._position
        for event_type in list(self._by_type):
            since = self._checked.get(event_type, now) - 1.0
            events = await store.find_events(
                app, event_type, since=since, exclude=sorted(self._seen.get(event_type, ())),
                limit=PAGE, position=position,
            )
            self._checked[event_type] = now
            self._seen[event_type] = {e.id for e in events}
            full = position is None or len(events) >= PAGE
            if events or full:
                self.wake(event_type, None if full else events)
        for gone in set(self._checked) - set(self._by_type):
            self._checked.pop(gone, None)
            self._seen.pop(gone, None)
        self._position = reached


def _values(data: Any, keys: tuple[str, ...]) -> tuple[Any, ...] | None:
    """The values of ``data`` under ``keys`` (dotted keys nest), as
    :func:`~cantata.model.event.match_data` walks them; ``None`` if one is missing, or
    one is a list or a mapping (equal to no hashable value a wait wants)."""
    found = tuple(value_at(data, key) for key in keys)
    return None if any(v is MISSING for v in found) or not _hashable(found) else found


def _hashable(values: tuple[Any, ...]) -> bool:
    try:
        hash(values)
    except TypeError:  # (a list or a mapping in it)
        return False
    return True


def _count(counts: dict[Any, Any], key: Any, by: int, execution: RunExecution | None = None,
           ) -> None:
    """Add ``by`` to ``counts[key]`` (with ``execution``: to ``counts[key][execution]``),
    dropping what comes to zero."""
    if execution is not None:
        inner = counts.setdefault(key, {})
        _count(inner, execution, by)
        if not inner:
            del counts[key]
        return
    n = counts.get(key, 0) + by
    if n > 0:
        counts[key] = n
    else:
        counts.pop(key, None)
