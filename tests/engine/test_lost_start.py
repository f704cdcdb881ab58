"""``app.start`` whose answer is lost: the run's creation committed in the server, the
connection cut before its reply arrived. Start finds out by the run's id and returns
the run (stored once, completing once); only a store that stays unreachable for a
lease makes it raise, naming the run and how to find out (docs/guarantees.md)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cantata import App, StoreUnavailable, WorkflowContext
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from tests.engine.test_store_stalls import STALL, no_worker_lost, stored_runs
from tests.helpers import eventually, with_schema
from tests.stall_proxy import StallProxy, stall_proxy


def lost_app(store: Any, ran: list[str], lease: float) -> App:
    """Workflow ``order`` of one step, which notes its argument in ``ran``."""
    app = App("lost", store=store, lease=lease, poll_interval=0.05, shutdown_grace=1)
    app.queue("q", concurrency=1)

    @app.step
    async def work(tag: str) -> str:
        ran.append(tag)
        return f"done {tag}"

    @app.workflow
    async def order(ctx: WorkflowContext, tag: str) -> str:
        return str(await ctx.run(work, tag))

    return app


def proxied(proxy: StallProxy, postgres_url: str, schema: str) -> PostgresStore:
    return PostgresStore(with_schema(proxy.url(postgres_url), schema), connect_timeout=1.0)


async def lose_the_answer(proxy: StallProxy, postgres_url: str, schema: str,
                          stall: float) -> None:
    """Once the creation holding ``marker`` committed in the server, cut the connection
    (its answer held by the proxy is lost) and stall new ones for ``stall`` seconds."""
    await asyncio.wait_for(proxy.marked.wait(), 10)
    await eventually(lambda: stored_runs(postgres_url, schema, "order"),
                     what="the run's creation committed in the server")
    proxy.cut()
    await asyncio.sleep(stall)  # connecting again takes longer than its timeout
    proxy.resume()


@pytest.mark.postgres
@pytest.mark.parametrize("key", [None, "order-7"], ids=["first-checkpoint", "keyed"])
async def test_a_start_whose_answer_is_lost_returns_the_one_run_it_stored(
    postgres_url: str, pooled_schema: str, key: str | None
) -> None:
    marker = f"lost-start-{key or 'nokey'}-8c1e"  # (the run's argument: in its creation)
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:
        app = lost_app(proxied(proxy, postgres_url, pooled_schema), ran, lease=10)
        async with app:
            proxy.stall_after(marker.encode())
            start = asyncio.ensure_future(app.start("order", marker, idempotency_key=key))
            await lose_the_answer(proxy, postgres_url, pooled_schema, STALL)
            handle = await asyncio.wait_for(start, 20)  # (raised StoreUnavailable before)
            runs = await stored_runs(postgres_url, pooled_schema, "order")
            assert [r for r, _ in runs] == [handle.run_id]
            assert await handle.result(timeout=20) == f"done {marker}"
            assert ran == [marker], "the run's step ran more than once"
            assert len(await stored_runs(postgres_url, pooled_schema, "order")) == 1
            await no_worker_lost(app, handle.run_id)


@pytest.mark.postgres
async def test_a_start_whose_answer_stays_lost_names_its_run_and_a_keyed_retry_is_safe(
    postgres_url: str, pooled_schema: str
) -> None:
    marker = "lost-start-for-good-51d0"
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:
        app = lost_app(proxied(proxy, postgres_url, pooled_schema), ran, lease=1.5)
        async with app:
            proxy.stall_after(marker.encode())
            start = asyncio.ensure_future(app.start("order", marker, idempotency_key="k-9"))
            # unreachable for longer than start waits (one lease)
            await lose_the_answer(proxy, postgres_url, pooled_schema, 3.5)
            with pytest.raises(StoreUnavailable) as caught:
                await asyncio.wait_for(start, 20)
            [(run_id, _)] = await stored_runs(postgres_url, pooled_schema, "order")
            text = str(caught.value)
            assert f"run {run_id} of order may have been stored" in text, text
            assert f"app.get_handle('{run_id}').status()" in text, text
            assert "the same idempotency key is safe" in text, text
            assert await app.get_handle(run_id).status() is not None
            handle = await app.start("order", marker, idempotency_key="k-9")
            assert handle.run_id == run_id
            assert await handle.result(timeout=20) == f"done {marker}"
            assert ran == [marker], "the run's step ran more than once"
            assert len(await stored_runs(postgres_url, pooled_schema, "order")) == 1


class LosesCreation:
    """A store whose next run creation, once armed, commits and then raises
    ``StoreUnavailable`` (its answer lost); ``raced``: the first read of that run
    afterwards does not see it yet (the commit still under way on a server)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)  # type: ignore[call-arg]
        self.armed = False
        self.raced = False
        self.lost: list[str] = []

    async def _lose(self, run: Any, created: Any) -> Any:
        if not self.armed:
            return await created
        self.armed = False
        await created
        self.lost.append(run.run_id)
        raise StoreUnavailable("lost the connection (a test's outage); the operation may "
                               "not have been applied")

    async def create_run(self, run: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._lose(run, super().create_run(run, *args, **kwargs))  # type: ignore[misc]

    async def create_queued_run(self, run: Any, *args: Any, **kwargs: Any) -> Any:
        return await self._lose(
            run, super().create_queued_run(run, *args, **kwargs))  # type: ignore[misc]

    async def get_run(self, app: str, run_id: str) -> Any:
        if self.raced and run_id in self.lost:
            self.raced = False
            return None
        return await super().get_run(app, run_id)  # type: ignore[misc]


class SQLiteLosing(LosesCreation, SQLiteStore):
    pass


class PostgresLosing(LosesCreation, PostgresStore):
    pass


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def losing_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        return SQLiteLosing(str(tmp_path / "lost.db"))
    postgres_url = request.getfixturevalue("postgres_url")
    return PostgresLosing(with_schema(postgres_url, request.getfixturevalue("pooled_schema")))


@pytest.mark.parametrize("how", ["first-checkpoint", "keyed", "queued", "raced"])
async def test_a_start_whose_answer_is_lost_returns_its_run_on_either_store(
    losing_store: Any, how: str
) -> None:
    store = losing_store
    ran: list[str] = []
    app = lost_app(store, ran, lease=2)
    async with app:
        store.armed, store.raced = True, how == "raced"
        handle = await app.start(
            "order", how, idempotency_key="k" if how == "keyed" else None,
            queue="q" if how == "queued" else None,
        )
        assert store.lost == [handle.run_id]
        assert await handle.result(timeout=10) == f"done {how}"
        assert ran == [how]
        assert [r.run_id for r in await app.list_runs()] == [handle.run_id]


@pytest.mark.postgres
@pytest.mark.parametrize("key", [None, "order-8"], ids=["first-checkpoint", "keyed"])
async def test_closing_the_app_ends_a_start_finding_out_its_lost_answer(
    postgres_url: str, pooled_schema: str, key: str | None
) -> None:
    """The app closed while start finds out whether its run was stored (the store
    unreachable): start stops at once, not a lease later, and says which run may have
    been stored and whether starting again is safe."""
    marker = f"lost-start-closed-{key or 'nokey'}-2b7e"
    ran: list[str] = []
    loop = asyncio.get_running_loop()
    async with stall_proxy(postgres_url) as proxy:
        app = lost_app(proxied(proxy, postgres_url, pooled_schema), ran, lease=20)
        await app.open()
        closing: asyncio.Future[None] | None = None
        try:
            proxy.stall_after(marker.encode())
            start = asyncio.ensure_future(app.start("order", marker, idempotency_key=key))
            await asyncio.wait_for(proxy.marked.wait(), 10)
            await eventually(lambda: stored_runs(postgres_url, pooled_schema, "order"),
                             what="the run's creation committed in the server")
            proxy.cut()  # its answer lost; new connections stall until resumed
            await asyncio.sleep(1.0)
            assert not start.done(), "start did not wait to find out"
            began = loop.time()
            closing = asyncio.ensure_future(app.close())
            with pytest.raises(StoreUnavailable) as caught:  # (before: a lease later)
                await asyncio.wait_for(start, 15)
            took = loop.time() - began
            assert took < 2.0, f"start ended {took:.1f} s after the close began"
            [(run_id, _)] = await stored_runs(postgres_url, pooled_schema, "order")
            text = str(caught.value)
            assert f"run {run_id} of order may have been stored" in text, text
            assert "the app was closed" in text, text
            assert f"app.get_handle('{run_id}').status()" in text, text
            safe = ("the same idempotency key is safe" if key is not None
                    else "without an idempotency key may start a second run")
            assert safe in text, text
        finally:
            proxy.resume()
            await asyncio.wait_for(closing if closing is not None else app.close(), 60)
        assert ran == [], "the run was executed by a closing app"
