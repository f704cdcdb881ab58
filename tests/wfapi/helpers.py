"""Helpers of the workflow API tests (see tests/engine/helpers.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from cantata import App
from tests.engine.helpers import LEASE, POLL, history_keys, make_app
from tests.engine.helpers import eventually as _eventually

__all__ = ["LEASE", "POLL", "eventually", "history_keys", "make_app", "other_process"]


async def eventually(
    check: Callable[[], Awaitable[bool] | bool], timeout: float = 15.0
) -> None:
    """``tests.engine.helpers.eventually`` with room for a loaded machine."""
    await _eventually(check, timeout=timeout)


@asynccontextmanager
async def other_process(store_url: str, name: str = "shop") -> AsyncIterator[App | None]:
    """Another app on the same store, opened as a client (``None`` on ``memory://``,
    whose database belongs to one app)."""
    if store_url.startswith("memory://"):
        yield None
        return
    other = make_app(store_url, name)
    async with other.client():
        yield other
