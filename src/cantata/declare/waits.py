"""The event types a workflow's code waits for, found before any run reaches the wait.

An event published before a run reaches its ``ctx.wait_for_event`` is kept for that
wait (docs/guide.md), so it is not an orphan; but the wait is only declared in the
store when a run first reaches it. Reading the literal types out of the workflow's
source lets the app declare them when it opens.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import textwrap
from collections.abc import Callable
from typing import Any


def literal_waits(fn: Callable[..., Any]) -> set[str]:
    """Event types passed to ``*.wait_for_event(...)`` in ``fn``'s source: string
    literals, and names bound to strings (module constants, closure variables).

    Types computed at run time are not found here; they are declared when a run
    first reaches the wait. A function whose source cannot be read yields none.
    """
    source = None
    with contextlib.suppress(OSError, TypeError):
        source = inspect.getsource(fn)
    if source is None:
        return set()
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:
        return set()
    names = {**getattr(fn, "__globals__", {}), **_closure(fn)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == "wait_for_event"):
            continue
        args = [*node.args[:1], *(k.value for k in node.keywords if k.arg == "type")]
        for arg in args:
            value = arg.value if isinstance(arg, ast.Constant) else (
                names.get(arg.id) if isinstance(arg, ast.Name) else None
            )
            if isinstance(value, str):
                found.add(value)
    return found


def _closure(fn: Callable[..., Any]) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    out: dict[str, Any] = {}
    if code is not None:
        for name, cell in zip(code.co_freevars, cells, strict=False):
            with contextlib.suppress(ValueError):  # a cell not yet filled
                out[name] = cell.cell_contents
    return out
