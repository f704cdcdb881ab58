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

from cantata.model.event import Event, match_data

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


class EventWaits:
    """The in-memory waits of one engine, by event type, and where its polls got to."""

    def __init__(self) -> None:
        self._by_type: dict[str, dict[RunExecution, list[Wants]]] = {}
        self._checked: dict[str, float] = {}  # when each type's last poll began
        self._seen: dict[str, set[str]] = {}  # the ids it read (read again: overlap)
        self._position: int | None = None  # the log position read as the last poll began

    def __bool__(self) -> bool:
        return bool(self._by_type)

    def add(self, event_type: str, execution: RunExecution, wants: Wants) -> None:
        self._by_type.setdefault(event_type, {}).setdefault(execution, []).append(wants)

    def remove(self, event_type: str, execution: RunExecution, wants: Wants) -> None:
        group = self._by_type.get(event_type)
        if group is None:
            return
        filters = group.get(execution)
        if filters is not None:
            filters.remove(wants)  # (one registration of it: two waits may share one)
            if not filters:
                del group[execution]
        if not group:
            del self._by_type[event_type]

    def wake(self, event_type: str, events: Sequence[Event[Any]] | None) -> None:
        """Wake the waits of ``event_type`` that one of ``events`` may satisfy; with
        ``None`` (news whose events are not known), every wait of the type.

        The waits are indexed by their match's keys and values first, so that many
        waits for their own keyed event cost a lookup per event, not a comparison per
        wait and event (a value that is not hashable is compared one by one)."""
        group = self._by_type.get(event_type)
        if not group:
            return
        if events is None:
            for execution in group:
                execution.wakeup.set()
            return
        if not events:
            return
        ids = {e.id for e in events}
        keyed: dict[tuple[str, ...], dict[tuple[Any, ...], list[RunExecution]]] = {}
        compared: list[tuple[RunExecution, Mapping[str, Any]]] = []
        for execution, wants in group.items():
            for want in wants:
                if want.event_id is not None:
                    if want.event_id in ids:
                        execution.wakeup.set()
                elif not want.match:
                    execution.wakeup.set()
                else:
                    values = tuple(want.match.values())
                    if _hashable(values):
                        by_value = keyed.setdefault(tuple(want.match), {})
                        by_value.setdefault(values, []).append(execution)
                    else:
                        compared.append((execution, want.match))
        for keys, by_value in keyed.items():
            for ev in events:
                found = _values(ev.data, keys)
                if found is not None:
                    for execution in by_value.get(found, ()):
                        execution.wakeup.set()
        for execution, match in compared:
            if any(match_data(ev.data, match) for ev in events):
                execution.wakeup.set()

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

    async def poll(self, engine: Engine) -> None:
        """Read the events of each waited type stored since the last poll and wake the
        waits they may satisfy. "Since" is the log's order (what was stored after the
        position read as the last poll began, whatever the writer's clock), and what
        was stored in the last second by this worker's clock (a write under way as
        the position was read may come before it in the log)."""
        if not self._by_type:
            return
        store, app = engine.store, engine.app
        now = time.time()
        position = self._position
        reached = await store.log_position(app)  # before the reads
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
    values = []
    for key in keys:
        value: Any = data
        for part in key.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        values.append(value)
    found = tuple(values)
    return found if _hashable(found) else None


def _hashable(values: tuple[Any, ...]) -> bool:
    try:
        hash(values)
    except TypeError:  # (a list or a mapping in it)
        return False
    return True
