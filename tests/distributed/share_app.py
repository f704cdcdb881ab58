"""The app the ``--processes`` tests run (tests/distributed/test_processes.py).

As ``lease_app``, each step leaves ``start``/``end`` marks named with its key and the
process id (``gated`` and the ``gate_job`` handler wait for the file ``gate`` in the
marks folder, so that a test can kill the process that holds them). Its ``chain`` runs
in a queue that lets one worker process hold at most 4 runs: without such a bound the
first worker to look claims every pending run (up to 100 at a time), so a burst would
not reach the other processes (docs/guide.md). The lease is ``CANTATA_TEST_LEASE``
seconds (default 1).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import cantata
from cantata import App, Event, Retry

app = App("share", lease=float(os.environ.get("CANTATA_TEST_LEASE", "1.0")),
          poll_interval=0.05)
MARKS = Path(os.environ.get("CANTATA_TEST_MARKS", "/tmp"))
app.queue("burst", per_worker=4)


def mark(kind: str, key: str) -> None:
    (MARKS / f"{kind}~{key}~{os.getpid()}~{time.time():.6f}").touch()


@app.step(retry=Retry(max_attempts=3, initial_interval=0.05))
async def work(order: dict[str, Any], step: str) -> str:
    key = f"{order['id']}.{step}"
    mark("start", key)
    await asyncio.sleep(order.get("seconds", 0.3))
    mark("end", key)
    return f"{step}:{order['id']}"


@app.workflow(queue="burst")
async def chain(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> list[str]:
    return [await ctx.run(work, order, step) for step in order.get("steps", "abc")]


async def gate(kind: str, key: str) -> None:
    """Mark ``kind``-start, wait for the file ``gate``, mark ``kind``-end."""
    mark(f"{kind}start", key)
    while not (MARKS / "gate").exists():  # noqa: ASYNC110 - another process makes it
        await asyncio.sleep(0.02)
    mark(f"{kind}end", key)


@app.step(retry=Retry(max_attempts=3, initial_interval=0.05))
async def wait_gate(run: int) -> int:
    await gate("g", str(run))
    return run


@app.workflow
async def gated(ctx: cantata.WorkflowContext, run: int) -> int:
    result: int = await ctx.run(wait_gate, run)
    return result


@app.on("gate.requested", group="gates")
async def gate_job(event: Event[Any]) -> None:
    await gate("h", str(event.data["id"]))
