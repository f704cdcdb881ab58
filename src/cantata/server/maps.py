"""Maps as data: a workflow's steps and compensations, and the choreography, each as
``{"mermaid", "nodes", "edges"}`` for the dashboard to draw (and for any client).

The nodes and edges mirror the Mermaid text that :mod:`cantata.observability.graph`
and :mod:`cantata.observability.eventmap` write, node ids included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from cantata.app import App
from cantata.errors import UnknownWorkflow
from cantata.model.records import COMPENSATION as ENTRY_COMPENSATION
from cantata.model.records import HistoryEntry, RunRecord
from cantata.observability.eventmap import (
    EVENT,
    Handlers,
    _covers,
    declared_edges,
    events_mermaid,
    observed_edges,
)
from cantata.observability.graph import (
    CHILD,
    COMPENSATION,
    EMIT,
    SLEEP,
    STEP,
    WAIT,
    FlowItem,
    GraphUnavailable,
    flow_mermaid,
    items_from_history,
    workflow_items,
)
from cantata.server.models import MapEdge, MapNode, MapOut


async def workflow_map(app: App, workflow: str, run: RunRecord | None) -> MapOut:
    """The map of ``workflow``, its nodes coloured by ``run``'s history when given.

    From code when this process has it, else from the run's (or the latest run's)
    recorded history.

    Raises:
        UnknownWorkflow: nothing declares or recorded it.
        GraphUnavailable: it is declared, but neither code nor a run shows its steps.
    """
    store = app.store
    history: list[HistoryEntry] = []
    if run is not None:
        history = await store.load_history(app.name, run.run_id)
    known = workflow_items(app.router, workflow)
    if known is not None:
        items, origin = known
    else:
        source = run
        if source is None:
            latest = await store.list_runs(app.name, workflow=workflow, limit=1)
            source = latest[0] if latest else None
        entries = history if run is not None else (
            await store.load_history(app.name, source.run_id) if source is not None else [])
        items = items_from_history(entries)
        if not items:
            if not await app.engine.knows_workflow(workflow) and source is None:
                raise UnknownWorkflow(f"no workflow named {workflow!r} in app {app.name!r}")
            raise GraphUnavailable(
                f"the steps of workflow {workflow!r} are not known here: serve the console "
                "with the app's code (cantata serve module:app), or run the workflow once")
        assert source is not None
        origin = f"from the history of run {source.run_id}"
    comp_states: dict[str, str] = {}
    if run is not None:
        items = _with_states(items, history)
        for e in sorted(history, key=lambda e: e.seq):
            if e.kind == ENTRY_COMPENSATION:
                comp_states[e.name] = e.status
    return _flow(workflow, items, origin, run, comp_states)


def _key_base(item: FlowItem) -> str:
    """The base of an item's history key (``ctx.wait_for_event("t")`` is ``wait:t#n``)."""
    if item.kind == SLEEP:
        return "sleep"
    if item.kind in (WAIT, EMIT, CHILD):
        return f"{item.kind}:{item.name}"
    return item.name


def _with_states(items: Sequence[FlowItem], history: Sequence[HistoryEntry]) -> list[FlowItem]:
    """Each item with the status of its occurrence in the run (``""``: not reached)."""
    seen: dict[tuple[bool, str], int] = {}
    by_key = {e.key: e for e in history}
    comp_entries: dict[str, list[HistoryEntry]] = {}
    for e in sorted(history, key=lambda e: e.seq):
        if e.kind == ENTRY_COMPENSATION:
            comp_entries.setdefault(e.name, []).append(e)
    out = []
    for item in items:
        comp = item.kind == COMPENSATION
        base = item.name if comp else _key_base(item)
        n = seen.get((comp, base), 0) + 1
        seen[(comp, base)] = n
        if comp:
            found = comp_entries.get(item.name, [])
            entry = found[n - 1] if len(found) >= n else None
        else:
            entry = by_key.get(f"{base}#{n}")
        out.append(replace(item, status=entry.status if entry is not None else ""))
    return out


