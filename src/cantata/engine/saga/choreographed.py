"""A saga run choreographed: each step is a handler reacting to the previous step's event.

The run itself only starts the chain and waits for its end, so a choreographed run
has the same run id, statuses and result as an orchestrated one::

    <saga>.started → <step1>.done → … → <saga>.finished
    <stepN>.failed → <undo of stepN-1>.compensated → … → <saga>.finished

The saga's state (its input and the results so far) travels in the events; a
failure also carries the undo plan (which steps to undo, in order). Each undo event
is meant for the one service whose turn it is (see ``Saga.undo_triggers``). Every
event of a run has an id derived from the run and its type: a hop repeated after a
crash emits the same event again, which the log keeps once.

Every event of a run also carries the run's map (``map``: :attr:`Saga.map_id` of the
code that started the chain) and the hop groups of that map that react to it
(``hops``). A deploy that changes the map (a step renamed, removed, added, moved, a
compensation changed) leaves old and new code live side by side, both maps' groups
declared, so an event goes to the groups of both: each hop runs only for the runs of
its own code's map (:func:`own_hop`), so a step runs once per run, under the run's
map. A run whose events carry no map (begun before maps were carried) is run by any
code, as before.

A handler that keeps killing its worker is charged like an orchestrated step: its
handler allows one attempt more than the step's retry policy, and that extra
attempt, which only happens when the last one was cut short, records ``WorkerLost``
without calling the step.
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import TYPE_CHECKING, Any

from cantata.choreography.context import HandBack
from cantata.errors import Cancelled, DeadlineExceeded, StepFailed, UnknownStep, error_text
from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import EntryKind, EntryStatus
from cantata.model.status import RunStatus

from ..event_waits import Wants
from ..invoke import invoke_step
from ..runtime import Watch
from ..signals import CompensatedElsewhere, _DeadlinePassed
from ..steps import WORKER_LOST
from .calls import is_final_error, saga_step_def, stage_names, step_args, undeclared, undo_args
from .declaration import Saga, Stage, Step

if TYPE_CHECKING:
    from cantata.choreography.context import HandlerContext
    from cantata.declare.defs import StepDef
    from cantata.declare.router import Router

    from ..context import WorkflowContext


def start_key(workflow: str) -> str:
    """The history key of a choreographed saga run's start event (its first call)."""
    return f"emit:{workflow}.started#1"


def end_key(workflow: str) -> str:
    """The history key of a choreographed saga run's wait for its end."""
    return f"wait:{workflow}.finished#1"


def ran_choreographed(workflow: str, keys: set[str]) -> bool:
    """Whether a run of ``workflow`` whose history holds ``keys`` ran as a choreographed
    saga: its start event and its wait for the end (its steps: other services' handlers)."""
    return start_key(workflow) in keys and end_key(workflow) in keys


async def run_choreographed(saga: Saga, ctx: WorkflowContext, data: Any) -> dict[str, Any]:
    """Start the chain of handlers and wait for ``<saga>.finished``.

    Raises:
        UnknownStep: a step of the first stage (or its compensation) is declared by no
            service, found before the chain starts, as an orchestrated run finds it.
    """
    started = saga.event_type("started")
    if start_key(saga.name) not in ctx._x.journal.history:  # (a replay started it already)
        from .orchestrated import resolve_stage

        await resolve_stage(saga, ctx, saga.stages[0])
    await ctx.emit(started, {"run_id": ctx.run_id, "input": data, "results": {},
                             MAP: saga.map_id, HOPS: list(saga.reactors().get(started, ()))})
    try:
        end = await wait_finished(saga, ctx)
    except (Cancelled, _DeadlinePassed) as exc:
        return await _stop(saga, ctx, exc)
    if end["outcome"] == "completed":
        return dict(end["results"])
    raise CompensatedElsewhere(end["error"], status=RunStatus(end["outcome"]),
                               flagged=bool(end.get("flagged")))


