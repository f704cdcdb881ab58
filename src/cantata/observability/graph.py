"""Mermaid maps: a workflow's steps (``cantata graph APP WORKFLOW``) and, in
:mod:`.eventmap`, the choreography (``cantata graph APP --events``).

A workflow is drawn from code when its map can be known before it runs: a
declarative :class:`~cantata.engine.saga.Saga` carries it (``WorkflowDef.spec``),
and for a plain ``async def`` the ``ctx.run(...)`` calls (with their
``compensate=``), sleeps, waits, emits and child calls are read from the source
with :mod:`ast`. Calls inside ``if``/``for``/``try`` are marked as such: static
analysis knows they may happen, not whether. The app's declaration of the workflow
keeps that map in the store (:func:`workflow_shape`), for consoles without the code.
Otherwise (no source, dynamic calls) the map is drawn from a run's recorded history.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from cantata.declare.defs import STEP_ATTR, WORKFLOW_ATTR
from cantata.declare.router import Router
from cantata.errors import CantataError, SerializationError, UnknownWorkflow
from cantata.model import codec
from cantata.model.records import Declaration, HistoryEntry
from cantata.model.status import FINAL_STATUSES, RunStatus, call_status
from cantata.store.base import Store

STEP, SLEEP, WAIT, EMIT, CHILD, COMPENSATION = (
    "step", "sleep", "wait", "emit", "child", "compensation"
)


class GraphUnavailable(CantataError):
    """A workflow's map cannot be known from its code nor from a recorded run."""

    code = "graph_unavailable"


@dataclass(frozen=True, slots=True)
class FlowItem:
    """One durable call of a workflow, in order.

    ``note`` says when static analysis cannot promise the call happens
    (``if``, ``loop``, ``try``); ``status`` is the recorded outcome (history only).
    """

    kind: str  # step | sleep | wait | emit | child | compensation
    name: str
    compensate: str | None = None
    note: str = ""
    status: str = ""


# -- from a declarative saga ------------------------------------------------------------


def items_from_spec(spec: Any) -> list[FlowItem] | None:
    """The steps of a Saga-like spec (``spec.steps`` with ``name``/``compensation``)."""
    steps = getattr(spec, "steps", None)
    if not steps:
        return None
    out = []
    for step in steps:
        name = getattr(step, "name", None)
        if not isinstance(name, str):
            return None
        comp = getattr(step, "compensation", None)
        out.append(FlowItem(STEP, name, comp if isinstance(comp, str) else None))
    return out


# -- from source code ---------------------------------------------------------------------

_CTX_CALLS = {"run": STEP, "sleep": SLEEP, "wait_for_event": WAIT, "emit": EMIT,
              "call": CHILD, "start_child": CHILD}


class _CallFinder(ast.NodeVisitor):
    """Collects ``ctx.<call>(...)`` in source order with the construct enclosing it."""

    def __init__(self, ctx: str, resolve: Callable[[ast.expr], str]) -> None:
        self.ctx = ctx
        self.resolve = resolve
        self.found: list[tuple[int, int, FlowItem]] = []
        self.enclosing: list[str] = []

    def _nested(self, note: str, node: ast.AST) -> None:
        self.enclosing.append(note)
        self.generic_visit(node)
        self.enclosing.pop()

    def visit_If(self, node: ast.If) -> None:
        self.visit(node.test)
        self.enclosing.append("if")
        for stmt in (*node.body, *node.orelse):
            self.visit(stmt)
        self.enclosing.pop()

    def visit_For(self, node: ast.For) -> None:
        self._nested("loop", node)

    def visit_AsyncFor(self, node: ast.AsyncFor) -> None:
        self._nested("loop", node)

    def visit_While(self, node: ast.While) -> None:
        self._nested("loop", node)

    def visit_Try(self, node: ast.Try) -> None:
        for stmt in node.body:
            self.visit(stmt)
        self.enclosing.append("on error")
        for handler in node.handlers:
            self.visit(handler)
        self.enclosing.pop()
        self.enclosing.append("if")
        for stmt in node.orelse:
            self.visit(stmt)
        self.enclosing.pop()
        for stmt in node.finalbody:
            self.visit(stmt)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (
            isinstance(func, ast.Attribute)
            and isinstance(func.value, ast.Name)
            and func.value.id == self.ctx
            and func.attr in _CTX_CALLS
        ):
            kind = _CTX_CALLS[func.attr]
            first = node.args[0] if node.args else None
            if kind == SLEEP:
                name = f"sleep {ast.unparse(first)} s" if first is not None else "sleep"
            else:
                name = self.resolve(first) if first is not None else "?"
            comp = next((self.resolve(k.value) for k in node.keywords if k.arg == "compensate"),
                        None)
            note = self.enclosing[-1] if self.enclosing else ""
            self.found.append((node.lineno, node.col_offset, FlowItem(kind, name, comp, note)))
        self.generic_visit(node)


