"""Shared helpers of the flow-control tests: overlap and window checks of begin/end logs."""

from __future__ import annotations

from collections.abc import Sequence


def max_overlap(spans: Sequence[tuple[float, float]]) -> int:
    """The most spans (begin, end) open at one time (an end before a begin at a tie)."""
    points = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    top = cur = 0
    for _, d in points:
        cur += d
        top = max(top, cur)
    return top


def max_in_window(begins: Sequence[float], per: float) -> int:
    """The most begins in any half-open window of ``per`` seconds."""
    times = sorted(begins)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - per:
            j += 1
        best = max(best, i - j + 1)
    return best
