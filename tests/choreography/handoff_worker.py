"""A worker process for ``test_handoff.py``: killed with SIGKILL inside a handler that
the local hand-off started (docs/performance.md).

Usage: ``python handoff_worker.py STORE_URL BROKER_URL MARKER_DIR``. ``reserve`` emits
``inventory.reserved``; this process serves ``payment`` too, so that event is handed
to ``charge`` here at once. ``charge`` drops a marker, then hangs, so the test kills the
worker after the hand-off and before its commit. Another marker says that the
hand-off (not the broker's delivery) started it.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cantata
from cantata import App, HandlerContext


def mark(path: Path, text: str) -> None:
    """Write a marker atomically: the test must never read it half-written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_app(
    store: str, broker: str, markers: Path, *, hang: bool,
    on_charge: Callable[[cantata.Event[Any]], None] | None = None,
) -> App:
    """The same app in the killed worker and in the fresh one (``hang=False``)."""
    app = App("shop", store=store, broker=broker, lease=1.0, poll_interval=0.05)

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("inventory.reserved", {"order_id": event.data["order_id"]})

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        if on_charge is not None:
            on_charge(event)
        await ctx.emit("payment.charged", {"order_id": event.data["order_id"],
                                           "pid": os.getpid()})
        if hang:
            mark(markers / f"in-charge-{os.getpid()}", event.id)
            await asyncio.sleep(3600)

    return app


def spy_on_hand_off(app: App, markers: Path) -> None:
    """Drop a marker when the broker hands ``inventory.reserved`` off in this process."""
    broker: Any = app._broker
    handed = broker.handed  # both brokers: the deliveries the settlement held

    def spy(by: Any, events: Any, held: Any, **kw: Any) -> None:
        if any(g == "payment" for g, _ in held):
            mark(markers / "handed-off", "held")
        handed(by, events, held, **kw)

    broker.handed = spy


async def main(store: str, broker: str, markers: Path) -> None:
    app = build_app(store, broker, markers, hang=True)
    async with app:
        spy_on_hand_off(app, markers)
        mark(markers / "ready", str(os.getpid()))
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3])))