def _resolver(fn: Callable[..., Any]) -> Callable[[ast.expr], str]:
    """Turn a call's first argument into a step/workflow name where the code allows."""
    try:
        cv = inspect.getclosurevars(fn)
        scope = {**cv.builtins, **cv.globals, **cv.nonlocals}
    except (TypeError, ValueError):
        scope = dict(getattr(fn, "__globals__", {}))

    def resolve(node: ast.expr) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        obj: Any = None
        if isinstance(node, ast.Name):
            obj = scope.get(node.id, getattr(fn, "__globals__", {}).get(node.id))
        elif isinstance(node, ast.Attribute):
            parts: list[str] = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                parts.insert(0, cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                obj = scope.get(cur.id, getattr(fn, "__globals__", {}).get(cur.id))
                for part in parts:
                    obj = getattr(obj, part, None)
        for attr in (STEP_ATTR, WORKFLOW_ATTR):
            definition = getattr(obj, attr, None)
            if definition is not None:
                return str(definition.name)
        return f"{ast.unparse(node)}?"

    return resolve


def items_from_code(fn: Callable[..., Any]) -> list[FlowItem] | None:
    """The durable calls of a workflow function, read from its source (``None`` if unknown)."""
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError):
        return None
    func = next(
        (n for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)),
        None,
    )
    if func is None or not func.args.args:
        return None
    finder = _CallFinder(func.args.args[0].arg, _resolver(fn))
    for stmt in func.body:
        finder.visit(stmt)
    items = [item for _, _, item in sorted(finder.found, key=lambda t: (t[0], t[1]))]
    if not items or any(i.kind == STEP and i.name.endswith("?") for i in items):
        return None  # dynamic step choice: only a recorded run can tell
    return items


# -- from a recorded run ------------------------------------------------------------------

_HISTORY_KINDS = {"step": STEP, "sleep": SLEEP, "wait": WAIT, "emit": EMIT, "child": CHILD,
                  "compensation": COMPENSATION}


def items_from_history(entries: Sequence[HistoryEntry]) -> list[FlowItem]:
    """The calls a run actually made, in history order (``ctx.now()`` & co left out)."""
    out = []
    for e in sorted(entries, key=lambda e: e.seq):
        kind = _HISTORY_KINDS.get(e.kind)
        if kind is None:
            continue
        name = e.name
        if kind == SLEEP and e.detail:
            info = codec.loads(e.detail)
            if isinstance(info, dict):
                name = f"sleep {info.get('seconds')} s"
        out.append(FlowItem(kind, name, status=e.status))
    return out


# -- the map's layout, and its Mermaid ----------------------------------------------------

# a run's ends short of completing (each names the end a map draws for it)
FAILURE_ENDS = FINAL_STATUSES - {RunStatus.COMPLETED}


def label(text: str) -> str:
    """A quoted Mermaid label (quotes and angle brackets escaped)."""
    return '"' + text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;") + '"'


