"""A worker process for the kill -9 test of transactional steps.

Usage: ``python tx_crash_app.py STORE_URL MARKER_DIR``. Starts (or resumes, by its
idempotency key) a run of ``fill``: 20 ``@app.transaction`` steps, each inserting one
row in the service's table ``items`` in the store's database. The first attempt of
step 5 inserts its row, touches ``MARKER_DIR/inside`` and hangs, to be killed there.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import cantata
from cantata import App, WorkflowContext

STEPS = 20


def build(store_url: str, marker_dir: str) -> App:
    app = App("txcrash", store=store_url, lease=1.0, poll_interval=0.05)

    @app.transaction
    async def create_table(tx: cantata.Tx) -> None:
        await tx.execute("CREATE TABLE IF NOT EXISTS items (run_id TEXT, i INTEGER, "
                         "PRIMARY KEY (run_id, i))")

    @app.transaction
    async def add_item(tx: cantata.Tx, i: int) -> int:
        info = cantata.step_info()
        await tx.execute("INSERT INTO items VALUES (?, ?)", info.run_id, i)
        if i == 5 and info.attempt == 1:
            (Path(marker_dir) / "inside").touch()
            await asyncio.sleep(60)  # killed here: the insert is not committed
        await asyncio.sleep(0.02)
        return i

    @app.workflow
    async def fill(ctx: WorkflowContext) -> int:
        await ctx.run(create_table)
        for i in range(STEPS):
            await ctx.run(add_item, i)
        return STEPS

    return app


async def main(store_url: str, marker_dir: str) -> None:
    app = build(store_url, marker_dir)
    async with app:
        handle = await app.start("fill", idempotency_key="fill-1")
        print(handle.run_id, flush=True)
        print(await handle.result(timeout=120), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
