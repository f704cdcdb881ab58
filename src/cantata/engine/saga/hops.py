"""A choreographed saga's hop that the code does not run for a run (no I/O).

A deploy that changes a choreographed saga's map (a step renamed, removed, added or
moved) leaves old and new workers live side by side, both maps' groups declared. Each
run's events carry its map (``choreographed.MAP``) and the groups of that map that
react to them (``choreographed.HOPS``): a hop of another map settles a delivery the
run's map does not need and hands back one it does (``choreographed.own_hop``; here
:func:`stray_event` for a group that reacts to other events in this code). A run whose
map no live worker's code has waits, as an orchestrated run waits for a worker of its
version; ``cantata stalled``, the trace and ``cantata check-replay`` say so
(:func:`map_hop_text`, :func:`lost_hop_text` when its group is gone from the code, and
:func:`not_its_map` on a delivery settled without running; ``docs/styles.md``).

A run begun before runs carried their map follows the older rules. Its hop for a step
the new code lacks (its event delivered to the old group, not handled yet) waits;
:func:`lost_hop` tells it from a leftover by the event's deliveries (a group of the
code that reacts to the event did not get it: the event was stored before the new code
declared its groups). One hop later, its ``done`` event waits for the next step's
group, which the new code serves for another event: no hop of the code reacts to it
(:func:`is_stray`), so the consumer dead-letters it with the cause
(:func:`stray_event`) rather than settling it unhandled; on NATS, whose consumers no
longer fetch that subject, it stays pending and the same three say so.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cantata.model.event import Event, matches

from .choreographed import HOPS, MAP, own_hop

if TYPE_CHECKING:
    from cantata.declare.router import Router

LOST_HOP = "no live worker's code has step "  # how lost_hop_text begins
STRAY_HOP = "no hop of saga "  # how stray_text begins
MAP_HOP = "no live worker's code has map "  # how map_hop_text begins
NOT_ITS_MAP = "not a hop of this run's map "  # how not_its_map begins
NO_UNDO = "no compensation of step "  # how stray_event's text of a removed undo begins
LOST_HOP_WAITS = "and the run waits for it"  # in its text when the run waits for the hop


@dataclass(frozen=True, slots=True)
class LostHop:
    """A pending delivery to a group of saga ``saga`` that the code does not have.

    ``waits``: the run waits for it (no group of the code got the event instead);
    ``False``: a leftover of an earlier map, which nothing waits for.
    """

    saga: str
    group: str
    waits: bool


def saga_of(group: str, sagas: Iterable[str]) -> str | None:
    """The saga whose hops ``group`` belongs to (by its ``<saga>.`` prefix)."""
    found = [s for s in sagas if group.startswith(f"{s}.")]
    return max(found, key=len) if found else None


def lost_hop(
    group: str, event_type: str, delivered: Collection[str],
    code: Mapping[str, Collection[str]], patterns: Iterable[tuple[str, str]],
    hops: Collection[str] | None = None,
) -> LostHop | None:
    """Whether ``group``'s delivery of an event of ``event_type`` is a hop the code
    lacks (``None``: the group is no saga's, or the code has it).

    Args:
        delivered: the groups the event was delivered to.
        code: saga name -> the hop groups of that saga in the code
            (:meth:`~cantata.engine.saga.declaration.Saga.hop_groups`).
        patterns: ``(group, event type pattern)`` of the handlers declared.
        hops: the groups of the run's map that react to the event, when the event says
            (:data:`~.choreographed.HOPS`): the run waits for the group if it is one.
    """
    saga = saga_of(group, code)
    if saga is None or group in code[saga]:
        return None
    if hops is not None:
        return LostHop(saga, group, waits=group in hops)
    current = set(code[saga])
    reactors = {g for g, p in patterns if g in current and matches(p, event_type)}
    return LostHop(saga, group, waits=not reactors or not reactors <= set(delivered))


def lost_hop_text(
    name: str, hop: LostHop, code: Mapping[str, Collection[str]], version: str | None
) -> str:
    """What to tell an operator of ``hop`` (``name``: the step or compensation the
    group's handler ran)."""
    groups = ", ".join(sorted(code[hop.saga]))
    head = (f"{LOST_HOP}{name!r} of saga {hop.saga!r} (group "
            f"{hop.group}; the saga's hops in their code: {groups})")
    if not hop.waits:
        return (f"{head}: left over from an earlier map of the saga; this run does not "
                "wait for it (the code's own hop got the event)")
    of = f" {version}" if version else ""
    return (f"{head}: a deploy renamed or removed it while this run's hop for it was in "
            f"flight, {LOST_HOP_WAITS} (a cancel too, which this hop would read). "
            f"Run a worker whose code has the step (the run's version{of}) until the run "
            "has passed it, as for an orchestrated run whose recorded step the code no "
            "longer makes; cantata check-replay APP lists such runs")


def undoing(saga: str, group: str, data: Any) -> str | None:
    """The step a run's event asks ``group`` to undo (the first of its undo plan, when
    that step's group is ``group``), else ``None``."""
    undo = data.get("undo") if isinstance(data, dict) else None
    if not isinstance(undo, list) or not undo:
        return None
    step = str(undo[0])
    return step if f"{saga}.{step.replace('.', '_')}" == group else None


def map_hop_text(
    saga: str, group: str, event_type: str, run_map: str, maps: Collection[str],
    version: str | None, undo: str | None = None,
) -> str:
    """What to tell an operator of a run's hop that waits for a worker whose code has
    the run's map ``run_map`` (``maps``: those of the live workers' code; ``undo``: the
    step the hop undoes, for a compensation's hop)."""
    of = f" {version}" if version else ""
    theirs = ", ".join(sorted(maps)) or "none"
    if undo is not None:
        what = (f"its compensation of step {undo!r}, event {event_type}, waits for group "
                f"{group}; the live workers' code has map {theirs}): a deploy changed the "
                "saga's steps (removed that step's compensate=, or the step) while this run "
                f"was compensating, {LOST_HOP_WAITS}. ")
    else:
        what = (f"its event {event_type} waits for group {group}; the live workers' code "
                f"has map {theirs}): a deploy changed the saga's steps while this run was "
                f"on its way, {LOST_HOP_WAITS}. ")
    return (f"{MAP_HOP}{run_map} of saga {saga!r}, this run's map ({what}"
            f"Workers of another map leave the run's hops to a worker whose code has its map "
            f"(so no step runs twice): run one (the run's version{of}) until the run has "
            "finished; cantata check-replay APP lists such runs")


def not_its_map(group: str, event_type: str, data: Any, sagas: Iterable[str]) -> str | None:
    """Why a delivery of a run's event to ``group`` was settled without its handler
    running, when ``group`` is a hop of a saga but not of the run's map for the event
    (:func:`~.choreographed.own_hop`); ``None`` otherwise (``sagas``: the workflows'
    names)."""
    if not isinstance(data, dict) or data.get(MAP) is None:
        return None
    hops = data.get(HOPS) or ()
    saga = saga_of(group, sagas)
    if saga is None or not event_type.startswith(f"{saga}.") or group in hops:
        return None
    return (f"{NOT_ITS_MAP}{data[MAP]} of saga {saga!r} (its hops for {event_type}: "
            f"{', '.join(hops) or 'none'}): settled without running, the group being of "
            "another map of the saga, which the run's own hops do not need")


def is_stray(saga: str, event_type: str, reacted: Collection[str]) -> bool:
    """True if ``event_type``, an event of ``saga``, is one no hop of the saga in the
    code reacts to (``reacted``: the types they react to), other than its end."""
    return (event_type.startswith(f"{saga}.") and event_type != f"{saga}.finished"
            and event_type not in reacted)


def stray_text(saga: str, group: str, event_type: str, version: str | None) -> str:
    """What to tell an operator of a pending delivery to ``group`` of an event of an
    earlier map of ``saga`` (:func:`is_stray`)."""
    of = f" {version}" if version else ""
    return (f"{STRAY_HOP}{saga!r} in the live workers' code reacts to {event_type} (group "
            f"{group} no longer does): the event is of an earlier map of the saga (a step "
            f"renamed or removed by a deploy while this run was on its way), "
            f"{LOST_HOP_WAITS}. Run a worker whose code has that map (the run's "
            f"version{of}) until the run has passed it; cantata check-replay APP lists "
            "such runs")


def stray_event(router: Router, group: str, event: Event[Any]) -> str | None:
    """Why a delivery to ``group`` of an event no handler of the group matches is to be
    dead-lettered (``None``: settle it unhandled, as for any group moved to another
    pattern).

    An event of a run whose map (carried in its data) is not the code's is settled when
    ``group`` is no hop of the run's map for it, and handed back for a worker of the
    run's map when it is (the group reacts to another event in this code's map): see
    :func:`~.choreographed.own_hop`. What follows is for runs that carry no map: an
    event asking this group's step to be undone when this code has no undo of it for
    that event (its ``compensate=`` removed), or one no hop of the saga reacts to.

    Raises:
        HandBack: the delivery is a hop of its run's map, which is not this code's.

    The group is a hop of a saga in the code and no hop of that saga reacts to the
    event: the event is of an earlier map of the saga (the ``done`` event of a step a
    deploy renamed or removed, the run having passed it on the old code), and its run
    waits for the hop that would have handled it. The code's own runs never emit such
    an event, so this never dead-letters one of theirs.
    """
    event_type = event.type
    for wdef in router.workflows.values():
        saga = wdef.spec
        if saga is None:
            continue
        hops = set(saga.hop_groups())
        data = event.data if isinstance(event.data, dict) else {}
        if group in hops and data.get(MAP) is not None and event_type.startswith(
                f"{saga.name}."):
            own_hop(saga, group, data)  # (raises HandBack for a hop of the run's map)
            return None
        ours = group in hops and event_type.startswith(f"{saga.name}.")
        step = undoing(saga.name, group, data) if ours else None
        if step is not None:
            # the run's turn to undo ``step`` here, and no undo of this code takes it
            return (f"{NO_UNDO}{step!r} of saga {saga.name!r} in this code reacts to "
                    f"{event_type} (group {group}): a deploy removed the step's "
                    "compensate= (or the step) while this run was compensating, "
                    f"{LOST_HOP_WAITS}. Run a worker whose code has it (the run's "
                    "version) and replay this dead letter to it: cantata dlq replay ID")
        reacted = {h.pattern for h in router.handlers if h.group in hops}
        if group not in hops or not is_stray(saga.name, event_type, reacted):
            continue
        return (f"{STRAY_HOP}{saga.name!r} in this code reacts to {event_type} (group "
                f"{group} no longer does): the event is of an earlier map of the saga (a "
                f"step renamed or removed by a deploy while this run was on its way), "
                f"{LOST_HOP_WAITS}. Run a worker whose code has that map (the run's "
                "version) and replay this dead letter to it: cantata dlq replay ID")
    return None