async def _stop(saga: Saga, ctx: WorkflowContext, exc: BaseException) -> dict[str, Any]:
    """A cancel or the deadline stops a choreographed run as it stops an orchestrated
    one: the step in flight finishes, no later step starts, what finished is undone.

    The run's cancel flag is what the services see (each forward handler reads it
    before its step); the reason is recorded, so a replay ends the run the same way.
    """
    x = ctx._x
    if isinstance(exc, Cancelled):
        reason = "Cancelled: the run was cancelled"
    else:
        reason = error_text(DeadlineExceeded(f"run {ctx.run_id} passed its deadline"))
    reason = str(ctx._value("saga.stop", lambda: reason))
    status = RunStatus.CANCELLED if reason.startswith("Cancelled") else RunStatus.FAILED
    x.compensating = True  # from here on, only the undoing goes on
    if status == RunStatus.FAILED:  # a cancel has set the run's flag already
        await x.engine.store.request_cancel(x.run.app, ctx.run_id, actor="deadline")
    end = await wait_finished(saga, ctx)
    if end["outcome"] == "completed":
        return dict(end["results"])  # the last step had finished: as orchestrated
    failures = list(end.get("failures") or [])
    if failures:
        raise CompensatedElsewhere(f"{reason}; compensation failed: {'; '.join(failures)}",
                                   status=RunStatus.FAILED, flagged=True)
    if status == RunStatus.FAILED and end.get("undone"):
        status = RunStatus.COMPENSATED
    raise CompensatedElsewhere(reason, status=status)


async def wait_finished(saga: Saga, ctx: WorkflowContext) -> dict[str, Any]:
    """Wait durably for this run's ``<saga>.finished`` event, recorded like a
    ``ctx.wait_for_event`` (a ``wait`` in history and in the trace).

    The event's id is known (:func:`event_id`), so each look is one read by id, not
    a scan of every run's ``finished`` events as a match on the data would be.
    """
    x = ctx._x
    engine = x.engine
    finished = saga.event_type("finished")
    j = x.journal
    call = await j.replay_or_begin(EntryKind.WAIT, finished, base=f"wait:{finished}")
    entry = call.entry
    if entry is not None and call.replayed:
        return dict(Event.from_cloudevent(codec.loads(entry.result)).data)
    if entry is None:
        entry = await j.begin(call, EntryStatus.WAITING, started_at=x.now(),
                              detail=codec.dumps({"type": finished,
                                                  "match": {"run_id": ctx.run_id}}))
    await engine.declare_wait(x.wdef.name, finished)
    wanted = event_id(x.run.app, ctx.run_id, finished)
    found: list[Event[Any]] = []

    async def look() -> bool:
        ev = await engine.store.get_event(x.run.app, wanted)
        if ev is not None:
            found.append(ev)
        return ev is not None

    await j.await_final(entry, look, watch=Watch("event", finished, Wants(event_id=wanted)),
                        poll=False)
    j.consumed_events.add(wanted)
    await j.settle(entry, EntryStatus.COMPLETED, result=found[0].to_json().decode())
    return dict(found[0].data)


# -- events -----------------------------------------------------------------------------

MAP = "map"  # in a run's events: the run's map (Saga.map_id)
OTHER_MAP = "run"  # how a hand-back's text begins (after "HandBack: "): "run R has map M"
HOPS = "hops"  # in a run's event: the hop groups of the run's map that react to it


def own_hop(saga: Saga, group: str, data: dict[str, Any]) -> bool:
    """Whether this code runs ``group``'s hop for a run's event carrying ``data``.

    ``True`` when the run's map is this code's (or unknown: a run begun before maps
    were carried); ``False`` when ``group`` is no hop of the run's map for this event:
    the delivery is settled without running anything (a group of another map, whose
    event the groups of the run's own map got too; the trace says so).

    Raises:
        HandBack: ``group`` is a hop of the run's map for this event but this code's
            map is another: the delivery is left for a worker whose code has the run's
            map (the group is in both maps, served by old and new workers alike).
    """
    run_map = data.get(MAP)
    if run_map is None or run_map == saga.map_id:
        return True
    if group not in (data.get(HOPS) or ()):
        return False
    raise HandBack(
        f"{OTHER_MAP} {data.get('run_id')} has map {run_map} of saga {saga.name!r}, and this "
        f"worker's code has map {saga.map_id} (a deploy changed the saga's steps): "
        f"its hop of group {group} is left for a worker whose code has the run's map (the "
        "run's version); the run waits for one"
    )


