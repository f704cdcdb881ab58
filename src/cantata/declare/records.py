"""An app's declarations as the rows the store keeps (``store.declare``): what other
services read to route events, find workflows and report orphans, and consoles without
the code read to draw workflow maps."""

from __future__ import annotations

from collections.abc import Callable

from cantata.model import codec
from cantata.model.records import Declaration

from .router import Router


def declaration_records(
    router: Router, maps: Callable[[Router, str], str | None] | None = None
) -> list[Declaration]:
    """One row per workflow, step, handler pattern, trigger pattern and literal wait.

    Args:
        maps: a workflow's map as its row keeps it (the app passes
            :func:`cantata.observability.graph.workflow_shape`), or ``None``.
    """
    out = [Declaration("workflow", w.name, "", w.service,
                       maps(router, w.name) if maps is not None else None)
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
