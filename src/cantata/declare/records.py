"""An app's declarations as the rows the store keeps (``store.declare``): what other
services read to route events, find workflows and report orphans, and consoles without
the code read to draw workflow maps."""

from __future__ import annotations

from cantata.model import codec
from cantata.model.records import Declaration

from .router import Router


def declaration_records(router: Router) -> list[Declaration]:
    """One row per workflow (with its map, where its code tells it), step, handler
    pattern, trigger pattern and literal wait."""
    from cantata.observability.graph import workflow_shape  # its maps' own code

    out = [Declaration("workflow", w.name, "", w.service, workflow_shape(router, w.name))
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
