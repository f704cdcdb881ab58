"""A worker process for ``test_crash.py``: killed with SIGKILL inside a handler.

Usage: ``python crash_worker.py DB_PATH MARKER_DIR MAX_ATTEMPTS``. It serves the
app of :func:`build_app` with a handler that emits, drops a marker file, then hangs,
so the test knows when to kill it: mid-handler, after the emit, before completion.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cantata
from cantata import App, HandlerContext, Retry


def mark(path: Path, text: str) -> None:
    """Write a marker atomically: the test must never read it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_app(
    db: str,
    markers: Path,
    *,
    hang: bool,
    max_attempts: int = 5,
    on_reserved: Callable[[cantata.Event[Any]], None] | None = None,
) -> App:
    """The same app in the killed worker and in the fresh one (``hang=False``)."""
    app = App("shop", store=f"sqlite:///{db}", lease=1.0, poll_interval=0.05)

    @app.on(
        "order.placed", group="inventory",
        retry=Retry(max_attempts=max_attempts, initial_interval=0.01),
    )
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"],
                                              "pid": os.getpid()})
        mark(markers / f"in-handler-{os.getpid()}", event.id)
        if hang:
            await asyncio.sleep(3600)

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any]) -> None:
        if on_reserved is not None:
            on_reserved(event)

    return app


async def main(db: str, markers: Path, max_attempts: int) -> None:
    app = build_app(db, markers, hang=True, max_attempts=max_attempts)
    async with app:
        mark(markers / "ready", str(os.getpid()))
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])))
