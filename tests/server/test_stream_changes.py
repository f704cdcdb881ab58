"""``/api/stream`` brings what the pages of runs, traces and handler groups show: a
step that ends while its run's status stays (``step``), an event a group handled
(``delivery``), a group retired by anyone (``group``), and the group of a dead letter
whose group's name holds ``:`` (docs/console.md, "Live changes"); on SQLite and
PostgreSQL, made by another process than the console's."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from cantata import App, Event, Retry
from cantata.errors import GroupInUse
from cantata.model.access import Role
from cantata.server.auth import create_token
from tests.helpers import eventually
from tests.server.conftest import ServerThread
from tests.server.shop import make_shop
from tests.server.test_groups_api import ledger_worker
from tests.server.test_stream import listen


async def test_steps_deliveries_and_a_retired_group_reach_the_stream(store_url: str) -> None:
    console_app = App("shop", store=store_url)  # the console: no code, its own connection
    with ServerThread(console_app, serve=False) as server:
        state = {"emails_broken": False, "billing_down": False}
        shop = make_shop(store_url, state=state)

        @shop.on("order.refunded", group="billing:eu", retry=Retry(max_attempts=1))
        async def refund_eu(event: Event[Any]) -> None:
            raise RuntimeError("no ledger for eu")

        async with ledger_worker(store_url):  # (a service that then goes away)
            pass
        async with shop:
            token = await create_token(shop.store, "stream-more", Role.VIEWER)
            seen: list[tuple[str, dict[str, Any]]] = []
            ready = asyncio.Event()
            task = asyncio.create_task(listen(server.url, token, seen, ready))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                handle = await shop.start("invoice", {"id": "T-1"})
                await handle.result(timeout=10)
                placed = await shop.publish("order.placed", {"order_id": "T-1"})
                await shop.publish("order.refunded", {"order_id": "T-1"})

                async def retired() -> bool:  # once the shop's worker says what it serves
                    try:
                        done = await shop.retire_group("ledger", actor="token:x")
                        return bool(done.declarations)
                    except GroupInUse:
                        return False

                await eventually(retired, timeout=15, what="the ledger retired")

                def arrived() -> bool:
                    kinds = {k for k, _ in seen}
                    return {"step", "delivery", "group", "dead_letter"} <= kinds

                await eventually(arrived, timeout=15, what="step, delivery, group events")
                steps = [d for k, d in seen if k == "step" and d["run_id"] == handle.run_id]
                # reserve#1 ended while the run kept running: its own change
                assert any("reserve#1" in d["completed"] for d in steps), seen
                delivery = next(d for k, d in seen if k == "delivery" and d["group"] == "emails")
                assert delivery["event_id"] == placed.id and delivery["state"] == "done"
                group = next(d for k, d in seen if k == "group")
                assert (group["name"], group["action"], group["ended"]) == ("ledger", "retired", 1)
                assert group["time"].endswith("Z")
                dead = next(d for k, d in seen if k == "dead_letter")
                assert dead["group"] == "billing:eu" and dead["state"] == "dead"
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def test_a_worker_coming_and_going_reaches_the_stream(store_url: str) -> None:
    """What serves the groups, ticks the schedules and begins queued runs: the Groups,
    Schedules and Queues pages read them again when a worker comes or goes."""
    console_app = App("shop", store=store_url)
    with ServerThread(console_app, serve=False) as server:
        shop = make_shop(store_url)
        async with shop:  # (the store made, and a token)
            token = await create_token(shop.store, "stream-workers", Role.VIEWER)
        seen: list[tuple[str, dict[str, Any]]] = []
        ready = asyncio.Event()
        task = asyncio.create_task(listen(server.url, token, seen, ready))
        try:
            await asyncio.wait_for(ready.wait(), 10)
            await asyncio.sleep(1.2)  # (the feed has seen who was live when it began)
            ledger = ledger_worker(store_url)
            async with ledger:
                worker = ledger.engine.worker_id
                await eventually(lambda: ("worker", {"id": worker, "state": "up"})
                                 in [(k, {"id": d["id"], "state": d["state"]})
                                     for k, d in seen if k == "worker"],
                                 timeout=10, what="the worker up")

            def gone() -> bool:
                return any(k == "worker" and d["id"] == worker and d["state"] == "gone"
                           for k, d in seen)

            await eventually(gone, timeout=15, what="the worker gone")
            up = next(d for k, d in seen if k == "worker")
            assert up["time"].endswith("Z")
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
