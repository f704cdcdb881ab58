"""A wait's look for its event in the store (``ctx.wait_for_event``).

A wait takes the first event of its type that its match accepts, that no other wait of
the run took, stored since the run started (for a run started by an event, after that
event in the log). Read that way, each look reads every event of the type since the
run began: a run that waits again and again for events of one kind (an entity's loop)
read them all at every wait, and its n-th wait cost n reads' worth.

So each run keeps, per kind of wait (type and match), a **floor**: the event its last
such wait took, and when the look that found it began. That look read the log in its
order and took the first event it could, so every event of the kind that was already
stored before it was taken (by that wait or an earlier one); the next wait of the
same kind reads only what follows the floor in the log, and what was stored from a minute
(``AFTER_SKEW``) before that look on by the clocks (an event written before the floor
in the log may be committed after that look read), never from before the run began.

A run resumed from its history (a parked run woken, a run taken over) finds its
floors there (:func:`recorded_floors`): the event each kind's last completed wait
took, from the moment that wait began (before its looks), if it began after the run
did (a fork's history begins with its source's waits). Only if no wait of the run
left unfinished in its history had begun by the moment that one ended: a wait may
take an event in memory and its run stop before that is recorded, and the event is
free again for the resumed run; such a wait's begin is stored no later than any
outcome recorded after it (a run's writes are stored in order), so one that began
before a floor's wait ended says that floor may pass over an event it took.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from cantata.model import codec
from cantata.model.event import Event, match_data
from cantata.model.records import EntryStatus, HistoryEntry
from cantata.store.roles.events import AFTER_SKEW

if TYPE_CHECKING:
    from cantata.model.records import RunRecord

    from .engine import Engine
    from .journal import Journal

#: The candidates a look's first read takes; a full page is read again, four times
#: larger (a match the store cannot compare lets through events Python refuses).
FIRST_PAGE = 16
#: How long before a look began an event may have been stored and still come before
#: what that look read in the log (a write under way; a writer's clock behind): the
#: store's margin for ``after`` (a floor's read costs no more for it: the store reads
#: from that long before the floor's event anyway).
LATE = AFTER_SKEW


def kind_of(event_type: str, match: Mapping[str, Any] | None) -> tuple[str, str]:
    """The key of a wait's kind: two waits share a floor only if they accept the same
    events (``repr`` keeps ``1``, ``1.0``, ``True`` and ``"1"`` apart)."""
    return event_type, repr(sorted((match or {}).items()))


class Floor:
    """Where the next wait of a kind reads from: the event the last one took, the time
    its look began, and whether that event was seen still stored since."""

    __slots__ = ("began", "checked", "event_id")

    def __init__(self, event_id: str, began: float) -> None:
        self.event_id = event_id
        self.began = began
        self.checked = False


def recorded_floors(
    waits: list[HistoryEntry], took: Mapping[str, str]
) -> dict[tuple[str, str], Floor]:
    """The floors a run's recorded waits (``kind == WAIT``, in history's order) give;
    ``took``: the id of the event each completed one took, by its key."""
    open_since = min((w.started_at or 0.0 for w in waits if w.status != EntryStatus.COMPLETED
                      and w.status != EntryStatus.FAILED), default=None)
    floors: dict[tuple[str, str], Floor] = {}
    for w in waits:
        event_id = took.get(w.key)
        if w.status != EntryStatus.COMPLETED or event_id is None or not w.detail \
                or w.started_at is None or w.ended_at is None:
            continue
        if open_since is not None and open_since <= w.ended_at:
            continue
        detail = codec.loads(w.detail)
        # (``ctx.wait_for_event``'s: a choreographed saga's wait takes its event by
        # id, not the first of a match in the log, and records no timeout)
        if isinstance(detail, dict) and "timeout" in detail:
            floors[kind_of(str(detail.get("type")), detail.get("match"))] = Floor(
                event_id, w.started_at)
    return floors


async def look(
    engine: Engine, j: Journal, run: RunRecord, event_type: str,
    match: Mapping[str, Any] | None, trigger: str | None, found: list[Event[Any]],
) -> bool:
    """Take the first event the wait accepts into ``found`` (and into the run's taken
    events, before any await after the read); ``False`` if there is none yet."""
    kind = kind_of(event_type, match)
    floor = j.wait_floors.get(kind)
    began = time.time()
    if floor is not None and not run.created_at <= floor.began <= began:
        # A floor is one of this run's waits since it began: a fork's copied waits
        # are its source's, before the fork began (what follows them in the log may
        # precede the fork); a recorded begin by a clock ahead of this one's proves
        # nothing.
        floor = None
    limit = FIRST_PAGE
    while True:
        taken = j.consumed_events
        exclude = sorted(taken if trigger is None else taken | {trigger})
        if floor is None:
            events = await engine.store.find_events(
                run.app, event_type, since=run.created_at, after=trigger, exclude=exclude,
                limit=limit, match=match,
            )
        else:
            events = await engine.store.find_events(
                run.app, event_type, since=max(run.created_at, floor.began - LATE),
                after=floor.event_id,
                exclude=exclude, limit=limit, match=match,
            )
        for ev in events:
            # Taken here, before any await: a concurrent wait of the run
            # (asyncio.gather) that read the same events skips it.
            if ev.id not in taken and ev.id != trigger \
                    and match_data(ev.data, match) and engine.signer.accepts(ev):
                taken.add(ev.id)
                found.append(ev)
                j.wait_floors[kind] = Floor(ev.id, began)
                return True
        if len(events) == limit:
            limit *= 4
            continue
        if floor is not None and not floor.checked:
            # The floor's event is no longer stored (deleted by hand): what follows it
            # in the log cannot be found by it. Read from the run's start again.
            if await engine.store.get_event(run.app, floor.event_id) is None:
                del j.wait_floors[kind]
                floor, limit = None, FIRST_PAGE
                continue
            floor.checked = True
        return False
