"""Keeping a trace tree readable: huge or deep transactions are summarised.

A transaction may hold ten thousand events. The tree keeps, breadth first, at most
``max_nodes`` nodes, at most :data:`MAX_CHILDREN` children per node (the first, the
last and the open ones) and :data:`MAX_DEPTH` levels; the rest becomes one summary
node per parent ("… 9 800 more events"). A summary keeps the open subtrees it stands
for in ``hidden``, so stall detection still finds what is stuck in there.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Sequence

from .node import DEAD, DEAD_LETTER, EVENT, FAILED, MIXED, OPEN_STATUSES, TraceNode

MAX_NODES = 1_500
MAX_CHILDREN = 60
MAX_DEPTH = 40
HEAD, TAIL = 25, 10  # children kept at the start and the end of a long list

_PLURAL = {
    "run": "runs",
    "step": "steps",
    "compensation": "compensations",
    "event": "events",
    "handler": "handlers",
    "timer": "timers",
    "wait": "waits",
    "dead_letter": "dead letters",
}


def count(n: int) -> str:
    """``9800`` → ``9 800`` (grouped for reading)."""
    return f"{n:,}".replace(",", " ")


def needs_attention(node: TraceNode) -> bool:
    """Open work, a dead letter (not one replayed since) or a failed compensation: what
    stall detection looks at."""
    return (
        node.status in OPEN_STATUSES
        or (node.kind == DEAD_LETTER and node.status == DEAD)
        or (node.kind == "compensation" and node.status == FAILED)
    )


def _has_attention(node: TraceNode) -> bool:
    return any(needs_attention(n) for n in node.walk())


def summary(dropped: Sequence[TraceNode], below: str = "") -> TraceNode:
    """One node standing for ``dropped`` (and everything under them)."""
    total = sum(1 for d in dropped for _ in d.walk())
    kinds = Counter(d.kind for d in dropped)
    kind, n_kind = kinds.most_common(1)[0]
    noun = _PLURAL.get(kind, "nodes") if n_kind == len(dropped) else "nodes"
    name = f"… {count(len(dropped))} more {noun}{below}"
    if total > len(dropped):
        name += f" ({count(total - len(dropped))} more below them)"
    statuses = {d.status for d in dropped}
    starts = [d.started_at for d in dropped if d.started_at is not None]
    ends = [d.ended_at for d in dropped if d.ended_at is not None]
    node = TraceNode(
        kind, name, statuses.pop() if len(statuses) == 1 else MIXED, None,
        min(starts) if starts else None,
        max(ends) if ends and not any(d.is_open for d in dropped) else None,
    )
    node.elided = total
    node.hidden = [d for d in dropped if _has_attention(d)]
    return node


def truncation_notice(limit: int) -> TraceNode:
    """A node saying the store held more records than were read."""
    node = TraceNode(
        EVENT, f"… more records beyond the first {count(limit)} of each kind (not loaded)", MIXED
    )
    node.ref = "truncated"
    return node


def _keep(children: list[TraceNode], room: int) -> list[bool]:
    """Which children stay: the first and last ones, then the open ones, within ``room``."""
    n = len(children)
    keep = [False] * n
    if n <= min(MAX_CHILDREN, room):
        return [True] * n
    budget = min(MAX_CHILDREN, room)
    for i in list(range(min(HEAD, n))) + list(range(max(n - TAIL, 0), n)):
        if budget > 0 and not keep[i]:
            keep[i] = True
            budget -= 1
    for i, child in enumerate(children):
        if budget <= 0:
            break
        if not keep[i] and needs_attention(child):
            keep[i] = True
            budget -= 1
    return keep


def bound(root: TraceNode, max_nodes: int = MAX_NODES) -> TraceNode:
    """Summarise ``root`` in place (breadth first) so it holds about ``max_nodes`` nodes."""
    room = max(max_nodes, 1) - 1
    queue: deque[tuple[TraceNode, int]] = deque([(root, 0)])
    while queue:
        node, depth = queue.popleft()
        kids = node.children
        if not kids:
            continue
        if depth + 1 >= MAX_DEPTH:
            node.children = [summary(kids, ", deeper than the trace shows")]
            continue
        if room <= 0:
            node.children = [summary(kids)]
            continue
        keep = _keep(kids, room)
        kept = [c for c, k in zip(kids, keep, strict=True) if k]
        dropped = [c for c, k in zip(kids, keep, strict=True) if not k]
        room -= len(kept)
        if dropped:
            at = next(i for i, k in enumerate(keep) if not k)
            kept.insert(sum(keep[:at]), summary(dropped))
        node.children = kept
        queue.extend((c, depth + 1) for c in kept if c.elided == 0)
    return root
