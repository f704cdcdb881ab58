"""``cantata.step_info()``: what a running step knows about itself."""

from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any

from cantata.errors import CantataError


@dataclass(frozen=True, slots=True)
class StepInfo:
    """Identity of the step attempt being executed.

    Attributes:
        run_id: the workflow run.
        step: the step's name.
        key: its place in history (``name#occurrence``).
        attempt: 1 for the first attempt.
        idempotency_key: stable across retries and recoveries; pass it to external APIs.
        heartbeat_details: the details of the last ``cantata.heartbeat(details)`` of an
            earlier attempt of this step (``None`` on a first attempt, or if it sent none).
    """

    run_id: str
    step: str
    key: str
    attempt: int
    idempotency_key: str
    heartbeat_details: Any = None


_current: contextvars.ContextVar[StepInfo | None] = contextvars.ContextVar(
    "cantata_step_info", default=None
)


def step_info() -> StepInfo:
    """The :class:`StepInfo` of the step running in this task or thread.

    Raises:
        CantataError: when called outside a step.
    """
    info = _current.get()
    if info is None:
        raise CantataError(
            "cantata.step_info() was called outside a step: call it inside a function "
            "decorated with @app.step while a workflow runs it"
        )
    return info


def set_step_info(info: StepInfo | None) -> contextvars.Token[StepInfo | None]:
    return _current.set(info)


def reset_step_info(token: contextvars.Token[StepInfo | None]) -> None:
    _current.reset(token)
