"""A worker process for the heartbeat crash test.

Usage: ``python beat_app.py STORE_URL MARKER_DIR``: starts (or resumes) one run of
``copy_files``, whose step reports its progress with cantata.heartbeat(); its first
attempt stops after 3 files, touches ``MARKER_DIR/beating`` and hangs, to be killed.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import cantata
from cantata import App, WorkflowContext


def build(store_url: str, marker_dir: str, seen: list[object] | None = None) -> App:
    app = App("beats", store=store_url, lease=1.0, poll_interval=0.05)

    @app.step
    async def copy(files: int) -> int:
        info = cantata.step_info()
        if seen is not None:
            seen.append(info.heartbeat_details)
        start = (info.heartbeat_details or {}).get("done", 0)
        for i in range(start, files):
            cantata.heartbeat({"done": i + 1})
            if info.attempt == 1 and i == 2:
                while True:  # until the throttled write of the last beat is in the store
                    kept = await app.store.last_step_heartbeat(app.name, info.run_id, info.key)
                    if kept is not None and kept.details == '{"done":3}':
                        break
                    await asyncio.sleep(0.1)
                (Path(marker_dir) / "beating").touch()
                await asyncio.sleep(60)  # killed here
        return files

    @app.workflow
    async def copy_files(ctx: WorkflowContext, files: int) -> int:
        return int(await ctx.run(copy, files))

    return app


async def main(store_url: str, marker_dir: str) -> None:
    app = build(store_url, marker_dir)
    async with app:
        handle = await app.start("copy_files", 5, idempotency_key="copy-1")
        print(handle.run_id, flush=True)
        await handle.result(timeout=120)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
