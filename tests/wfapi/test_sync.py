"""The blocking facade, ``cantata.sync``: connections from threads, nested and
overlapping, handles that outlive their block, and the blocking twin of the async API."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Event, Retry, WorkflowContext, sync
from cantata.errors import (
    ConfigurationError,
    ResultTimeout,
    RunNotFound,
    StoreUnavailable,
    WorkflowCancelled,
    WorkflowFailed,
)
from cantata.model.status import RunStatus
from tests.helpers import make_app

WAIT = 30.0  # seconds a thread may take before the test calls it hung


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file, or this session's PostgreSQL schema (each test its own app name)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    pg: str = request.getfixturevalue("pg_session_url")
    return pg


def _app(url: str) -> App:
    app = make_app(url, name=f"sync-{uuid.uuid4().hex[:8]}")

    @app.workflow
    async def echo(ctx: WorkflowContext, x: int) -> int:
        return x

    @app.workflow
    async def parked(ctx: WorkflowContext) -> str:
        await ctx.sleep(3600)
        return "woke"

    return app


def _in_threads(count: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``count`` threads at once; each one's result or exception.
    A thread still running after ``WAIT`` seconds fails the test (a hang)."""
    out: list[Any] = [None] * count
    go = threading.Barrier(count)

    def body(i: int) -> None:
        go.wait()
        try:
            out[i] = target(i)
        except BaseException as exc:  # reported by the assertions
            out[i] = exc

    threads = [threading.Thread(target=body, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + WAIT
    for t in threads:
        t.join(max(deadline - time.monotonic(), 0))
    hung = [i for i, t in enumerate(threads) if t.is_alive()]
    assert not hung, f"threads {hung} still blocked after {WAIT} s"
    return out


def test_connections_from_many_threads_at_once_each_work(url: str) -> None:
    app = _app(url)

    def view(i: int) -> list[str]:  # a web view: one connection per request
        ids = []
        for n in range(3):
            with sync.connect(app) as c:
                ids.append(c.start("echo", i * 10 + n).run_id)
        return ids

    out = _in_threads(8, view)
    errors = [o for o in out if isinstance(o, BaseException)]
    assert not errors, errors
    ids = [run_id for ids in out for run_id in ids]
    assert len(set(ids)) == 24
    with sync.connect(app, serve=True) as c:
        results = sorted(c.get_handle(run_id).result(timeout=WAIT) for run_id in ids)
    assert results == sorted(i * 10 + n for i in range(8) for n in range(3))


def test_nested_and_overlapping_connections_each_work(url: str) -> None:
    app = _app(url)
    with sync.connect(app) as c1:
        with sync.connect(app) as c2:
            a = c2.start("echo", 1)
            b = c1.start("echo", 2)
        c = c1.start("echo", 3)  # the inner block's end closed nothing
    c1 = sync.connect(app).__enter__()
    c2 = sync.connect(app).__enter__()
    c1.__exit__(None, None, None)
    d = c2.start("echo", 4)  # the first one's end left the second open
    c2.__exit__(None, None, None)
    with sync.connect(app, serve=True) as c3:
        assert [h.result(timeout=WAIT) for h in (a, b, c, d)] == [1, 2, 3, 4]
        assert c3.get_handle(a.run_id).status() == RunStatus.COMPLETED


def test_a_handle_outlives_its_block(url: str) -> None:
    app = _app(url)
    with sync.connect(app) as c:
        h = c.start("echo", 5)
        h2 = c.get_handle(h.run_id)
    for call in (h.status, h2.status, h.info, lambda: h.result(timeout=1), h.cancel):
        with pytest.raises(StoreUnavailable, match=r"sync\.connect"):
            call()
    with sync.connect(app, serve=True):  # open again (another connection): it works
        assert h.result(timeout=WAIT) == 5
        assert h2.status() == RunStatus.COMPLETED
        assert h.info().run_id == h.run_id


def test_a_call_waiting_when_the_last_block_ends_raises_rather_than_hangs(url: str) -> None:
    app = _app(url)
    with sync.connect(app) as c:
        h = c.start("parked")
    ready = threading.Event()

    def waiter(i: int) -> Any:
        if i == 0:
            ready.set()
            return h.result()  # no timeout: it would wait for ever
        ready.wait()
        time.sleep(0.5)  # the other thread is waiting in result()
        c.__exit__(None, None, None)  # the last block ends
        return None

    c.__enter__()
    out = _in_threads(2, waiter)
    assert isinstance(out[0], StoreUnavailable), out[0]
    assert "closed" in str(out[0])


def test_a_connection_must_be_entered_first() -> None:
    app = _app("memory://")
    c = sync.connect(app)
    with pytest.raises(ConfigurationError, match=r"with cantata\.sync\.connect"):
        c.start("echo", 1)
    with pytest.raises(ConfigurationError, match=r"with cantata\.sync\.connect"):
        c.get_handle("some-run")
    with pytest.raises(ConfigurationError, match=r"with cantata\.sync\.connect"):
        c.list_runs()


def test_an_app_open_on_another_event_loop_is_refused_not_hung(tmp_path: Path) -> None:
    app = _app(f"sqlite:///{tmp_path}/cantata.db")
    opened, done = threading.Event(), threading.Event()

    async def elsewhere() -> None:
        async with app.client():
            opened.set()
            await asyncio.to_thread(done.wait)

    other = threading.Thread(target=asyncio.run, args=(elsewhere(),), daemon=True)
    other.start()
    try:
        assert opened.wait(WAIT)
        out = _in_threads(1, lambda _: sync.connect(app).__enter__())
        assert isinstance(out[0], ConfigurationError), out[0]
        assert "another event loop" in str(out[0])
    finally:
        done.set()
        other.join(WAIT)
    with sync.connect(app) as c:  # once closed there, it opens here
        assert c.list_runs() == []

    async def while_sync_holds_it() -> None:
        with pytest.raises(ConfigurationError, match="another event loop"):
            async with app:
                pass

    with sync.connect(app):
        asyncio.run(while_sync_holds_it())


def test_the_blocking_twin_of_the_handle_and_app_operations(url: str) -> None:
    app = _app(url)
    failing = {"on": True}

    @app.step(retry=Retry(max_attempts=1))
    async def charge(amount: int) -> int:
        if failing["on"]:
            raise ValueError("card declined")
        return amount

    @app.on("order.placed", group="billing", retry=Retry(max_attempts=1))
    async def bill(event: Event[Any]) -> None:
        raise RuntimeError(f"card declined for {event.data['order_id']}")

    @app.workflow
    async def tick(ctx: WorkflowContext, at: dt.datetime) -> str:
        return at.isoformat()

    @app.workflow
    async def pay(ctx: WorkflowContext, amount: int) -> int:
        await ctx.set_attributes(customer=7)
        return int(await ctx.run(charge, amount))

    with sync.connect(app, serve=True) as c:
        h = c.start("pay", 3)
        with pytest.raises(WorkflowFailed):
            h.result(timeout=WAIT)
        assert h.info().status == RunStatus.FAILED
        assert [r.run_id for r in c.find_runs(attributes={"customer": 7})] == [h.run_id]
        assert c.list_runs(workflow="pay")[0].run_id == h.run_id
        failing["on"] = False
        h.retry(actor="ops:ann")
        assert h.result(timeout=WAIT) == 3
        ok = c.start("pay", 4)
        assert ok.result(timeout=WAIT) == 4
        forked = c.fork(ok.run_id, from_step="charge#1", actor="ops:bo")
        assert forked.result(timeout=WAIT) == 4 and forked.run_id != ok.run_id
        p = c.start("parked")
        with pytest.raises(ResultTimeout):
            p.result(timeout=0.2)
        p.cancel(actor="ops:cy")
        with pytest.raises(WorkflowCancelled):
            p.result(timeout=WAIT)
        assert c.trace(h.info().correlation_id).kind
        assert c.stalled(older_than=3600) == []
        c.publish("order.placed", {"order_id": 1})
        c.publish("order.placed", {"order_id": 2})
        deadline = time.monotonic() + WAIT
        while len(c.dead_letters()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first, second = c.dead_letters()
        assert c.replay(first.id, actor="ops:di").id == first.id
        assert c.discard(second.id, actor="ops:ed").id == second.id
        with pytest.raises(RunNotFound):
            c.get_handle("no-such-run").status()
        assert c.publish("nobody.listens", {"n": 1}).type == "nobody.listens"
        assert c.queue_stats() == []
        c.schedules.create("nightly", "0 3 * * *", "tick")
        c.schedules.pause("nightly")
        assert [(s.name, s.paused) for s in c.schedules.list()] == [("nightly", True)]
        c.schedules.resume("nightly")
        assert c.schedules.trigger("nightly").result(timeout=WAIT).startswith("20")
        c.schedules.delete("nightly")
        assert c.schedules.list() == []
    actors = asyncio.run(_actors(url, app.name))
    assert {"ops:ann", "ops:bo", "ops:cy", "ops:di", "ops:ed"} <= actors


async def _actors(url: str, name: str) -> set[str]:
    async with make_app(url, name=name).client() as app:
        return {r.actor for r in await app.store.audit_records(name)}


async def test_the_async_api_from_another_loop_is_refused_while_a_block_is_open(
    tmp_path: Path,
) -> None:
    """While a sync block holds the app on its background loop, the async API used from
    this loop says so (its connections belong to that loop) and the block still closes."""
    app = App("xloop", store=f"sqlite:///{tmp_path / 'x.db'}")

    @app.workflow
    async def wf(ctx: WorkflowContext, x: int) -> int:
        return x

    with sync.connect(app) as c:
        with pytest.raises(ConfigurationError, match="open on another event loop"):
            await app.start(wf, 1)
        assert c.start(wf, 2).run_id
    async with app.client():  # closed cleanly: this loop may open it now
        assert len(await app.list_runs()) == 1


@pytest.fixture
def ctrl_c_reaches_python() -> Iterator[None]:
    """SIGINT handled as a terminal's Ctrl-C is: by Python's default handler. A test
    process started in the background (``cmd &``, ``nohup``) inherits SIGINT ignored,
    and Python then installs no handler at all, so a Ctrl-C would reach nothing."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        if previous is signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous)


def _interrupt_main_after(*delays: float) -> list[threading.Timer]:
    """A Ctrl-C (SIGINT to the main thread, as a terminal sends it) after each delay."""
    main = threading.main_thread().ident
    assert main is not None and threading.current_thread() is threading.main_thread()
    timers = [threading.Timer(d, signal.pthread_kill, (main, signal.SIGINT)) for d in delays]
    for t in timers:
        t.start()
    return timers


def _sat_out(timers: list[threading.Timer]) -> None:
    """Wait until every Ctrl-C of ``timers`` was sent, taking the late ones here."""
    for t in timers:
        while t.is_alive():
            with contextlib.suppress(KeyboardInterrupt):
                t.join()
    with contextlib.suppress(KeyboardInterrupt):
        time.sleep(0.1)  # a signal sent last is handled at the next bytecode


def _app_with_a_slow_step(url: str) -> tuple[App, threading.Event, threading.Event]:
    """An app whose workflow ``hold`` runs a step that sets ``started`` and then waits
    for ``release``; its close would wait for that step (shutdown_grace ``WAIT``)."""
    app = _app(url)
    app.shutdown_grace = WAIT
    started, release = threading.Event(), threading.Event()

    @app.step(retry=Retry(max_attempts=1))
    def slow() -> str:
        started.set()
        release.wait(WAIT)
        return "done"

    @app.workflow
    async def hold(ctx: WorkflowContext) -> str:
        return str(await ctx.run(slow))

    return app, started, release


def _ctrl_c_here() -> None:
    """A Ctrl-C to this (the main) thread, handled right here: at the next instruction."""
    signal.raise_signal(signal.SIGINT)


def _closed_here(app: App) -> list[str]:
    """The workflows of ``app``'s runs, read on a new event loop: only a closed app
    opens there."""

    async def read() -> list[str]:
        async with app.client():
            return [str(r.workflow) for r in await app.list_runs()]

    return asyncio.run(read())


@pytest.mark.parametrize("presses", [1, 2, 3])
@pytest.mark.usefixtures("ctrl_c_reaches_python")
def test_a_ctrl_c_while_a_block_closes_leaves_the_app_usable(url: str, presses: int) -> None:
    """The block's end waits for a step in progress (shutdown_grace); Ctrl-C there stops
    the close at once (once more: gives the close up) and the KeyboardInterrupt goes on
    up; the app is not left bound to the block's dead loop: it opens again."""
    app, started, release = _app_with_a_slow_step(url)
    began, timers = time.monotonic(), []
    try:
        with pytest.raises(KeyboardInterrupt), sync.connect(app, serve=True) as c:
            c.start("hold")
            assert started.wait(WAIT)
            timers = _interrupt_main_after(*[0.5 + 0.02 * i for i in range(presses)])
        _sat_out(timers)
        assert time.monotonic() - began < WAIT  # it did not wait out the grace
    finally:
        release.set()
    with sync.connect(app) as c:  # usable again
        assert [r.workflow for r in c.list_runs()] == ["hold"]
    with sync.connect(app, serve=True) as c:
        assert c.start("echo", 7).result(timeout=WAIT) == 7


@pytest.mark.usefixtures("ctrl_c_reaches_python")
def test_a_ctrl_c_as_a_block_ends_before_the_close_began_still_closes_the_app(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ctrl-C landing in the block's end before the app's close began (here: as the
    end takes the app's lock) does not leave the app open and serving: it closes at
    once (no grace) and the KeyboardInterrupt goes on up."""
    app, started, release = _app_with_a_slow_step(url)
    lock_of = sync._lock_of

    def ctrl_c_then_lock(of: App) -> threading.Lock:
        _ctrl_c_here()
        return lock_of(of)

    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), sync.connect(app, serve=True) as c:
            c.start("hold")
            assert started.wait(WAIT)
            monkeypatch.setattr(sync, "_lock_of", ctrl_c_then_lock)
        monkeypatch.undo()
        assert time.monotonic() - began < WAIT  # it did not wait out the grace
        assert _closed_here(app) == ["hold"]
    finally:
        release.set()


@pytest.mark.usefixtures("ctrl_c_reaches_python")
def test_a_second_ctrl_c_as_the_first_is_handled_still_ends_the_grace(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C twice while the block's end waits for a step in progress, the second
    landing as the first is being handled (here: as the end tells the app's loop about
    the first): the waiting stops, the close still ends its grace at once, so the app's
    next block opens at once although the step still runs."""
    app, started, release = _app_with_a_slow_step(url)
    main = threading.main_thread()
    assert threading.current_thread() is main
    first_sent, second_sent = threading.Event(), threading.Event()
    call_soon_threadsafe = asyncio.BaseEventLoop.call_soon_threadsafe

    def second_ctrl_c_first(loop: asyncio.BaseEventLoop, *args: Any, **kw: Any) -> Any:
        at_first = threading.current_thread() is main and first_sent.is_set()
        if at_first and not second_sent.is_set():
            second_sent.set()
            _ctrl_c_here()
        return call_soon_threadsafe(loop, *args, **kw)

    def first_ctrl_c_once_closing() -> None:
        deadline = time.monotonic() + WAIT
        while app._force_stop is None and time.monotonic() < deadline:  # close under way
            time.sleep(0.01)
        time.sleep(0.2)  # the end waits for the close
        first_sent.set()
        signal.pthread_kill(main.ident or 0, signal.SIGINT)

    monkeypatch.setattr(asyncio.BaseEventLoop, "call_soon_threadsafe", second_ctrl_c_first)
    began = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt), sync.connect(app, serve=True) as c:
            c.start("hold")
            assert started.wait(WAIT)
            sender = threading.Thread(target=first_ctrl_c_once_closing, daemon=True)
            sender.start()
        sender.join(WAIT)
        assert second_sent.is_set()
        monkeypatch.undo()
        assert time.monotonic() - began < WAIT  # it did not wait out the grace
        with sync.connect(app) as c:  # the step still runs: only a hurried close ended
            assert [r.workflow for r in c.list_runs()] == ["hold"]
    finally:
        release.set()


def test_an_app_left_open_on_a_closed_event_loop_opens_again(tmp_path: Path) -> None:
    """A close cut short for good (its loop closed under it, as a second Ctrl-C in
    ``asyncio.run`` does) leaves nothing that can run: the app opens again, from a
    sync block or from another loop."""
    app = _app(f"sqlite:///{tmp_path}/cantata.db")

    def open_and_drop_the_loop() -> None:
        loop = asyncio.new_event_loop()
        loop.run_until_complete(app.open(serve=False))
        loop.run_until_complete(app.start("echo", 1))
        loop.close()  # never closed the app

    _in_threads(1, lambda _: open_and_drop_the_loop())
    with sync.connect(app) as c:
        assert [r.workflow for r in c.list_runs()] == ["echo"]

    _in_threads(1, lambda _: open_and_drop_the_loop())

    async def from_here() -> int:
        async with app:
            return int(await (await app.start("echo", 2)).result(timeout=WAIT))

    assert asyncio.run(from_here()) == 2
