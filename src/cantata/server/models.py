"""The JSON the API answers, as pydantic models (they make the OpenAPI document), and
the functions that build them from Cantata's records. Times are RFC 3339 UTC.

The CLI's ``--json`` prints the same models (``cantata run``, ``runs``, ``trace``,
``stalled``, ``dlq list``): this module imports no web framework, so the CLI can.
"""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cantata.flow.schedules import ScheduleInfo
from cantata.model import codec
from cantata.model.event import Event
from cantata.model.flow import QueueEntry, QueuePosition, QueueSpec, QueueStats
from cantata.model.records import (
    COMPENSATION,
    VALUE,
    Attempt,
    AuditRecord,
    AuditReport,
    DeadLetter,
    GroupRetired,
    HistoryEntry,
    RunRecord,
    branch_cancelled,
    to_datetime,
)
from cantata.model.schedule import key_tick
from cantata.model.status import RunStatus, call_status
from cantata.observability.groups import GroupInfo
from cantata.observability.node import TraceNode
from cantata.observability.stalled import Stall
from cantata.observability.timeline import where_it_stands

TYPE_PATTERN = r"^[A-Za-z0-9_\-]+(\.[A-Za-z0-9_\-]+)*$"  # as cantata.model.event


def utc(ts: float | None) -> dt.datetime | None:
    return to_datetime(ts)


def _json(text: str | None) -> Any:
    return None if text is None else codec.loads(text)


class ErrorDetail(BaseModel):
    code: str = Field(description="A stable code, e.g. `run_not_found`, `invalid_input`.")
    message: str = Field(description="What was wrong and what to do.")
    field: str | None = Field(description="The request field that was wrong, if one was.")


class ErrorOut(BaseModel):
    """Every error response."""

    error: ErrorDetail


class Health(BaseModel):
    status: str = "ok"


class RunOut(BaseModel):
    """A run as listed."""

    run_id: str
    workflow: str
    status: RunStatus
    created_at: dt.datetime
    updated_at: dt.datetime
    idempotency_key: str | None
    correlation_id: str
    error: str | None = Field(description="`Type: message` of a failed, compensated or "
                                          "cancelled run.")
    result: Any = Field(description="The run's JSON result, once completed.")
    version: str | None = Field(default=None, description=(
        "The code version the run is pinned to: the worker that last took it, else the "
        "code that started it (null: none known)."))


class RunsPage(BaseModel):
    runs: list[RunOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; "
                                                "null on the last page.")


class AttemptOut(BaseModel):
    attempt: int
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    error: str | None


BRANCH_CANCELLED = ("True for a step whose branch the workflow's own code cancelled while "
                    "it ran (an asyncio.TaskGroup after another branch failed, a timeout "
                    "around ctx.run): the step ended as it did (`status`), then its branch "
                    "got the cancel instead of its result.")


class StepOut(BaseModel):
    """One durable call of a run: a step, a compensation, a sleep, a wait, an emit, a child."""

    name: str
    key: str = Field(description="The call's place in history: `name#occurrence`.")
    kind: str
    status: str
    compensation: bool = Field(description="True for a compensation (a step undoing another).")
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    error: str | None
    attempts: list[AttemptOut]
    cancelled: bool = Field(description=BRANCH_CANCELLED)


class RateOut(BaseModel):
    limit: int
    per: float = Field(description="Seconds of the sliding window.")


class QueueLimitsOut(BaseModel):
    """A queue's limits, as ``app.queue`` declared them (per partition)."""

    concurrency: int | None = Field(description="Runs in progress at most (per partition).")
    per_worker: int | None = Field(description="Runs in progress on one worker at most.")
    rate: RateOut | None = Field(description="Begins at most per window (per partition).")
    priorities: bool


