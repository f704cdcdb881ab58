"""``/api/runs``, ``/api/workflows``, ``/api/overview``: runs listed (by search attribute
too), shown, cancelled, retried, forked and started by name."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from cantata.app import App
from cantata.declare.defs import Parameters, WorkflowDef
from cantata.engine.recovery import check_attribute_names
from cantata.errors import (
    ConfigurationError,
    IdempotencyConflict,
    PayloadTooLarge,
    RunNotFound,
    RunNotRetryable,
    SerializationError,
    StepNotInHistory,
    UnknownAttribute,
)
from cantata.model.access import RunQuery
from cantata.model.status import RunStatus
from cantata.observability.stalled import find_stalls
from cantata.server import params
from cantata.server.deps import ERRORS, Operator, Viewer, known_query
from cantata.server.errors import ApiError, bad_input, caused_by
from cantata.server.flow_out import run_queue, served
from cantata.server.models import (
    AttentionOut,
    CancelOut,
    ErrorOut,
    ForkIn,
    ForkOut,
    Overview,
    RetryIn,
    RunDetail,
    RunsPage,
    StallOut,
    StartIn,
    StartOut,
    run_detail,
    run_out,
    stall_out,
    utc,
)
from cantata.server.state import console_of

router = APIRouter(prefix="/api", tags=["runs"], responses=ERRORS,
                   dependencies=[Depends(known_query)])

RunId = Annotated[str, Path(pattern=params.ID_PATTERN, description="A run id")]
KeyFilter = Annotated[str | None, Query(max_length=params.MAX_KEY, description=(
    "the exact text (any characters; spaces and letters outside ASCII too)"))]


def _unprocessable(what: str) -> dict[int | str, dict[str, Any]]:
    return {422: {"model": ErrorOut, "description": what}}


@router.get("/runs", response_model=RunsPage, summary="Runs, newest first",
            responses=_unprocessable("A malformed `attr`, or one no run has set"))
async def list_runs(
    request: Request,
    _: Viewer,
    workflow: Annotated[str | None, Query(pattern=params.NAME_PATTERN)] = None,
    status: RunStatus | None = None,
    since: Annotated[str | None, Query(description="RFC 3339 time (or POSIX seconds): "
                                                   "created at or after")] = None,
    until: Annotated[str | None, Query(description="RFC 3339 time (or POSIX seconds): "
                                                   "created before")] = None,
    failed_since: Annotated[str | None, Query(description=(
        "RFC 3339 time (or POSIX seconds): failed runs that failed at or after it "
        "(whenever they were created)"))] = None,
    idempotency_key: KeyFilter = None,
    correlation_id: KeyFilter = None,
    version: Annotated[str | None, Query(max_length=params.MAX_KEY, description=(
        "the code version the runs are pinned to, exactly (as `cantata runs --version`)"
    ))] = None,
    limit: Annotated[int, Query(ge=1, le=params.MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page",
                                        max_length=600)] = None,
    attr: Annotated[list[str] | None, Query(description=(
        "NAME=VALUE: runs with this search attribute (`ctx.set_attributes`); repeat it "
        "for runs with all of them"))] = None,
) -> RunsPage:
    """One page of runs matching every filter given, newest first; follow `next_cursor`."""
    console = console_of(request)
    attributes = params.attributes(attr)
    q = RunQuery(
        workflow=params.name("workflow", workflow),
        status=status,
        since=params.timestamp("since", since),
        until=params.timestamp("until", until),
        failed_since=params.timestamp("failed_since", failed_since),
        idempotency_key=params.key("idempotency_key", idempotency_key),
        correlation_id=params.key("correlation_id", correlation_id),
        version=params.key("version", version),
        after=params.run_cursor(cursor),
        limit=limit + 1,  # one more tells whether a next page exists
        attributes=attributes,
    )
    store = await console.store()
    runs = await store.query_runs(console.app.name, q)
    if attributes and not runs:  # nothing found: a name no run has set is a typo
        try:
            await check_attribute_names(store, console.app.name, (n for n, _ in attributes))
        except UnknownAttribute as exc:
            raise ApiError(422, exc.code, console.redact(str(exc)), "attr") from None
    more = len(runs) > limit
    runs = runs[:limit]
    next_cursor = (
        params.encode_cursor([runs[-1].created_at, runs[-1].run_id]) if more else None
    )
    return RunsPage(runs=[run_out(r) for r in runs], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunDetail, summary="One run with its steps")
async def get_run(request: Request, run_id: RunId, _: Viewer) -> RunDetail:
    """The run, each step with its attempts and errors, compensations flagged; for a
    run started in a queue, its place there and the queue's limits."""
    console = console_of(request)
    params.required_ident("run_id", run_id)
    return await _detail(await console.open(), run_id)


