"""Assembling one business transaction into a tree, from the store's records.

Links come from the ids every record carries: a run's history places its steps,
timers, waits, emitted events and child runs in order; an event's delivery rows
give one handler node per group, under which go the events that group emitted
(``causation_id`` = the handled event, ``source`` = ``cantata/<app>/<group>``) and
its dead letters, the replayed ones first (each an episode of failed attempts
before a replay: the handler's attempts count them too); runs an event started
(``causation_id`` = the event) hang under the event. What links to nothing known
is attached to the root. The result is then bounded (:mod:`.bound`) so a
transaction of any size renders quickly.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cantata.engine.saga.hops import not_its_map
from cantata.model import codec
from cantata.model.checks import check_text
from cantata.model.event import Event, matches
from cantata.model.records import (
    CHILD,
    DELIVERY_DEAD,
    DELIVERY_DONE,
    DELIVERY_PENDING,
    EMIT,
    SLEEP,
    VALUE,
    Attempt,
    DeadLetter,
    Declaration,
    Delivery,
    HistoryEntry,
    RunRecord,
    branch_cancelled,
    is_retired,
)
from cantata.model.status import CUT_SHORT, RunStatus, call_status
from cantata.store.base import Store, TraceRecords

if TYPE_CHECKING:
    from .stall_hints import LiveWorker

from .bound import MAX_NODES, bound, truncation_notice
from .node import (
    CANCEL_REQUESTED,
    COMPENSATION,
    COMPLETED,
    DEAD,
    DEAD_LETTER,
    EVENT,
    FAILED,
    HANDLER,
    PENDING,
    PUBLISHED,
    REPLAYED,
    RETIRED,
    RUN,
    SLOT_WAIT,
    STEP,
    TIMER,
    UNADDRESSED_TASK,
    WAIT,
    TraceNode,
    TraceNotFound,
    stamp,
)

DEFAULT_LIMIT = 10_000
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
TRIGGER_PREFIX = "start:"
_LIVE = frozenset({"pending", "running", "compensating"})

_ENTRY_KINDS = {
    "step": STEP,
    "compensation": COMPENSATION,
    SLEEP: TIMER,
    "wait": WAIT,
}
_DELIVERY_STATUS = {DELIVERY_DONE: COMPLETED, DELIVERY_DEAD: DEAD, DELIVERY_PENDING: PENDING}


async def build_trace(
    store: Store,
    app: str,
    correlation_id: str,
    *,
    limit: int = DEFAULT_LIMIT,
    max_nodes: int = MAX_NODES,
) -> TraceNode:
    """The whole business transaction ``correlation_id`` of ``app`` as a tree.

    The root is the run (a transaction started by ``app.start``) or the event (one
    started by a publish). A run id or event id inside another transaction is
    accepted too: the trace of its transaction is returned.

    Args:
        limit: at most this many records of each kind are read from the store.
        max_nodes: the tree is summarised ("… 9 800 more events") beyond this size.

    Raises:
        TraceNotFound: no run or event of ``app`` has that id or correlation id.
    """
    declarations = await store.declarations(app)
    return await assemble(store, app, correlation_id, declarations, limit=limit,
                          max_nodes=max_nodes)


async def assemble(
    store: Store,
    app: str,
    correlation_id: str,
    declarations: Sequence[Declaration],
    *,
    limit: int = DEFAULT_LIMIT,
    max_nodes: int = MAX_NODES,
    now: float | None = None,
    live: list[LiveWorker] | None = None,
) -> TraceNode:
    """:func:`build_trace` with the app's declarations already loaded (``now``: POSIX
    seconds a worker's lease is judged at, the wall clock by default; ``live``: the
    live workers, when read already)."""
    from .saga_hints import note_lost_hops  # (it names handlers as this module does)

    cid, records = await load_records(store, app, correlation_id, limit)
    root = Builder(app, records, declarations).build(cid)
    cancelling = {r.run_id for r in records.runs if r.cancel_requested}
    await note_queued(store, app, root, cancelling)
    await note_lost_hops(store, app, root, declarations, records.runs, now, live,
                         [e for e, _ in records.events])
    if records_truncated(records, limit):
        root.children.append(truncation_notice(limit))
    root.correlation_id = cid
    return bound(root, max_nodes)


async def note_queued(
    store: Store, app: str, root: TraceNode, cancelling: frozenset[str] | set[str] = frozenset()
) -> None:
    """Say on each run that waits in a queue where it waits and behind how many runs
    (and, as its last progress, since when it waits there);
    of one whose cancel was asked meanwhile (a run id in ``cancelling``), that it ends
    without beginning once a worker takes it: it no longer waits for a place. Say on
    each other live run whose step waits for a slot of a limited step which step, and
    behind how many waiters."""
    waiting: dict[str, TraceNode] = {}
    for node in root.walk():
        if node.kind != RUN or node.ref is None or node.status not in _LIVE:
            continue
        pos = None
        if node.status == "pending":
            pos = await store.queue_position(app, node.ref)
        if pos is None:
            if node.detail is None:
                waiting[node.ref] = node
            continue
        part = f" (partition {pos.partition!r})" if pos.partition else ""
        if node.ref in cancelling:
            node.detail = (f"{CANCEL_REQUESTED} while queued in {pos.queue!r}{part}: it "
                           "ends cancelled, without beginning, once a worker takes it")
        else:
            node.detail = f"queued in {pos.queue!r}{part} behind {pos.ahead} run(s)"
            # it waits since it was queued: a retried run since the retry, not since it
            # was created
            node.touched = stamp(pos.since) if pos.since is not None else node.touched
    for run_id, wait in (await store.slot_waits(app, list(waiting))).items():
        kind, _, name = wait.scope.partition(":")
        waiting[run_id].detail = f"{SLOT_WAIT} of {kind} {name!r} behind {wait.ahead} run(s)"


async def load_records(
    store: Store, app: str, correlation_id: str, limit: int
) -> tuple[str, TraceRecords]:
    """The records of ``correlation_id`` (or of the transaction holding that run/event).

    One record more than ``limit`` is asked for, so that truncation can be told.
    """
    check_text("correlation id", correlation_id, error=TraceNotFound,
               hint=f"no run or event of app {app!r} has such an id; check the id")
    records = await store.trace_records(app, correlation_id, limit=limit + 1)
    if records.runs or records.events:
        return correlation_id, records
    other: str | None = None
    run = await store.get_run(app, correlation_id)
    if run is not None:
        other = run.correlation_id
    else:
        event = await store.get_event(app, correlation_id)
        if event is not None:
            other = event.correlation_id or event.id
    if other is not None and other != correlation_id:
        records = await store.trace_records(app, other, limit=limit + 1)
        if records.runs or records.events:
            return other, records
    raise TraceNotFound(
        f"no business transaction {correlation_id!r} in app {app!r}: no run or event has that "
        f"id or correlation id in store {store.url} ({TRACE_ADVICE})"
    )


# What a library caller is told to check when no transaction has the id (the CLI
# names its own options instead: ``cantata trace``).
TRACE_ADVICE = "check the id, and the app's name and store it was recorded in"


def records_truncated(records: TraceRecords, limit: int) -> bool:
    """True if the store held more than ``limit`` records of a kind (the tree is incomplete)."""
    return (
        len(records.runs) > limit
        or len(records.events) > limit
        or any(len(v) > limit for v in records.entries.values())
    )


def short_name(declaration: Declaration) -> str:
    """The handler function a declaration names, without ``<locals>`` noise (or the group)."""
    info = codec.loads(declaration.detail) if declaration.detail else None
    name = info.get("handler") if isinstance(info, dict) else None
    return str(name).rsplit("<locals>.", 1)[-1] if name else declaration.name


def _token(step: object) -> str:
    """A saga step's name as its event types and groups spell it (see ``Saga.event_type``)."""
    return str(step).replace(".", "_")


