"""Shared helpers for the choreography tests: fast apps and polling assertions."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cantata import App, Retry

# Retries that fail fast: the suite exercises retry counts, not waiting.
FAST = Retry(max_attempts=3, initial_interval=0.01, backoff=1.0, max_interval=0.05)

# After an outcome is visible, how long to keep watching for a duplicate.
SETTLE = 0.3


def make_app(store: str, name: str = "shop", **kw: Any) -> App:
    """An app with short intervals, so takeovers and polls happen in tens of ms."""
    kw.setdefault("poll_interval", 0.05)
    kw.setdefault("lease", 1.0)
    return App(name, store=store, **kw)


async def eventually(
    check: Callable[[], Any] | Callable[[], Awaitable[Any]],
    timeout: float = 10.0,
    what: str = "condition",
) -> Any:
    """Poll ``check`` (sync or async) until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        await asyncio.sleep(0.01)


async def events_of_type(app: App, event_type: str) -> list[Any]:
    """Every event of ``event_type`` in the app's log (to check what was committed)."""
    return await app.store.find_events(app.name, event_type, since=0.0, exclude=[], limit=1000)