class RunQueueOut(BaseModel):
    """Where a run started in a queue stands there (docs/flow-control.md#queues)."""

    name: str = Field(description="The queue.")
    partition: str | None = Field(description="Its partition key (null: none).")
    priority: int
    state: Literal["waiting", "running", "ended"] = Field(description=(
        "`waiting` to begin, `running` once begun (it holds a place of the queue's "
        "limits), `ended` once the run ended."))
    position: int | None = Field(description=(
        "While `waiting`: its place among the runs waiting in its queue (its partition's, "
        "for a partitioned run), 1 = begins next; by priority first when the queue has "
        "priorities. Null otherwise."))
    waiting_since: dt.datetime | None = Field(description=(
        "While `waiting`: since when (queued, or queued again by a retry)."))
    limits: QueueLimitsOut | None = Field(description=(
        "The queue's limits; null when no service of the app declares the queue."))


class RunDetail(RunOut):
    """One run with its steps, attempts and errors."""

    args: list[Any]
    causation_id: str | None
    parent_run_id: str | None
    cancel_requested: bool
    flagged: bool = Field(description="Needs an operator (a compensation failed for good).")
    compensated: bool = Field(description="At least one compensation ran.")
    steps: list[StepOut]
    attributes: dict[str, str] = Field(description="The run's search attributes "
                                       "(`ctx.set_attributes`), as indexed text.")
    queue: RunQueueOut | None = Field(default=None, description=(
        "The queue the run was started in, its place there and the queue's limits; "
        "null for a run started in no queue."))


class CancelOut(BaseModel):
    run_id: str
    status: RunStatus
    cancel_requested: bool


class RetryIn(BaseModel):
    """Retry a run; a compensated one only with `include_compensated`."""

    include_compensated: bool = Field(default=False, strict=True, description=(
        "Retry a compensated run too (its compensations are superseded; the steps they "
        "undid are not redone)."))
    force: bool = Field(default=False, strict=True, description=(
        "Retry even when the console's code (served with module:app) does not replay the "
        "history the retry keeps (409 `history_not_replayable` otherwise)."))


class ForkIn(BaseModel):
    from_step: str = Field(min_length=1, max_length=500, description=(
        "The history key of the call to start again at, `name#n` (a step's `key` in "
        "GET /api/runs/{run_id}); a bare name means its first call."))


class ForkOut(BaseModel):
    run_id: str = Field(description="The new run.")


class StartIn(BaseModel):
    """Start a workflow: `input` is its single argument, or `args` the list of them."""

    # (a misspelt field is refused: dropped, the run would start without it)
    model_config = ConfigDict(extra="forbid")

    input: Any = None
    args: list[Any] | None = None
    idempotency_key: str | None = Field(default=None, description=(
        "Any text `app.start` takes: 1-500 characters, without a NUL or a lone surrogate."))
    correlation_id: str | None = Field(default=None, description=(
        "Any text `app.start` takes: up to 500 characters, without a NUL or a lone surrogate "
        "(empty: the run begins a transaction of its own)."))


class StartOut(BaseModel):
    run_id: str
    created: bool = Field(description="False when the idempotency key's run already "
                                      "existed: it is answered, nothing was started (200).")


class PublishIn(BaseModel):
    # A field this route does not take (a CloudEvent's ``correlationid``, ``source``,
    # ``data_base64``, or a misspelling) is refused: dropped, it would change the event.
    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=TYPE_PATTERN, max_length=200,
                      description="Dot-separated tokens, e.g. `order.placed`.")
    data: Any = None
    # (any text app.publish takes: checked by its own rule, params.event_attributes)
    correlation_id: str | None = Field(default=None, description=(
        "Any text `app.publish` takes: 1-500 characters, without a NUL or a lone surrogate."))
    subject: str | None = None
    id: str | None = Field(default=None, description=(
        "Any text `app.publish` takes: 1-500 characters, without a NUL or a lone surrogate."))


class PublishOut(BaseModel):
    id: str
    orphan: bool = Field(default=False, description="No handler, workflow trigger or wait "
                                                    "of the app listens to this type (the "
                                                    "event is stored all the same).")
    duplicate: bool = Field(default=False, description="The id was used already by an "
                                                       "event with the same content: that "
                                                       "event is answered, nothing was "
                                                       "published again (200).")