def _shape(node_id: str, item: FlowItem) -> str:
    text = item.name
    if item.note:
        text += f" ({item.note})"
    if item.status and item.status != "completed":
        text += f" [{item.status.replace('_', ' ')}]"
    if item.kind == SLEEP:
        return f"{node_id}({label('⏱ ' + text)})"
    if item.kind == WAIT:
        return f"{node_id}{{{{{label('wait for ' + text)}}}}}"
    if item.kind == EMIT:
        return f"{node_id}>{label('emit ' + text)}]"
    if item.kind == CHILD:
        return f"{node_id}[[{label('child ' + text)}]]"
    if item.kind == COMPENSATION:
        return f"{node_id}[/{label('↩ ' + text)}/]"
    return f"{node_id}[{label(text)}]"


@dataclass(frozen=True, slots=True)
class FlowNode:
    """One node of a workflow's map: ``start``, a call (``step``, ``sleep``, …,
    ``compensation``) or an ``end``; ``status`` is its state in the run drawn."""

    id: str
    kind: str
    name: str
    status: str | None = None
    note: str = ""


@dataclass(frozen=True, slots=True)
class FlowEdge:
    """One arrow of a workflow's map: ``next``, ``maybe``, ``fails`` or ``undo``."""

    source: str
    target: str
    kind: str
    label: str | None = None


@dataclass(frozen=True, slots=True)
class FlowMap:
    """A workflow's map as nodes and edges: what the Mermaid text and the console's map
    data are both made of."""

    workflow: str
    nodes: list[FlowNode]
    edges: list[FlowEdge]

    def mermaid(self, origin: str) -> str:
        """A ``flowchart TD`` of the map; ``origin`` says where its shape came from."""
        lines = ["flowchart TD", f"    %% workflow {self.workflow} — {origin}"]
        for node in self.nodes:
            if node.kind in ("start", "end"):
                lines.append(f"    {node.id}([{label(node.name)}])")
            else:
                item = FlowItem(node.kind, node.name, note=node.note, status=node.status or "")
                lines.append(f"    {_shape(node.id, item)}")
        for edge in self.edges:
            arrow = "-->" if edge.kind == "next" else "-.->"
            tag = f"|{label(edge.label)}|" if edge.label else ""
            lines.append(f"    {edge.source} {arrow}{tag} {edge.target}")
        return "\n".join(lines) + "\n"


def run_states(items: Sequence[FlowItem], history: Sequence[HistoryEntry]
               ) -> tuple[list[FlowItem], dict[str, str]]:
    """Each item with the status of its occurrence in a run (``""``: not reached), and
    the state of each compensation that ran, by name."""
    seen: dict[tuple[bool, str], int] = {}
    by_key = {e.key: e for e in history}
    comp_entries: dict[str, list[HistoryEntry]] = {}
    for e in sorted(history, key=lambda e: e.seq):
        if e.kind == "compensation":
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
        out.append(replace(item, status=str(entry.status) if entry is not None else ""))
    comp_states = {name: str(found[-1].status) for name, found in comp_entries.items()}
    return out, comp_states


def _key_base(item: FlowItem) -> str:
    """The base of an item's history key (``ctx.wait_for_event("t")`` is ``wait:t#n``)."""
    if item.kind == SLEEP:
        return "sleep"
    if item.kind in (WAIT, EMIT, CHILD):
        return f"{item.kind}:{item.name}"
    return item.name


def _state(item: FlowItem, run: str) -> str:
    """An item's state in a run whose status is ``run``."""
    return call_status(item.status, run) or "not_reached"


