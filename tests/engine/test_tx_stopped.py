"""A stop of a transactional step's body that comes while its COMMIT is in flight.

The engine stops step bodies when its worker's hold is in doubt (``Engine.fence_self``:
a stalled heartbeat; the body guard) and at the run's deadline. A transactional
step's completion commits with its writes: a stop that lands while that COMMIT is
under way must neither have the step run again once the COMMIT went through (its
writes made twice) nor have it recorded failed (its writes there without its
completion): the stop is honoured once the COMMIT's outcome is known
(docs/workflow-api.md).
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from cantata import App, Tx, WorkflowCompensated
from cantata.model.records import EntryStatus
from cantata.store import tx
from cantata.store.postgres import PostgresStore
from cantata.store.sqlite import SQLiteStore
from tests.engine.test_store_stalls import check_booked, tx_app
from tests.helpers import with_schema
from tests.stall_proxy import stall_proxy

DEADLINE = 2.0  # seconds: the run's, for a stop at its deadline (the COMMIT held past it)
STOPS = ["fence", "lapsed", "deadline"]
LEASE = {"lapsed": 1.0}  # (else 10 s)


async def stop_bodies(app: App, stop: str, started: float) -> None:
    """The step bodies running in ``app`` are stopped: as its worker does when its hold
    is in doubt (``fence``); by the worker itself, its heartbeats held with the COMMIT
    past its lease of 1 s (``lapsed``: its body guard, ``Engine.fence_self``); or by
    the run's deadline passing (``deadline``)."""
    if stop == "fence":
        app.engine.fence_self()
    elif stop == "lapsed":
        await asyncio.sleep(2 * LEASE[stop])
    else:
        await asyncio.sleep(started + DEADLINE + 0.3 - time.monotonic())


async def start(app: App, stop: str, n: int) -> Any:
    return await app.start("booking", n, deadline=DEADLINE if stop == "deadline" else None)


async def check_once(app: App, handle: Any, stop: str, seen: list[str], ran: list[str],
                     n: int, held: list[str] | None = None) -> None:
    """The step's transaction committed once and its history says it completed.

    ``held``: the step bodies that had run when the COMMIT was held. No body runs
    after it. On a loaded machine the 1 s lease of ``lapsed`` can lapse before the
    step's first COMMIT is sent: that attempt is stopped and rolled back, and the held
    COMMIT is the next attempt's (a re-run of a step that did not commit, which the
    test did not set out to check, but whose effect must still be made once)."""
    held = ["reserve", "book"] if held is None else held
    if stop != "deadline":
        assert await handle.result(timeout=20) == "booked, 1 booking(s)", (seen, ran)
        assert ran == held and held[-1] == "book", (ran, held)
        if held == ["reserve", "book"]:
            await check_booked(app, handle.run_id, seen, ran, booked=n)
        else:
            assert held == ["reserve"] + ["book"] * (len(held) - 1), held
            await check_booked(app, handle.run_id, seen, ran, booked=n, attempts=False)
        return
    with pytest.raises(WorkflowCompensated, match="DeadlineExceeded"):
        await handle.result(timeout=20)
    assert ran == ["reserve", "book", "undo"], ran  # (the booking is not compensated)
    book = {e.name: e for e in await app.store.load_history(app.name, handle.run_id)}["book"]
    assert (book.status, book.result) == (EntryStatus.COMPLETED, "1"), book

    async def rows(tx: Tx) -> tuple[Any, Any]:
        from cantata.model.records import RunWrite

        return RunWrite(), await tx.fetch("SELECT n FROM bookings")

    run = await app.store.get_run(app.name, handle.run_id)
    assert run is not None
    tx_store: Any = app.store
    assert await tx_store.run_transaction(app.name, handle.run_id, run.fence, rows) == [(n,)]


