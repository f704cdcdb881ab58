"""A worker process for the parking tests, killed with SIGKILL while its run is parked.

Usage: ``python park_app.py STORE_URL``: starts one ``sleepy`` and one ``waiting``
run, prints their ids (one line), and serves until killed.
"""

from __future__ import annotations

import asyncio
import sys

from cantata import App, WorkflowContext


def build(store: str, **kw: object) -> App:
    app = App("parkapp", store=store, lease=1.0, poll_interval=0.05, park_after=0.0,
              shutdown_grace=0.2, **kw)  # type: ignore[arg-type]

    @app.workflow
    async def sleepy(ctx: WorkflowContext, seconds: float) -> str:
        await ctx.sleep(seconds)
        return "slept"

    @app.workflow
    async def waiting(ctx: WorkflowContext, order: int) -> int:
        ev = await ctx.wait_for_event("payment.done", match={"order": order}, timeout=60)
        return int(ev.data["amount"])

    return app


async def main(store: str) -> None:
    app = build(store)
    async with app:
        a = await app.start("sleepy", 2.0)
        b = await app.start("waiting", 5)
        print(a.run_id, b.run_id, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
