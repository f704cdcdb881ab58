"""Declarations: what an app's code declares (steps, workflows, queries, handlers,
triggers, queues, schedules), as data collected by a :class:`Router`.

This layer sits on :mod:`cantata.model` and imports nothing above it; the engine and
the choreography consumer read it (docs/architecture.md).
"""

from cantata.declare.defs import (
    HandlerDef,
    QueryDef,
    StepDef,
    TriggerDef,
    WorkflowDef,
    step_name,
    workflow_name,
)
from cantata.declare.router import Router

__all__ = [
    "HandlerDef",
    "QueryDef",
    "Router",
    "StepDef",
    "TriggerDef",
    "WorkflowDef",
    "step_name",
    "workflow_name",
]
