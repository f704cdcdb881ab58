"""``TraceNode``: one thing that happened in a business transaction (pure data)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass, field

from cantata.errors import CantataError
from cantata.model.records import to_datetime

# Node kinds.
RUN = "run"
STEP = "step"
COMPENSATION = "compensation"
EVENT = "event"
HANDLER = "handler"
TIMER = "timer"
WAIT = "wait"
DEAD_LETTER = "dead_letter"
KINDS = (RUN, STEP, COMPENSATION, EVENT, HANDLER, TIMER, WAIT, DEAD_LETTER)

# Statuses a node can have besides the run statuses (``RunStatus`` values).
PENDING = "pending"
RUNNING = "running"
WAITING = "waiting"
COMPLETED = "completed"
FAILED = "failed"
DEAD = "dead"
PUBLISHED = "published"  # an event no group was addressed to
MIXED = "mixed"  # a summary of nodes with different statuses
REPLAYED = "replayed"  # a dead letter an operator replayed (no longer in the queue)
RETIRED = "retired"  # a handler whose group an operator retired before it handled the event

# The detail of a step called as a task before any service declared it: the task goes
# to whichever service declares the step (the node names no group until then).
UNADDRESSED_TASK = "task for the service that declares this step (none has yet)"

# The detail of a live run whose cancel was asked and not applied yet: it ends when a
# worker of its workflow takes it up (one queued then ends without beginning).
CANCEL_REQUESTED = "cancel requested"
# The detail of a run whose step waits for a slot of a limited step (assemble.py)
SLOT_WAIT = "waiting for a slot"

# Statuses that mean "not finished yet" (work is still owed).
OPEN_STATUSES = frozenset({PENDING, RUNNING, WAITING, "compensating"})


class TraceNotFound(CantataError):
    """No run or event of the app carries that correlation id."""

    code = "trace_not_found"


@dataclass
class TraceNode:
    """One node of a trace tree (see ``app.trace``).

    Attributes:
        kind: ``run``, ``step``, ``compensation``, ``event``, ``handler``, ``timer``,
            ``wait`` or ``dead_letter``.
        name: the workflow, step or handler name, or the event type.
        status: a plain string: a run status, ``completed`` / ``failed`` / ``running``
            / ``waiting`` for history entries, ``pending`` / ``completed`` / ``dead``
            for handlers and events (``retired`` for a handler whose group was retired
            before it handled the event: ``cantata groups retire``), ``dead`` /
            ``replayed`` for dead letters.
        group: the reacting service, for handler and dead-letter nodes.
        started_at, ended_at: aware UTC datetimes (``ended_at`` is ``None`` while open;
            a replayed dead letter's is the time of the replay).
        attempts: attempts made (steps, compensations, handlers, dead letters); a
            handler's count those before each replay of its dead letters too.
        error: ``"Type: message"`` — for a node that succeeded after retries, the error
            of its last failed attempt (why it was retried); for a handler whose dead
            letter was replayed, that letter's error unless it has a newer one.
        children: what this node caused, in order.

    Besides these fields each node carries diagnostic extras that are not part of
    the contract: ``ref`` (run id, event id, dead-letter id or history key),
    ``detail`` (event source, wait pattern, a cancel requested, ...), ``cancelled`` (a
    step whose branch the workflow's own code cancelled while it ran: it ended as its
    ``status`` says, then the branch got the cancel), ``due`` (timer wake-up, wait
    timeout or next retry), ``touched`` (last progress) and, on the summary nodes of a
    truncated tree, ``elided`` (how many nodes it stands for) and ``hidden`` (the open
    nodes among them, so stall detection still sees them).
    """

    kind: str
    name: str
    status: str
    group: str | None = None
    started_at: dt.datetime | None = None
    ended_at: dt.datetime | None = None
    attempts: int = 0
    error: str | None = None
    children: list[TraceNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ref: str | None = None
        self.detail: str | None = None
        self.cancelled: bool = False
        self.due: dt.datetime | None = None
        self.touched: dt.datetime | None = None
        self.elided: int = 0
        self.hidden: list[TraceNode] = []
        self.correlation_id: str | None = None  # set on the root

    @property
    def is_open(self) -> bool:
        """True while work is still owed here (pending, running, waiting)."""
        return self.status in OPEN_STATUSES

    def walk(self) -> Iterator[TraceNode]:
        """This node and every descendant, depth first (iterative: deep trees are fine)."""
        stack = [self]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(reversed(node.children))

    def find(self, kind: str | None = None, name: str | None = None) -> list[TraceNode]:
        """Descendants (and self) of ``kind`` and/or ``name``, in tree order."""
        return [
            n for n in self.walk()
            if (kind is None or n.kind == kind) and (name is None or n.name == name)
        ]


def stamp(ts: float | None) -> dt.datetime | None:
    """POSIX seconds to an aware UTC datetime (out of range: see ``to_datetime``)."""
    return to_datetime(ts)

