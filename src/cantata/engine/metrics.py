"""Counters of one engine (exported to Prometheus by the metrics extra)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Metrics:
    """Counters of this process (exported to Prometheus by the metrics extra)."""

    runs: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    handled: int = 0
    handler_failures: int = 0
    dead_lettered: int = 0
    orphans: dict[str, int] = field(default_factory=dict)
