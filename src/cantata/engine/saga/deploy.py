"""Registering a saga: one workflow, and the handlers of its choreography.

Whatever the deployed mode, the saga is registered the same way: a workflow that
records the mode of each run when it starts (so a run started under one mode
finishes in it after a redeploy in the other), and the handlers that carry the
choreographed runs. Only new runs follow the deployed mode.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

from cantata.declare.defs import STEP_ATTR, HandlerDef, StepDef
from cantata.errors import UnknownStep
from cantata.model.retry import HANDLER_RETRY, STEP_RETRY, Retry

from .calls import check_input
from .choreographed import forward_handler, run_choreographed, undo_handler
from .declaration import Saga, Stage, Step
from .join import join_handler
from .orchestrated import run_orchestrated

if TYPE_CHECKING:
    from cantata.declare.router import Router

    from ..context import WorkflowContext

MODE_VALUE = "saga.mode"  # the recorded value naming a run's mode


def attach(saga: Saga, router: Router) -> None:
    """Register ``saga``'s steps, workflow and handlers in ``router``.

    Raises:
        UnknownStep: a step named by a string is neither registered nor qualified by
            the service that serves it.
    """
    for step in saga.steps:
        for fn in (step.action, step.compensate):
            sdef = getattr(fn, STEP_ATTR, None)
            if isinstance(sdef, StepDef):
                if sdef.name not in router.steps:
                    router._add_step(sdef)
            elif isinstance(fn, str) and fn not in router.steps and "." not in fn:
                raise UnknownStep(
                    f"saga {saga.name}: step {fn!r} is not registered: decorate it with "
                    "@app.step before including the saga (a step of another service is "
                    "named 'service.step')"
                )

    async def saga_workflow(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
        check_input(saga, ctx.run_id, data)
        mode = ctx._value(MODE_VALUE, lambda: _started_as(saga, ctx) or saga.mode)
        if mode == "choreographed":
            return await run_choreographed(saga, ctx, data)
        return await run_orchestrated(saga, ctx, data)

    saga_workflow.__name__ = saga_workflow.__qualname__ = saga.name
    router.workflow(name=saga.name)(saga_workflow)
    router.workflows[saga.name] = replace(router.workflows[saga.name], spec=saga)
    # A choreographed run waits for its outcome, and the trace shows each step's
    # failure: neither is an orphan, though no handler may react to a failure.
    router.waits.add((saga.name, saga.event_type("finished")))
    router.waits.update((saga.name, saga.event_type(s.name, "failed")) for s in saga.steps)
    _attach_handlers(saga, router)


def _started_as(saga: Saga, ctx: WorkflowContext) -> str | None:
    """The mode of a run that began before modes were recorded, read from its history
    (``None`` for a new run): it must finish as it began."""
    keys = ctx._x.journal.history
    if any(k.startswith(f"emit:{saga.event_type('started')}#") for k in keys):
        return "choreographed"
    if any(k.partition("#")[0] in {s.name for s in saga.steps} for k in keys):
        return "orchestrated"
    return None


def _with_lost_attempt(retry: Retry) -> Retry:
    """The step's policy plus the attempt that records ``WorkerLost`` (see choreographed)."""
    return replace(retry, max_attempts=retry.max_attempts + 1, non_retryable=())


def _step_retry(router: Router, step: Step, name: str) -> Retry:
    if step.retry is not None and name == step.name:
        return step.retry
    sdef = router.steps.get(name)
    return sdef.retry if sdef is not None else STEP_RETRY


def _service(router: Router, name: str) -> str | None:
    sdef = router.steps.get(name)
    if sdef is not None:
        return sdef.service
    return name.split(".", 1)[0] if "." in name else None


def _next_failed(saga: Saga, stage: Stage) -> tuple[str, ...]:
    """What the hop that ends ``stage`` emits instead of ``<stage>.done`` when the next
    stage's step is declared by no service (``choreographed.next_stage``)."""
    if stage.index == len(saga.stages) - 1:
        return ()
    after = saga.stages[stage.index + 1]
    first = saga.undo_before(after)[:1]
    if after.parallel:
        return tuple(saga.compensate_event(n) for n in first)
    return (saga.failed_event(after),) if first else ()


def _attach_handlers(saga: Saga, router: Router) -> None:
    triggers = saga.undo_triggers()
    finished = saga.event_type("finished")
    known: set[str] = set()  # steps some service declared (choreographed.stage_failure)
    for stage in saga.stages:
        after = (
            finished if stage.index == len(saga.stages) - 1
            else saga.event_type(stage.name, "done")
        )
        for step in stage.steps:
            group, service = saga.group(step.name), _service(router, step.name)
            done = ((saga.event_type(step.name, "done"),) if stage.parallel
                    else (after, *_next_failed(saga, stage)))
            fwd = forward_handler(saga, router, stage, step, known)
            _add(saga, router, saga.trigger(stage), group, fwd, service,
                 _with_lost_attempt(_step_retry(router, step, step.name)),
                 (*done, saga.event_type(step.name, "failed"), saga.failed_event(stage),
                  finished), step.name)
            if step.compensation is None:
                continue
            undo = undo_handler(saga, router, step)
            retry = _with_lost_attempt(_step_retry(router, step, step.compensation))
            emits = (saga.event_type(step.name, "compensated"),
                     *(saga.compensate_event(b.name) for b in stage.steps
                       if b.compensation is not None and b is not step),
                     *(saga.compensate_event(t) for t in saga.undo_before(stage)[:1]),
                     finished)
            for pattern in triggers[step.name]:
                _add(saga, router, pattern, group, undo, service, retry, emits,
                     step.compensation)
        if stage.parallel:
            _attach_join(saga, router, stage, after, known)


def _attach_join(saga: Saga, router: Router, stage: Stage, after: str, known: set[str]) -> None:
    join = join_handler(saga, router, stage, known)
    firsts = [*(b.name for b in stage.steps if b.compensation is not None),
              *saga.undo_before(stage)[:1]]
    emits = (after, *_next_failed(saga, stage), *(saga.compensate_event(n) for n in firsts),
             saga.event_type("finished"))
    for step in stage.steps:
        for outcome in ("done", "failed"):
            _add(saga, router, saga.event_type(step.name, outcome), saga.group(stage.name), join,
                 None, HANDLER_RETRY, emits)


def _add(
    saga: Saga, router: Router, pattern: str, group: str, fn: Any, service: str | None,
    retry: Retry, emits: tuple[str, ...], step: str | None = None,
) -> None:
    router._add_handler(HandlerDef(
        pattern=pattern, group=group, fn=fn, retry=retry, model=None, is_async=True,
        wants_ctx=True, emits=tuple(dict.fromkeys(emits)), service=service,
        workflow=None if service is not None else saga.name, step=step,
    ))
