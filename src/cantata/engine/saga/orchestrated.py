"""A saga run orchestrated: the generated workflow calls the steps, stage by stage.

Steps are durable calls of the run (``name#1``, as ``ctx.run`` records them), so a
crash replays finished steps. A parallel stage runs its branches as concurrent calls
of one run; their keys are their names, so replay does not depend on which branch
finished first. Once every branch has ended, the compensations of those that
finished are registered in declaration order, and the first failure in declaration
order fails the run: the runner then undoes in reverse — the finished branches,
then the steps before.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from cantata.errors import UnknownStep

from .calls import saga_step_def, stage_names, step_args, undeclared, undo_args
from .declaration import Saga, Stage, Step

if TYPE_CHECKING:
    from cantata.declare.defs import StepDef

    from ..context import WorkflowContext


async def run_orchestrated(saga: Saga, ctx: WorkflowContext, data: Any) -> dict[str, Any]:
    """Run every stage in order; returns ``{step name: result}`` in declaration order."""
    results: dict[str, Any] = {}
    for stage in saga.stages:
        before = dict(results)
        defs = await resolve_stage(saga, ctx, stage)
        calls = [_call(saga, ctx, step, data, before, defs) for step in stage.steps]
        if not stage.parallel:
            value, comp = await calls[0]
            results[stage.steps[0].name] = value
            _register(ctx, comp, data, value)
            continue
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        for step, outcome in zip(stage.steps, outcomes, strict=True):
            if not isinstance(outcome, BaseException):
                value, comp = outcome
                results[step.name] = value
                _register(ctx, comp, data, value)
        failure = _first_failure(outcomes)
        if failure is not None:
            raise failure
    return results


def _first_failure(outcomes: list[Any]) -> BaseException | None:
    """The error a parallel stage ends with: an interruption (cancel, deadline, the
    worker letting go) first, else the first failed branch in declaration order."""
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    for e in errors:
        if not isinstance(e, Exception):
            return e
    return errors[0] if errors else None


async def resolve_stage(saga: Saga, ctx: WorkflowContext, stage: Stage) -> dict[str, StepDef]:
    """The definitions of ``stage``'s steps and compensations, by name, before any of
    them begins.

    Raises:
        UnknownStep: one of them is declared by no service (nor registered here): no
            branch of the stage begins, as in choreographed mode, where the hop before
            the stage finds the same (``docs/styles.md``).
    """
    found: dict[str, StepDef] = {}
    for step, name, what in stage_names(stage):
        fn = step.action if what == "step" else step.compensate
        assert fn is not None
        try:
            found[name] = await ctx._step_def(fn, what)
        except UnknownStep:
            raise undeclared(saga, ctx._x.engine.app, name, what) from None
    return found


async def _call(
    saga: Saga, ctx: WorkflowContext, step: Step, data: Any, results: dict[str, Any],
    defs: dict[str, StepDef],
) -> tuple[Any, StepDef | None]:
    """Run one step durably; returns its result and its resolved compensation."""
    sdef = defs[step.name]
    comp = defs[step.compensation] if step.compensation is not None else None
    x = ctx._x
    args = step_args(sdef, data, results)
    key = x.journal.next_key(sdef.name)
    if x.engine.is_remote(sdef):
        # Served by another service's workers with their own options and checks.
        value = await x.call_step(sdef, args, key)
    else:
        value = await x.call_step(saga_step_def(saga, step, sdef, data, results), args, key)
    return value, comp


def _register(ctx: WorkflowContext, comp: StepDef | None, data: Any, value: Any) -> None:
    if comp is not None:
        # (in declaration order, after every step registered before: docstring above)
        ctx._x.compensations.append((comp, undo_args(comp, data, value)))
        ranks = ctx._x.api.compensation_ranks
        ranks.append(ranks[-1] if ranks else (float("-inf"), 0))
