"""The console's change feed stops when its last client leaves, whenever that falls
against a change the store announces: before, its loop could lose the cancel that
stops it (``asyncio.wait_for`` on Python 3.11), and the leaving client's stream never
ended (a revoked token's stream stayed open while changes flowed)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from cantata import App
from cantata.server.stream import ChangeFeed
from cantata.store.base import Store


async def test_the_last_client_leaving_stops_the_feed_whenever_a_change_comes(
    tmp_path: Path,
) -> None:
    async with App("shop", store=f"sqlite:///{tmp_path}/s.db").client() as app:
        store = app.store

        async def store_of() -> Store:
            return store

        # (a long interval: between reads the loop waits for the store's news alone)
        feed = ChangeFeed(store_of, "shop", interval=30)
        for turns in range(8):
            for _ in range(3):
                subscription = feed.subscribe()
                await subscription.__aenter__()
                await asyncio.sleep(0.02)  # the loop is waiting for news
                feed._changed("runs")  # news, as the store's listener gives it
                for _ in range(turns):
                    await asyncio.sleep(0)
                # the client leaves (waited for by asyncio.wait, which cancels no one)
                leaving = asyncio.ensure_future(subscription.__aexit__(None, None, None))
                await asyncio.wait((leaving,), timeout=5)
                if not leaving.done():
                    await _stop(leaving, feed)
                    raise AssertionError(
                        f"the feed did not stop when its last client left {turns} loop "
                        "turns after a change was announced")
                assert feed.clients == 0 and feed._task is None


async def _stop(leaving: asyncio.Future[Any], feed: ChangeFeed) -> None:
    """End a feed whose loop lost its cancel (so that the failing test ends)."""
    for _ in range(100):
        if leaving.done():
            return
        if feed._task is not None:
            feed._task.cancel()
        await asyncio.sleep(0.01)