def _flow(workflow: str, items: Sequence[FlowItem], origin: str, run: RunRecord | None,
          comp_states: dict[str, str]) -> MapOut:
    """Nodes and edges laid out exactly as :func:`flow_mermaid` draws them; a declared
    compensation takes the state its recorded run (by name) has in ``comp_states``."""
    mermaid = flow_mermaid(workflow, items, origin)
    final = str(run.status) if run is not None else None
    nodes = [MapNode(id="start", kind="start", name=workflow,
                     status="completed" if run is not None else None)]
    edges: list[MapEdge] = []
    forward = [i for i in items if i.kind != COMPENSATION]
    recorded = [i for i in items if i.kind == COMPENSATION]
    prev = "start"
    ids: list[str] = []
    for n, item in enumerate(forward, 1):
        node_id = f"n{n}"
        ids.append(node_id)
        nodes.append(MapNode(id=node_id, kind=item.kind, name=item.name,
                             status=_state(item, run), note=item.note or None))
        edges.append(MapEdge(source=prev, target=node_id, kind="maybe" if item.note else "next"))
        prev = node_id
    nodes.append(MapNode(id="finish", kind="end", name="completed",
                         status="completed" if final == "completed" else None))
    edges.append(MapEdge(source=prev, target="finish", kind="next"))
    comp_of: dict[int, str] = {}
    for n, item in enumerate(forward):
        if item.compensate:
            comp_of[n] = f"c{n + 1}"
            status = comp_states.get(item.compensate) if run is not None else None
            nodes.append(MapNode(id=comp_of[n], kind="compensation", name=item.compensate,
                                 status=(status or "not_reached") if run is not None else None,
                                 note=item.note or None))
    if comp_of:
        nodes.append(MapNode(id="undone", kind="end",
                             name="cancelled" if final == "cancelled" else "compensated",
                             status=final if final in ("compensated", "cancelled") else None))
        latest: str | None = None
        for n, item in enumerate(forward):
            if latest is not None and item.kind in (STEP, CHILD, WAIT):
                edges.append(MapEdge(source=ids[n], target=latest, kind="fails", label="fails"))
            if n in comp_of:
                edges.append(MapEdge(source=comp_of[n], target=latest or "undone", kind="undo"))
                latest = comp_of[n]
    elif recorded:
        failing = next((ids[n] for n, i in enumerate(forward) if i.status == "failed"), prev)
        prev_c = failing
        for n, item in enumerate(recorded, 1):
            nodes.append(MapNode(id=f"r{n}", kind="compensation", name=item.name,
                                 status=item.status or None))
            edges.append(MapEdge(source=prev_c, target=f"r{n}", kind="undo"))
            prev_c = f"r{n}"
    return MapOut(mermaid=mermaid, nodes=nodes, edges=edges)


def _state(item: FlowItem, run: RunRecord | None) -> str | None:
    if run is None:
        return None
    if run.status.is_final and item.status in ("running", "waiting"):
        # the run ended while this call was open: it was cut short, not still going
        return "cancelled" if str(run.status) == "cancelled" else "interrupted"
    return item.status or "not_reached"


# -- the choreography -----------------------------------------------------------------------


async def events_map(app: App) -> MapOut:
    """Event types → handlers (groups) → emitted types, declared and observed.

    Edge states: ``active`` (declared and seen), ``dead`` (declared, no event ever
    reached its handler or workflow), ``silent`` (declared, never emitted),
    ``undeclared`` (seen in traffic, not declared).
    """
    store = app.store
    declarations = await store.declarations(app.name)
    handlers = Handlers(app.router, declarations)
    declared = declared_edges(app.router, declarations, handlers)
    types: set[str] = set()
    for e in declared:
        types.update(n[1] for n in (e.source, e.target) if n[0] == EVENT)
    observed = await observed_edges(store, app.name, handlers, types)
    mermaid = events_mermaid(app.name, declared, observed)
    ids: dict[tuple[str, str], str] = {}
    nodes: list[MapNode] = []

    def node(n: tuple[str, str]) -> str:
        if n not in ids:
            ids[n] = f"{n[0][0]}{len(ids) + 1}"
            nodes.append(MapNode(id=ids[n], kind=n[0], name=n[1]))
        return ids[n]

    edges: list[MapEdge] = []
    for edge in sorted(declared, key=lambda e: (e.source, e.target)):
        a, b = node(edge.source), node(edge.target)
        if any(_covers(edge, s) for s in observed):
            state = "active"
        else:
            state = "dead" if edge.source[0] == EVENT else "silent"
        edges.append(MapEdge(source=a, target=b, kind="flow", state=state,
                             label=None if state == "active" else "never seen"))
    for edge in sorted(observed, key=lambda e: (e.source, e.target)):
        if not any(_covers(d, edge) for d in declared):
            a, b = node(edge.source), node(edge.target)
            edges.append(MapEdge(source=a, target=b, kind="flow", state="undeclared",
                                 label="undeclared"))
    return MapOut(mermaid=mermaid, nodes=nodes, edges=edges)

