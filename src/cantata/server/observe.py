"""``/api/trace``, ``/api/stalled``, ``/api/dead-letters``, ``/api/events``,
``/api/maps``: seeing business transactions and acting on their dead letters (replay,
discard)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response

from cantata.broker import binding
from cantata.errors import DeadLetterNotFound, DuplicateEventId, PayloadTooLarge, RunNotFound
from cantata.observability.stalled import find_stalls
from cantata.observability.trace import build_trace
from cantata.server import params
from cantata.server.auth import Principal
from cantata.server.deps import ERRORS, Operator, Viewer, known_query
from cantata.server.errors import ApiError, caused_by
from cantata.server.maps import events_map, workflow_map
from cantata.server.models import (
    DeadLetterOut,
    MapOut,
    PublishIn,
    PublishOut,
    StallOut,
    TraceOut,
    dead_letter_out,
    stall_out,
    trace_out,
)
from cantata.server.state import console_of

router = APIRouter(prefix="/api", responses=ERRORS,
                   dependencies=[Depends(known_query)])

MAX_DEAD_LETTERS = 1000
AnId = Annotated[str, Path(pattern=params.ID_PATTERN)]
AName = Annotated[str, Path(pattern=params.NAME_PATTERN)]
AKey = Annotated[str, Path(max_length=params.MAX_KEY)]


@router.get("/trace/{correlation_id:cantata_text}", response_model=TraceOut, tags=["observe"],
            summary="A business transaction as a tree")
async def trace(request: Request, correlation_id: AKey, _: Viewer) -> TraceOut:
    """Runs, steps, events, handlers and dead letters of one transaction, and where it
    stands. Any run or event id of the transaction finds it too. The correlation id is
    any text (percent-encoded: a `/` as `%2F`)."""
    console = console_of(request)
    params.key("correlation_id", correlation_id)
    app = await console.open()
    root = await build_trace(app.store, app.name, correlation_id)
    return trace_out(root, correlation_id, app.clock.now())


@router.get("/stalled", response_model=list[StallOut], tags=["observe"],
            summary="Transactions with no progress")
async def stalled(
    request: Request,
    _: Viewer,
    older_than: Annotated[float | None, Query(description="Seconds without progress "
                                                          "(default 300)", ge=0,
                                              le=10 * 365 * 86400)] = None,
    limit: Annotated[int, Query(ge=1, le=params.MAX_LIMIT)] = 100,
) -> list[StallOut]:
    """Stalls of transactions with no progress for `older_than` seconds, and why."""
    console = console_of(request)
    seconds = params.seconds("older_than", older_than, 300.0)
    app = await console.open()
    stalls = await find_stalls(app.store, app.name, older_than=seconds, now=app.clock.now(),
                               limit=limit)
    return [stall_out(s) for s in stalls]


@router.get("/dead-letters", response_model=list[DeadLetterOut], tags=["events"],
            summary="Dead letters, oldest first")
async def dead_letters(
    request: Request,
    _: Viewer,
    group: Annotated[str | None, Query(pattern=params.NAME_PATTERN)] = None,
    type: Annotated[str | None, Query(pattern=params.NAME_PATTERN)] = None,
) -> list[DeadLetterOut]:
    """Dead letters (deliveries that failed for good), by group and event type. A
    `group` no code has and no service of the app declared is a 404 (`unknown_group`)
    naming the known ones, as `cantata dlq list --group` refuses it."""
    console = console_of(request)
    params.name("group", group)
    params.ident("type", type)
    app = await console.open()
    found = await app.store.dead_letters(app.name, limit=MAX_DEAD_LETTERS, group=group,
                                         type=type)
    if not found and group is not None:  # a typo, not an empty list: as `cantata dlq list`
        problem = await app._unknown_group(group)
        if problem is not None:
            raise ApiError(404, "unknown_group",
                           console.redact(f"{problem}; GET /api/groups lists them"), "group")
    return [dead_letter_out(d) for d in found]


@router.post("/dead-letters/{dead_letter_id}/replay", response_model=DeadLetterOut,
             tags=["events"], summary="Redeliver a dead letter to its group")
async def replay(request: Request, dead_letter_id: AnId, who: Operator) -> DeadLetterOut:
    """Takes it off the list and delivers its event to its group again (it comes back if
    the handler fails again)."""
    return await _letter_action(request, dead_letter_id, who, "replay")


@router.post("/dead-letters/{dead_letter_id}/discard", response_model=DeadLetterOut,
             tags=["events"], summary="Discard a dead letter for good")
async def discard(request: Request, dead_letter_id: AnId, who: Operator) -> DeadLetterOut:
    """Takes it off the list without delivering it again (its delivery stays dead), as
    `cantata dlq discard`; answers what was discarded. A second discard is a 404: it is
    gone."""
    return await _letter_action(request, dead_letter_id, who, "discard")


async def _letter_action(
    request: Request, dead_letter_id: str, who: Principal, action: str
) -> DeadLetterOut:
    """``app.replay`` or ``app.discard`` of one dead letter by ``who``; a letter gone
    already is a 404 that says it may have been replayed or discarded."""
    console = console_of(request)
    params.required_ident("dead_letter_id", dead_letter_id)
    app = await console.open()
    if action == "replay" and app._broker is not None:
        # 503 broker_mismatch where the app's workers read another broker: the letter
        # would leave the list and reach none of them (cantata serve --broker)
        await binding.check(app.store, app.name, app._broker)
    act = app.replay if action == "replay" else app.discard
    try:
        dl = await act(dead_letter_id, actor=who.actor)
    except DeadLetterNotFound:
        raise DeadLetterNotFound(
            f"no dead letter {dead_letter_id!r} in app {app.name!r} (replayed or discarded "
            "already?)"
        ) from None
    return dead_letter_out(dl)


@router.post("/events", status_code=201, response_model=PublishOut, tags=["events"],
             summary="Publish an event", responses={200: {
                 "model": PublishOut, "description": "An event with this id and the same "
                 "content was published before: nothing new (`duplicate` is true)"}})
async def publish(request: Request, response: Response, body: PublishIn,
                  who: Operator) -> PublishOut:
    """Publishes an event into the app (201); its correlation id defaults to its id.
    ``orphan`` is true when no handler, workflow trigger or wait of the app listens to
    its type (the event is stored all the same). An ``id`` already used by an event
    with the same content answers that event with 200 and ``duplicate: true``
    (nothing is published again); with other content it is a 400 naming ``id``."""
    console = console_of(request)
    params.finite("data", body.data)
    params.event_attributes(body.type, correlation_id=body.correlation_id,
                            subject=body.subject, id=body.id)
    app = await console.open()
    if app._broker is not None:  # relayed to a NATS name space no worker reads: 503
        await binding.check(app.store, app.name, app._broker, publishing=True)
    try:
        # Audited as the token's: event.published, or event.publish_repeated when
        # nothing was published (the id's event with the same content exists).
        event, orphan = await app._publish(body.type, body.data, subject=body.subject,
                                           correlation_id=body.correlation_id, id=body.id,
                                           actor=who.actor)
    except DuplicateEventId as exc:
        raise caused_by("id", exc) from None
    except PayloadTooLarge as exc:
        raise caused_by("data", exc) from None
    if event.duplicate:
        response.status_code = 200
    return PublishOut(id=event.id, orphan=orphan, duplicate=event.duplicate)


@router.get("/maps/workflows/{name}", response_model=MapOut, tags=["maps"],
            summary="A workflow's map")
async def map_workflow(
    request: Request,
    name: AName,
    _: Viewer,
    run_id: Annotated[str | None, Query(description="Colour the steps by this run's "
                                                    "states", pattern=params.ID_PATTERN)] = None,
) -> MapOut:
    """Steps and compensations, from the code when the console has it, else from history."""
    console = console_of(request)
    params.name("name", name)
    params.ident("run_id", run_id)
    app = await console.open()
    run = None
    if run_id is not None:
        run = await app.store.get_run(app.name, run_id)
        if run is None or run.workflow != name:
            raise RunNotFound(f"no run {run_id!r} of workflow {name!r} in app {app.name!r}")
    return await workflow_map(app, name, run)


@router.get("/maps/events", response_model=MapOut, tags=["maps"],
            summary="The choreography map")
async def map_events(request: Request, _: Viewer) -> MapOut:
    """Event types → handlers (groups) → emitted types; declared vs observed."""
    app = await console_of(request).open()
    return await events_map(app)
