"""Observability: trace assembly, stalled transactions, flow maps and AsyncAPI."""

from cantata.observability.stalled import Stall, find_stalls, stalls_of
from cantata.observability.trace import TraceNode, TraceNotFound, build_trace, render_timeline

__all__ = [
    "Stall",
    "TraceNode",
    "TraceNotFound",
    "build_trace",
    "find_stalls",
    "render_timeline",
    "stalls_of",
]