class TraceNodeOut(BaseModel):
    kind: str = Field(description="run, step, compensation, event, handler, timer, wait or "
                                  "dead_letter")
    name: str
    status: str
    group: str | None
    started_at: dt.datetime | None
    ended_at: dt.datetime | None
    attempts: int
    error: str | None
    ref: str | None = Field(description="Run id, event id, dead-letter id or history key.")
    detail: str | None = Field(None, description="What the node waits for or comes from "
                                                 "(a wait's pattern, a task's service, a "
                                                 "queue and its depth, an event's source, "
                                                 "a cancel requested and not applied yet)")
    cancelled: bool = Field(False, description=BRANCH_CANCELLED)
    children: list[TraceNodeOut]


class TraceOut(TraceNodeOut):
    """The root of a business transaction's tree, and where it stands."""

    correlation_id: str
    where: str = Field(description="One line: where the transaction stands.")


class StallOut(BaseModel):
    correlation_id: str
    reason: str = Field(description="pending_step, waiting_event, dead_letter, "
                                    "unhandled_event or compensation_failed")
    since: dt.datetime
    where: str
    node: TraceNodeOut
    hint: str | None = Field(None, description="the cause, when the store tells it (a "
                                               "run no live worker takes, an event for a "
                                               "group no live worker serves)")


class EventOut(BaseModel):
    id: str
    type: str
    source: str
    subject: str | None
    time: str
    data: Any = Field(description="The event's data; bytes data (a CloudEvent's "
                                  "`data_base64`) as its base64 text.")
    correlation_id: str | None
    causation_id: str | None


class DeadLetterOut(BaseModel):
    id: str
    group: str
    event: EventOut
    error: str
    attempts: int
    failed_at: dt.datetime


class MapNode(BaseModel):
    id: str
    kind: str = Field(description="Workflow maps: start, step, compensation, sleep, wait, "
                                  "emit, child, end. Event maps: event, handler, workflow.")
    name: str
    status: str | None = Field(default=None, description="The state in the run asked for.")
    note: str | None = None


class MapEdge(BaseModel):
    source: str
    target: str
    kind: str = Field(description="Workflow maps: next, maybe, fails, undo. Event maps: "
                                  "flow.")
    state: str | None = Field(default=None, description="Event maps: active (declared and "
                              "seen), dead (declared, no event ever reached the handler), "
                              "silent (declared, never emitted), undeclared (seen only).")
    label: str | None = None


class MapOut(BaseModel):
    mermaid: str
    nodes: list[MapNode]
    edges: list[MapEdge]


class AuditOut(BaseModel):
    seq: int
    time: dt.datetime
    actor: str
    action: str
    target: str
    data: Any
    prev_hash: str
    hash: str
    past_head: bool = Field(
        False, description="The record lies past the chain's head: no Cantata process "
        "wrote it (it was added outside Cantata; `GET /api/audit/verify` reports it)")


class AuditPage(BaseModel):
    records: list[AuditOut]
    next_cursor: str | None


class VerifyOut(BaseModel):
    ok: bool
    records: int
    first_bad_seq: int | None
    reason: str | None


class SessionIn(BaseModel):
    token: str = Field(min_length=1, max_length=500)


class SessionOut(BaseModel):
    name: str
    role: str
    app: str
    store: str = Field(description="The store URL, its password masked.")


SERVED = ("Whether a live worker serves the app (a worker is live while its heartbeat is "
          "within its lease; a console is none): without one no schedule ticks and no "
          "queued run begins.")


class LastRunOut(BaseModel):
    """The run a schedule's ticks started last."""

    run_id: str
    tick: dt.datetime | None = Field(description="The tick it was started for (from its "
                                                 "idempotency key `schedule:NAME:TICK`).")
    status: RunStatus | None = Field(description="Its status now (null: the run is gone).")


