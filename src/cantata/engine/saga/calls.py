"""Calling a saga's steps the same way in both modes.

A step is called ``action(input)`` or ``action(input, results)``; a compensation
``undo(input)`` or ``undo(input, result)``. Inside a saga a step gets the saga's
retry/timeout overrides, and its result is checked once, in the attempt itself: it
must serialise, and the saga's state with it must stay within ``max_state``. Both
checks fail the step at once (no retry: the same result would fail again), naming
the run and the step, so the two modes fail identically.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import replace
from typing import Any

from cantata.declare.defs import StepDef, _runs_elsewhere
from cantata.errors import SagaStateTooLarge, SerializationError, UnknownStep
from cantata.model import codec

from ..stepinfo import step_info
from .declaration import Saga, Stage, Step


def takes_second(sdef: StepDef) -> bool:
    """True if the step's function accepts a second positional argument.

    A step served by another service is called with the input only: its signature
    is not known here.
    """
    if sdef.fn is _runs_elsewhere:
        return False
    try:
        params = list(inspect.signature(sdef.fn).parameters.values())
    except (TypeError, ValueError):
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 2 or any(p.kind is p.VAR_POSITIONAL for p in params)


def step_args(sdef: StepDef, data: Any, results: dict[str, Any]) -> list[Any]:
    """The arguments of a saga step: the input, and the earlier results if it wants them."""
    return [data, dict(results)] if takes_second(sdef) else [data]


def undo_args(cdef: StepDef, data: Any, result: Any) -> list[Any]:
    """The arguments of a compensation: the input, and the undone step's result if wanted."""
    return [data, result] if takes_second(cdef) else [data]


def state_size(data: Any, results: dict[str, Any]) -> int:
    """Bytes of JSON of a saga's state."""
    return len(codec.dumps({"input": data, "results": results}, "saga state"))


def check_input(saga: Saga, run_id: str, data: Any) -> None:
    """Refuse a run whose input alone passes the saga's state bound.

    Raises:
        SagaStateTooLarge: naming the run and the sizes.
    """
    size = state_size(data, {})
    if size > saga.max_state:
        raise SagaStateTooLarge(
            f"saga {saga.name} run {run_id}: its input is {size} bytes of JSON, over the "
            f"saga's state bound of {saga.max_state} bytes (Saga(max_state=...)); pass a "
            "reference (an id) instead of the data"
        )


def saga_step_def(
    saga: Saga, step: Step, sdef: StepDef, data: Any, results: dict[str, Any]
) -> StepDef:
    """``sdef`` as this saga runs it: overrides applied, its result checked in the attempt.

    The returned definition is local (``service=None``): the caller decided already that
    this process executes it.
    """

    fn, is_async = sdef.fn, sdef.is_async

    async def checked(*args: Any) -> Any:
        value = await (fn(*args) if is_async else asyncio.to_thread(fn, *args))
        run_id = step_info().run_id
        plain = codec.loads(codec.dumps(value, f"result of step {sdef.name} in run {run_id}"))
        size = state_size(data, {**results, sdef.name: plain})
        if size > saga.max_state:
            raise SagaStateTooLarge(
                f"saga {saga.name} run {run_id}: the result of step {sdef.name} makes the "
                f"saga's state {size} bytes of JSON, over its bound of {saga.max_state} "
                "bytes (Saga(max_state=...)); return a reference (an id) instead of the data"
            )
        return value

    checked.__name__ = checked.__qualname__ = getattr(fn, "__name__", sdef.name)
    return replace(
        sdef,
        fn=checked,
        is_async=True,
        service=None,
        retry=step.retry or sdef.retry,
        timeout=step.timeout if step.timeout is not None else sdef.timeout,
    )


def is_final_error(retry: Any, exc: BaseException) -> bool:
    """True if ``exc`` fails the attempt for good (not retryable)."""
    return not retry.is_retryable(exc) or isinstance(exc, SerializationError)


def undeclared(saga: Saga, app: str, name: str, what: str = "step") -> UnknownStep:
    """The error of a saga's step (or compensation) that no service declares, the same
    in both modes: orchestrated, the run raises it when it reaches the step;
    choreographed, the hop before the step fails the step with it."""
    return UnknownStep(
        f"saga {saga.name}: no service declares {what} {name!r} in app {app!r}: register "
        "it with @app.step (service=... for another service's step) in the service that "
        "runs it and start that service, or correct the saga's Step(...)"
    )


def stage_names(stage: Stage) -> list[tuple[Step, str, str]]:
    """``(step, name, what)`` of every step and compensation of ``stage``, in the order
    both modes resolve them before the stage begins."""
    out: list[tuple[Step, str, str]] = []
    for step in stage.steps:
        out.append((step, step.name, "step"))
        if step.compensation is not None:
            out.append((step, step.compensation, "compensation"))
    return out
