"""Helpers for the orchestration tests: short intervals so the suite stays fast."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from cantata import App

LEASE = 1.0
POLL = 0.05


def make_app(store: str, name: str = "shop", **kw: Any) -> App:
    """An app with a short lease, poll interval and stop grace (tests that leave a step
    running when they close the app do not wait 30 s for it)."""
    kw.setdefault("lease", LEASE)
    kw.setdefault("poll_interval", POLL)
    kw.setdefault("shutdown_grace", 0.2)
    return App(name, store=store, **kw)


async def eventually(
    check: Callable[[], Awaitable[bool] | bool],
    timeout: float = 5.0,
    interval: float = 0.01,
) -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        ok = check()
        if inspect.isawaitable(ok):
            ok = await ok
        if ok:
            return
        if loop.time() > end:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def history_keys(app: App, run_id: str) -> list[str]:
    """The keys of a run's recorded history, in order."""
    return [e.key for e in await app.store.load_history(app.name, run_id)]
