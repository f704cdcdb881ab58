"""Competing consumers: workers of one group share its events, none handled twice."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import cantata
from cantata import App, HandlerContext, WorkflowContext
from tests.choreography.helpers import SETTLE, events_of_type, eventually, make_app

N = 40


def worker(sqlite_url: str, name: str, handled: list[tuple[str, str]]) -> App:
    app = make_app(sqlite_url, concurrency=2)  # small, so one worker cannot grab everything

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: HandlerContext) -> None:
        handled.append((name, event.id))
        await asyncio.sleep(0.02)
        await ctx.emit("inventory.reserved", {"order": event.data["n"]})

    return app


async def test_two_workers_share_a_group_without_handling_an_event_twice(
    sqlite_url: str,
) -> None:
    handled: list[tuple[str, str]] = []
    a, b = worker(sqlite_url, "a", handled), worker(sqlite_url, "b", handled)
    async with a, b:
        ids = {(await a.publish("order.placed", {"n": n})).id for n in range(N)}
        await eventually(lambda: len(handled) >= N, what="every event to be handled")
        await asyncio.sleep(SETTLE)
        reserved = await events_of_type(a, "inventory.reserved")

    per_event = Counter(event_id for _, event_id in handled)
    assert set(per_event) == ids
    assert max(per_event.values()) == 1
    per_worker = Counter(name for name, _ in handled)
    assert per_worker["a"] > 0 and per_worker["b"] > 0, per_worker
    assert sorted(e.data["order"] for e in reserved) == list(range(N))


async def test_other_groups_still_get_every_event_with_competing_workers(
    sqlite_url: str,
) -> None:
    handled: list[tuple[str, str]] = []
    audited: list[str] = []
    a, b = worker(sqlite_url, "a", handled), worker(sqlite_url, "b", handled)

    @b.on("order.*", group="audit")
    async def audit(event: cantata.Event[Any]) -> None:
        audited.append(event.id)

    async with a, b:
        for n in range(10):
            await b.publish("order.placed", {"n": n})
        await eventually(lambda: len(handled) >= 10 and len(audited) >= 10)
        await asyncio.sleep(SETTLE)

    assert len(handled) == 10
    assert len(audited) == len(set(audited)) == 10


async def test_two_workers_start_one_run_per_event(sqlite_url: str) -> None:
    def build() -> App:
        app = make_app(sqlite_url)

        @app.workflow
        async def fulfil(ctx: WorkflowContext, order: dict[str, int]) -> int:
            return order["n"]

        app.start_on("order.placed", fulfil)
        return app

    a, b = build(), build()
    async with a, b:
        for n in range(10):
            await a.publish("order.placed", {"n": n})
        runs = await eventually(lambda: _completed(a, 10), what="ten completed runs")
        await asyncio.sleep(SETTLE)
        assert len(await a.list_runs(workflow="fulfil")) == 10
        results = [await b.get_handle(r.run_id).result(timeout=5) for r in runs]
    assert sorted(results) == list(range(10))


async def _completed(app: App, n: int) -> list[cantata.RunInfo]:
    runs = await app.list_runs(workflow="fulfil", status="completed")
    return runs if len(runs) >= n else []
