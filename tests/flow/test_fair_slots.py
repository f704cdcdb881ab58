"""Slots are served first come, first served across worker processes: a run that
waits for a step's slot begins before every run that began waiting after it, also
when those newcomers ask the store the moment a slot is freed (docs/flow-control.md).

Two worker Apps share one store (each its own worker id, as two processes would).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from cantata import App, WorkflowCancelled, WorkflowContext
from tests.flow.helpers import until
from tests.helpers import with_schema

LATER = 30


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """One store for both worker Apps: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/fair.db"
    url: str = request.getfixturevalue("postgres_url")
    return with_schema(url, request.getfixturevalue("pooled_schema"))


def worker_app(url: str, begins: list[str], hold: asyncio.Event, poll_interval: float = 0.1) -> App:
    """A worker of app ``fair``: step ``pay`` (one at a time across the cluster) notes
    each begin; the run keyed ``holder`` keeps its slot until ``hold`` is set."""
    app = App("fair", store=url, broker="embedded", poll_interval=poll_interval, shutdown_grace=1.0)

    @app.step(concurrency=1)
    async def pay(key: str) -> str:
        begins.append(key)
        if key == "holder":
            await hold.wait()
        else:
            await asyncio.sleep(0.01)
        return key

    @app.workflow
    async def order(ctx: WorkflowContext, key: str) -> str:
        return str(await ctx.run(pay, key))

    return app


def waiting(app: App) -> int:
    """The runs of ``app``'s worker waiting for a slot (denied by the store)."""
    assert app.engine.flow is not None
    return len(app.engine.flow.slot_waiters)


async def test_an_early_waiter_begins_before_every_later_run(shared_url: str) -> None:
    begins: list[str] = []
    hold = asyncio.Event()
    first, second = worker_app(shared_url, begins, hold), worker_app(shared_url, begins, hold)
    async with first, second:
        handles = [await first.start("order", "holder")]
        await until(lambda: begins == ["holder"])
        handles.append(await second.start("order", "early"))
        await until(lambda: waiting(second) == 1)  # it asked, was denied and waits
        for i in range(LATER):
            if i == LATER // 3:
                hold.set()  # the slot is freed while newcomers keep asking
            app = first if i % 2 == 0 else second
            handles.append(await app.start("order", f"later-{i}"))
            await asyncio.sleep(0.02)
        results = [await h.result(timeout=60) for h in handles]
    assert sorted(results) == sorted(["holder", "early", *[f"later-{i}" for i in range(LATER)]])
    overtaken = begins[1 : begins.index("early")]
    assert begins[0] == "holder" and not overtaken, f"later runs began first: {overtaken}"


async def test_a_cancelled_waiter_does_not_hold_up_the_runs_behind_it(shared_url: str) -> None:
    """A waiter that stops waiting (its run cancelled) leaves the queue at once: the run
    behind it begins as soon as the slot is freed, not once the waiter's row lapses
    (3 s with the default poll interval and lease)."""
    begins: list[str] = []
    hold = asyncio.Event()
    app = worker_app(shared_url, begins, hold, poll_interval=0.2)
    async with app:
        holder = await app.start("order", "holder")
        await until(lambda: begins == ["holder"])
        doomed = await app.start("order", "doomed")
        await until(lambda: waiting(app) == 1)  # it asked, was denied and waits
        await doomed.cancel()
        with pytest.raises(WorkflowCancelled):
            await doomed.result(timeout=10)
        behind = await app.start("order", "behind")
        await until(lambda: waiting(app) == 1)  # the only one left
        freed = time.monotonic()
        hold.set()
        assert await behind.result(timeout=30) == "behind"
        waited = time.monotonic() - freed
        assert await holder.result(timeout=10) == "holder"
    assert begins == ["holder", "behind"]
    assert waited < 1.5, f"the run behind a cancelled waiter began {waited:.2f} s after the release"