def event_id(app: str, run_id: str, event_type: str) -> str:
    """The id of a run's event of ``event_type`` (each type happens once per run)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"cantata:{app}:saga:{run_id}:{event_type}"))


async def emit(
    ctx: HandlerContext, event_type: str, data: dict[str, Any],
    cause: Event[Any] | None = None, *, saga: Saga | None = None,
) -> None:
    """Emit a saga event with its run-derived id (and, for a run that carries its map,
    the groups of the map that react to it).

    ``cause`` (the join) makes the event a function of stored events only: its time,
    causation and traceparent come from ``cause``, so two handlers that both complete a
    join emit the very same event.
    """
    if saga is not None and MAP in data:
        data = {**data, HOPS: list(saga.reactors().get(event_type, ()))}
    ev = await ctx.emit(event_type, data)
    fixed = dataclasses.replace(ev, id=event_id(ctx.app, data["run_id"], event_type))
    if cause is not None:
        fixed = dataclasses.replace(fixed, time=cause.time, causation_id=cause.id,
                                    traceparent=cause.traceparent, subject=cause.subject)
    ctx.emitted[-1] = fixed


def end_of(data: dict[str, Any]) -> dict[str, Any]:
    """The ``finished`` event data for a run's state: outcome, error, flag."""
    failure = data.get("failure")
    if failure is None:
        return {**data, "outcome": "completed"}
    # A step that never began (see stage_failure) fails the run with its own error, as
    # the orchestrated run raises it.
    error = failure.get("error") or error_text(StepFailed(
        failure["step"], failure["type"], failure["message"], failure["attempts"]))
    failures = list(data.get("failures") or [])
    if failures:
        return {**data, "outcome": "failed", "flagged": True,
                "error": f"{error}; compensation failed: {'; '.join(failures)}"}
    outcome = "compensated" if data.get("undone") else "failed"
    return {**data, "outcome": outcome, "error": error}


async def fail_stage(
    saga: Saga, ctx: HandlerContext, stage: Stage, state: dict[str, Any],
    finished: list[str], cause: Event[Any] | None = None,
) -> None:
    """Say ``stage`` failed, with the undo plan; end the run if nothing is to undo.

    An event that nobody would react to is not emitted: ``finished`` says it all.
    """
    plan = saga.undo_plan(stage, finished)
    state = {**state, "undo": plan, "undone": [], "failures": []}
    if not plan:
        await emit(ctx, saga.event_type("finished"), end_of(state), cause, saga=saga)
    elif stage.parallel:  # which branch is undone first depends on which finished
        await emit(ctx, saga.compensate_event(plan[0]), state, cause, saga=saga)
    else:
        await emit(ctx, saga.failed_event(stage), state, cause, saga=saga)


async def stage_failure(
    saga: Saga, router: Router, ctx: HandlerContext, stage: Stage, known: set[str]
) -> dict[str, Any] | None:
    """The failure of ``stage`` before it begins when one of its steps (or of their
    compensations) is declared by no service (``None`` when each is), which the hop
    before the stage says instead of starting it: an orchestrated run fails there with
    the same error (``orchestrated.resolve_stage``), and no service would ever react to
    the stage's event.

    A step is known if this process registered it or a service declared it (the
    store's declarations, read only for a step not known yet: ``known`` keeps the
    names found, for this app's later hops).
    """
    names = stage_names(stage)
    if all(name in router.steps or name in known for _, name, _ in names):
        return None
    store = ctx._store
    if store is None:
        return None
    known.update(d.name for d in await store.declarations(ctx.app)
                 if d.kind == "step" and d.service)
    for step, name, what in names:
        if name not in router.steps and name not in known:
            exc = undeclared(saga, ctx.app, name, what)
            return {"step": step.name, "type": type(exc).__name__, "message": str(exc),
                    "attempts": 0, "error": error_text(exc)}
    return None


async def next_stage(
    saga: Saga, router: Router, ctx: HandlerContext, stage: Stage, state: dict[str, Any],
    known: set[str], cause: Event[Any] | None = None,
) -> None:
    """``stage`` is done (not the last): emit ``<stage>.done``, which starts the next
    stage, or the next stage's failure when a step of it is declared by no service."""
    after = saga.stages[stage.index + 1]
    failure = await stage_failure(saga, router, ctx, after, known)
    if failure is None:
        await emit(ctx, saga.event_type(stage.name, "done"), state, cause, saga=saga)
    else:
        await fail_stage(saga, ctx, after, {**state, "failure": failure}, [], cause)


def resolve(saga: Saga, router: Router, name: str) -> StepDef:
    sdef = router.steps.get(name)
    if sdef is None:
        raise UnknownStep(
            f"saga {saga.name}: step {name!r} is not registered in this process: register "
            "it with @app.step in the service that handles it"
        )
    return sdef


# -- handlers ---------------------------------------------------------------------------


