"""The app the cluster test runs in several worker processes (PostgreSQL + NATS)."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import cantata
from cantata import App, Event, HandlerContext, Retry

app = App("cluster", lease=1.5, poll_interval=0.1)
MARKS = Path(os.environ.get("CANTATA_TEST_MARKS", "/tmp"))


def mark(kind: str, key: str) -> None:
    """One file per finished execution: the test counts them."""
    (MARKS / f"{kind}-{key}-{os.getpid()}-{time.time():.6f}").touch()


@app.step(retry=Retry(max_attempts=5, initial_interval=0.05))
def work(order: dict[str, Any], step: str) -> str:
    time.sleep(0.05)  # long enough for a worker to be killed in the middle of some
    mark("step", f"{order['id']}.{step}")
    return f"{step}:{order['id']}"


@app.workflow
async def saga(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> list[str]:
    return [await ctx.run(work, order, step) for step in ("a", "b", "c")]


@app.on("order.placed", group="inventory")
async def reserve(event: Event[Any], ctx: HandlerContext) -> None:
    await asyncio.sleep(0.02)
    await ctx.emit("stock.reserved", event.data)


@app.on("stock.reserved", group="shipping")
async def ship(event: Event[Any], ctx: HandlerContext) -> None:
    await ctx.emit("order.shipped", event.data)
