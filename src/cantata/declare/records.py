"""An app's declarations as the rows the store keeps (``store.declare``): what other
services read to route events, find workflows and report orphans, and processes
without the code read to draw workflow maps and to start a workflow in its queue.

A workflow's row keeps a JSON object (its ``detail``): ``queue``, the queue its
``@app.workflow(queue=...)`` names (``null`` for none), and, when the code tells its
map, ``map`` and ``origin`` (:func:`cantata.observability.graph.workflow_shape`).
Older versions kept the map alone, or nothing: such a row does not tell the queue.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cantata.errors import SerializationError
from cantata.model import codec
from cantata.model.records import Declaration

from .defs import WorkflowDef
from .router import Router

#: :func:`declared_queues`' answer for a workflow declared without a queue (a queue's
#: name is never empty).
NO_QUEUE = ""


def declaration_records(
    router: Router, maps: Callable[[Router, str], dict[str, Any] | None] | None = None
) -> list[Declaration]:
    """One row per workflow, step, handler pattern, trigger pattern and literal wait.

    Args:
        maps: a workflow's map as its row keeps it (the app passes
            :func:`cantata.observability.graph.workflow_shape`), or ``None``.
    """
    out = [Declaration("workflow", w.name, "", w.service, workflow_detail(router, w, maps))
           for w in router.workflows.values()]
    out += [Declaration("step", s.name, "", s.service) for s in router.steps.values()]
    out += [
        Declaration("handler", h.group, h.pattern, h.service,
                    codec.dumps({"handler": h.name, "emits": list(h.emits)}))
        for h in router.handlers
    ]
    out += [Declaration("trigger", t.group, t.pattern, None,
                        codec.dumps({"workflow": t.workflow})) for t in router.triggers]
    out += [Declaration("wait", wf, t) for wf, t in sorted(router.waits)]
    return out


def workflow_detail(
    router: Router, wdef: WorkflowDef,
    maps: Callable[[Router, str], dict[str, Any] | None] | None,
) -> str:
    """The JSON ``detail`` of ``wdef``'s row: its queue, and its map when known."""
    detail: dict[str, Any] = {"queue": wdef.queue}
    shape = maps(router, wdef.name) if maps is not None else None
    if shape:
        detail.update(shape)
    return codec.dumps(detail, f"the declaration of workflow {wdef.name!r}")


def declared_queues(declarations: Sequence[Declaration]) -> dict[str, str | None]:
    """For every declared workflow, the queue its row names: a queue's name,
    :data:`NO_QUEUE` when declared without one, ``None`` when the row does not tell
    (written by an older version)."""
    out: dict[str, str | None] = {}
    for d in declarations:
        if d.kind == "workflow":
            out[d.name] = _queue_of(d.detail)
    return out


def _queue_of(detail: str | None) -> str | None:
    try:
        info = codec.loads(detail) if detail else None
    except SerializationError:
        return None
    if not isinstance(info, dict) or "queue" not in info:
        return None
    queue = info["queue"]
    return queue if isinstance(queue, str) and queue else NO_QUEUE