async def _detail(app: App, run_id: str) -> RunDetail:
    store = app.store
    run = await store.get_run(app.name, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in app {app.name!r}")
    history = await store.load_history(app.name, run_id)
    attempts = await store.load_attempts(app.name, run_id)
    attributes = (await store.run_attributes(app.name, [run_id])).get(run_id, {})
    return run_detail(run, history, attempts, attributes, await run_queue(app, run))


@router.post("/runs/{run_id}/cancel", response_model=CancelOut, summary="Cancel a run")
async def cancel_run(request: Request, run_id: RunId, who: Operator) -> CancelOut:
    """Stops the run at its next durable point; it compensates. 409 if it already ended."""
    console = console_of(request)
    params.required_ident("run_id", run_id)
    app = await console.open()
    run = await app.store.get_run(app.name, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in app {app.name!r}")
    if run.status.is_final:
        raise ApiError(409, "run_final", f"run {run_id} already ended ({run.status}): "
                       "only a live run can be cancelled")
    handle = app.get_handle(run_id)
    await handle.cancel(actor=who.actor)
    after = await handle.info()
    return CancelOut(run_id=run_id, status=after.status, cancel_requested=True)


@router.post("/runs/{run_id}/retry", response_model=RunDetail, summary="Retry a failed run")
async def retry_run(
    request: Request,
    run_id: RunId,
    who: Operator,
    body: Annotated[RetryIn, Body(openapi_examples={
        "failed": {"value": {}},
        "compensated": {"value": {"include_compensated": True}},
    })] = RetryIn(),
) -> RunDetail:
    """Continues a failed run from its failed step with the deployed code (completed steps
    are not run again), as `cantata retry`; answers the run as GET /api/runs/{run_id}.
    409 if the run is live (`run_in_progress`) or ended otherwise (`run_not_retryable`):
    a compensated run only with `include_compensated`; 409 `history_not_replayable` when
    the console has the workflow's code and it does not replay the run's history (unless
    `force`)."""
    console = console_of(request)
    params.required_ident("run_id", run_id)
    app = await console.open()
    try:
        await app.get_handle(run_id).retry(actor=who.actor,
                                           include_compensated=body.include_compensated,
                                           force=body.force)
    except RunNotRetryable as exc:
        run = await app.store.get_run(app.name, run_id)
        if run is None or run.status != RunStatus.COMPENSATED or body.include_compensated:
            raise  # (another reason than the flag: the library's message says it)
        raise ApiError(409, exc.code, f"run {run_id} ended compensated: send "
                       '{"include_compensated": true} to retry it anyway (its compensations '
                       "are superseded; the steps they undid are not redone)",
                       "include_compensated") from None
    return await _detail(app, run_id)


@router.post("/runs/{run_id}/fork", status_code=201, response_model=ForkOut,
             summary="Fork a run from a step",
             responses=_unprocessable("The run never reached `from_step`, or it is not a "
                                      "step (the message lists the steps it did reach)"))
async def fork_run(
    request: Request,
    run_id: RunId,
    who: Operator,
    body: Annotated[ForkIn, Body(openapi_examples={
        "from a step": {"value": {"from_step": "charge#1"}},
    })],
) -> ForkOut:
    """Starts a new run of the run's workflow and arguments that reuses its recorded
    results before `from_step` and runs the rest with the deployed code (201), as
    `cantata fork`. 409 while the run is live."""
    console = console_of(request)
    params.required_ident("run_id", run_id)
    app = await console.open()
    try:
        handle = await app.fork(run_id, body.from_step, actor=who.actor)
    except (StepNotInHistory, ConfigurationError) as exc:
        code = exc.code if isinstance(exc, StepNotInHistory) else "invalid_input"
        raise ApiError(422, code, console.redact(str(exc)), "from_step") from None
    return ForkOut(run_id=handle.run_id)


@router.post("/workflows/{name}/runs", status_code=201, response_model=StartOut,
             summary="Start a workflow by name", responses={200: {
                 "model": StartOut, "description": "A run with this idempotency key and "
                 "the same arguments exists: it is answered (`created` is false)"}, 422: {
                 "model": ErrorOut, "description": "The arguments do not fit the "
                 "workflow's parameters (checked when its code is loaded here)"}})
async def start_run(
    request: Request,
    name: Annotated[str, Path(pattern=params.NAME_PATTERN, description="A workflow name")],
    who: Operator,
    response: Response,
    body: Annotated[StartIn, Body(openapi_examples={
        "input": {"value": {"input": {"order_id": 42}, "idempotency_key": "order-42"}},
    })] = StartIn(),
) -> StartOut:
    """Writes the run for the workers of the workflow's service to take (201). An
    `idempotency_key` already used with the same arguments answers its run with 200 and
    `created: false` (nothing is started). When the workflow's code is loaded in this
    process, arguments it cannot be called with (one missing, too many) are refused
    with 422 instead, and arguments that do not match a parameter's declared type (a
    pydantic model, a dataclass, a date) with 400 `invalid_input`, naming the field."""
    console = console_of(request)
    params.name("name", name)
    if "input" in body.model_fields_set and body.args is not None:
        raise bad_input("args", "give either input (one argument) or args (a list), not both")
    args: list[Any] = []
    sent: str | None = None  # the body field the arguments came in
    if body.args is not None:
        args, sent = body.args, "args"
    elif "input" in body.model_fields_set:
        args, sent = [body.input], "input"
    params.start_keys(body.idempotency_key, body.correlation_id)
    if sent is not None:  # the value as sent: a NaN's place is told within it
        params.finite(sent, body.args if sent == "args" else body.input)
    app = await console.open()
    wdef = app.workflows.get(name)
    if wdef is not None:  # its code is loaded here: refuse arguments it cannot be called with
        _check_arguments(wdef, args, sent)
    key = body.idempotency_key
    try:
        # Whether this call created the run, as the store decided it: of simultaneous
        # first starts with one key, exactly one is told so (and audited as the start).
        # The run's run.created names the token, in the transaction that creates it.
        handle, created = await app._start(name, *args, idempotency_key=key,
                                           correlation_id=body.correlation_id,
                                           actor=who.actor)
    except IdempotencyConflict as exc:
        raise caused_by("idempotency_key", exc) from None
    except PayloadTooLarge as exc:
        raise caused_by(sent or "input", exc) from None
    except SerializationError as exc:  # not the declared type of a loaded workflow's
        raise bad_input(sent or "input", console.redact(str(exc))) from None
    if not created:  # the key's run: nothing was started, and the log says so
        response.status_code = 200
        await app.store.record_action(app.name, who.actor, "run.start_repeated",
                                      handle.run_id, {"workflow": name,
                                                      "idempotency_key": key})
        return StartOut(run_id=handle.run_id, created=False)
    await app.store.record_action(app.name, who.actor, "run.started", handle.run_id,
                                  {"workflow": name})
    return StartOut(run_id=handle.run_id, created=True)


def _check_arguments(wdef: WorkflowDef, args: list[Any], given: str | None) -> None:
    """422 when the workflow cannot be called with ``args`` (too few or too many), as
    ``cantata start`` refuses them (:class:`~cantata.declare.defs.Parameters`).

    ``given`` is the body field the arguments came in (``None``: neither was sent).
    """
    takes = Parameters.of(wdef)
    problem = None if takes is None else takes.problem(len(args))
    if takes is None or problem is None:
        return
    raise ApiError(
        422, "invalid_arguments",
        f"{problem}: send " '{"input": x} for one argument or {"args": [...]} for several',
        given or ("input" if len(takes.required) == 1 else "args"))


@router.get("/workflows", response_model=list[str], summary="Workflow names")
async def workflows(request: Request, _: Viewer) -> list[str]:
    """Every workflow declared by any service of the app (or in this process's code)."""
    console = console_of(request)
    app = await console.open()
    declared = {d.name for d in await app.store.declarations(app.name) if d.kind == "workflow"}
    return sorted(declared | set(app.workflows))


STALLED_AFTER = 300.0  # seconds without progress: the overview's stalls, as `cantata stalled`
STALLED_COUNTED = 100  # stalls the overview counts at most (`stalled_more` past it)


@router.get("/overview", response_model=Overview, summary="Counts, failures, stalls")
async def overview(request: Request, _: Viewer) -> Overview:
    """What the dashboard's first page shows: runs by status, recent failures, stalls,
    and whether a live worker serves the app (`served`: without one no live run
    progresses, long before it counts as stalled)."""
    console = console_of(request)
    app = await console.open()
    store = app.store
    failures = []
    for status in ("failed", "compensated"):
        failures += await store.query_runs(app.name, RunQuery(status=params.status(status),
                                                              limit=10))
    failures = sorted(failures, key=lambda r: (r.created_at, r.run_id), reverse=True)[:10]
    stalls = await find_stalls(store, app.name, older_than=STALLED_AFTER,
                               now=app.clock.now(), limit=STALLED_COUNTED)
    hour_ago = app.clock.now() - 3600
    counted = await store.attention_counts(app.name, failed_since=hour_ago)
    since = utc(hour_ago)
    assert since is not None
    attention = AttentionOut(
        stalled=len(stalls), stalled_more=len(stalls) >= STALLED_COUNTED,
        dead_letters=counted.dead_letters, failed_last_hour=counted.failed_since,
        failed_since=since)
    names = await workflows(request, _)
    stalled: list[StallOut] = [stall_out(s) for s in stalls[:20]]
    return Overview(app=app.name, counts=await console.counts(),
                    recent_failures=[run_out(r) for r in failures], stalled=stalled,
                    dead_letters=counted.dead_letters, attention=attention, workflows=names,
                    served=await served(app))
