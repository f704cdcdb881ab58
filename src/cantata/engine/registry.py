"""Re-exports :mod:`cantata.declare` for engine modules not yet pointed at it.

Declarations live in :mod:`cantata.declare` (docs/architecture.md); import them
from there. This module goes once ``engine.py``, ``runner.py``, ``steps.py`` and
``context.py`` (under rework in another branch) import the declarations directly.
"""

from cantata.declare.defs import (
    DECLARED_ATTR,
    STANDALONE_ATTR,
    STEP_ATTR,
    WORKFLOW_ATTR,
    StepDef,
    WorkflowDef,
    remote_step_def,
    step_name,
    workflow_name,
)
from cantata.declare.router import Router

__all__ = [
    "DECLARED_ATTR",
    "STANDALONE_ATTR",
    "STEP_ATTR",
    "WORKFLOW_ATTR",
    "Router",
    "StepDef",
    "WorkflowDef",
    "remote_step_def",
    "step_name",
    "workflow_name",
]