def _step_error(failed: str) -> str:
    """``Type: message`` of a ``StepFailed`` text (``step s failed after n attempt(s): ...``)."""
    _, sep, error = failed.partition(" attempt(s): ")
    return error if sep else failed


def _error_of(attempt: Attempt) -> str | None:
    if attempt.error_type is None:
        return None
    return f"{attempt.error_type}: {attempt.error or ''}".rstrip(": ")


class Builder:
    """Turns :class:`TraceRecords` into linked :class:`TraceNode` objects."""

    def __init__(
        self, app: str, records: TraceRecords, declarations: Sequence[Declaration]
    ) -> None:
        self.app = app
        self.records = records
        self.runs = {r.run_id: r for r in records.runs}
        self.events: dict[str, tuple[Event[Any], float]] = {
            e.id: (e, stored) for e, stored in records.events
        }
        self.deliveries: dict[str, list[Delivery]] = {}
        for d in records.deliveries:
            self.deliveries.setdefault(d.event.id, []).append(d)
        self.dead_letters: dict[tuple[str, str], list[DeadLetter]] = {}
        for dl in records.dead_letters:
            self.dead_letters.setdefault((dl.event.id, dl.group), []).append(dl)
        self.replayed: dict[tuple[str, str], list[tuple[DeadLetter, float]]] = {}
        for dl, replayed_at in records.replayed_dead_letters:
            self.replayed.setdefault((dl.event.id, dl.group), []).append((dl, replayed_at))
        self.caused_events: dict[str, list[Event[Any]]] = {}
        for e, _ in records.events:
            if e.causation_id is not None and e.causation_id != e.id:
                self.caused_events.setdefault(e.causation_id, []).append(e)
        self.caused_runs: dict[str, list[RunRecord]] = {}
        for r in records.runs:
            if r.causation_id is not None:
                self.caused_runs.setdefault(r.causation_id, []).append(r)
        self.handlers = [
            (d.name, d.pattern, short_name(d))
            for d in declarations if d.kind == "handler"
        ]
        self.workflows = [d.name for d in declarations if d.kind == "workflow"]
        self.nodes: dict[str, TraceNode] = {}
        self.holder: dict[str, TraceNode] = {}  # record key -> the node it hangs under

    # -- the whole tree ------------------------------------------------------------------

    def build(self, correlation_id: str) -> TraceNode:
        for run in self.records.runs:
            self.nodes[f"run:{run.run_id}"] = self._run_node(run)
        for event, stored in self.records.events:
            self.nodes[f"event:{event.id}"] = self._event_node(event, stored)
        for run in self.records.runs:
            self._fill_run(run)
        for event, _ in self.records.events:
            self._fill_event(event)
        self._link_leftovers()
        return self._root(correlation_id)

    def _attach(self, parent: TraceNode, key: str) -> bool:
        node = self.nodes.get(key)
        if node is None or key in self.holder or node is parent:
            return False
        parent.children.append(node)
        self.holder[key] = parent
        return True

    def _root(self, correlation_id: str) -> TraceNode:
        root_key = next(
            (k for k in (f"run:{correlation_id}", f"event:{correlation_id}") if k in self.nodes),
            None,
        )
        if root_key is not None and root_key in self.holder:
            self._detach(root_key)
        root = self.nodes[root_key] if root_key is not None else None
        tops = [k for k in self.nodes if k not in self.holder and self.nodes[k] is not root]
        tops.sort(key=lambda k: self.nodes[k].started_at or EPOCH)
        if root is None:
            # Joined under an id that is neither a run nor an event: the earliest
            # unlinked record stands for the transaction (any record, if all form a cycle).
            first = tops.pop(0) if tops else min(
                self.nodes, key=lambda k: self.nodes[k].started_at or EPOCH
            )
            self._detach(first)
            root = self.nodes[first]
        for key in tops:
            root.children.append(self.nodes[key])
            self.holder[key] = root
        self._break_cycles(root)
        return root

    def _break_cycles(self, root: TraceNode) -> None:
        """Records that cause each other are unreachable from the root: hang them on it."""
        # Every node but the root has one holder, so the walk from the root is finite.
        seen = {id(n) for n in root.walk()}
        for key, node in self.nodes.items():
            if id(node) in seen:
                continue
            self._detach(key)
            root.children.append(node)
            self.holder[key] = root
            seen.update(id(n) for n in node.walk())

    def _detach(self, key: str) -> None:
        node = self.nodes[key]
        holder = self.holder.pop(key, None)
        if holder is not None:
            holder.children = [c for c in holder.children if c is not node]

    def _link_leftovers(self) -> None:
        """Runs and events not placed by a history entry or a delivery row."""
        for run in self.records.runs:
            key = f"run:{run.run_id}"
            for parent_key in (
                f"run:{run.parent_run_id}",
                f"event:{run.causation_id}",
                f"run:{run.causation_id}",
            ):
                parent = self.nodes.get(parent_key)
                if parent is not None and self._attach(parent, key):
                    break
        for event, _ in self.records.events:
            key = f"event:{event.id}"
            for parent_key in (f"run:{event.causation_id}", f"event:{event.causation_id}"):
                parent = self.nodes.get(parent_key)
                if parent is not None and self._attach(parent, key):
                    break

    # -- runs ----------------------------------------------------------------------------

    def _run_node(self, run: RunRecord) -> TraceNode:
        node = TraceNode(
            RUN, run.workflow, str(run.status), None, stamp(run.created_at),
            stamp(run.updated_at) if run.status.is_final else None, 0, run.error,
        )
        node.ref = run.run_id
        node.touched = stamp(run.updated_at)
        if run.flagged:
            node.detail = "flagged for an operator"
        elif run.cancel_requested and not run.status.is_final:
            # (one waiting in a queue is said so by note_queued)
            node.detail = (f"{CANCEL_REQUESTED}, not applied yet: a worker of its "
                           "workflow applies it at the run's next durable point")
        return node

    def _fill_run(self, run: RunRecord) -> None:
        node = self.nodes[f"run:{run.run_id}"]
        attempts: dict[str, list[Attempt]] = {}
        for a in self.records.attempts.get(run.run_id, []):
            attempts.setdefault(a.key, []).append(a)
        for entry in sorted(self.records.entries.get(run.run_id, []), key=lambda e: e.seq):
            if entry.kind == VALUE:
                continue
            if entry.kind == EMIT:
                self._place_emitted(node, entry)
            elif entry.kind == CHILD:
                self._place_child(node, entry, run.status)
            elif entry.kind in _ENTRY_KINDS:
                node.children.append(self._entry_node(entry, attempts.get(entry.key, []),
                                                      run.status))

    def _entry_node(self, entry: HistoryEntry, attempts: list[Attempt],
                    run: RunStatus) -> TraceNode:
        kind = _ENTRY_KINDS[entry.kind]
        error = entry.error
        if error is None:
            failed = [e for e in map(_error_of, attempts) if e]
            error = failed[-1] if failed else None
        node = TraceNode(  # a call the ended run left open is shown cut short, not open
            kind, entry.name, call_status(entry.status, run), None, stamp(entry.started_at),
            stamp(entry.ended_at), entry.attempts, error,
        )
        node.ref = entry.key
        node.due = stamp(entry.wake_at)
        node.cancelled = branch_cancelled(entry)
        times = [t for a in attempts for t in (a.started_at, a.ended_at) if t is not None]
        node.touched = stamp(max(times)) if times else node.started_at
        info = codec.loads(entry.detail) if entry.detail else None
        if kind in (STEP, COMPENSATION) and isinstance(info, dict) and info.get("service"):
            # a step served by another service: the service is the group to name
            node.group = str(info["service"])
            node.detail = f"task for service {info['service']}"
        elif kind in (STEP, COMPENSATION) and isinstance(info, dict) and "task" in info:
            # for whichever service declares the step: none had when it was called
            node.detail = UNADDRESSED_TASK
        if kind == TIMER and isinstance(info, dict):
            node.detail = f"{info.get('seconds')} s"
        elif kind == WAIT and isinstance(info, dict):
            match = info.get("match") or {}
            node.detail = f"matching {codec.dumps(match)}" if match else "any"
            if entry.result:
                got = codec.loads(entry.result)
                if isinstance(got, dict):
                    node.detail += f"; got event {got.get('id')}"
        return node

    def _place_emitted(self, run_node: TraceNode, entry: HistoryEntry) -> None:
        try:
            event = Event.from_cloudevent(codec.loads(entry.result))
        except Exception:
            return
        if self._attach(run_node, f"event:{event.id}"):
            return
        if f"event:{event.id}" in self.nodes:
            return
        # Emitted but beyond the store's limit: show it from the recorded envelope.
        stub = self._event_node(event, entry.started_at or 0.0)
        stub.status = PUBLISHED
        run_node.children.append(stub)

    def _place_child(self, run_node: TraceNode, entry: HistoryEntry, run: RunStatus) -> None:
        info = codec.loads(entry.detail) if entry.detail else {}
        child_id = str(info.get("run_id")) if isinstance(info, dict) else ""
        if self._attach(run_node, f"run:{child_id}") or f"run:{child_id}" in self.nodes:
            return
        stub = TraceNode(RUN, entry.name, call_status(entry.status, run), None,
                         stamp(entry.started_at),
                         stamp(entry.ended_at), 0, entry.error)
        stub.ref = child_id or entry.key
        run_node.children.append(stub)

    # -- events --------------------------------------------------------------------------

    def _event_node(self, event: Event[Any], stored: float) -> TraceNode:
        node = TraceNode(EVENT, event.type, PUBLISHED, None, stamp(stored), stamp(stored))
        node.ref = event.id
        node.detail = event.source
        node.touched = stamp(stored)
        return node

    def handler_name(self, group: str, event_type: str) -> str:
        """The declared handler of ``group`` for ``event_type`` (exact beats wildcard)."""
        wildcard = None
        for grp, pattern, name in self.handlers:
            if grp != group or not matches(pattern, event_type):
                continue
            if "*" not in pattern:
                return name
            wildcard = wildcard or name
        return wildcard or group

    def _emitting_group(self, event: Event[Any]) -> str | None:
        prefix = f"cantata/{self.app}/"
        return event.source[len(prefix):] if event.source.startswith(prefix) else None

    def _fill_event(self, event: Event[Any]) -> None:
        node = self.nodes[f"event:{event.id}"]
        deliveries = sorted(self.deliveries.get(event.id, []), key=lambda d: d.group)
        caused = self.caused_events.get(event.id, [])
        for d in deliveries:
            replayed = [
                self._replayed_node(dl, at) for dl, at in self.replayed.get((event.id, d.group), [])
            ]
            retired = is_retired(d.status, d.error)
            if d.group.startswith(TRIGGER_PREFIX) and d.status == DELIVERY_DONE and not retired:
                node.children.extend(replayed)  # the start failed before: kept in view
                workflow = d.group[len(TRIGGER_PREFIX):]
                for run in self.caused_runs.get(event.id, []):
                    if run.workflow == workflow:
                        self._attach(node, f"run:{run.run_id}")
                continue
            handler = self._handler_node(event, d)
            self._saga_outcome(handler, event, d, [
                e for e in caused if self._emitting_group(e) == d.group
            ])
            node.children.append(handler)
            if replayed:
                # The delivery's row counts the attempts since the last replay only.
                handler.children.extend(replayed)
                handler.attempts += sum(r.attempts for r in replayed)
                if handler.error is None:
                    handler.error = replayed[-1].error
            for e in caused:
                if self._emitting_group(e) == d.group:
                    self._attach(handler, f"event:{e.id}")
            for dl in self.dead_letters.get((event.id, d.group), []):
                handler.children.append(self._dead_letter_node(dl))
        statuses = {d.status for d in deliveries}
        if DELIVERY_DEAD in statuses:
            node.status = DEAD
        elif DELIVERY_PENDING in statuses:
            node.status = PENDING
        elif statuses:
            node.status = COMPLETED
        if DELIVERY_PENDING in statuses:
            node.ended_at = None
        elif deliveries:
            node.ended_at = stamp(max(d.updated_at for d in deliveries))

    def _handler_node(self, event: Event[Any], d: Delivery) -> TraceNode:
        status = _DELIVERY_STATUS.get(d.status, d.status)
        retired = is_retired(d.status, d.error)
        if retired:
            status = RETIRED  # ended by `cantata groups retire`, not handled
        if d.group.startswith(TRIGGER_PREFIX):
            name = f"start {d.group[len(TRIGGER_PREFIX):]}"
        else:
            name = self.handler_name(d.group, event.type)
        _, stored = self.events[event.id]
        node = TraceNode(
            HANDLER, name, status, d.group, stamp(stored),
            None if status == PENDING else stamp(d.updated_at), d.attempts,
            None if retired else d.error,
        )
        if retired:
            node.detail = d.error
        elif d.status == DELIVERY_DONE:
            # a saga's hop of another map than its run's, settled without running
            node.detail = not_its_map(d.group, event.type, event.data, self.workflows)
        node.ref = f"{d.group}/{event.id}"
        node.touched = stamp(d.updated_at)
        if status == PENDING and d.next_at > 0:
            node.due = stamp(d.next_at)
        return node

    def _saga_outcome(self, node: TraceNode, event: Event[Any], d: Delivery,
                      emitted: list[Event[Any]]) -> None:
        """Show a choreographed saga's handler as the orchestrated run shows the call.

        Its step's outcome travels in the events (see ``engine/saga/choreographed.py``):
        a step's handler that emitted the step's ``failure`` (on a trigger that carried
        none) failed with that error; a handler whose trigger names its step first in
        the ``undo`` plan runs a compensation, and failed if it added to ``failures``.
        """
        data = event.data
        run = self.runs.get(data.get("run_id", "")) if isinstance(data, dict) else None
        prefix = f"{run.workflow}." if run is not None else ""
        if not (prefix and event.type.startswith(prefix) and d.group.startswith(prefix)):
            return
        token = d.group[len(prefix):]  # the step, as its group names it
        states = [e.data for e in emitted if isinstance(e.data, dict)]
        undo = data.get("undo")
        if isinstance(undo, list) and undo and _token(undo[0]) == token:
            node.kind = COMPENSATION
            before = len(data.get("failures") or [])
            for state in states:
                failures = state.get("failures")
                if isinstance(failures, list) and len(failures) > before:
                    node.status = FAILED
                    node.error = _step_error(str(failures[-1]))
            return
        if "failure" in data:
            return  # a failure passed on (a join's), not this step's own
        for state in states:
            failure = state.get("failure")
            if isinstance(failure, dict) and _token(failure.get("step")) == token:
                never_ran = failure.get("type") == "Cancelled" and not failure.get("attempts")
                node.status = CUT_SHORT if never_ran else FAILED
                node.error = f"{failure.get('type')}: {failure.get('message') or ''}".rstrip(": ")

    def _replayed_node(self, dl: DeadLetter, replayed_at: float) -> TraceNode:
        node = self._dead_letter_node(dl)
        node.status = REPLAYED
        node.ended_at = node.touched = stamp(replayed_at)
        return node

    def _dead_letter_node(self, dl: DeadLetter) -> TraceNode:
        node = TraceNode(DEAD_LETTER, dl.event.type, DEAD, dl.group, dl.failed_at, dl.failed_at,
                         dl.attempts, dl.error)
        node.ref = dl.id
        node.touched = dl.failed_at
        return node
