"""The app the lease and graceful-stop tests run in worker processes.

Every step and handler body leaves marks (``start``/``end`` files named with the
step key and the process id) so a test can count what ran, where, and how often.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import cantata
from cantata import App, Event, Retry

app = App(
    "leases",
    lease=float(os.environ.get("CANTATA_TEST_LEASE", "1.0")),
    poll_interval=0.05,
    park_after=float(os.environ.get("CANTATA_TEST_PARK_AFTER", "60")),
)
app.shutdown_grace = float(os.environ.get("CANTATA_TEST_GRACE", "30"))
MARKS = Path(os.environ.get("CANTATA_TEST_MARKS", "/tmp"))
if os.environ.get("CANTATA_TEST_SAFETY_NET"):
    # How long an idle worker's loops wait for news on PostgreSQL before they look on
    # their own (5 s): a test widens it, so that what such a look finds is clearly
    # apart from what the worker sees within a lease.
    from cantata.store.roles import lifecycle

    lifecycle.SAFETY_NET = float(os.environ["CANTATA_TEST_SAFETY_NET"])


def mark(kind: str, key: str) -> None:
    (MARKS / f"{kind}~{key}~{os.getpid()}~{time.time():.6f}").touch()


@app.step(retry=Retry(max_attempts=3, initial_interval=0.05))
async def work(order: dict[str, Any], step: str) -> str:
    key = f"{order['id']}.{step}"
    mark("start", key)
    # (``seconds`` for every step, or ``seconds_<step>`` for that one)
    await asyncio.sleep(order.get(f"seconds_{step}", order.get("seconds", 0.3)))
    mark("end", key)
    return f"{step}:{order['id']}"


@app.workflow
async def chain(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> list[str]:
    return [await ctx.run(work, order, step) for step in order.get("steps", "abc")]


@app.workflow
async def napper(ctx: cantata.WorkflowContext, seconds: float) -> None:
    """A step (so that its sleep begins a moment after the run was claimed), then a
    sleep (parked at once with ``CANTATA_TEST_PARK_AFTER=0``), then a mark."""
    await ctx.run(work, {"id": "nap", "seconds": 0.5}, "n")
    await ctx.sleep(seconds)
    mark("woke", "nap")


@app.on("job.requested", group="jobs")
async def job(event: Event[Any]) -> None:
    mark("hstart", str(event.data["id"]))
    await asyncio.sleep(event.data["seconds"])
    mark("hend", str(event.data["id"]))