@pytest.mark.postgres
@pytest.mark.parametrize("stop", STOPS)
async def test_a_stop_while_a_transactional_steps_commit_is_in_flight_postgres(
    postgres_url: str, pooled_schema: str, stop: str,
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:

        async def hold_commit(tx: Tx) -> None:
            if not proxy.marked.is_set():  # its COMMIT reaches the server, the answer held
                # (this transaction's COMMIT: not another connection's sent meanwhile,
                # which would hold this one's before the server; and the next attempt's,
                # if a lease lapsed on a loaded machine stopped this one before it)
                proxy.stall_after(b"COMMIT", on=b"hold_this_commit")
                await tx.execute("SELECT 1 AS hold_this_commit")

        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema))
        app = tx_app(store, seen, ran, in_step=hold_commit, lease=LEASE.get(stop, 10))
        async with app:
            started = time.monotonic()
            handle = await start(app, stop, 6)
            await asyncio.wait_for(proxy.marked.wait(), 10)
            held = list(ran)
            await stop_bodies(app, stop, started)
            await asyncio.sleep(0.1)
            proxy.resume()
            await check_once(app, handle, stop, seen, ran, 6, held)


class StopsAtCommit(SQLiteStore):
    """A SQLite store whose transactional step's transaction, once its checkpoint is
    written in it, waits before its COMMIT for the step bodies of ``app`` to be
    stopped (``stop``), once."""

    app: App | None = None
    loop: asyncio.AbstractEventLoop
    stop = "fence"
    started = 0.0

    def _commit_fenced(self, c: Any, app: str, run_id: str, fence: int, write: Any) -> bool:
        done = super()._commit_fenced(c, app, run_id, fence, write)
        stopping = self.app
        if stopping is not None and threading.current_thread().name.startswith(
                "cantata-sqlite-tx"):
            self.app = None
            stopped = threading.Event()

            async def stop() -> None:
                await stop_bodies(stopping, self.stop, self.started)
                stopped.set()

            asyncio.run_coroutine_threadsafe(stop(), self.loop)
            stopped.wait(10)
        return done


@pytest.mark.parametrize("stop", STOPS)
async def test_a_stop_while_a_transactional_steps_commit_is_in_flight_sqlite(
    tmp_path: Any, stop: str,
) -> None:
    seen: list[str] = []
    ran: list[str] = []
    store = StopsAtCommit(str(tmp_path / "stop.db"))
    app = tx_app(store, seen, ran, lease=LEASE.get(stop, 10))
    async with app:
        store.loop, store.stop, store.started = asyncio.get_running_loop(), stop, time.monotonic()
        store.app = app
        handle = await start(app, stop, 6)
        await check_once(app, handle, stop, seen, ran, 6)


@pytest.mark.postgres
async def test_a_stopped_transactional_steps_commit_gone_silent_is_an_outage(
    postgres_url: str, pooled_schema: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its COMMIT reached the server, whose answer never comes back (the connection
    silent for good): the stop waits for it a while only, then the run goes on from
    its history, where the step committed."""
    monkeypatch.setattr(tx, "STOP_PATIENCE", 0.5)
    seen: list[str] = []
    ran: list[str] = []
    async with stall_proxy(postgres_url) as proxy:

        async def hold_commit(tx: Tx) -> None:
            if ran.count("book") == 1:
                proxy.stall_after(b"COMMIT", on=b"hold_this_commit")
                await tx.execute("SELECT 1 AS hold_this_commit")

        store = PostgresStore(with_schema(proxy.url(postgres_url), pooled_schema))
        app = tx_app(store, seen, ran, in_step=hold_commit)
        async with app:
            handle = await start(app, "fence", 7)
            await asyncio.wait_for(proxy.marked.wait(), 10)
            assert proxy.blackhole(b"INSERT INTO bookings") == 1
            proxy.resume()  # (the other connections go on)
            app.engine.fence_self()
            await check_once(app, handle, "fence", seen, ran, 7)
