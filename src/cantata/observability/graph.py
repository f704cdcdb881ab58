"""Mermaid maps: a workflow's steps (``cantata graph APP WORKFLOW``) and, in
:mod:`.eventmap`, the choreography (``cantata graph APP --events``).

A workflow is drawn from code when its map can be known before it runs: a
declarative :class:`~cantata.engine.saga.Saga` carries it (``WorkflowDef.spec``),
and for a plain ``async def`` the ``ctx.run(...)`` calls (with their
``compensate=``), sleeps, waits, emits and child calls are read from the source
with :mod:`ast`. Calls inside ``if``/``for``/``try`` are marked as such: static
analysis knows they may happen, not whether. Otherwise (no source, dynamic calls)
the map is drawn from the recorded history of the workflow's latest run.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cantata.declare.defs import STEP_ATTR, WORKFLOW_ATTR
from cantata.declare.router import Router
from cantata.errors import CantataError, UnknownWorkflow
from cantata.model import codec
from cantata.model.records import HistoryEntry
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


# -- Mermaid ------------------------------------------------------------------------------


def label(text: str) -> str:
    """A quoted Mermaid label (quotes and angle brackets escaped)."""
    return '"' + text.replace('"', "#quot;").replace("<", "#lt;").replace(">", "#gt;") + '"'


def _shape(node_id: str, item: FlowItem) -> str:
    text = item.name
    if item.note:
        text += f" ({item.note})"
    if item.status and item.status != "completed":
        text += f" [{item.status}]"
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


def flow_mermaid(workflow: str, items: Sequence[FlowItem], origin: str) -> str:
    """A ``flowchart TD`` of ``items``; compensations hang off the steps they undo.

    A step that fails hands over to the compensation of the latest earlier step that
    registered one; compensations then run in reverse order.
    """
    lines = ["flowchart TD", f"    %% workflow {workflow} — {origin}",
             f"    start([{label(workflow)}])"]
    forward = [i for i in items if i.kind != COMPENSATION]
    recorded_comps = [i for i in items if i.kind == COMPENSATION]
    prev = "start"
    ids: list[str] = []
    for n, item in enumerate(forward, 1):
        node_id = f"n{n}"
        ids.append(node_id)
        lines.append(f"    {_shape(node_id, item)}")
        arrow = "-.->" if item.note else "-->"
        lines.append(f"    {prev} {arrow} {node_id}")
        prev = node_id
    lines.append(f"    {prev} --> finish([{label('completed')}])")
    comp_of: dict[int, str] = {}
    for n, item in enumerate(forward):
        if item.compensate:
            comp_id = f"c{n + 1}"
            comp_of[n] = comp_id
            comp = FlowItem(COMPENSATION, item.compensate, note=item.note)
            lines.append(f"    {_shape(comp_id, comp)}")
    if comp_of:
        lines.append(f"    undone([{label('compensated')}])")
        latest: str | None = None
        for n, item in enumerate(forward):
            if latest is not None and item.kind in (STEP, CHILD, WAIT):
                lines.append(f"    {ids[n]} -.->|{label('fails')}| {latest}")
            if n in comp_of:
                lines.append(f"    {comp_of[n]} -.-> {latest or 'undone'}")
                latest = comp_of[n]
    elif recorded_comps:
        failing = next((ids[n] for n, i in enumerate(forward) if i.status == "failed"), prev)
        prev_c = failing
        for n, item in enumerate(recorded_comps, 1):
            lines.append(f"    {_shape(f'r{n}', item)}")
            lines.append(f"    {prev_c} -.-> r{n}")
            prev_c = f"r{n}"
    return "\n".join(lines) + "\n"


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
    """Mermaid for ``workflow``: from code if possible, else from its latest recorded run.

    Raises:
        UnknownWorkflow: neither the code nor the store knows it.
        GraphUnavailable: it is known but its map can be read neither from code nor
            from a recorded run.
    """
    drawn = code_mermaid(router, workflow)
    if drawn is not None:
        return drawn
    if store is not None:
        runs = await store.list_runs(app, workflow=workflow, limit=1)
        if runs:
            entries = await store.load_history(app, runs[0].run_id)
            items = items_from_history(entries)
            if items:
                origin = f"from the history of run {runs[0].run_id} ({runs[0].status})"
                return flow_mermaid(workflow, items, origin)
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
