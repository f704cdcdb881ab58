"""One trace across both styles: ``cantata trace ID`` and ``app.trace(correlation_id)``.

``build_trace(store, app, correlation_id)`` assembles a business transaction — runs
and their steps, compensations, timers and waits, the events they emit, the
handlers of every group that reacted, what those emitted, dead letters, and the
runs events started — into a tree of :class:`TraceNode`. ``render_timeline(root)``
turns it into a readable timeline that ends with where the transaction stands.
"""

from __future__ import annotations

from .assemble import DEFAULT_LIMIT, build_trace
from .bound import MAX_NODES
from .node import KINDS, TraceNode, TraceNotFound
from .timeline import render_timeline

__all__ = [
    "DEFAULT_LIMIT",
    "KINDS",
    "MAX_NODES",
    "TraceNode",
    "TraceNotFound",
    "build_trace",
    "render_timeline",
]
