"""Maps as data: a workflow's steps and compensations, and the choreography, each as
``{"mermaid", "nodes", "edges"}`` for the dashboard to draw (and for any client).

The nodes and edges are those of the Mermaid text that :mod:`cantata.observability.graph`
and :mod:`cantata.observability.eventmap` write, node ids included.
"""

from __future__ import annotations

from dataclasses import replace

from cantata.app import App
from cantata.errors import CantataError, UnknownWorkflow
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
    STEP,
    GraphUnavailable,
    declared_items,
    flow_map,
    items_from_history,
    run_states,
    workflow_items,
)
from cantata.observability.node import TraceNode
from cantata.server.models import MapEdge, MapNode, MapOut


async def workflow_map(app: App, workflow: str, run: RunRecord | None) -> MapOut:
    """The map of ``workflow``, its nodes coloured by ``run``'s history when given.

    From code when this process has it, else from the map the code's declaration kept
    in the store, else from the run's (or the latest run's) recorded history; either
    way its end is the run's own (:func:`flow_map`).

    Raises:
        UnknownWorkflow: nothing declares or recorded it.
        GraphUnavailable: it is declared, but neither code nor a run shows its steps.
    """
    store = app.store
    history: list[HistoryEntry] = []
    if run is not None:
        history = await store.load_history(app.name, run.run_id)
    known = workflow_items(app.router, workflow)
    if known is None:  # the map the app's code declared, kept in the store
        known = declared_items(await store.declarations(app.name), workflow)
    source = run
    if known is not None:
        items, origin = known
    else:
        if source is None:
            latest = await store.list_runs(app.name, workflow=workflow, limit=1)
            source = latest[0] if latest else None
        entries = history if run is not None else (
            await store.load_history(app.name, source.run_id) if source is not None else [])
        items = items_from_history(entries)
        if not items and run is None:
            if not await app.engine.knows_workflow(workflow) and source is None:
                declared = {d.name for d in await store.declarations(app.name)
                            if d.kind == "workflow"}
                names = ", ".join(sorted(declared | set(app.workflows))) or "none"
                raise UnknownWorkflow(f"no workflow named {workflow!r} in app {app.name!r} "
                                      f"(known: {names}); GET /api/workflows lists them")
            raise GraphUnavailable(
                f"the steps of workflow {workflow!r} are not known here: serve the console "
                "with the app's code (cantata serve module:app), or run the workflow once")
        assert source is not None
        origin = f"from the history of run {source.run_id} ({source.status})"
    comp_states: dict[str, str] = {}
    if run is not None:
        items, comp_states = run_states(items, history)
        if known is not None and not any(i.status for i in items if i.kind == STEP):
            # a choreographed saga's steps are handlers, not calls of its history (which
            # holds its start event and its wait for the end): their states are the
            # handlers' of its trace
            steps, undone = await _hop_states(app, workflow, run)
            if steps or undone:
                items = [replace(i, status=steps.get(i.name, "")) if i.kind == STEP else i
                         for i in items]
                comp_states.update(undone)
    drawn = flow_map(workflow, items, str(source.status) if source is not None else None,
                     whole=known is not None, comp_states=comp_states)
    coloured = run is not None  # a plain map drawn from a run's history shows no states
    nodes = [MapNode(id=n.id, kind=n.kind, name=n.name, status=n.status if coloured else None,
                     note=n.note or None) for n in drawn.nodes]
    edges = [MapEdge(source=e.source, target=e.target, kind=e.kind, label=e.label)
             for e in drawn.edges]
    return MapOut(mermaid=drawn.mermaid(origin), nodes=nodes, edges=edges)


_HOP_STATUS = {"completed": "completed", "failed": "failed", "dead": "failed",
               "pending": "running", "retired": "failed"}


async def _hop_states(app: App, workflow: str, run: RunRecord
                      ) -> tuple[dict[str, str], dict[str, str]]:
    """The states of a choreographed saga run's steps and of its compensations, by
    name: its trace's handler and compensation nodes under the run, whose groups are
    the saga's hops (``<saga>.<step>``). Empty for another run."""
    try:
        root = await app.trace(run.correlation_id)
    except CantataError:  # (gone meanwhile, or the store is away: the map says less)
        return {}, {}
    prefix = f"{workflow}."

    def find(node: TraceNode) -> TraceNode | None:
        if node.kind == "run" and node.ref == run.run_id:
            return node
        for child in node.children:
            found = find(child)
            if found is not None:
                return found
        return None

    steps: dict[str, str] = {}
    undone: dict[str, str] = {}
    below = find(root)
    todo = list(below.children) if below is not None else []
    while todo:
        node = todo.pop(0)
        if node.kind == "run":  # (a child run's own hops are its own)
            continue
        todo.extend(node.children)
        group = node.group or ""
        if not group.startswith(prefix):
            continue
        state = _HOP_STATUS.get(node.status, node.status)
        if node.kind == "handler":
            steps[node.name] = state
        elif node.kind == "compensation":
            undone[node.name] = state
    return steps, undone


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

