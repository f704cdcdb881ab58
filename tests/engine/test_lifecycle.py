"""Opening and closing one app from several tasks of its event loop at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from cantata import App, ConfigurationError, Event, HandlerContext, RunStatus, WorkflowContext
from cantata.broker.embedded import EmbeddedBroker

from .helpers import make_app


def _echo_app(url: str) -> App:
    app = make_app(url)

    @app.workflow
    async def echo(ctx: WorkflowContext, n: int) -> int:
        return n

    return app


def _assert_closed(app: App) -> None:
    """The app is closed, and nothing of it runs on (no worker, relay or heartbeat)."""
    assert not app.is_open
    with pytest.raises(ConfigurationError, match="is not open"):
        app.store  # noqa: B018
    assert asyncio.all_tasks() == {asyncio.current_task()}


async def test_concurrent_client_blocks_share_one_runtime(sqlite_url: str) -> None:
    """Tasks that each open the app as a client at once (request handlers opening it
    lazily, helpers under asyncio.gather) share one open app; the last one out closes it."""
    app = _echo_app(sqlite_url)
    engines: set[int] = set()

    async def one(n: int) -> str:
        async with app.client():
            assert app.is_open
            engines.add(id(app.store))
            handle = await app.start("echo", n)
            await asyncio.sleep(0.01)  # the blocks overlap
            assert await handle.status() == RunStatus.PENDING
            return handle.run_id

    run_ids = await asyncio.gather(*(one(n) for n in range(8)))
    assert len(engines) == 1
    assert len(set(run_ids)) == 8
    _assert_closed(app)
    async with app:  # and it opens again, with every run there
        for n, run_id in enumerate(run_ids):
            assert await app.get_handle(run_id).result(timeout=5) == n
    _assert_closed(app)


async def test_an_open_while_closing_waits_and_gets_an_open_app(sqlite_url: str) -> None:
    """An open that begins while the last block is closing the app waits for the close,
    then opens it afresh: it never gets an app closed under it."""
    app = _echo_app(sqlite_url)
    await app.open(serve=False)
    closing = asyncio.create_task(app.close())
    await asyncio.sleep(0)  # the close is under way
    async with app.client():
        handle = await app.start("echo", 7)
        await asyncio.sleep(0.05)
        assert await handle.status() == RunStatus.PENDING
    await closing
    _assert_closed(app)
    async with app:
        assert await handle.result(timeout=5) == 7
    _assert_closed(app)


async def test_a_close_while_opening_leaves_the_app_closed(sqlite_url: str) -> None:
    """Blocks entered and left at once, with opens and closes interleaved, end with the
    app closed and nothing left running."""
    app = _echo_app(sqlite_url)

    async def enter_leave(delay: float) -> None:
        await asyncio.sleep(delay)
        async with app:
            await asyncio.sleep(delay)

    await asyncio.gather(*(enter_leave(d / 100) for d in (0, 0, 1, 2, 0, 3)))
    _assert_closed(app)


class _SlowToSubscribe(EmbeddedBroker):
    """An embedded broker whose subscribe (a step of the worker's open that comes after
    its first claims) waits until ``body_done`` is set, or 5 s."""

    def __init__(self) -> None:
        super().__init__()
        self.body_done = asyncio.Event()

    async def subscribe(self, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.body_done.wait(), 5)
        return await super().subscribe(*args, **kwargs)


async def test_a_body_run_while_its_worker_opens_can_use_the_app(sqlite_url: str) -> None:
    """A run the worker claims while ``async with app:`` is still opening (its store and
    engine ready, its subscriptions not yet) runs steps that may use the app: starting a
    run or publishing from a step must not fail with "app is not open"."""
    broker = _SlowToSubscribe()
    app = make_app(sqlite_url, broker=broker)
    used: list[str] = []

    @app.workflow
    async def child(ctx: WorkflowContext) -> str:
        return "child"

    @app.step
    async def start_child() -> str:
        try:
            handle = await app.start(child, idempotency_key="child-1")
            await app.publish("parent.noted", {"child": handle.run_id})
            used.append(handle.run_id)
        finally:
            broker.body_done.set()
        return handle.run_id

    @app.workflow
    async def parent(ctx: WorkflowContext) -> str:
        result: str = await ctx.run(start_child)
        return result

    @app.on("parent.noted", group="notes")
    async def noted(event: Event[Any], ctx: HandlerContext) -> None: ...

    async with app.client():
        started = await app.start(parent)
    opening = time.monotonic()
    async with app:
        assert used, "the step ran before the worker's open returned, and failed"
        assert time.monotonic() - opening < 4, "the open did not wait for the step"
        child_id = await started.result(timeout=5)
        assert await app.get_handle(child_id).result(timeout=5) == "child"
