"""The app the multi-process flow tests run in 2-3 worker processes.

Every step appends ``kind key begin|end time pid`` to the ledger file
``$CANTATA_TEST_LEDGER`` (small O_APPEND writes are atomic), so the test times
begins and ends from outside the workers. ``$CANTATA_TEST_SCHEDULE`` declares the
``every`` schedule with that catch-up policy.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import cantata
from cantata import App, Rate

app = App("flowc", lease=1.5, poll_interval=0.1)
LEDGER = os.environ.get("CANTATA_TEST_LEDGER", "/tmp/cantata-flow-ledger")

app.queue("conc", concurrency=2)
app.queue("rated", rate=Rate(3, per=1.0))
app.queue("prio", concurrency=1, priorities=True)
app.queue("parts", concurrency=1)
app.queue("perw", per_worker=2)


def note(kind: str, key: object, what: str) -> None:
    fd = os.open(LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {key} {what} {time.time():.6f} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


@app.step
def timed(kind: str, key: str, seconds: float) -> str:
    note(kind, key, "begin")
    hold = Path(f"{LEDGER}.hold-{key}")
    while hold.exists():  # the test holds this step until it removes the file
        time.sleep(0.02)
    time.sleep(seconds)
    note(kind, key, "end")
    return key


@app.step(concurrency=1)
def fragile(key: str, seconds: float) -> str:
    note("fragile", key, "begin")
    once = Path(f"{LEDGER}.once-{key}")
    if once.exists():  # long only the first time (the attempt the test kills)
        once.unlink()
        time.sleep(seconds)
    note("fragile", key, "end")
    return key


@app.workflow
async def job(ctx: cantata.WorkflowContext, kind: str, key: str, seconds: float) -> str:
    return str(await ctx.run(timed, kind, key, seconds))


@app.workflow
async def limited(ctx: cantata.WorkflowContext, key: str, seconds: float) -> str:
    return str(await ctx.run(fragile, key, seconds))


if os.environ.get("CANTATA_TEST_SCHEDULE"):

    @app.schedule(every=1, overlap="allow", catch_up=os.environ["CANTATA_TEST_SCHEDULE"])
    @app.workflow
    async def tick(ctx: cantata.WorkflowContext, when: object) -> None:
        note("tick", when.isoformat(), "ran")  # type: ignore[attr-defined]
