"""A small app for the crash tests, run as a separate process that may be killed.

Usage: ``python crash_app.py DB_PATH LOG_DIR WORKFLOW KEY``. Starts (or, with the same
idempotency key, resumes) a run of WORKFLOW, waits for it and prints its outcome as one
JSON line. Steps append one line per execution to ``LOG_DIR/<step>.log`` so the test can
count executions across processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import cantata
from cantata import App, Retry, WorkflowContext, WorkflowError

FAST = Retry(max_attempts=2, initial_interval=0.01)
BACKOFF = 4.0  # seconds between the attempts of step flaky


def build(db_path: str, log_dir: str) -> App:
    """The app of every process of a crash test (same workflows, same store)."""
    app = App("crashy", store=f"sqlite:///{db_path}", lease=1.0, poll_interval=0.05)
    logs = Path(log_dir)

    def log(step: str) -> None:
        info = cantata.step_info()
        line = json.dumps({"pid": os.getpid(), "attempt": info.attempt,
                           "key": info.idempotency_key, "t": time.time()})
        with (logs / f"{step}.log").open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    @app.step(retry=FAST)
    async def one(n: int) -> int:
        log("one")
        return n + 1

    @app.step(retry=FAST)
    async def undo_one(n: int) -> None:
        log("undo_one")

    @app.step(retry=FAST)
    async def two(n: int) -> int:
        log("two")
        if cantata.step_info().attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # the worker dies mid-step
        return n * 10

    @app.step(retry=FAST)
    async def blocking(n: int) -> int:
        log("blocking")
        if cantata.step_info().attempt == 1:
            (logs / "blocked").touch()
            await asyncio.sleep(60)  # the test kills the process here
        return n * 100

    @app.step(retry=FAST)
    async def doom(n: int) -> int:
        log("doom")
        os.kill(os.getpid(), signal.SIGKILL)  # kills its worker on every attempt
        return n

    @app.step(retry=FAST)
    async def three(n: int) -> int:
        log("three")
        return n + 3

    @app.step(retry=Retry(max_attempts=2, initial_interval=BACKOFF, jitter=0.0))
    async def flaky(n: int) -> int:
        log("flaky")
        if cantata.step_info().attempt == 1:
            raise ConnectionError("downstream unavailable")  # the test kills the worker
        return n + 7  # in the backoff that follows

    @app.workflow
    async def self_kill(ctx: WorkflowContext, n: int) -> list[int]:
        a = await ctx.run(one, n, compensate=undo_one)
        b = await ctx.run(two, a)
        c = await ctx.run(three, b)
        return [a, b, c]

    @app.workflow
    async def killed_while_blocked(ctx: WorkflowContext, n: int) -> list[int]:
        a = await ctx.run(one, n, compensate=undo_one)
        b = await ctx.run(blocking, a)
        c = await ctx.run(three, b)
        return [a, b, c]

    @app.workflow
    async def kills_every_time(ctx: WorkflowContext, n: int) -> int:
        a = await ctx.run(one, n, compensate=undo_one)
        return int(await ctx.run(doom, a))

    @app.workflow
    async def killed_in_backoff(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(flaky, n))

    return app


async def main(db_path: str, log_dir: str, workflow: str, key: str) -> None:
    app = build(db_path, log_dir)
    with (Path(log_dir) / "opened.log").open("a") as f:  # (when this process got going)
        f.write(json.dumps({"pid": os.getpid(), "t": time.time()}) + "\n")
    async with app:
        handle = await app.start(workflow, 1, idempotency_key=key)
        try:
            result = await handle.result(timeout=20)
            out = {"run_id": handle.run_id, "status": "completed", "result": result}
        except WorkflowError as exc:
            out = {"run_id": handle.run_id, "status": exc.status, "error": exc.error}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
