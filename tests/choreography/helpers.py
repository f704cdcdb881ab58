"""Shared helpers for the choreography tests: fast apps and polling assertions."""

from __future__ import annotations

from typing import Any

from cantata import App, Retry
from tests.helpers import eventually, make_app

__all__ = ["FAST", "SETTLE", "events_of_type", "eventually", "make_app"]

# Retries that fail fast: the suite exercises retry counts, not waiting.
FAST = Retry(max_attempts=3, initial_interval=0.01, backoff=1.0, max_interval=0.05)

# After an outcome is visible, how long to keep watching for a duplicate.
SETTLE = 0.3


async def events_of_type(app: App, event_type: str) -> list[Any]:
    """Every event of ``event_type`` in the app's log (to check what was committed)."""
    return await app.store.find_events(app.name, event_type, since=0.0, exclude=[], limit=1000)
