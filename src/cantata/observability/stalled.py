"""Where business transactions are stuck: ``cantata stalled`` and ``app.stalled()``.

A stall is a node of a trace that has made no progress for ``older_than`` seconds:

- ``pending_step``: a live run whose step (or the run itself, never picked up, or
  a timer past its wake-up) is not moving — no worker serves it, or it keeps failing;
- ``waiting_event``: a run waiting in ``ctx.wait_for_event`` for an event that has
  not come;
- ``dead_letter``: a group's handler failed for good (the node is the dead letter);
- ``unhandled_event``: a group declared for the event type has not handled it
  (``node.group`` names it) — the service is down, or retrying;
- ``compensation_failed``: a compensation failed for good; the run needs an operator.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass

from cantata.model.records import Declaration, utc_datetime
from cantata.store.base import Store

from .assemble import assemble
from .node import (
    COMPENSATION,
    DEAD,
    DEAD_LETTER,
    FAILED,
    HANDLER,
    PENDING,
    RUN,
    RUNNING,
    STEP,
    TIMER,
    WAIT,
    WAITING,
    TraceNode,
    TraceNotFound,
)
from .saga_hints import HOP_HINTS, saga_hop_hint
from .stall_hints import LiveWorker, group_hint, live_workers, run_hints

PENDING_STEP = "pending_step"
QUEUED = "queued"  # a run waiting in a queue (node.detail: which, behind how many);
# not in REASONS, which are the stalls of every app (a queue is declared by some)
WAITING_EVENT = "waiting_event"
DEAD_LETTERED = "dead_letter"
UNHANDLED_EVENT = "unhandled_event"
COMPENSATION_FAILED = "compensation_failed"
REASONS = (PENDING_STEP, WAITING_EVENT, DEAD_LETTERED, UNHANDLED_EVENT, COMPENSATION_FAILED)
# The stalls of a run that may be no live worker's to take (a queued one of a newer
# version waits too): they get a hint when so (stall_hints.py).
_HINTED = (PENDING_STEP, WAITING_EVENT, QUEUED)

_LIVE_RUN = frozenset({"pending", "running", "compensating"})


@dataclass(frozen=True, slots=True)
class Stall:
    """One place where a transaction is stuck.

    Attributes:
        correlation_id: the business transaction (``cantata trace`` it).
        reason: ``queued`` (the node's ``detail`` says in which queue and behind how
            many runs), ``pending_step``, ``waiting_event``, ``dead_letter``,
            ``unhandled_event`` or ``compensation_failed``.
        since: when it last made progress (aware UTC datetime).
        node: the stuck node of the trace (``node.group`` names the group of a
            handler or dead letter).
        hint: the cause, when the store tells it: a run no live worker takes
            because none serves its workflow or runs a version that may, an event
            for a group no live worker serves, and a choreographed saga's step that
            only a worker of its service whose app includes the saga handles, or that no
            live worker's code has (a step renamed or removed by a deploy while the
            run's hop for it was in flight; ``None`` otherwise).
    """

    correlation_id: str
    reason: str
    since: dt.datetime
    node: TraceNode
    hint: str | None = None


def _nodes(root: TraceNode) -> Iterator[TraceNode]:
    """Every node, including the open subtrees summary nodes stand for."""
    stack = [root]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(reversed(node.hidden))
        stack.extend(reversed(node.children))


def _run_stall(run: TraceNode, now: dt.datetime) -> tuple[str, TraceNode, dt.datetime] | None:
    """Why a live run is not moving (``None`` while it legitimately sleeps or waits on a child)."""
    if run.status not in _LIVE_RUN:
        return None
    if run.status == "pending" and run.detail and run.detail.startswith("queued"):
        return QUEUED, run, run.touched or run.started_at or now  # (since it was queued)
    for child in run.children:
        if child.kind == WAIT and child.status == WAITING:
            return WAITING_EVENT, child, child.started_at or now
    for child in run.children:
        if child.kind == TIMER and child.status == WAITING:
            if child.due is not None and child.due <= now:
                return PENDING_STEP, child, child.due
            return None
        if child.kind == RUN and child.is_open:
            return None  # the child run reports its own stall
    for child in reversed(run.children):
        if child.kind in (STEP, COMPENSATION) and child.status == RUNNING:
            return PENDING_STEP, child, child.touched or child.started_at or now
    return PENDING_STEP, run, run.touched or run.started_at or now


def _stall_of(node: TraceNode, now: dt.datetime) -> tuple[str, TraceNode, dt.datetime] | None:
    if node.kind == RUN:
        return _run_stall(node, now)
    # A choreographed saga's compensation is a handler's delivery: pending or dead as one.
    if node.kind in (HANDLER, COMPENSATION) and node.status == PENDING:
        return UNHANDLED_EVENT, node, node.touched or node.started_at or now
    if node.kind in (HANDLER, COMPENSATION) and node.status == DEAD:
        if any(c.kind == DEAD_LETTER and c.status == DEAD for c in node.children):
            return None  # reported on the dead letter itself
        return DEAD_LETTERED, node, node.ended_at or node.touched or now
    if node.kind == DEAD_LETTER and node.status == DEAD:  # not one replayed since
        return DEAD_LETTERED, node, node.started_at or now
    if node.kind == COMPENSATION and node.status == FAILED:
        return COMPENSATION_FAILED, node, node.ended_at or node.touched or now
    return None


def stalls_of(
    root: TraceNode,
    older_than: float,
    now: float,
    *,
    correlation_id: str | None = None,
) -> list[Stall]:
    """The stalls of one trace: nodes with no progress for ``older_than`` seconds at ``now``.

    Args:
        root: a tree from :func:`~cantata.observability.trace.build_trace`.
        older_than: seconds without progress; ``0`` lists everything still owed.
        now: POSIX seconds (the app's clock).
        correlation_id: defaults to the one ``build_trace`` recorded on ``root``.

    Returns:
        The stalls, oldest first.
    """
    return [s for s, _ in _stalls_with_runs(root, older_than, now, correlation_id)]


def _stalls_with_runs(
    root: TraceNode, older_than: float, now: float, correlation_id: str | None = None
) -> list[tuple[Stall, str | None]]:
    """:func:`stalls_of`, each with the id of the run that is stuck (if a run is)."""
    cid = correlation_id or root.correlation_id or root.ref or ""
    at = utc_datetime(now)
    cutoff = utc_datetime(now - older_than)
    out = []
    for node in _nodes(root):
        found = _stall_of(node, at)
        if found is not None and found[2] <= cutoff:
            reason, where, since = found
            run_id = node.ref if node.kind == RUN else None
            out.append((Stall(cid, reason, since, where), run_id))
    out.sort(key=lambda s: s[0].since)
    return out


async def _with_hints(
    store: Store, app: str, stuck: list[tuple[Stall, str | None]], now: float,
    declarations: list[Declaration], live: list[LiveWorker] | None = None,
) -> list[Stall]:
    """The stalls, with a hint where live workers run but none of them may take the
    run, or serves the group an event waits for (:mod:`.stall_hints`)."""
    hinted: list[tuple[Stall, str]] = [
        (s, r) for s, r in stuck if r is not None and s.reason in _HINTED]
    events = any(s.reason == UNHANDLED_EVENT for s, _ in stuck)
    if live is None:
        live = await live_workers(store, app, now) if hinted or events else []
    # A run in an event wait is due once its event came (the run was woken) or its
    # timeout passed: no longer parked, nobody owns it, and a worker would have taken it
    # by now if one could.
    waiting = {r for s, r in hinted if s.reason == WAITING_EVENT}
    parked = await store.parked_runs(app, sorted(waiting), now=now) if live and waiting \
        else set()
    runs: dict[str, bool] = {}
    for stall, waiter in hinted:
        due = stall.reason != WAITING_EVENT or waiter not in parked
        runs[waiter] = runs.get(waiter, False) or due
    queued = frozenset(r for s, r in hinted if s.reason == QUEUED)
    found = await run_hints(store, app, runs, live, queued)
    out = []
    for stall, run_id in stuck:
        hint = None
        if run_id is not None and stall.reason in _HINTED:
            hint = found.get(run_id)
        elif stall.reason == UNHANDLED_EVENT and stall.node.detail \
                and stall.node.detail.startswith(HOP_HINTS):
            hint = stall.node.detail  # a saga's hop no live worker's code has (the trace's)
        elif stall.reason == UNHANDLED_EVENT and stall.node.group:
            group = stall.node.group
            hint = group_hint(group, live)
            if not any(w.groups is not None and group in w.groups for w in live):
                # no live worker is known to serve it: a saga's hop says why
                hint = saga_hop_hint(group, declarations) or hint
        out.append(stall if hint is None else dataclasses.replace(stall, hint=hint))
    return out


async def find_stalls(
    store: Store,
    app: str,
    *,
    older_than: float,
    now: float,
    limit: int = 100,
) -> list[Stall]:
    """Stalls of every transaction of ``app`` with no progress for ``older_than`` seconds.

    Args:
        older_than: seconds without progress.
        now: POSIX seconds (``app.clock.now()``).
        limit: at most this many stalls (and transactions looked at).

    Returns:
        The stalls, oldest first.
    """
    cids = await store.stale_correlations(app, older_than=now - older_than, limit=limit,
                                           now=now)
    declarations = await store.declarations(app)
    found: list[tuple[Stall, str | None]] = []
    # read once for every trace (a saga's hop no live worker's code has) and the hints
    live = await live_workers(store, app, now) if cids else []
    for cid in cids:
        try:
            root = await assemble(store, app, cid, declarations, now=now, live=live)
        except TraceNotFound:
            continue  # removed meanwhile
        found.extend(_stalls_with_runs(root, older_than, now, correlation_id=cid))
    found.sort(key=lambda s: s[0].since)
    return await _with_hints(store, app, found[:limit], now, declarations, live)
