"""Handler groups and triggers: ``cantata groups`` lists them, ``cantata groups retire``
retires one that no code serves any more (docs/operating.md, "Retiring a group").

What an app's processes declare is kept as a union (``Store.declare``): the store cannot
tell a group whose service is down from one a deploy removed, so the events of its
types keep getting deliveries for it. Retiring it removes its declaration and ends its
pending deliveries (``Store.retire_group``), refused while a live worker says in its
heartbeat that it serves the group (:mod:`.stall_hints`).
"""

from __future__ import annotations

from dataclasses import dataclass

from cantata.errors import GroupInUse
from cantata.model.records import GroupRetired, GroupStats
from cantata.store.base import Store

from .stall_hints import LiveWorker, live_workers


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One group as ``cantata groups`` shows it: its :class:`GroupStats` and the live
    workers that serve it now (``served_by``, worker ids; ``served`` is ``None`` when a
    live worker does not say which groups it serves, an older release or one whose
    consumer has not started yet)."""

    stats: GroupStats
    served_by: tuple[str, ...]
    served: bool | None


async def groups(store: Store, app: str, *, now: float) -> list[GroupInfo]:
    """Every declared handler group and trigger of ``app`` (and every group no longer
    declared with pending deliveries or dead letters), by name, and who serves it."""
    live = await live_workers(store, app, now)
    unknown = any(w.groups is None for w in live)
    out = []
    for stats in await store.group_stats(app, now=now):
        by = _serving(stats.group, live)
        out.append(GroupInfo(stats, by, True if by else (None if unknown else False)))
    return out


def _serving(group: str, live: list[LiveWorker]) -> tuple[str, ...]:
    return tuple(sorted(w.worker_id for w in live if w.groups is not None and group in w.groups))


async def retire(store: Store, app: str, group: str, *, now: float, actor: str) -> GroupRetired:
    """Retire ``group`` (a handler group, or ``start:<workflow>`` for a trigger): its
    declaration is removed, its pending deliveries are ended as retired, its dead letters
    stay; audited as ``group.retired`` by ``actor`` (see ``Store.retire_group``).

    A worker that starts serving the group while the retire runs wins: it declares the
    group again when it opens (and once more when its consumer has started), and the
    deliveries it holds are left to it. If one is live once the retire has committed,
    the declarations removed are written back, so the group keeps getting the events
    stored from then on.

    Raises:
        GroupInUse: a live worker serves the group (it is named), or a live worker does
            not say which groups it serves; nothing is changed.
    """
    live = await live_workers(store, app, now)
    by = _serving(group, live)
    if by:
        raise GroupInUse(
            f"group {group!r} of app {app!r} is served by live worker(s) {', '.join(by)}: "
            "retire only a group no code serves any more; deploy code without it (or stop "
            "those workers) and retire it once they are gone (`cantata groups` says when "
            "no live worker serves it)"
        )
    unsure = sorted(w.worker_id for w in live if w.groups is None)
    if unsure:
        raise GroupInUse(
            f"cannot tell whether group {group!r} of app {app!r} is served: live worker(s) "
            f"{', '.join(unsure)} do not say which groups they serve (starting, or of a "
            "release older than their heartbeats' groups): try again once they have "
            "started, or once they are gone"
        )
    done = await store.retire_group(app, group, now=now, actor=actor)
    if done.declarations and _serving(group, await live_workers(store, app, now)):
        # A worker of the group started meanwhile: its declaration wins.
        await store.declare(app, list(done.declarations))
    return done
