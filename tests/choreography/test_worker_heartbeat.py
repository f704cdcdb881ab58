"""One heartbeat per worker: the engine's keeps its runs and its deliveries alive,
through a graceful stop too, until the consumer has drained (docs/architecture.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from cantata import App, Event

LEASE = 1.0


def draining_app(url: str) -> tuple[App, asyncio.Event, asyncio.Event, list[str]]:
    app = App("shop", store=url, lease=LEASE, poll_interval=0.05, shutdown_grace=10.0)
    entered, release = asyncio.Event(), asyncio.Event()
    handled: list[str] = []

    @app.on("job.queued", group="work")
    async def work(event: Event[Any]) -> None:
        entered.set()
        await release.wait()
        handled.append(event.id)

    return app, entered, release, handled


async def test_a_handler_draining_past_the_lease_keeps_its_delivery(sqlite_url: str) -> None:
    app, entered, release, handled = draining_app(sqlite_url)
    await app.open()
    sent = await app.publish("job.queued", {"n": 1})
    await asyncio.wait_for(entered.wait(), 10)
    store = app.store
    closing = asyncio.create_task(app.close())
    try:
        # The engine has no runs: its own stop is over at once. The handler drains on,
        # for three leases, and the worker's row must stay alive meanwhile.
        await asyncio.sleep(3 * LEASE)
        assert not closing.done()
        now = time.time()
        stolen = await store.claim_deliveries(
            "shop", "thief", ["work"], now=now, stale_before=now, limit=10
        )
        assert stolen == [], "a draining worker's delivery was taken over"
    finally:
        release.set()
        await asyncio.wait_for(closing, 15)
    assert handled == [sent.id]


async def test_the_worker_row_is_kept_by_one_heartbeat(sqlite_url: str) -> None:
    app, _, release, _ = draining_app(sqlite_url)
    release.set()
    async with app:
        beats: list[str] = []
        real = app.store.heartbeat

        async def counted(app_name: str, worker_id: str, *args: Any, **kw: Any) -> Any:
            beats.append(worker_id)
            return await real(app_name, worker_id, *args, **kw)

        app.store.heartbeat = counted  # type: ignore[method-assign, assignment]
        await asyncio.sleep(3.0)
        me = app.engine.worker_id
        app.store.heartbeat = real  # type: ignore[method-assign]
    # One loop beats every lease/4: 12 in three seconds; a second one would double it.
    assert set(beats) == {me}
    assert 4 <= len(beats) <= 16, beats
