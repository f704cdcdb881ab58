"""A publishing process for ``test_publish_audit_atomic.py``, killed (SIGKILL) by itself
the moment its store has written the event, before anything else runs: where a crash
leaves an event without its ``event.published`` record if the two are written apart.

Usage: ``python publish_child.py STORE_URL EVENT_ID``. It publishes one event as an
operator (``app.publish(..., actor=...)``) and never exits by itself.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from cantata import App

KEY = "publish-atomic-key-0123456789abcdef"
APP = "pubshop"
ACTOR = "cli:ann@host"


def die_after(write: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """``write``, then SIGKILL of this process once it has returned (committed)."""

    async def written_then_killed(*args: Any, **kw: Any) -> Any:
        await write(*args, **kw)
        os.kill(os.getpid(), signal.SIGKILL)

    return written_then_killed


async def main(store: str, event_id: str) -> None:
    app = App(APP, store=store, broker="embedded", audit_key=KEY)
    async with app.client():
        for name in ("append_events", "append_held"):  # the writes that store an event
            setattr(app.store, name, die_after(getattr(app.store, name)))
        await app.publish("order.placed", {"n": 1}, id=event_id, actor=ACTOR)
    sys.exit("the publish returned: the store was not written through append_events")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
