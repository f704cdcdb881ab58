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
    """Event types passed as a string literal to ``*.wait_for_event(...)`` in ``fn``.

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
    found: set[str] = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "wait_for_event"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found