class ScheduleOut(BaseModel):
    """A schedule: when it ticks, its policies, its state, its next and last ticks."""

    name: str
    workflow: str
    cron: str | None = Field(description="The cron expression (null for an interval).")
    every: float | None = Field(description="The interval in seconds (null for a cron).")
    when: str = Field(description="The cron expression, or `every Ns`.")
    timezone: str = Field(description="The IANA zone the cron expression is read in.")
    overlap: str = Field(description="skip, buffer_one or allow")
    catch_up: str = Field(description="skip, last or all")
    catch_up_limit: int | None
    paused: bool
    source: str = Field(description="`code` (`@app.schedule`) or `api` "
                                    "(`app.schedules.create`).")
    in_code: bool | None = Field(description="A code schedule: whether the console's code "
                                             "declares it (false: no worker of this code "
                                             "ticks it); null for an API schedule or a "
                                             "console without the app's code.")
    next_tick: dt.datetime | None = Field(description="Null while paused or not in code.")
    next_ticks: list[dt.datetime] = Field(description="The next few ticks, soonest first.")
    last_run: LastRunOut | None = Field(description="The run its ticks started last (a "
                                                    "triggered run is not counted).")
    served: bool = Field(description=SERVED)


class ScheduleIn(BaseModel):
    """A schedule to create, as `app.schedules.create` takes it: a `cron` expression or
    `every` seconds (one of them), and the `input` each run gets after its tick."""

    model_config = ConfigDict(extra="forbid")  # a misspelt policy is refused, not ignored

    name: str = Field(description="1-100 characters, not one a schedule of the app has.")
    workflow: str = Field(description="A workflow of the app (`GET /api/workflows`); it is "
                                      "called `wf(ctx, tick)`, or `wf(ctx, tick, input)`.")
    cron: str | None = Field(None, description="Five fields (minute hour day month "
                                               "weekday), read in `timezone`.")
    every: float | None = Field(None, strict=True, description="Seconds between ticks, > 0.")
    timezone: str = Field("UTC", description="An IANA time zone, e.g. `Europe/Berlin`.")
    overlap: str = Field("skip", description="skip, buffer_one or allow")
    catch_up: str = Field("skip", description="skip, last or all")
    catch_up_limit: int | None = Field(None, strict=True, description="With `catch_up` "
                                                                       "all: the latest N.")
    input: Any = Field(None, description="Given to each run after its tick (null: none).")


class TriggerOut(BaseModel):
    schedule: str
    run_id: str = Field(description="The run started now.")


class PartitionMaxOut(BaseModel):
    in_progress: int = Field(description="Runs in progress in the busiest partition.")
    began_recently: int = Field(description="Runs begun in the last `window_seconds` in "
                                            "the partition where most began.")


class QueueOut(BaseModel):
    """A queue's limits and where its runs stand, across its partitions."""

    name: str
    concurrency: int | None = Field(description="Runs in progress at most (per partition).")
    per_worker: int | None = Field(description="Runs in progress on one worker at most.")
    rate: RateOut | None = Field(description="Begins at most per window (per partition).")
    priorities: bool
    waiting: int = Field(description="Runs waiting to begin (the depth).")
    in_progress: int = Field(description="Runs begun and not ended.")
    began_recently: int = Field(description="Runs begun in the last `window_seconds`.")
    window_seconds: float = Field(description="The window `began_recently` counts: the "
                                              "rate's (with its small margin), else 60.")
    oldest_waiting_since: dt.datetime | None = Field(description="When the run waiting "
                                                                 "longest was queued.")
    oldest_waiting_seconds: float | None = Field(description="How long it has waited.")
    partitioned: bool = Field(description="Runs counted in progress or begun carry a "
                                          "partition key: the limits hold per key and the "
                                          "figures above are summed over the keys.")
    per_partition_max: PartitionMaxOut | None = Field(description=(
        "The highest figures of any one partition (each figure of its own), to read "
        "against the limits; null when not partitioned (the figures above are then "
        "the partition's)."))
    served: bool = Field(description=SERVED)


