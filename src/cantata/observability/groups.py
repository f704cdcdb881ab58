"""Handler groups and triggers: ``cantata groups`` lists them, ``cantata groups retire``
retires one that no code serves any more (docs/operating.md, "Retiring a group").

What an app's processes declare is kept as a union (``Store.declare``): the store cannot
tell a group whose service is down from one a deploy removed, so the events of its
types keep getting deliveries for it. Retiring it removes its declaration and ends its
pending deliveries (``Store.retire_group``), refused while a live worker says in its
heartbeat that it serves the group (:mod:`.stall_hints`), and while live runs of a
choreographed saga wait on a pending delivery of the group (one of their hops).
"""

from __future__ import annotations

from dataclasses import dataclass

from cantata.engine.saga.choreographed import HOPS, MAP
from cantata.engine.saga.hops import saga_of
from cantata.errors import GroupInUse
from cantata.model.records import GroupRetired, GroupStats
from cantata.store.base import Store

from .stall_hints import LiveWorker, live_workers


@dataclass(frozen=True, slots=True)
class GroupInfo:
    """One group as ``cantata groups`` shows it: its :class:`GroupStats` and the live
    workers that serve it now (``served_by``, worker ids; ``served`` is ``None`` when a
    live worker does not say which groups it serves: one of an older release, or of
    one that named them only once its consumer had started)."""

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
    group when it opens, and once more once its first heartbeat (which names the groups
    it serves) is in, before it serves anything (app_runtime.serve); and the
    deliveries it holds are left to it. If one is live once the retire has committed,
    the declarations removed are written back, so the group keeps getting the events
    stored from then on.

    Raises:
        GroupInUse: a live worker serves the group (it is named), or a live worker does
            not say which groups it serves, or live runs of a choreographed saga wait on
            its pending deliveries (how many is said); nothing is changed.
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
    saga, waiting = await waiting_runs(store, app, group)
    if waiting:
        some = ", ".join(waiting[:3]) + (", ..." if len(waiting) > 3 else "")
        raise GroupInUse(
            f"group {group!r} of app {app!r} is a hop of the choreographed saga {saga!r}, "
            f"and {len(waiting)} live run(s) of it wait on its pending deliveries ({some}): "
            "retired, they would wait for ever (a cancel, too, passes through the hop). "
            "Let them pass it first: run a worker whose code has the group (the runs' "
            "version) until `cantata groups` shows no pending delivery for it, then retire "
            "it"
        )
    done = await store.retire_group(app, group, now=now, actor=actor)
    if done.declarations and _serving(group, await live_workers(store, app, now)):
        # A worker of the group started meanwhile: its declaration wins.
        await store.declare(app, list(done.declarations))
    return done


WAITING_READ = 10_000  # pending deliveries read to find the runs waiting on a group


async def waiting_runs(store: Store, app: str, group: str) -> tuple[str | None, list[str]]:
    """The choreographed saga ``group`` is a hop of, and the live runs of it that wait on
    one of the group's pending deliveries (``None, []`` for a group of no saga).

    A run waits on a delivery that is a hop of its map (its events say which groups are,
    ``choreographed.HOPS``); the delivery of a run begun before runs carried their map
    counts while the run is live (nothing tells whether it needs it).
    """
    sagas = [d.name for d in await store.declarations(app) if d.kind == "workflow"]
    saga = saga_of(group, sagas)
    if saga is None:
        return None, []
    runs: dict[str, None] = {}
    for event in await store.pending_events(app, group, limit=WAITING_READ):
        data = event.data
        if not (isinstance(data, dict) and event.type.startswith(f"{saga}.")
                and isinstance(data.get("run_id"), str)):
            continue
        if data.get(MAP) is not None and group not in (data.get(HOPS) or ()):
            continue  # a group of another map than its run's: nothing waits for it
        runs[data["run_id"]] = None
    live = []
    for run_id in runs:
        run = await store.get_run(app, run_id)
        if run is not None and not run.status.is_final:
            live.append(run_id)
    return saga, live
