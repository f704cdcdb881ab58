"""``/api/runs``, ``/api/workflows``, ``/api/overview``: runs listed, shown, cancelled and
started by name."""

from __future__ import annotations

import inspect
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request

from cantata.declare.defs import WorkflowDef
from cantata.errors import RunNotFound
from cantata.model.access import RunQuery
from cantata.model.status import RunStatus
from cantata.server import params
from cantata.server.auth import Principal
from cantata.server.deps import ERRORS, operator, viewer
from cantata.server.errors import ApiError, bad_input
from cantata.server.models import (
    CancelOut,
    ErrorOut,
    Overview,
    RunDetail,
    RunsPage,
    StallOut,
    StartIn,
    StartOut,
    run_detail,
    run_out,
)
from cantata.server.observe import stall_out
from cantata.server.state import console_of

router = APIRouter(prefix="/api", tags=["runs"], responses=ERRORS)

Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]
RunId = Annotated[str, Path(pattern=params.ID_PATTERN, description="A run id")]
IdFilter = Annotated[str | None, Query(pattern=params.ID_PATTERN)]


@router.get("/runs", response_model=RunsPage, summary="Runs, newest first")
async def list_runs(
    request: Request,
    _: Viewer,
    workflow: Annotated[str | None, Query(pattern=params.NAME_PATTERN)] = None,
    status: RunStatus | None = None,
    since: Annotated[str | None, Query(description="RFC 3339 time (or POSIX seconds): "
                                                   "created at or after")] = None,
    until: Annotated[str | None, Query(description="RFC 3339 time (or POSIX seconds): "
                                                   "created before")] = None,
    idempotency_key: IdFilter = None,
    correlation_id: IdFilter = None,
    limit: Annotated[int, Query(ge=1, le=params.MAX_LIMIT)] = 50,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page",
                                        max_length=600)] = None,
) -> RunsPage:
    """One page of runs matching every filter given, newest first; follow `next_cursor`."""
    console = console_of(request)
    q = RunQuery(
        workflow=params.name("workflow", workflow),
        status=status,
        since=params.timestamp("since", since),
        until=params.timestamp("until", until),
        idempotency_key=params.ident("idempotency_key", idempotency_key),
        correlation_id=params.ident("correlation_id", correlation_id),
        after=params.run_cursor(cursor),
        limit=limit + 1,  # one more tells whether a next page exists
    )
    runs = await (await console.store()).query_runs(console.app.name, q)
    more = len(runs) > limit
    runs = runs[:limit]
    next_cursor = (
        params.encode_cursor([runs[-1].created_at, runs[-1].run_id]) if more else None
    )
    return RunsPage(runs=[run_out(r) for r in runs], next_cursor=next_cursor)


@router.get("/runs/{run_id}", response_model=RunDetail, summary="One run with its steps")
async def get_run(request: Request, run_id: RunId, _: Viewer) -> RunDetail:
    """The run, each step with its attempts and errors, compensations flagged."""
    console = console_of(request)
    params.required_ident("run_id", run_id)
    store = await console.store()
    run = await store.get_run(console.app.name, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in app {console.app.name!r}")
    history = await store.load_history(console.app.name, run_id)
    attempts = await store.load_attempts(console.app.name, run_id)
    return run_detail(run, history, attempts)


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


@router.post("/workflows/{name}/runs", status_code=201, response_model=StartOut,
             summary="Start a workflow by name", responses={422: {
                 "model": ErrorOut, "description": "The arguments do not fit the "
                 "workflow's parameters (checked when its code is loaded here)"}})
async def start_run(
    request: Request,
    name: Annotated[str, Path(pattern=params.NAME_PATTERN, description="A workflow name")],
    who: Operator,
    body: Annotated[StartIn, Body(openapi_examples={
        "input": {"value": {"input": {"order_id": 42}, "idempotency_key": "order-42"}},
    })] = StartIn(),
) -> StartOut:
    """Writes the run for the workers of the workflow's service to take (201). When the
    workflow's code is loaded in this process, arguments it cannot be called with (one
    missing, too many) are refused with 422 instead."""
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
    params.ident("idempotency_key", body.idempotency_key)
    params.ident("correlation_id", body.correlation_id)
    app = await console.open()
    wdef = app.workflows.get(name)
    if wdef is not None:  # its code is loaded here: refuse arguments it cannot be called with
        _check_arguments(wdef, args, sent)
    handle = await app.start(name, *args, idempotency_key=body.idempotency_key,
                             correlation_id=body.correlation_id)
    await app.store.record_action(app.name, who.actor, "run.started", handle.run_id,
                                  {"workflow": name})
    return StartOut(run_id=handle.run_id)


def _check_arguments(wdef: WorkflowDef, args: list[Any], given: str | None) -> None:
    """422 when the workflow cannot be called with ``args`` (too few or too many).

    ``given`` is the body field the arguments came in (``None``: neither was sent).
    """
    try:
        declared = list(inspect.signature(wdef.fn).parameters.values())[1:]  # after ctx
    except (TypeError, ValueError):
        return
    positional = [p for p in declared if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p.name for p in positional if p.default is p.empty]
    missing = required[len(args):]
    varargs = any(p.kind is p.VAR_POSITIONAL for p in declared)
    if missing:
        problem = (f"is missing {'argument' if len(missing) == 1 else 'arguments'} "
                   f"{', '.join(map(repr, missing))}")
    elif len(args) > len(positional) and not varargs:
        problem = f"takes {len(positional)} argument(s), got {len(args)}"
    else:
        return
    names = ", ".join(p.name for p in positional) or "none"
    raise ApiError(
        422, "invalid_arguments",
        f"workflow {wdef.name!r} {problem} (its parameters: {names}): send "
        '{"input": x} for one argument or {"args": [...]} for several',
        given or ("input" if len(required) == 1 else "args"))


@router.get("/workflows", response_model=list[str], summary="Workflow names")
async def workflows(request: Request, _: Viewer) -> list[str]:
    """Every workflow declared by any service of the app (or in this process's code)."""
    console = console_of(request)
    app = await console.open()
    declared = {d.name for d in await app.store.declarations(app.name) if d.kind == "workflow"}
    return sorted(declared | set(app.workflows))


@router.get("/overview", response_model=Overview, summary="Counts, failures, stalls")
async def overview(request: Request, _: Viewer) -> Overview:
    """What the dashboard's first page shows: runs by status, recent failures, stalls."""
    console = console_of(request)
    app = await console.open()
    store = app.store
    failures = []
    for status in ("failed", "compensated"):
        failures += await store.query_runs(app.name, RunQuery(status=params.status(status),
                                                              limit=10))
    failures = sorted(failures, key=lambda r: (r.created_at, r.run_id), reverse=True)[:10]
    stalls = await app.stalled(older_than=300)
    dead = await store.dead_letters(app.name, limit=1000)
    names = await workflows(request, _)
    stalled: list[StallOut] = [stall_out(s) for s in stalls[:20]]
    return Overview(app=app.name, counts=await console.counts(),
                    recent_failures=[run_out(r) for r in failures], stalled=stalled,
                    dead_letters=len(dead), workflows=names)
