"""Why a choreographed saga's hop waits on another service: the hint of its stall.

A choreographed saga's step of another service (``Step("payments.charge")``) is a
handler built from the saga, in group ``<saga>.<step>`` of that service. Its workers
serve it only if their app includes the saga: a service whose code declares the step
alone (all an orchestrated saga needs) never reacts. The declarations in the store
tell which group is such a hop, so ``cantata stalled`` can say so.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from cantata.engine.saga.choreographed import HOPS, MAP
from cantata.engine.saga.hops import (
    LOST_HOP,
    MAP_HOP,
    STRAY_HOP,
    is_stray,
    lost_hop,
    lost_hop_text,
    map_hop_text,
    saga_of,
    stray_text,
    undoing,
)
from cantata.model.event import Event
from cantata.model.records import Declaration, RunRecord
from cantata.store.base import Store

from .assemble import short_name
from .node import COMPENSATION, HANDLER, PENDING, RUN, TraceNode
from .stall_hints import LiveWorker, live_workers, sagas_in_code

__all__ = ["HOP_HINTS", "note_lost_hops", "saga_hop_hint"]

HOP_HINTS = (LOST_HOP, STRAY_HOP, MAP_HOP)  # how the hints note_lost_hops leaves on a node begin


def saga_hop_hint(group: str | None, declarations: Sequence[Declaration]) -> str | None:
    """The hint for an unhandled event of ``group`` when the group is a choreographed
    saga's hop served by another service (``None`` otherwise)."""
    sagas = [d.name for d in declarations
             if group is not None and d.kind == "workflow" and group.startswith(f"{d.name}.")]
    for d in declarations if sagas else ():
        step, service = short_name(d), d.service
        if d.kind != "handler" or d.name != group or not step.startswith(f"{service}."):
            continue
        saga = max(sagas, key=len)
        return (f"group {group} runs step {step} of the choreographed saga {saga} for service "
                f"{service}: only a worker of service {service} whose app includes the saga "
                f"handles it; run one (cantata worker APP --service {service}) with "
                f"app.include(...) of saga {saga} in that service's code (orchestrated, "
                "the step alone is enough)")
    return None


async def note_lost_hops(
    store: Store, app: str, root: TraceNode, declarations: Sequence[Declaration],
    runs: Sequence[RunRecord], now: float | None = None,
    live: list[LiveWorker] | None = None, events: Sequence[Event[Any]] = (),
) -> None:
    """Say on each pending hop of a choreographed saga that no live worker's code has
    (a step renamed or removed by a deploy) why it waits, or that nothing waits for it,
    and on each pending delivery of an event no hop of the saga in their code reacts
    to (an event of an earlier map) that the run waits for it (``node.detail``;
    :mod:`cantata.engine.saga.hops`). The live workers (``live``, else read at
    ``now``) are read only when a saga's hop is pending.

    ``events``: the transaction's events; one that carries its run's map
    (:data:`~cantata.engine.saga.choreographed.MAP`) says which groups its run waits
    for, and a hop of a map no live worker's code has is told so."""
    sagas = [d.name for d in declarations if d.kind == "workflow"]
    parent: dict[int, TraceNode] = {}
    hops: list[TraceNode] = []
    for node in root.walk():
        for child in node.children:
            parent[id(child)] = node
        if node.kind in (HANDLER, COMPENSATION) and node.status == PENDING and node.group \
                and saga_of(node.group, sagas) is not None:
            hops.append(node)
    if not hops:
        return
    if live is None:
        live = await live_workers(store, app, time.time() if now is None else now)
    if not live or any(w.sagas is None or w.saga_events is None for w in live):
        return  # none, or one of a release that does not tell its sagas
    code = sagas_in_code(live)
    reacted = sagas_in_code(live, events=True)
    patterns = [(d.name, d.pattern) for d in declarations if d.kind == "handler"]
    versions = {r.run_id: r.version for r in runs}
    mapped = {e.id: e.data for e in events
              if isinstance(e.data, dict) and e.data.get(MAP) is not None}
    for node in hops:
        group, event = node.group, parent.get(id(node))
        if group is None or event is None:
            continue
        run = event
        while run.kind != RUN and id(run) in parent:
            run = parent[id(run)]
        version = versions.get(run.ref or "") if run.kind == RUN else None
        data = mapped.get(event.ref or "")
        waits_for: list[str] | None = None
        if data is not None:
            waits_for = list(data.get(HOPS) or ())
            named = saga_of(group, sagas)
            if named is not None and group in waits_for and group in code.get(named, ()):
                maps = {(w.saga_maps or {}).get(named) for w in live} - {None}
                # (a worker of a release that does not tell its maps runs any run's hop)
                if data[MAP] not in maps and all(w.saga_maps is not None for w in live):
                    node.detail = map_hop_text(named, group, event.name, str(data[MAP]),
                                               {str(m) for m in maps}, version,
                                               undoing(named, group, data))
                continue
        saga = saga_of(group, code)
        if saga is not None and group in code[saga]:
            if data is not None:
                continue  # (told above: its run's map, not the event, says who takes it)
            # a hop the code has, for an event none of its hops reacts to (on NATS such
            # a delivery is never fetched; the embedded broker dead-letters it)
            if is_stray(saga, event.name, reacted.get(saga, ())):
                node.detail = stray_text(saga, group, event.name, version)
            continue
        if any(w.groups is None or group in w.groups for w in live):
            continue
        delivered = [c.group for c in event.children if c.group]
        hop = lost_hop(group, event.name, delivered, code, patterns, waits_for)
        if hop is not None:
            node.detail = lost_hop_text(node.name, hop, code, version)