def forward_handler(
    saga: Saga, router: Router, stage: Stage, step: Step, known: set[str]
) -> Any:
    """The handler that runs ``step`` when its stage's trigger arrives (``known``: see
    :func:`stage_failure`)."""
    last = stage.index == len(saga.stages) - 1

    async def forward(event: Event[Any], ctx: HandlerContext) -> None:
        data = dict(event.data)
        if not own_hop(saga, ctx.group, data):
            return
        run_id, given, results = data["run_id"], data["input"], dict(data["results"])
        sdef = resolve(saga, router, step.name)
        call_def = saga_step_def(saga, step, sdef, given, results)
        retry = call_def.retry
        failure: dict[str, Any] | None = None
        if await _stopping(ctx, run_id):
            failure = {"step": sdef.name, "type": "Cancelled",
                       "message": "the run was stopped before this step", "attempts": 0}
        elif ctx.attempt > retry.max_attempts:
            failure = {"step": sdef.name, "type": WORKER_LOST[0], "message": WORKER_LOST[1],
                       "attempts": ctx.attempt - 1}
        else:
            try:
                value = await invoke_step(call_def, step_args(sdef, given, results), run_id,
                                          f"{sdef.name}#1", ctx.attempt)
            except Exception as exc:
                if not is_final_error(retry, exc) and ctx.attempt < retry.max_attempts:
                    raise  # retried by the delivery, with the step's backoff
                failure = {"step": sdef.name, "type": type(exc).__name__,
                           "message": str(exc), "attempts": ctx.attempt}
        if failure is not None:
            state = {**data, "failure": failure}
            if stage.parallel:
                await emit(ctx, saga.event_type(step.name, "failed"), state, saga=saga)
            else:
                await fail_stage(saga, ctx, stage, state, [])
            return
        results[sdef.name] = codec.loads(codec.dumps(value, f"result of step {sdef.name}"))
        state = {**data, "results": results}
        if last and not stage.parallel:
            await emit(ctx, saga.event_type("finished"), end_of(state), saga=saga)
        elif stage.parallel:  # to the stage's join
            await emit(ctx, saga.event_type(step.name, "done"), state, saga=saga)
        else:
            await next_stage(saga, router, ctx, stage, state, known)

    # Named as the step it runs, so a trace reads the same in both modes.
    forward.__name__ = forward.__qualname__ = step.name
    return forward


async def _stopping(ctx: HandlerContext, run_id: str) -> bool:
    """True if the run was cancelled (or passed its deadline): start no more steps."""
    store = ctx._store
    if store is None:
        return False
    run = await store.get_run(ctx.app, run_id)
    return run is not None and (run.cancel_requested or run.status.is_final)


def undo_handler(saga: Saga, router: Router, step: Step) -> Any:
    """The handler that undoes ``step`` when the undo plan names it next."""
    assert step.compensation is not None
    comp_name = step.compensation

    async def undo(event: Event[Any], ctx: HandlerContext) -> None:
        data = dict(event.data)
        if not own_hop(saga, ctx.group, data):
            return
        plan = list(data.get("undo") or [])
        if not plan or plan[0] != step.name:
            return  # not this step's turn (never sent so; kept as a guard)
        undone = list(data.get("undone") or [])
        failures = list(data.get("failures") or [])
        cdef = resolve(saga, router, comp_name)
        # The n-th undo by the same compensation, as the orchestrated runner keys it.
        n = 1 + sum(1 for s in undone if saga.step(s).compensation == comp_name)
        retry = cdef.retry
        if ctx.attempt > retry.max_attempts:
            failures.append(str(StepFailed(cdef.name, *WORKER_LOST, ctx.attempt - 1)))
        else:
            result = data["results"].get(step.name)
            try:
                await invoke_step(cdef, undo_args(cdef, data["input"], result),
                                  data["run_id"], f"compensate:{cdef.name}#{n}", ctx.attempt)
            except Exception as exc:
                if not is_final_error(retry, exc) and ctx.attempt < retry.max_attempts:
                    raise
                failures.append(str(StepFailed(cdef.name, type(exc).__name__, str(exc),
                                               ctx.attempt)))
        state = {**data, "undo": plan[1:], "undone": [*undone, step.name], "failures": failures}
        if plan[1:]:
            failed = data["failure"]["step"]
            await emit(ctx, saga.next_undo_event(step.name, failed, plan[1:]), state, saga=saga)
        else:
            await emit(ctx, saga.event_type("finished"), end_of(state), saga=saga)

    undo.__name__ = undo.__qualname__ = comp_name
    return undo
