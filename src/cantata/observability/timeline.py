"""Rendering a trace for people: a tree with timings, then where the transaction stands."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator

from rich.console import Group, RenderableType
from rich.text import Text
from rich.tree import Tree

from cantata.engine.saga.hops import LOST_HOP_WAITS
from cantata.model.records import utc_datetime

from .bound import count
from .node import (
    CANCEL_REQUESTED,
    COMPENSATION,
    COMPLETED,
    DEAD_LETTER,
    EVENT,
    HANDLER,
    REPLAYED,
    RETIRED,
    RUN,
    RUNNING,
    SLOT_WAIT,
    STEP,
    TIMER,
    WAIT,
    WAITING,
    TraceNode,
)
from .stalled import (
    COMPENSATION_FAILED,
    DEAD_LETTERED,
    PENDING_STEP,
    QUEUED,
    UNHANDLED_EVENT,
    WAITING_EVENT,
    Stall,
    stalls_of,
)

MAX_STALL_LINES = 12
# A step whose branch the workflow's own code cancelled while it ran (``node.cancelled``)
BRANCH_CANCELLED = "branch cancelled while it ran"
RECENT = 5.0  # seconds: open items younger than this read "in progress"

_STYLE = {
    "completed": "green",
    "compensated": "yellow",
    "failed": "red",
    "dead": "red",
    "cancelled": "magenta",
    "interrupted": "magenta",
    "running": "cyan",
    "pending": "blue",
    "waiting": "blue",
    "compensating": "yellow",
    "published": "white",
    "mixed": "white",
    "replayed": "yellow",
}
_ICON = {
    "completed": "✓",
    "compensated": "↩",
    "failed": "✗",
    "dead": "✗",
    "cancelled": "⊘",
    "interrupted": "⊘",
    "running": "▶",
    "pending": "…",
    "waiting": "⏸",
    "compensating": "↩",
    "published": "•",
    "mixed": "…",
    "replayed": "↻",
}
_KIND_WORD = {
    RUN: "run",
    STEP: "step",
    COMPENSATION: "compensate",
    EVENT: "event",
    HANDLER: "handler",
    TIMER: "timer",
    WAIT: "wait for",
    DEAD_LETTER: "dead letter",
}


def fmt_seconds(seconds: float) -> str:
    """A short human duration: ``850 µs``, ``12.3 ms``, ``4.20 s``, ``3.5 min``, ``2.0 h``."""
    s = abs(seconds)
    if s == 0:
        return "0 ms"
    if s < 0.001:
        text = f"{s * 1e6:.0f} µs"
    elif s < 1:
        text = f"{s * 1000:.1f} ms"
    elif s < 120:
        text = f"{s:.2f} s"
    elif s < 7200:
        text = f"{s / 60:.1f} min"
    elif s < 172800:
        text = f"{s / 3600:.1f} h"
    else:
        text = f"{s / 86400:.1f} d"
    return f"-{text}" if seconds < 0 else text


def _short(ref: str | None) -> str:
    """An id as the timeline prints it: whole, never cut (an operator copies it into
    ``cantata run``; a long line folds instead)."""
    return ref or ""


def _clock(at: dt.datetime, now: dt.datetime | None = None) -> str:
    """``14:12:39.338 UTC`` on the day of ``now``, else ``2026-12-05 14:12:39 UTC``."""
    if now is not None and at.date() != now.date():
        return at.strftime("%Y-%m-%d %H:%M:%S") + " UTC"
    return at.strftime("%H:%M:%S.%f")[:-3] + " UTC"


class _Renderer:
    def __init__(self, root: TraceNode, now: float) -> None:
        self.root = root
        self.now = utc_datetime(now)
        self.origin = root.started_at
        self.parent: dict[int, TraceNode] = {}
        stack = [root]
        while stack:
            node = stack.pop()
            for child in (*node.children, *node.hidden):
                self.parent[id(child)] = node
                stack.append(child)

    def offset(self, at: dt.datetime | None) -> str:
        if at is None or self.origin is None:
            return ""
        return "+" + fmt_seconds((at - self.origin).total_seconds()).replace("+-", "-")

    def label(self, node: TraceNode) -> Text:
        style = _STYLE.get(node.status, "white")
        text = Text()
        if node.elided or node.ref == "truncated":
            text.append(node.name, style="dim")
            if node.status not in ("mixed", "completed"):
                text.append(f"  {node.status}", style=style)
            return text
        text.append(f"{_ICON.get(node.status, '•')} ", style=style)
        text.append(f"{_KIND_WORD.get(node.kind, node.kind)} ", style="dim")
        if node.kind == HANDLER:
            text.append(f"{node.group}", style="bold magenta")
            if node.name != node.group:
                text.append(f" → {node.name}")
        elif node.kind == DEAD_LETTER:
            text.append(f"in {node.group}", style="bold red")
        else:
            text.append(node.name, style="bold" if node.kind in (RUN, EVENT) else "")
        text.append(f"  {node.status}", style=style)
        when = self.offset(node.started_at)
        if when:
            text.append(f"  {when}", style="dim")
        if node.started_at is not None and node.ended_at is not None and node.kind not in (
            EVENT, DEAD_LETTER
        ):
            took = (node.ended_at - node.started_at).total_seconds()
            text.append(f" ({fmt_seconds(took)})", style="dim")
        for extra in self.extras(node):
            text.append(f"  · {extra}", style="dim")
        if node.error:
            prefix = "last retry: " if node.status == "completed" else ""
            calm = prefix or node.status == REPLAYED  # the failure was dealt with
            text.append(f"\n{prefix}{node.error}", style="yellow" if calm else "red")
        return text

    def extras(self, node: TraceNode) -> list[str]:
        out: list[str] = []
        if node.attempts > 1 or (node.attempts == 1 and node.kind == DEAD_LETTER):
            out.append(f"{node.attempts} attempts")
        if node.kind == RUN and node.ref:
            out.append(f"run {_short(node.ref)}")
            if node.detail:
                out.append(node.detail)
        elif node.kind == EVENT and node.ref:
            out.append(f"id {_short(node.ref)}")
        elif node.kind == TIMER and node.detail:
            out.append(node.detail)
            if node.status == WAITING and node.due is not None:
                out.append(f"wakes {_clock(node.due, self.now)}")
        elif node.kind == WAIT:
            if node.detail:
                out.append(node.detail)
            if node.status == WAITING and node.due is not None:
                out.append(f"times out {_clock(node.due, self.now)}")
        elif node.kind in (STEP, COMPENSATION) and node.status == RUNNING \
                and node.due is not None and node.due > self.now:
            out.append(f"next attempt {_clock(node.due, self.now)}")  # in its backoff
        elif node.kind in (STEP, COMPENSATION) and node.cancelled:
            out.append(BRANCH_CANCELLED)
        elif node.kind == HANDLER and node.status in (RETIRED, COMPLETED) and node.detail:
            # who retired its group, or why a saga's hop of another map did not run
            out.append(node.detail)
        elif node.kind in (HANDLER, COMPENSATION) and node.status == "pending":
            if node.attempts == 0:
                out.append("not picked up yet")
            elif node.due is not None:
                out.append(f"next attempt {_clock(node.due, self.now)}")
            if node.detail:  # why it waits (a saga's hop no live worker's code has)
                out.append(node.detail)
        elif node.kind == DEAD_LETTER and node.ref:
            out.append(f"id {_short(node.ref)}")
            if node.status == REPLAYED and node.ended_at is not None:
                out.append(f"replayed {_clock(node.ended_at, self.now)}")
        return out

    def tree(self) -> Tree:
        root = self.root
        title = Text()
        title.append(f"trace {root.correlation_id or root.ref}", style="bold")
        if root.started_at is not None:
            title.append(f"   started {root.started_at:%Y-%m-%d %H:%M:%S} UTC", style="dim")
        tree = Tree(title, guide_style="dim")
        stack: list[tuple[TraceNode, Tree]] = [(root, tree)]
        while stack:
            node, branch = stack.pop()
            sub = branch.add(self.label(node))
            stack.extend((child, sub) for child in reversed(node.children))
        return tree

    # -- where it stands -----------------------------------------------------------------

    def owner(self, node: TraceNode, kind: str) -> TraceNode | None:
        cur = self.parent.get(id(node))
        while cur is not None and cur.kind != kind:
            cur = self.parent.get(id(cur))
        return cur

    def event_of(self, node: TraceNode) -> str:
        event = self.owner(node, EVENT)
        return event.name if event is not None else "its event"

    def ago(self, since: dt.datetime) -> str:
        return fmt_seconds((self.now - since).total_seconds())

    def describe(self, stall: Stall) -> Text:
        n = stall.node
        line = Text("  ")
        if stall.reason == DEAD_LETTERED:
            line.append("✗ dead-lettered: ", style="bold red")
            event = n.name if n.kind == DEAD_LETTER else self.event_of(n)
            line.append(f"group {n.group} gave up on {event} after {n.attempts} attempt(s), "
                        f"{self.ago(stall.since)} ago")
            if n.error:
                line.append(f" — {n.error}", style="red")
            if n.kind == DEAD_LETTER and n.ref:
                line.append(f"\n    replay it: cantata dlq replay {n.ref}", style="dim")
        elif stall.reason == UNHANDLED_EVENT:
            line.append("… not handled: ", style="bold blue")
            verb = "has not reacted to" if n.attempts == 0 else "keeps failing on"
            line.append(f"group {n.group} {verb} {self.event_of(n)} "
                        f"(pending for {self.ago(stall.since)}")
            line.append(f", {n.attempts} attempt(s))" if n.attempts else ")")
            if n.error:
                line.append(f" — last error {n.error}", style="red")
            if n.detail:
                line.append(f" — {n.detail}")
        elif stall.reason == WAITING_EVENT:
            run = self.owner(n, RUN)
            line.append("⏸ waiting: ", style="bold blue")
            line.append(f"run {run.name if run else '?'} waits for {n.name}")
            if n.detail:
                line.append(f" {n.detail}")
            line.append(f" since {_clock(stall.since, self.now)} ({self.ago(stall.since)})")
        elif stall.reason == QUEUED:
            line.append("… queued: ", style="bold blue")
            line.append(f"run {n.name} ({_short(n.ref)}) is {n.detail}, waiting for "
                        f"{self.ago(stall.since)}")
        elif stall.reason == PENDING_STEP:
            line.append("… pending: ", style="bold blue")
            if n.kind == RUN:
                line.append(f"run {n.name} ({_short(n.ref)}) is {n.status}")
                slot = bool(n.detail and n.detail.startswith(SLOT_WAIT))
                if n.detail and (slot or n.detail.startswith(CANCEL_REQUESTED)):
                    line.append(f", {n.detail}")
                line.append(f", no progress for {self.ago(stall.since)}")
                if n.status == "pending" and not slot:
                    line.append(" — is a worker serving this workflow running?")
            else:
                run = self.owner(n, RUN)
                what = "timer" if n.kind == TIMER else _KIND_WORD.get(n.kind, n.kind)
                line.append(f"{what} {n.name} of run {run.name if run else '?'} is {n.status}"
                            f" (attempt {n.attempts}), no progress for {self.ago(stall.since)}")
                if n.error:
                    line.append(f" — last error {n.error}", style="red")
        elif stall.reason == COMPENSATION_FAILED:
            run = self.owner(n, RUN)
            line.append("⚠ compensation failed: ", style="bold red")
            line.append(f"{n.name} of run {run.name if run else '?'} failed after "
                        f"{n.attempts} attempt(s); the run needs an operator")
            if n.error:
                line.append(f" — {n.error}", style="red")
        return line

    def standing(self) -> RenderableType:
        root = self.root
        stalls = stalls_of(root, 0.0, self.now.timestamp())
        lines: list[RenderableType] = []
        if not stalls or (root.kind == RUN and not root.is_open):
            lines.append(self.outcome())
        else:
            head = Text("where it stands: ", style="bold")
            head.append("in progress" if self.moving(stalls) else "stalled", style="bold yellow")
            head.append(f" — {count(len(stalls))} item(s) not done")
            lines.append(head)
        groups: dict[tuple[str | None, ...], list[Stall]] = {}
        for stall in stalls:
            n = stall.node
            key = (stall.reason, n.kind, n.name, n.group, self.event_of(n))
            groups.setdefault(key, []).append(stall)
        for same in list(groups.values())[:MAX_STALL_LINES]:
            line = self.describe(same[0])
            if len(same) > 1:
                line.append(f"\n    and {count(len(same) - 1)} more like it (the oldest is "
                            "shown)", style="bold")
            lines.append(line)
        if len(groups) > MAX_STALL_LINES:
            lines.append(Text(f"  … and {len(groups) - MAX_STALL_LINES} more kinds of open "
                              "item (see `cantata stalled`)", style="dim"))
        for timer in root.walk():
            if timer.kind == TIMER and timer.status == WAITING and timer.due is not None \
                    and timer.due > self.now:
                run = self.owner(timer, RUN)
                lines.append(Text(f"  ⏱ sleeping: run {run.name if run else '?'} wakes at "
                                  f"{_clock(timer.due, self.now)}", style="blue"))
        return Group(*lines)

    def moving(self, stalls: list[Stall]) -> bool:
        """True if every open item changed within the last few seconds."""
        recent = self.now - dt.timedelta(seconds=RECENT)
        return all(s.reason != DEAD_LETTERED and s.reason != COMPENSATION_FAILED
                   and s.since >= recent for s in stalls)

    def outcome(self) -> Text:
        root = self.root
        nodes = list(root.walk())
        text = Text("where it stands: ", style="bold")
        ends = [n.ended_at for n in nodes if n.ended_at is not None]
        took = ""
        if root.started_at is not None and ends:
            took = f" in {fmt_seconds((max(ends) - root.started_at).total_seconds())}"
        if root.kind == RUN:
            style = _STYLE.get(root.status, "white")
            text.append(f"{root.status}", style=f"bold {style}")
            text.append(f" — run {root.name} {root.status}{took}")
            if root.error:
                text.append(f": {root.error}", style=style)
        else:
            events = sum(1 for n in nodes if n.kind == EVENT)
            handled = sum(1 for n in nodes if n.kind == HANDLER)
            # A publish's transaction ended as the runs it started did: a failed or
            # compensated one reads so, as it would as the root of its own trace.
            tops = list(_top_runs(root))
            run = next((r for status in _HEADLINE for r in tops if r.status == status), None)
            if run is None:
                text.append("completed", style="bold green")
            else:
                style = _STYLE.get(run.status, "white")
                text.append(f"{run.status}", style=f"bold {style}")
                text.append(f" — run {run.name} {run.status}")
                if run.error:
                    text.append(f": {run.error}", style=style)
                text.append(";")
            text.append(f" {'— ' if run is None else ''}{events} event(s), {handled} handler "
                        f"execution(s), settled{took}")
        runs = [n for n in nodes if n.kind == RUN and n is not root]
        if runs:
            done = ", ".join(f"{r.name} {r.status}" for r in runs[:6])
            text.append(f"; runs: {done}" + (" …" if len(runs) > 6 else ""))
        return text


# The run statuses an event-rooted transaction's outcome line leads with, most telling
# first (a failure beats an undo, which beats a cancel; all runs completed: completed).
_HEADLINE = ("failed", "compensating", "compensated", "cancelled", "running", "pending")


def _top_runs(node: TraceNode) -> Iterator[TraceNode]:
    """The runs under ``node`` not inside another run (a child run is its parent's)."""
    for child in node.children:
        if child.kind == RUN:
            yield child
        else:
            yield from _top_runs(child)


def render_timeline(root: TraceNode, *, now: float | None = None) -> RenderableType:
    """A readable timeline of a trace, ending with where the transaction stands.

    Args:
        root: a tree from :func:`~cantata.observability.trace.build_trace`.
        now: POSIX seconds used for "pending for …" (defaults to the wall clock).
    """
    r = _Renderer(root, time.time() if now is None else now)
    return Group(r.tree(), Text(""), r.standing())


def where_it_stands(root: TraceNode, *, now: float | None = None) -> str:
    """One line: where the transaction stands (its outcome, or its oldest open item)."""
    r = _Renderer(root, time.time() if now is None else now)
    stalls = stalls_of(root, 0.0, r.now.timestamp())
    if not stalls or (root.kind == RUN and not root.is_open):
        return r.outcome().plain.removeprefix("where it stands: ")
    state = "in progress" if r.moving(stalls) else "stalled"
    # a saga's hop no live worker's code has, which the run waits for, says why it waits
    lost = [s for s in stalls if s.node.detail and LOST_HOP_WAITS in s.node.detail]
    first = min(lost or stalls, key=lambda s: s.since)
    detail = r.describe(first).plain.strip().split("\n")[0]
    return f"{state}, {count(len(stalls))} item(s) not done; {detail}"