class GroupOut(BaseModel):
    """A handler group or `start_on` trigger (as `cantata groups` lists it): what it is
    declared for, its backlog and the live workers that serve it now."""

    group: str = Field(description="The group; a trigger's is `start:WORKFLOW`.")
    kind: str | None = Field(description="`handler` or `trigger`; null for a group no "
                                         "longer declared that still has pending "
                                         "deliveries or dead letters.")
    patterns: list[str] = Field(description="The event type patterns it is declared for.")
    pending: int = Field(description="Its pending deliveries (events not handled yet).")
    in_progress: int = Field(description="Of those, the ones a live worker holds now.")
    oldest_pending_at: dt.datetime | None = Field(description="When the event of the "
                                                              "oldest pending one was "
                                                              "stored.")
    oldest_pending_age: float | None = Field(description="How long ago, by the app's "
                                                             "clock.")
    dead_letters: int = Field(description="Its dead letters (GET /api/dead-letters?group=).")
    served: bool | None = Field(description="Whether a live worker serves it; null when a "
                                            "live worker does not say which groups it "
                                            "serves (starting, or an older release).")
    served_by: list[str] = Field(description="The ids of the live workers serving it.")


class DeclarationOut(BaseModel):
    kind: str = Field(description="`handler` or `trigger`.")
    pattern: str = Field(description="The event type pattern it was declared for.")


class GroupRetiredOut(BaseModel):
    """What retiring a group did (`app.retire_group`)."""

    group: str
    retired: bool = Field(description="Whether anything was removed or ended (false: "
                                      "nothing was left to retire, a no-op).")
    declarations_removed: list[DeclarationOut] = Field(description="The declarations "
                                                                    "removed.")
    ended: int = Field(description="Pending deliveries ended as retired (not handled).")
    held: int = Field(description="Pending deliveries a live worker held: left to it.")
    dead_letters: int = Field(description="Its dead letters, kept.")


class AttentionOut(BaseModel):
    """What an operator looks at first, each counted by an index and each the count of
    a list the dashboard links to."""

    stalled: int = Field(description="Transactions with no progress for 5 minutes, as "
                         "`cantata stalled` finds them (`GET /api/stalled`), up to 100.")
    stalled_more: bool = Field(description="100 were found: there may be more.")
    dead_letters: int = Field(description="Dead letters waiting (`GET /api/dead-letters`).")
    failed_last_hour: int = Field(description=(
        "Runs that failed in the last hour, whenever they were created "
        "(`GET /api/runs?failed_since=` `failed_since`)."))
    failed_since: dt.datetime = Field(description=(
        "An hour ago: the `failed_since` of that list."))


class Overview(BaseModel):
    app: str
    counts: dict[str, int]
    recent_failures: list[RunOut]
    stalled: list[StallOut]
    dead_letters: int
    attention: AttentionOut
    workflows: list[str]
    served: bool = Field(description=SERVED + " Live runs (`counts` of pending, running, "
                         "compensating) make no progress then.")


# -- builders ------------------------------------------------------------------------


def run_out(r: RunRecord) -> RunOut:
    """A run as listed."""
    created, updated = utc(r.created_at), utc(r.updated_at)
    assert created is not None and updated is not None
    return RunOut(
        run_id=r.run_id, workflow=r.workflow, status=r.status, created_at=created,
        updated_at=updated, idempotency_key=r.idempotency_key,
        correlation_id=r.correlation_id, error=r.error, result=_json(r.result),
        version=r.version,
    )


def steps_out(history: list[HistoryEntry], attempts: list[Attempt],
              status: RunStatus | None) -> list[StepOut]:
    """The calls of a history with their attempts, in order (``ctx.now()`` and other
    recorded values left out); with the run's ``status``, a call an ended run left open
    is shown cut short (:func:`call_status`)."""
    by_key: dict[str, list[Attempt]] = {}
    for a in attempts:
        by_key.setdefault(a.key, []).append(a)
    return [
        StepOut(
            name=e.name, key=e.key, kind=e.kind,
            status=e.status if status is None else call_status(e.status, status),
            compensation=e.kind == COMPENSATION, started_at=utc(e.started_at),
            ended_at=utc(e.ended_at), error=e.error, cancelled=branch_cancelled(e),
            attempts=[
                AttemptOut(attempt=a.attempt, started_at=utc(a.started_at),
                           ended_at=utc(a.ended_at),
                           error=f"{a.error_type}: {a.error}" if a.error_type else a.error)
                for a in by_key.get(e.key, [])
            ],
        )
        for e in sorted(history, key=lambda e: e.seq) if e.kind != VALUE
    ]


