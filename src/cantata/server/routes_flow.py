"""``/api/schedules``, ``/api/queues`` and ``/api/groups``: what runs when, what waits
where, and which handler groups events wait for.

Schedules are listed, created, paused, resumed, triggered and deleted through
``app.schedules`` (as ``cantata schedules`` does), with the caller's ``token:NAME`` as
the ``actor`` its audit records name, and checked by its own checks (a bad cron, zone,
policy or workflow is the library's error, answered as a 400 naming the body field);
queues are ``app.queue_stats()`` (as ``cantata queues``); groups are ``app.groups()``
and ``app.retire_group`` (as ``cantata groups [retire]``). Deleting a schedule declared
in code is the library's delete too: it is gone until a worker of that code opens the
app again (docs/console.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Body, Depends, Path, Request, Response

from cantata.errors import (
    CantataError,
    ConfigurationError,
    GroupInUse,
    PayloadTooLarge,
    ScheduleExists,
    SerializationError,
    UnknownSchedule,
    UnknownWorkflow,
)
from cantata.model.checks import brief, check_text
from cantata.model.schedule import MAX_NAME, ScheduleSpec
from cantata.server import params
from cantata.server.auth import Principal
from cantata.server.deps import ERRORS, Operator, Viewer, known_query
from cantata.server.errors import ApiError, bad_input, caused_by
from cantata.server.flow_out import queues_out, schedules_out
from cantata.server.models import (
    GroupOut,
    GroupRetiredOut,
    QueueOut,
    ScheduleIn,
    ScheduleOut,
    TriggerOut,
    group_out,
    group_retired_out,
)
from cantata.server.state import console_of

if TYPE_CHECKING:
    from cantata import App

router = APIRouter(prefix="/api", tags=["flow"], responses=ERRORS,
                   dependencies=[Depends(known_query)])

# A schedule's name is 1-100 characters of any text (a '/' too: the path converter
# takes it, the dashboard encodes it). A longer one is no schedule's: a 404, as any
# unknown name (not a 400: nothing in the request is malformed).
ScheduleName = Annotated[str, Path(min_length=1, description="A schedule's name")]


@router.get("/schedules", response_model=list[ScheduleOut], summary="Schedules, by name")
async def schedules(request: Request, _: Viewer) -> list[ScheduleOut]:
    """Every schedule of the app: when it ticks, its policies, whether it is paused, its
    next ticks and the run its ticks started last (with that run's status now)."""
    return await _listed(request)


async def _listed(request: Request, name: str | None = None) -> list[ScheduleOut]:
    app = await console_of(request).open()
    found = await schedules_out(app, name)
    if name is not None and not found:
        raise _unknown(app.name, name)
    return found


def _unknown(app: str, name: str) -> UnknownSchedule:
    return UnknownSchedule(f"no schedule named {_shown(name)} in app {app!r}: "
                           "GET /api/schedules lists them")


def _shown(name: str) -> str:
    """``name`` quoted for a message; one too long for any schedule is cut short."""
    if len(name) <= MAX_NAME:
        return repr(name)
    return f"{name[:MAX_NAME]!r}... ({len(name)} characters, more than any schedule's name)"


def _check(app: str, name: str) -> None:
    """A 404 for a name no schedule can have (longer than any, a NUL, a lone surrogate),
    before the store is asked (PostgreSQL would refuse the text)."""
    if len(name) > MAX_NAME:
        raise _unknown(app, name)
    check_text("schedule name", name, error=UnknownSchedule,
               hint=f"no schedule of app {app!r} has such a name; GET /api/schedules "
                    "lists them")


@contextmanager
def _known(app: App, name: str) -> Iterator[None]:
    """The library's :class:`UnknownSchedule` (it points to the CLI) as the API's 404,
    which says how to see the names here; one declared in code but not recorded yet
    keeps its explanation."""
    try:
        yield
    except UnknownSchedule as exc:
        if name in app.router.schedule_specs:
            raise UnknownSchedule(f"{exc}; GET /api/schedules lists the recorded ones") \
                from None
        raise _unknown(app.name, name) from None


@router.post("/schedules", status_code=201, response_model=ScheduleOut,
             summary="Create a schedule")
async def create(
    request: Request,
    who: Operator,
    body: Annotated[ScheduleIn, Body(openapi_examples={
        "cron": {"value": {"name": "nightly-report", "workflow": "report",
                           "cron": "0 3 * * *", "timezone": "Europe/Berlin"}},
        "every": {"value": {"name": "poll", "workflow": "poll", "every": 30,
                            "input": {"source": "erp"}}},
    })],
) -> ScheduleOut:
    """Creates a schedule, as `app.schedules.create` (source `api`; 201, the schedule
    as listed). A name a schedule has is a 409 (`schedule_exists`): nothing is
    replaced; delete that one first or choose another name. A bad cron expression,
    interval, time zone, policy or limit, an unknown workflow, or a workflow that
    cannot take the tick (and the input) is a 400 naming the field, by the library's
    own checks, as is an input that does not match the declared type of a loaded
    workflow's parameter (400 `invalid_input`, naming its fields). Audited as
    `schedule.created` by the token."""
    console = console_of(request)
    params.finite("input", body.input)
    spec = _spec(body)
    params.name("workflow", body.workflow)
    app = await console.open()
    try:
        await app.schedules.create(
            spec.name, spec.cron, spec.workflow, input=body.input, every=spec.every,
            timezone=spec.timezone, overlap=spec.overlap, catch_up=spec.catch_up,
            catch_up_limit=spec.catch_up_limit, actor=who.actor, replace=False)
    except ScheduleExists:
        raise await _exists(app, spec.name) from None
    except PayloadTooLarge as exc:  # (each tick's run takes the input as its argument)
        raise caused_by("input", exc) from None
    except SerializationError as exc:  # not the declared type of a loaded workflow's input
        raise bad_input("input", console.redact(str(exc))) from None
    except UnknownWorkflow as exc:  # (a 400: the body's field, not the path, is wrong)
        raise ApiError(400, exc.code, console.redact(f"{exc}; GET /api/workflows lists "
                                                     "them"), "workflow") from None
    except ConfigurationError as exc:  # the workflow cannot take what each tick passes
        field = "input" if body.input is not None else "workflow"
        raise ApiError(400, exc.code, console.redact(str(exc)), field) from None
    return (await _listed(request, spec.name))[0]


def _spec(body: ScheduleIn) -> ScheduleSpec:
    """The spec of ``body``, checked by :class:`ScheduleSpec` (the library's own
    checks) one field at a time first, so that the 400 names the field that is wrong."""
    name = body.name
    fine = {"cron": None, "every": 60.0}  # (a valid stand-in for the fields not probed)
    when = "every" if body.cron is None and body.every is not None else "cron"
    probes: list[tuple[str, dict[str, Any]]] = [
        ("name", fine),
        (when, {"cron": body.cron, "every": body.every}),
        ("timezone", {**fine, "timezone": body.timezone}),
        ("overlap", {**fine, "overlap": body.overlap}),
        ("catch_up", {**fine, "catch_up": body.catch_up}),
        ("catch_up_limit", {**fine, "catch_up_limit": body.catch_up_limit}),
        ("input", {**fine, "input": body.input, "has_input": body.input is not None}),
    ]
    for field, given in probes:
        try:
            ScheduleSpec(name, body.workflow, **given)
        except (ConfigurationError, SerializationError) as exc:
            raise caused_by(field, exc) from None
    try:
        return ScheduleSpec(name, body.workflow, body.cron, body.every, body.timezone,
                            body.overlap, body.catch_up, body.catch_up_limit, body.input,
                            body.input is not None)
    except CantataError as exc:  # (each field passed alone: none should be left)
        raise caused_by("body", exc) from None


async def _exists(app: App, name: str) -> ApiError:
    """The 409 of a name in use: how to free it, or to choose another."""
    code = next((s.source == "code" for s in await app.schedules.list() if s.name == name),
                False)
    also = (" It is declared in code (@app.schedule): deleted, it comes back when a worker "
            "of that code opens the app; pause it instead, or choose another name."
            if code else "")
    return ApiError(409, "schedule_exists", (
        f"a schedule named {_shown(name)} exists in app {app.name!r}: choose another name, "
        f"or delete it first (DELETE /api/schedules/{quote(name, safe='')}); nothing was "
        f"replaced.{also}"), "name")


@router.delete("/schedules/{name:cantata_text}", status_code=204, response_class=Response,
               summary="Delete a schedule")
async def delete(request: Request, name: ScheduleName, who: Operator) -> Response:
    """Removes the schedule, as `cantata schedules delete` (204): it starts no more
    runs; its runs are kept. One declared in code (source `code`) is recorded anew,
    with a fresh state, when a worker whose code declares it next opens the app (a
    deploy, a restart): to be rid of it, remove its `@app.schedule` too, or pause it.
    Audited as `schedule.deleted` by the token."""
    app = await console_of(request).open()
    _check(app.name, name)
    with _known(app, name):
        await app.schedules.delete(name, actor=who.actor)
    return Response(status_code=204)


@router.post("/schedules/{name:cantata_text}/pause", response_model=ScheduleOut,
             summary="Pause a schedule")
async def pause(request: Request, name: ScheduleName, who: Operator) -> ScheduleOut:
    """Starts no run of the schedule until it is resumed, as `cantata schedules pause`;
    answers the schedule. Audited as `schedule.paused` by the token (pausing a paused
    schedule changes nothing and is recorded again)."""
    return await _set(request, name, who, paused=True)


@router.post("/schedules/{name:cantata_text}/resume", response_model=ScheduleOut,
             summary="Resume a schedule")
async def resume(request: Request, name: ScheduleName, who: Operator) -> ScheduleOut:
    """Starts its runs again from its next tick (the ticks while it was paused are
    skipped), as `cantata schedules resume`; answers the schedule. Audited as
    `schedule.resumed` by the token."""
    return await _set(request, name, who, paused=False)


async def _set(request: Request, name: str, who: Principal, *, paused: bool) -> ScheduleOut:
    app = await console_of(request).open()
    _check(app.name, name)
    act = app.schedules.pause if paused else app.schedules.resume
    with _known(app, name):
        await act(name, actor=who.actor)
    return (await _listed(request, name))[0]


@router.post("/schedules/{name:cantata_text}/trigger", status_code=201, response_model=TriggerOut,
             summary="Start one run of a schedule now")
async def trigger(request: Request, name: ScheduleName, who: Operator) -> TriggerOut:
    """Starts one run of the schedule's workflow now (its tick: the current time),
    paused or not and whatever its overlap policy, as `cantata schedules trigger` (201).
    Its `run.created` and the `schedule.triggered` after it name the token. 409
    (`trigger_refused`) when the store refuses the run (its key `schedule:NAME:TICK`
    was used with other arguments)."""
    app = await console_of(request).open()
    _check(app.name, name)
    try:
        with _known(app, name):
            handle = await app.schedules.trigger(name, actor=who.actor)
    except ConfigurationError as exc:  # the library refused the run
        raise ApiError(409, "trigger_refused", console_of(request).redact(str(exc))) from None
    return TriggerOut(schedule=name, run_id=handle.run_id)


@router.get("/queues", response_model=list[QueueOut], summary="Queues, by name")
async def queues(request: Request, _: Viewer) -> list[QueueOut]:
    """Every queue of the app: its limits, runs waiting (the depth), in progress, begun
    recently, and how long the oldest waiting run has waited. Counted per queue, across
    its partitions (the limits apply per partition)."""
    return await queues_out(await console_of(request).open())



# A group's name is any text without a NUL (`@app.on(..., group=...)`; a trigger's is
# `start:WORKFLOW`): sent percent-encoded, '/' and line breaks included.
GroupName = Annotated[str, Path(min_length=1, description="A handler group, or a "
                                                          "trigger's `start:WORKFLOW`")]


@router.get("/groups", response_model=list[GroupOut], summary="Handler groups and triggers")
async def groups(request: Request, _: Viewer) -> list[GroupOut]:
    """Every handler group and `start_on` trigger of the app (declared by any of its
    processes), by name, as `cantata groups`: the event type patterns it is declared
    for, its pending deliveries (how many, the oldest's age, how many a live worker
    holds), its dead letters and the live workers that serve it now. A group no longer
    declared that still has pending deliveries or dead letters is listed too (`kind`
    null)."""
    app = await console_of(request).open()
    found = await app.groups()
    now = app.clock.now()
    return [group_out(g, now) for g in found]


@router.post("/groups/{name:cantata_text}/retire", response_model=GroupRetiredOut,
             summary="Retire a group no code serves any more")
async def retire_group(request: Request, name: GroupName, who: Operator) -> GroupRetiredOut:
    """Retires the group, as `cantata groups retire`: its declaration is removed (an
    event stored from now on gets no delivery for it) and its pending deliveries are
    ended as retired, not handled (a delivery a live worker holds is left to it:
    `held`); its dead letters stay. `retired` is false when there was nothing to retire
    (not declared, nothing pending): a no-op, nothing is recorded. 409 (`group_in_use`)
    while a live worker serves the group (the message names the workers). Audited as
    `group.retired` by the token."""
    console = console_of(request)
    try:
        check_text("group name", name, hint="no group has such a name; GET /api/groups "
                                            "lists them")
    except ConfigurationError as exc:
        raise bad_input("name", console.redact(_cut(str(exc), name))) from None
    app = await console.open()
    try:
        done = await app.retire_group(name, actor=who.actor)
    except GroupInUse as exc:
        raise ApiError(409, exc.code, console.redact(
            f"{_cut(str(exc), name)}; GET /api/groups lists who serves each group")) from None
    return group_retired_out(done)


def _cut(message: str, name: str) -> str:
    """``message`` with the group's name quoted as the API quotes what it was sent: cut
    to its first characters when long (a name may be any text of any length)."""
    return message.replace(repr(name), brief(name))
