"""The choreography map: event type → handler (group) → emitted types, and workflows.

Edges are *declared* (from code: handlers and their ``emits``, ``start_on``
triggers, waits and ``ctx.emit`` calls read from workflow source; plus what other
services recorded in the store) and *observed* (from traffic: an event whose
causation is an event a group handled, runs an event started, events a run
emitted). The drawing marks the difference: solid = declared and seen, dashed =
declared but never seen, thick = seen but not declared.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cantata.declare.router import Router
from cantata.model import codec
from cantata.model.event import matches
from cantata.model.records import Declaration, is_retired
from cantata.store.base import Store, TraceRecords

from .assemble import TRIGGER_PREFIX, short_name
from .graph import EMIT, WAIT, FlowItem, declared_items, items_from_code, label

EVENT, HANDLER, WORKFLOW = "event", "handler", "workflow"
SAMPLE = 200  # transactions read to observe traffic


@dataclass(frozen=True, slots=True)
class Edge:
    """``source → target``; a node is ``(kind, name)``, a handler's name ``group: handler``."""

    source: tuple[str, str]
    target: tuple[str, str]


class Handlers:
    """Which handler of a group takes an event type (code first, then the store)."""

    def __init__(self, router: Router, declarations: Sequence[Declaration]) -> None:
        self.table: list[tuple[str, str, str, tuple[str, ...]]] = [
            (h.group, h.pattern, h.name.rsplit("<locals>.", 1)[-1], tuple(h.emits))
            for h in router.handlers
        ]
        known = {(g, p) for g, p, _, _ in self.table}
        for d in declarations:
            if (
                d.kind != "handler"
                or d.name.startswith(TRIGGER_PREFIX)
                or (d.name, d.pattern) in known
            ):
                continue
            info = codec.loads(d.detail) if d.detail else {}
            emits = info.get("emits") if isinstance(info, dict) else None
            self.table.append((d.name, d.pattern, short_name(d), tuple(emits or ())))
            known.add((d.name, d.pattern))

    def node(self, group: str, event_type: str) -> tuple[str, str]:
        wildcard = None
        for g, pattern, name, _ in self.table:
            if g != group or not matches(pattern, event_type):
                continue
            if "*" not in pattern:
                return HANDLER, _handler_label(g, name)
            wildcard = wildcard or _handler_label(g, name)
        return HANDLER, wildcard or group


def _handler_label(group: str, name: str) -> str:
    return group if name == group else f"{group}: {name}"


def declared_edges(
    router: Router, declarations: Sequence[Declaration], handlers: Handlers
) -> set[Edge]:
    """What code (this process's and, via the store, other services') says flows where."""
    edges: set[Edge] = set()
    for group, pattern, name, emits in handlers.table:
        node = (HANDLER, _handler_label(group, name))
        edges.add(Edge((EVENT, pattern), node))
        edges.update(Edge(node, (EVENT, t)) for t in emits)
    triggers = {(t.pattern, t.workflow) for t in router.triggers}
    for d in declarations:
        if d.kind == "trigger":
            info = codec.loads(d.detail) if d.detail else {}
            wf = info.get("workflow") if isinstance(info, dict) else None
            triggers.add((d.pattern, str(wf or d.name.removeprefix(TRIGGER_PREFIX))))
        elif d.kind == "wait":
            edges.add(Edge((EVENT, d.pattern), (WORKFLOW, d.name)))
    edges.update(Edge((EVENT, p), (WORKFLOW, wf)) for p, wf in triggers)
    calls: dict[str, list[FlowItem]] = {
        wdef.name: items_from_code(wdef.fn) or [] for wdef in router.workflows.values()}
    for d in declarations:  # (a console without the code: the maps the store keeps)
        if d.kind == "workflow" and d.name not in calls:
            kept = declared_items(declarations, d.name)
            calls[d.name] = kept[0] if kept is not None else []
    for name, items in calls.items():
        for item in items:
            if item.kind == EMIT and not item.name.endswith("?"):
                edges.add(Edge((WORKFLOW, name), (EVENT, item.name)))
            elif item.kind == WAIT and not item.name.endswith("?"):
                edges.add(Edge((EVENT, item.name), (WORKFLOW, name)))
    # A choreographed saga's workflow emits its start event, to which its first hops
    # (the groups `<saga>.<step>`) react: Cantata declares it, not the user's code.
    for group, pattern, _, _ in handlers.table:
        saga = pattern.removesuffix(".started")
        if pattern.endswith(".started") and group.startswith(f"{saga}.") and saga in calls:
            edges.add(Edge((WORKFLOW, saga), (EVENT, pattern)))
    return edges


