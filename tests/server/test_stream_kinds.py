"""``/api/stream?kinds=``: a client gets the kinds of change it asked for only, the
others every kind as before; and one run's steps that end together are one ``step``
event (docs/console.md, "Live changes")."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import httpx

from cantata import App
from cantata.model.access import Role
from cantata.server.auth import create_token
from cantata.server.stream import Change, ChangeFeed
from cantata.store.factory import store_from_url
from tests.helpers import eventually
from tests.server.conftest import ServerThread
from tests.server.shop import make_shop
from tests.server.test_stream import listen


async def test_a_stream_gets_only_the_kinds_it_asked_for(store_url: str) -> None:
    console_app = App("shop", store=store_url)  # the console: no code, its own connection
    with ServerThread(console_app, serve=False) as server:
        shop = make_shop(store_url, state={"emails_broken": True})
        async with shop:
            token = await create_token(shop.store, "stream-kinds", Role.VIEWER)
            async with httpx.AsyncClient() as client:
                for bad in ("run,nope", " , "):
                    r = await client.get(f"{server.url}/api/stream", params={"kinds": bad},
                                         headers={"Authorization": f"Bearer {token}"})
                    assert r.status_code == 400, r.text
                    error = r.json()["error"]
                    assert error["field"] == "kinds"
                    assert "run, step, delivery, dead_letter" in error["message"]
            every: list[tuple[str, dict[str, Any]]] = []
            some: list[tuple[str, dict[str, Any]]] = []
            readies = [asyncio.Event(), asyncio.Event()]
            tasks = [asyncio.create_task(listen(server.url, token, every, readies[0])),
                     asyncio.create_task(listen(server.url, token, some, readies[1],
                                                kinds="run, dead_letter"))]
            try:
                for ready in readies:
                    await asyncio.wait_for(ready.wait(), 10)
                handle = await shop.start("place_order", {"id": "K-1"})
                await shop.publish("order.placed", {"order_id": "K-1"})

                async def both_done() -> bool:
                    return all(
                        any(k == "run" and d["run_id"] == handle.run_id
                            and d["status"] == "completed" for k, d in seen)
                        and any(k == "dead_letter" for k, _ in seen)
                        for seen in (every, some))

                await eventually(both_done, timeout=15)
                assert {k for k, _ in every} >= {"run", "step", "dead_letter"}
                assert {k for k, _ in some} == {"run", "dead_letter"}
                assert ([d for k, d in every if k == "run"]
                        == [d for k, d in some if k == "run"])
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task


async def test_one_runs_steps_that_end_together_are_one_step_event(tmp_path: Path) -> None:
    """Checkpoints of one run read in one batch reach a client as one `step` event, at
    the place of the last, with every step that ended; other runs' and other kinds'
    changes are left as they came. (SQLite, written by another connection: the feed
    reads them together at its next look.)"""
    url = f"sqlite:///{tmp_path}/feed.db"
    reader, writer = store_from_url(url), store_from_url(url)
    await reader.open()
    await writer.open()
    try:
        feed = ChangeFeed(lambda: _same(reader), "shop", interval=1.5)
        got: list[Change] = []
        runs_only: list[Change] = []
        async with feed.subscribe() as queue, feed.subscribe(frozenset({"run"})) as runs:
            await asyncio.sleep(0.3)  # (its first look, at the head, is behind it)
            for key in ("reserve#1", "charge#1"):
                await writer.record_action("shop", "worker:w", "run.checkpoint", "r-1",
                                           {"completed": [key], "failed": []})
            await writer.record_action("shop", "worker:w", "run.checkpoint", "r-2",
                                       {"completed": ["reserve#1"], "failed": []})
            await writer.record_action("shop", "worker:w", "run.status", "r-2",
                                       {"status": "completed"})
            await writer.record_action("shop", "worker:w", "run.checkpoint", "r-1",
                                       {"completed": [], "failed": ["ship#1"]})

            async def four() -> bool:
                while not queue.empty():
                    change = queue.get_nowait()
                    assert change is not None
                    got.append(change)
                while not runs.empty():
                    change = runs.get_nowait()
                    assert change is not None
                    runs_only.append(change)
                return len(got) >= 3 and len(runs_only) >= 1

            await eventually(four, timeout=10)
            await asyncio.sleep(0.3)
            await four()
    finally:
        await reader.close()
        await writer.close()
    assert [(c.kind, c.data.get("run_id")) for c in got] == [
        ("step", "r-2"), ("run", "r-2"), ("step", "r-1")]
    merged = got[-1].data
    assert (merged["completed"], merged["failed"]) == (["reserve#1", "charge#1"], ["ship#1"])
    assert got[-1].seq > got[1].seq > got[0].seq
    assert [(c.kind, c.data["run_id"]) for c in runs_only] == [("run", "r-2")]


async def _same(store: Any) -> Any:
    return store
