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


# A StepInfo, or the arguments to make one from (``StepInfo(*them)``): the engine sets
# the tuple on every attempt, and the frozen dataclass (one ``object.__setattr__`` per
# field) is made only when asked for (:func:`current`; most steps never ask,
# docs/performance.md round twenty-five).
_current: contextvars.ContextVar[StepInfo | tuple[Any, ...] | None] = contextvars.ContextVar(
    "cantata_step_info", default=None
)


def current() -> StepInfo | None:
    """The :class:`StepInfo` of the step running here, or ``None`` outside a step."""
    info = _current.get()
    if type(info) is tuple:
        run_id, step, key, attempt, previous = info
        return StepInfo(run_id, step, key, attempt, f"{run_id}:{key}", previous)
    return info  # type: ignore[return-value]


def step_info() -> StepInfo:
    """The :class:`StepInfo` of the step running in this task or thread.

    Raises:
        CantataError: when called outside a step.
    """
    info = current()
    if info is None:
        raise CantataError(
            "cantata.step_info() was called outside a step: call it inside a function "
            "decorated with @app.step while a workflow runs it"
        )
    return info


def set_step_info(
    info: StepInfo | tuple[Any, ...] | None,
) -> contextvars.Token[StepInfo | tuple[Any, ...] | None]:
    """``info``: a StepInfo, or the tuple ``(run_id, step, key, attempt,
    heartbeat_details)`` to make one from when asked."""
    return _current.set(info)


def reset_step_info(token: contextvars.Token[StepInfo | tuple[Any, ...] | None]) -> None:
    _current.reset(token)