def run_detail(r: RunRecord, history: list[HistoryEntry], attempts: list[Attempt],
               attributes: dict[str, str] | None = None,
               queue: RunQueueOut | None = None) -> RunDetail:
    """A run with its steps (:func:`steps_out`), its search attributes and its queue
    (:func:`run_queue_out`)."""
    steps = steps_out(history, attempts, r.status)
    args = _json(r.args)
    return RunDetail(
        **run_out(r).model_dump(), args=args if isinstance(args, list) else [args],
        causation_id=r.causation_id, parent_run_id=r.parent_run_id,
        cancel_requested=r.cancel_requested, flagged=r.flagged,
        compensated=any(s.compensation for s in steps), steps=steps,
        attributes=dict(attributes or {}), queue=queue,
    )


def run_queue_out(r: RunRecord, entry: QueueEntry, place: QueuePosition | None,
                  spec: QueueSpec | None) -> RunQueueOut:
    """Where run ``r`` stands in the queue of ``entry``: ``place`` is its place while it
    waits there (None once it began), ``spec`` the queue's declared limits."""
    state: Literal["waiting", "running", "ended"] = (
        "ended" if r.status.is_final else "waiting" if place is not None else "running")
    waiting = place is not None and state == "waiting"
    limits = None if spec is None else QueueLimitsOut(
        concurrency=spec.concurrency, per_worker=spec.per_worker,
        rate=RateOut(limit=spec.rate.limit, per=spec.rate.per) if spec.rate else None,
        priorities=spec.priorities)
    return RunQueueOut(
        name=entry.queue, partition=entry.partition or None, priority=entry.priority,
        state=state, position=place.ahead + 1 if waiting and place else None,
        waiting_since=utc(place.since) if waiting and place else None, limits=limits)


def node_out(node: TraceNode, *, depth: int | None = None) -> TraceNodeOut:
    """The tree under ``node`` (to ``depth`` levels; ``0``: the node alone), built without
    recursion so a deep trace cannot exhaust the stack."""

    def one(n: TraceNode) -> TraceNodeOut:
        return TraceNodeOut(kind=n.kind, name=n.name, status=n.status, group=n.group,
                            started_at=n.started_at, ended_at=n.ended_at, attempts=n.attempts,
                            error=n.error, ref=n.ref, detail=n.detail,
                            cancelled=n.cancelled, children=[])

    root = one(node)
    stack = [(node, root, 0)]
    while stack:
        n, out, level = stack.pop()
        if depth is not None and level >= depth:
            continue
        for child in n.children:
            c = one(child)
            out.children.append(c)
            stack.append((child, c, level + 1))
    return root


def trace_out(root: TraceNode, correlation_id: str, now: float) -> TraceOut:
    """A business transaction's tree, its correlation id and where it stands at ``now``."""
    tree = node_out(root)
    return TraceOut(**tree.model_dump(), correlation_id=root.correlation_id or correlation_id,
                    where=where_it_stands(root, now=now))


def stall_where(stall: Stall) -> str:
    """Where a stall is, in a few words (`group emails`, `step charge`)."""
    n = stall.node
    if n.kind in ("handler", "dead_letter"):
        return f"group {n.group}" + (f" ({n.name})" if n.kind == "handler" and
                                     n.name != n.group else "")
    return f"{n.kind} {n.name}"


def stall_out(stall: Stall) -> StallOut:
    """A stall as JSON (its node without children)."""
    return StallOut(correlation_id=stall.correlation_id, reason=stall.reason, since=stall.since,
                    where=stall_where(stall), node=node_out(stall.node, depth=0),
                    hint=stall.hint)


def event_out(e: Event[Any]) -> EventOut:
    """An event as JSON."""
    data = e.data
    if isinstance(data, (bytes, bytearray, memoryview)):  # JSON has no bytes
        data = base64.b64encode(bytes(data)).decode("ascii")
    return EventOut(id=e.id, type=e.type, source=e.source, subject=e.subject, time=e.time,
                    data=data, correlation_id=e.correlation_id, causation_id=e.causation_id)


