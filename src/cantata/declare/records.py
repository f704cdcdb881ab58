"""An app's declarations as the rows the store keeps (``store.declare``): what other
services read to route events, find workflows and report orphans."""

from __future__ import annotations

from cantata.model import codec
from cantata.model.records import Declaration

from .router import Router


def declaration_records(router: Router) -> list[Declaration]:
    """One row per workflow, step, handler pattern, trigger pattern and literal wait."""
    out = [Declaration("workflow", w.name, "", w.service) for w in router.workflows.values()]
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