def flow_map(workflow: str, items: Sequence[FlowItem], run: str | None = None, *,
             whole: bool = True, comp_states: Mapping[str, str] | None = None) -> FlowMap:
    """The map of ``items``; compensations hang off the steps they undo.

    A step that fails hands over to the compensation of the latest earlier step that
    registered one; compensations then run in reverse order.

    Args:
        items: the workflow's calls: its whole shape (``whole``: from its code or its
            declaration), or what one run did (its history, each call with its status).
        run: the status of the run whose states ``items`` carry (:func:`run_states`):
            each node gets its state in that run, and the end it reached is named by
            it (``completed``, ``failed``, ``compensated``, ``cancelled``; a live run
            has reached none). ``None``: the workflow's map alone.
        whole: ``False`` when ``items`` are one run's history, which cannot tell the
            ends that run did not reach: only its own is drawn (none while it is live).
        comp_states: each compensation's state in the run, by name.
    """
    final = run if run in FINAL_STATUSES else None
    failure = final if final in FAILURE_ENDS else None
    states = comp_states or {}
    nodes = [FlowNode("start", "start", workflow, "completed" if run is not None else None)]
    edges: list[FlowEdge] = []
    forward = [i for i in items if i.kind != COMPENSATION]
    recorded = [i for i in items if i.kind == COMPENSATION]
    ids: list[str] = []
    prev = "start"
    for n, item in enumerate(forward, 1):
        node_id = f"n{n}"
        ids.append(node_id)
        state = _state(item, run) if run is not None else None
        nodes.append(FlowNode(node_id, item.kind, item.name, state, item.note))
        edges.append(FlowEdge(prev, node_id, "maybe" if item.note else "next"))
        prev = node_id
    stop = _stopped_at(nodes[1:])  # index in forward of the call the run stopped at

    comp_of: dict[int, str] = {}
    for n, item in enumerate(forward):
        if item.compensate:
            comp_of[n] = f"c{n + 1}"
    # The end on the failure side: drawn with compensations, named by how the run ended.
    has_comps = bool(comp_of or recorded)
    undone = has_comps and (whole or failure is not None)
    # The end of the forward path: a run that failed without compensations ends there.
    if whole or final == "completed" or (failure is not None and not undone):
        name = failure if failure is not None and not undone else "completed"
        status = None if run is None else name if name == final else "not_reached"
        nodes.append(FlowNode("finish", "end", name, status))
        edges.append(FlowEdge(prev, "finish", "next"))
    if comp_of:
        for n, comp in comp_of.items():
            item = forward[n]
            status = None if run is None else states.get(item.compensate or "", "not_reached")
            nodes.append(FlowNode(comp, COMPENSATION, item.compensate or "", status, item.note))
    elif recorded:
        prev_c = ids[stop] if stop >= 0 else prev
        for n, item in enumerate(recorded, 1):
            nodes.append(FlowNode(f"r{n}", COMPENSATION, item.name,
                                  None if run is None else item.status or "not_reached"))
            edges.append(FlowEdge(prev_c, f"r{n}", "undo"))
            prev_c = f"r{n}"
    if undone:
        nodes.append(FlowNode("undone", "end", failure or "compensated",
                              None if run is None else failure or "not_reached"))
    if comp_of:
        latest: str | None = None
        for n, item in enumerate(forward):
            if latest is not None and item.kind in (STEP, CHILD, WAIT):
                edges.append(FlowEdge(ids[n], latest, "fails", "fails"))
            elif n == stop and failure is not None:
                # where the run stopped, with no way into the undo path drawn from it
                edges.append(FlowEdge(ids[n], latest or "undone", "fails",
                                      "cancelled" if failure == "cancelled" else "fails"))
            if n in comp_of:
                edges.append(FlowEdge(comp_of[n], latest or "undone", "undo"))
                latest = comp_of[n]
        if stop < 0 and failure is not None:  # it ended before its first call
            edges.append(FlowEdge("start", "undone", "fails",
                                  "cancelled" if failure == "cancelled" else "fails"))
    elif recorded and undone:
        edges.append(FlowEdge(f"r{len(recorded)}", "undone", "undo"))
    return FlowMap(workflow, nodes, edges)


def _stopped_at(calls: Sequence[FlowNode]) -> int:
    """The index of the call a run stopped at: the one it failed or was cut short in,
    else the last it reached (``-1``: none)."""
    reached = -1
    for n, node in enumerate(calls):
        if node.status in ("failed", "cancelled", "interrupted"):
            return n
        if node.status not in (None, "not_reached"):
            reached = n
    return reached


def flow_mermaid(workflow: str, items: Sequence[FlowItem], origin: str,
                 run: str | None = None, *, whole: bool = True) -> str:
    """A ``flowchart TD`` of ``items`` (see :func:`flow_map`)."""
    return flow_map(workflow, items, run, whole=whole).mermaid(origin)