def dead_letter_out(d: DeadLetter) -> DeadLetterOut:
    """A dead letter as JSON."""
    return DeadLetterOut(id=d.id, group=d.group, event=event_out(d.event), error=d.error,
                         attempts=d.attempts, failed_at=d.failed_at)


def audit_out(r: AuditRecord, head: int) -> AuditOut:
    """An audit record as JSON (its data parsed), marked when its ``seq`` lies past
    ``head``, the chain head's."""
    stamp = utc(r.time)
    assert stamp is not None
    return AuditOut(seq=r.seq, time=stamp, actor=r.actor, action=r.action, target=r.target,
                    data=codec.loads(r.data), prev_hash=r.prev_hash, hash=r.hash,
                    past_head=r.seq > head)


def verify_out(r: AuditReport) -> VerifyOut:
    """A verification report as JSON."""
    return VerifyOut(ok=r.ok, records=r.records, first_bad_seq=r.first_bad_seq, reason=r.reason)


def schedule_out(s: ScheduleInfo, last: RunRecord | None, served: bool) -> ScheduleOut:
    """A schedule as JSON; ``last`` is the record of its last run (``None``: gone),
    ``served``: a live worker serves the app."""
    last_run = None
    if s.last_run_id is not None:
        last_run = LastRunOut(
            run_id=s.last_run_id,
            tick=key_tick(s.name, last.idempotency_key) if last is not None else None,
            status=last.status if last is not None else None)
    return ScheduleOut(
        name=s.name, workflow=s.workflow, cron=s.cron, every=s.every, when=s.when,
        timezone=s.timezone, overlap=s.overlap, catch_up=s.catch_up,
        catch_up_limit=s.catch_up_limit, paused=s.paused, source=s.source,
        in_code=s.in_code, next_tick=s.next_tick, next_ticks=list(s.upcoming),
        last_run=last_run, served=served)


def queue_out(q: QueueStats, now: float, served: bool) -> QueueOut:
    """A queue's figures as JSON (``now``: the app's clock, for the oldest run's age;
    ``served``: a live worker serves the app)."""
    spec = q.spec
    oldest = q.oldest_waiting_at
    return QueueOut(
        name=q.name, concurrency=spec.concurrency, per_worker=spec.per_worker,
        rate=RateOut(limit=spec.rate.limit, per=spec.rate.per) if spec.rate else None,
        priorities=spec.priorities, waiting=q.waiting, in_progress=q.in_progress,
        began_recently=q.began_last_window,
        window_seconds=spec.stats_window,
        oldest_waiting_since=utc(oldest),
        oldest_waiting_seconds=None if oldest is None else round(max(now - oldest, 0.0), 3),
        partitioned=q.partitioned,
        per_partition_max=PartitionMaxOut(in_progress=q.partition_peak_in_progress,
                                          began_recently=q.partition_peak_began)
        if q.partitioned else None,
        served=served)


def group_out(g: GroupInfo, now: float) -> GroupOut:
    """A group as JSON (``now``: the app's clock, for the oldest pending delivery's age)."""
    s = g.stats
    oldest = s.oldest_pending_at
    return GroupOut(
        group=s.group, kind=s.kind, patterns=list(s.patterns), pending=s.pending,
        in_progress=s.in_progress, oldest_pending_at=utc(oldest),
        oldest_pending_age=None if oldest is None else round(max(now - oldest, 0.0), 3),
        dead_letters=s.dead_letters, served=g.served, served_by=list(g.served_by))


def group_retired_out(done: GroupRetired) -> GroupRetiredOut:
    """What a retire did, as JSON."""
    return GroupRetiredOut(
        group=done.group, retired=done.changed,
        declarations_removed=[DeclarationOut(kind=d.kind, pattern=d.pattern)
                              for d in done.declarations],
        ended=done.ended, held=done.held, dead_letters=done.dead_letters)
