"""Why a choreographed saga's hop waits on another service: the hint of its stall.

A choreographed saga's step of another service (``Step("payments.charge")``) is a
handler built from the saga, in group ``<saga>.<step>`` of that service. Its workers
serve it only if their app includes the saga: a service whose code declares the step
alone (all an orchestrated saga needs) never reacts. The declarations in the store
tell which group is such a hop, so ``cantata stalled`` can say so.
"""

from __future__ import annotations

from collections.abc import Sequence

from cantata.model.records import Declaration

from .assemble import short_name


def saga_hop_hint(group: str | None, declarations: Sequence[Declaration]) -> str | None:
    """The hint for an unhandled event of ``group`` when the group is a choreographed
    saga's hop served by another service (``None`` otherwise)."""
    sagas = [d.name for d in declarations
             if group is not None and d.kind == "workflow" and group.startswith(f"{d.name}.")]
    for d in declarations if sagas else ():
        step, service = short_name(d), d.service
        if d.kind != "handler" or d.name != group or not step.startswith(f"{service}."):
            continue
        saga = max(sagas, key=len)
        return (f"group {group} runs step {step} of the choreographed saga {saga} for service "
                f"{service}: only a worker of service {service} whose app includes the saga "
                f"handles it; run one (cantata worker APP --service {service}) with "
                f"app.include(...) of saga {saga} in that service's code (orchestrated, "
                "the step alone is enough)")
    return None