def workflow_items(router: Router, workflow: str) -> tuple[list[FlowItem], str] | None:
    """The map of ``workflow`` known from code, with where it came from (``None`` if not)."""
    wdef = router.workflows.get(workflow)
    if wdef is None:
        return None
    spec = wdef.spec if wdef.spec is not None else getattr(wdef.fn, "__cantata_saga__", None)
    if spec is not None:
        from .sagamap import is_saga, saga_items

        items = saga_items(spec) if is_saga(spec) else items_from_spec(spec)
        if items:
            return items, "declared saga"
    items = items_from_code(wdef.fn)
    return (items, "from code (static analysis)") if items else None


def workflow_shape(router: Router, workflow: str) -> dict[str, Any] | None:
    """``workflow``'s map as its declaration keeps it in the store (the ``map`` and
    ``origin`` of its JSON detail, see :mod:`cantata.declare.records`), for consoles
    and tools without the code; ``None`` when the code cannot tell it."""
    known = workflow_items(router, workflow)
    if known is None:
        return None
    items, origin = known
    calls = [{"kind": i.kind, "name": i.name, "compensate": i.compensate, "note": i.note}
             for i in items]
    return {"map": calls, "origin": origin}


def declared_items(declarations: Sequence[Declaration], workflow: str
                   ) -> tuple[list[FlowItem], str] | None:
    """The map of ``workflow`` that its declaration keeps (:func:`workflow_shape`), with
    where it came from; ``None`` if the declaring code kept none (older versions)."""
    for d in declarations:
        if d.kind != "workflow" or d.name != workflow or not d.detail:
            continue
        try:
            info = codec.loads(d.detail)
            items = [FlowItem(str(c["kind"]), str(c["name"]),
                              str(c["compensate"]) if c.get("compensate") else None,
                              str(c.get("note") or "")) for c in info["map"]]
        except (SerializationError, KeyError, TypeError, AttributeError):
            return None  # no map kept (the code could not tell it), or not one we read
        if items:
            return items, f"{info.get('origin', 'from code')}, as declared in the store"
    return None


def code_mermaid(router: Router, workflow: str) -> str | None:
    """Mermaid for ``workflow`` when its code tells its map (a saga's declaration, or
    the ``ctx`` calls read from its source); ``None`` otherwise."""
    wdef = router.workflows.get(workflow)
    if wdef is not None:
        from .sagamap import is_saga, saga_mermaid

        if is_saga(wdef.spec):
            return saga_mermaid(wdef.spec)
    known = workflow_items(router, workflow)
    return flow_mermaid(workflow, *known) if known is not None else None


async def workflow_mermaid(router: Router, app: str, workflow: str, store: Store | None) -> str:
    """Mermaid for ``workflow``: from code if possible, else from the map its declaration
    keeps in ``store``, else from its latest recorded run.

    Raises:
        UnknownWorkflow: neither the code nor the store knows it.
        GraphUnavailable: it is known but its map can be read neither from code nor
            from a recorded run.
    """
    drawn = code_mermaid(router, workflow)
    if drawn is not None:
        return drawn
    if store is not None:
        declared = declared_items(await store.declarations(app), workflow)
        if declared is not None:
            return flow_mermaid(workflow, *declared)
        runs = await store.list_runs(app, workflow=workflow, limit=1)
        if runs:
            entries = await store.load_history(app, runs[0].run_id)
            items = items_from_history(entries)
            if items:
                origin = f"from the history of run {runs[0].run_id} ({runs[0].status})"
                return flow_mermaid(workflow, items, origin, str(runs[0].status), whole=False)
    if workflow not in router.workflows:
        raise UnknownWorkflow(
            f"no workflow named {workflow!r} in app {app!r} (known: "
            f"{', '.join(sorted(router.workflows)) or 'none'})"
        )
    raise GraphUnavailable(
        f"the steps of workflow {workflow!r} cannot be read from its code (no source, or the "
        "steps are chosen at run time) and it has no recorded run yet: run it once, then "
        "draw it again with --store pointing at that store"
    )