def edges_of_records(app: str, records: TraceRecords, handlers: Handlers) -> set[Edge]:
    """What one transaction shows actually flowed."""
    edges: set[Edge] = set()
    events = {e.id: e for e, _ in records.events}
    runs = {r.run_id: r for r in records.runs}
    prefix = f"cantata/{app}/"
    for d in records.deliveries:
        # reached the group: handled, or at least attempted (a dead letter counts); a
        # delivery its group's retire ended was not handled
        handled = d.status in ("done", "dead") and not is_retired(d.status, d.error)
        reached = handled or d.attempts > 0
        if reached and not d.group.startswith(TRIGGER_PREFIX):
            edges.add(Edge((EVENT, d.event.type), handlers.node(d.group, d.event.type)))
    for e in events.values():
        cause = e.causation_id
        if cause in events and e.source.startswith(prefix):
            group = e.source[len(prefix):]
            edges.add(Edge(handlers.node(group, events[cause].type), (EVENT, e.type)))
        elif cause in runs:
            edges.add(Edge((WORKFLOW, runs[cause].workflow), (EVENT, e.type)))
    for r in runs.values():
        if r.causation_id in events and r.parent_run_id is None:
            edges.add(Edge((EVENT, events[r.causation_id].type), (WORKFLOW, r.workflow)))
        for entry in records.entries.get(r.run_id, []):
            if entry.kind == "wait" and entry.status == "completed":
                edges.add(Edge((EVENT, entry.name), (WORKFLOW, r.workflow)))
    return edges


async def observed_edges(
    store: Store, app: str, handlers: Handlers, types: Iterable[str], *, sample: int = SAMPLE
) -> set[Edge]:
    """Edges seen in up to ``sample`` recent transactions that touched ``types`` or ran."""
    cids: dict[str, None] = {}
    for run in await store.list_runs(app, limit=sample):
        cids.setdefault(run.correlation_id)
    for t in sorted(set(types)):
        for ev in await store.find_events(app, t, since=0.0, exclude=(), limit=sample):
            cids.setdefault(ev.correlation_id or ev.id)
    edges: set[Edge] = set()
    for cid in list(cids)[:sample]:
        records = await store.trace_records(app, cid, limit=2_000)
        edges |= edges_of_records(app, records, handlers)
    return edges


def _covers(declared: Edge, seen: Edge) -> bool:
    def same(a: tuple[str, str], b: tuple[str, str]) -> bool:
        if a[0] != b[0]:
            return False
        return matches(a[1], b[1]) if a[0] == EVENT else a[1] == b[1]

    return same(declared.source, seen.source) and same(declared.target, seen.target)


def events_mermaid(app: str, declared: set[Edge], observed: set[Edge] | None) -> str:
    """A ``flowchart LR`` of the choreography; ``observed=None`` draws declarations only."""
    lines = ["flowchart LR", f"    %% choreography map of app {app}"]
    if observed is not None:
        lines.append("    %% solid: declared and seen; dashed: declared, never seen; "
                     "thick: seen, not declared")
    ids: dict[tuple[str, str], str] = {}

    def node(n: tuple[str, str]) -> str:
        if n not in ids:
            ids[n] = f"{n[0][0]}{len(ids) + 1}"
            kind, name = n
            if kind == EVENT:
                lines.append(f"    {ids[n]}([{label(name)}])")
            elif kind == WORKFLOW:
                lines.append(f"    {ids[n]}[[{label('workflow ' + name)}]]")
            else:
                lines.append(f"    {ids[n]}[{label(name)}]")
        return ids[n]

    body: list[str] = []
    for edge in sorted(declared, key=lambda e: (e.source, e.target)):
        a, b = node(edge.source), node(edge.target)
        if observed is None or any(_covers(edge, s) for s in observed):
            body.append(f"    {a} --> {b}")
        else:
            body.append(f"    {a} -.->|{label('never seen')}| {b}")
    for edge in sorted(observed or (), key=lambda e: (e.source, e.target)):
        if not any(_covers(d, edge) for d in declared):
            a, b = node(edge.source), node(edge.target)
            body.append(f"    {a} ==>|{label('undeclared')}| {b}")
    return "\n".join(lines + body) + "\n"


async def choreography_mermaid(
    router: Router, app: str, store: Store | None, *, sample: int = SAMPLE
) -> str:
    """The choreography map of ``app``: declared from code (and the store), observed from
    traffic when ``store`` is given."""
    declarations = await store.declarations(app) if store is not None else []
    handlers = Handlers(router, declarations)
    declared = declared_edges(router, declarations, handlers)
    observed = None
    if store is not None:
        types: set[str] = set()
        for e in declared:
            types.update(n[1] for n in (e.source, e.target) if n[0] == EVENT)
        observed = await observed_edges(store, app, handlers, types, sample=sample)
    return events_mermaid(app, declared, observed)

