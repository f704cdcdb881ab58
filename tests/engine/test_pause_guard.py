"""The step-body guard (cantata.engine.pauses.GuardedBody, docs/leases.md): a body is
never resumed past a stall of its worker longer than the fence, even when its wake-up
was already queued when the stall began — the case the watchdog timer cannot catch,
since it runs only in the event loop's next pass.

The stall here is the event loop blocked in ``time.sleep`` (monotonic time runs on, as
it does through SIGSTOP); the fault suite does the same with real SIGSTOPs
(tests/faults/test_pause.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import time
from typing import Any

import pytest

import cantata
from cantata import Retry
from cantata.model.records import Attempt, RunWrite, branch_cancelled

from .helpers import eventually, make_app

LEASE = 1.0


async def test_a_body_is_not_resumed_past_a_stall_longer_than_its_fence(
    sqlite_url: str,
) -> None:
    app = make_app(sqlite_url, lease=LEASE)
    began = asyncio.Event()
    gate = asyncio.Event()
    outcomes: list[tuple[int, str]] = []

    @app.step(retry=Retry(max_attempts=1))
    async def pay() -> str:
        attempt = cantata.step_info().attempt
        began.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            outcomes.append((attempt, "stopped"))
            raise
        outcomes.append((attempt, "charged"))  # the side effect
        return "paid"

    @app.workflow
    async def checkout(ctx: cantata.WorkflowContext) -> str:
        return str(await ctx.run(pay))

    async with app:
        handle = await app.start(checkout)
        await asyncio.wait_for(began.wait(), 10)
        # The stall lands after the gate opened: the body's wake-up is queued right
        # behind it, in the same pass of the loop, before the watchdog can run.
        asyncio.get_running_loop().call_soon(time.sleep, LEASE * 0.9)
        gate.set()
        assert await handle.result(timeout=10) == "paid"
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    # Stopped at its await instead of going on to its effect; run again, as the same
    # attempt (a stall of this live worker is not an attempt), once the hold is sure.
    assert outcomes == [(1, "stopped"), (1, "charged")]
    assert [(a.attempt, a.error_type) for a in attempts] == [(1, None)]


async def test_a_body_that_stalls_its_worker_every_time_runs_out_of_attempts(
    sqlite_url: str,
) -> None:
    """A body that holds the loop past the fence in its own code is stopped at its next
    await, and that attempt counts (``StepStalled``): such a step fails after its
    attempts instead of being restarted forever (and a run taken over meanwhile does
    not have that attempt excused)."""
    app = make_app(sqlite_url, lease=LEASE)
    calls: list[int] = []

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def hog() -> str:
        calls.append(cantata.step_info().attempt)
        time.sleep(LEASE * 0.9)  # noqa: ASYNC251 - the defect on purpose
        await asyncio.sleep(0)
        return "done"

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> str:
        return str(await ctx.run(hog))

    async with app:
        handle = await app.start(wf)
        with pytest.raises(cantata.WorkflowFailed, match=r"StepStalled.*held its worker"):
            await handle.result(timeout=20)
    assert calls == [1, 2]


async def test_a_pause_of_the_whole_process_inside_a_body_is_not_the_bodys_doing(
    sqlite_url: str,
) -> None:
    """This process is really stopped (SIGSTOP, a child sends SIGCONT a second later)
    inside the body's synchronous code: the body is stopped at its next await as above,
    but the attempt does not count (no ``StepStalled``): the pause clock's thread stood
    still too, so it was the process, not the body, that stalled."""
    app = make_app(sqlite_url, lease=LEASE)
    calls: list[int] = []
    wakers: list[subprocess.Popen[bytes]] = []

    @app.step(retry=Retry(max_attempts=1))
    async def paused() -> str:
        calls.append(cantata.step_info().attempt)
        if len(calls) == 1:
            waker = f"sleep {LEASE}; kill -CONT {os.getpid()}"
            wakers.append(subprocess.Popen(["sh", "-c", waker]))  # noqa: ASYNC220 - on purpose
            os.kill(os.getpid(), signal.SIGSTOP)
        await asyncio.sleep(0)
        return "done"

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> str:
        return str(await ctx.run(paused))

    async with app:
        handle = await app.start(wf)
        assert await handle.result(timeout=20) == "done"
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    for waker in wakers:
        waker.wait()
    assert calls == [1, 1]
    assert [(a.attempt, a.error_type) for a in attempts] == [(1, None)]


async def test_a_handler_is_not_resumed_past_a_stall_longer_than_its_fence(
    sqlite_url: str,
) -> None:
    """The same guard on handler bodies, for a pause of the whole process (a real
    SIGSTOP; a store outage leaves handlers running): stopped at its await instead of
    going on to its effect, the event is handed back and handled again."""
    app = make_app(sqlite_url, lease=LEASE)
    began = asyncio.Event()
    gate = asyncio.Event()
    outcomes: list[tuple[int, str]] = []

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event[dict[str, int]], ctx: cantata.HandlerContext) -> None:
        began.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            outcomes.append((ctx.attempt, "stopped"))
            raise
        outcomes.append((ctx.attempt, "billed"))

    async with app:
        await app.publish("order.placed", {"id": 1})
        await asyncio.wait_for(began.wait(), 10)
        waker = f"sleep {LEASE}; kill -CONT {os.getpid()}"
        wakers: list[subprocess.Popen[bytes]] = []

        def pause() -> None:
            wakers.append(subprocess.Popen(["sh", "-c", waker]))
            os.kill(os.getpid(), signal.SIGSTOP)

        asyncio.get_running_loop().call_soon(pause)
        gate.set()
        deadline = time.monotonic() + 15
        while not any(what == "billed" for _, what in outcomes):
            assert time.monotonic() < deadline, outcomes
            await asyncio.sleep(0.05)
    for w in wakers:
        w.wait()
    assert [what for _, what in outcomes] == ["stopped", "billed"]


async def test_a_body_the_engine_fences_stops_at_once_and_the_run_goes_on(
    sqlite_url: str,
) -> None:
    """The body runs in its run's own task (cantata.fencing.InlineBody): the engine's
    fence stops it at its await, as it stopped a body's task, and takes its cancel back,
    so the run's execution (not cancelled, not launched anew) starts the same attempt
    again once its hold is sure and goes on to the next step.
    (A cancel of the run's task by anyone else, a stop past its grace, goes through the
    body as before: tests/engine/test_leases.py.)"""
    app = make_app(sqlite_url, lease=LEASE)
    began = asyncio.Event()
    outcomes: list[tuple[int, str]] = []

    @app.step(retry=Retry(max_attempts=1))
    async def pay() -> str:
        attempt = cantata.step_info().attempt
        began.set()
        try:
            await asyncio.sleep(0.3 if outcomes else 60)
        except asyncio.CancelledError:
            outcomes.append((attempt, "stopped"))
            raise
        outcomes.append((attempt, "charged"))
        return "paid"

    @app.step(timeout=5.0)
    async def ship(paid: str) -> str:
        await asyncio.sleep(0.05)
        return f"{paid}, shipped"

    entered: list[str] = []

    @app.workflow
    async def checkout(ctx: cantata.WorkflowContext) -> str:
        entered.append(ctx.run_id)
        return str(await ctx.run(ship, await ctx.run(pay)))

    async with app:
        handle = await app.start(checkout)
        await asyncio.wait_for(began.wait(), 10)
        t0 = time.monotonic()
        app.engine.fence_self()
        assert await handle.result(timeout=10) == "paid, shipped"
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    assert time.monotonic() - t0 < 5  # stopped at once, not after its 60 s sleep
    assert outcomes == [(1, "stopped"), (1, "charged")]
    assert [(a.key, a.attempt, a.error_type) for a in attempts] == [
        ("pay#1", 1, None), ("ship#1", 1, None)]
    assert entered == [handle.run_id]  # one execution went on: not ended and launched anew


@pytest.mark.parametrize("kind", ["plain", "transactional"])
async def test_a_step_of_a_cancelled_branch_stopped_by_its_fence_ends_as_it_will(
    sqlite_url: str, kind: str
) -> None:
    """A timeout of the workflow's code cancels the branch of a step in progress (it
    ends as it will, docs/guide.md), then the engine's fence stops the step's body (its
    worker's hold in doubt, docs/leases.md). The stopped attempt is still the one in
    progress: it starts again once the hold is sure, as any fenced attempt does, and
    the step ends as it will; its history entry says how (``completed``, its branch
    cancelled), and so does the console's API. Before, the step was stopped for good
    (its branch to begin nothing new): its entry stayed ``running`` and its attempt
    open in a run that went on to its fallback and completed (shown ``interrupted``,
    not ``cancelled``), and a transactional step's row was never written."""
    from tests.server.test_cli_json import api_json
    from tests.server.test_run_marks import console

    app = make_app(sqlite_url, lease=LEASE)
    began = asyncio.Event()
    calls: list[str] = []

    async def body(tx: cantata.Tx | None) -> int:
        calls.append("began")
        began.set()
        await asyncio.sleep(0.2 if len(calls) > 1 else 60)
        if tx is not None:
            await tx.execute("INSERT INTO held (n) VALUES (?)", len(calls))
        calls.append("ended")
        return len(calls)

    if kind == "transactional":
        @app.transaction(name="hold", retry=Retry(max_attempts=1))
        async def hold_tx(tx: cantata.Tx) -> int:
            return await body(tx)
        hold: Any = hold_tx
    else:
        @app.step(name="hold", retry=Retry(max_attempts=1))
        async def hold_plain() -> int:
            return await body(None)
        hold = hold_plain

    @app.step
    async def fallback() -> str:
        return "fell back"

    @app.workflow
    async def timed(ctx: cantata.WorkflowContext) -> str:
        try:
            async with asyncio.timeout(0.05):
                await ctx.run(hold)
        except TimeoutError:
            return str(await ctx.run(fallback))
        return "in time"

    async with app, console(app) as shop:
        lite = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"), timeout=10)
        lite.execute("CREATE TABLE held (n INTEGER)")
        lite.commit()
        handle = await app.start(timed)
        await asyncio.wait_for(began.wait(), 10)
        await asyncio.sleep(0.3)  # (the timeout's timer, due earlier, has gone off)
        app.engine.fence_self()
        assert await handle.result(timeout=10) == "fell back"
        history = {e.key: e for e in await app.store.load_history(app.name, handle.run_id)}
        attempts = await app.store.load_attempts(app.name, handle.run_id)
        detail = await api_json(shop, f"/api/runs/{handle.run_id}")
    rows = lite.execute("SELECT n FROM held").fetchall()
    lite.close()
    entry = history["hold#1"]
    assert (entry.status, entry.result) == ("completed", "3"), entry
    assert calls == ["began", "began", "ended"]  # stopped, then begun again as attempt 1
    assert branch_cancelled(entry), entry
    assert [(a.key, a.attempt, a.error_type, a.ended_at is not None) for a in attempts
            if a.key == "hold#1"] == [("hold#1", 1, None, True)]
    [step] = [s for s in detail["steps"] if s["key"] == "hold#1"]
    assert (step["status"], step["cancelled"]) == ("completed", True), step
    assert rows == ([(2,)] if kind == "transactional" else [])  # the stopped try left none


async def test_a_fenced_step_outwaits_a_slow_first_heartbeat_without_a_cancel(
    sqlite_url: str,
) -> None:
    """After a pause the fenced step waits for its worker's next heartbeat, a quarter
    lease at a time (Ownership.regained). When that heartbeat takes longer (the store
    busy with every worker coming back at once, as in
    tests/faults/test_pause.py::test_pause_of_every_worker_past_lease_sqlite), the wait
    times out and looks again; its timeout must not cancel the run's task, which takes
    a cancel during a step for the workflow code's own (engine/branches.py, RunTask).
    Before the fix it did: the run's task ended cancelled, the run, still owned here,
    was launched anew, and the attempt the pause cut was charged ``WorkerLost``; with
    one attempt, the run failed although no worker was lost."""
    app = make_app(sqlite_url, lease=LEASE)
    began = asyncio.Event()
    outcomes: list[tuple[int, str]] = []

    @app.step(retry=Retry(max_attempts=1))
    async def pay() -> str:
        attempt = cantata.step_info().attempt
        began.set()
        try:
            await asyncio.sleep(0.3 if outcomes else 60)
        except asyncio.CancelledError:
            outcomes.append((attempt, "stopped"))
            raise
        outcomes.append((attempt, "charged"))
        return "paid"

    entered: list[str] = []

    @app.workflow
    async def checkout(ctx: cantata.WorkflowContext) -> str:
        entered.append(ctx.run_id)
        return str(await ctx.run(pay))

    async with app:
        handle = await app.start(checkout)
        await asyncio.wait_for(began.wait(), 10)
        store = app.store
        real = store.heartbeat
        slow_until = time.monotonic() + LEASE * 0.6  # past two of the step's waits

        async def slow_heartbeat(*args: object, **kwargs: object) -> None:
            await real(*args, **kwargs)  # type: ignore[arg-type]
            await asyncio.sleep(max(0.0, slow_until - time.monotonic()))

        store.heartbeat = slow_heartbeat  # type: ignore[method-assign]
        try:
            # As a pause past the fence leaves it: the last heartbeat a lease ago,
            # the watchdog stopping the bodies.
            app.engine.ownership.beat_at = time.monotonic() - LEASE
            app.engine.fence_self()
            assert await handle.result(timeout=10) == "paid"
        finally:
            store.heartbeat = real  # type: ignore[method-assign]
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    assert outcomes == [(1, "stopped"), (1, "charged")]
    assert [(a.key, a.attempt, a.error_type) for a in attempts] == [("pay#1", 1, None)]
    assert entered == [handle.run_id]  # one execution went on: not ended and launched anew



async def test_a_step_begun_again_after_a_pause_is_excused_under_its_first_start(
    sqlite_url: str,
) -> None:
    """A step stopped by a pause begins again under the same attempt number, and the
    store keeps that attempt's first start time (the store contract). When the run is
    then taken from this worker (its hold lapsed once more: a host starved of CPU, as
    in the fault suite under heavy load), the new owner charges the attempt
    ``WorkerLost`` under that first start time, and this worker's excuse, which names
    the attempt by its start time, must name the same. Before the fix it named the
    second begin's time, matched nothing, and the attempt stayed charged."""
    app = make_app(sqlite_url, lease=LEASE)
    begins: list[int] = []
    gate = asyncio.Event()

    @app.step(retry=Retry(max_attempts=1))
    async def pay() -> str:
        begins.append(cantata.step_info().attempt)
        await gate.wait()
        return "paid"

    @app.workflow
    async def checkout(ctx: cantata.WorkflowContext) -> str:
        return str(await ctx.run(pay))

    async with app:
        handle = await app.start(checkout)
        await eventually(lambda: begins == [1])
        await asyncio.sleep(0.05)  # the second begin's clock is not the first's
        app.engine.ownership.beat_at = time.monotonic() - LEASE  # a pause past the fence
        app.engine.fence_self()
        await eventually(lambda: begins == [1, 1], 10, "the same attempt begun again")
        # Another worker takes the run over and charges the attempt in progress, under
        # the start time the store has (as steps.prior_attempts does).
        store, now = app.store, app.clock.now()
        await store.heartbeat(app.name, "other", now, None, lease=3600)
        [taken] = await store.claim_runs(app.name, "other", ["checkout"],
                                         stale_before=now + 60, limit=1)
        [stored] = await store.load_attempts(app.name, handle.run_id)
        await store.commit_run(app.name, handle.run_id, taken.fence, RunWrite(attempts=[
            Attempt(stored.key, stored.attempt, stored.started_at, now, "WorkerLost", "lost")]))
        gate.set()  # this worker's body ends; its checkpoint finds the run taken

        async def excused() -> bool:
            [a] = await store.load_attempts(app.name, handle.run_id)
            return a.error_type == "Paused"

        await eventually(excused, 10, "the attempt excused (Paused)")
        [after] = await store.load_attempts(app.name, handle.run_id)
    assert (after.attempt, after.started_at, after.error_type) == (
        1, stored.started_at, "Paused")


async def test_a_body_whose_hold_lapsed_before_it_began_never_runs_its_first_line() -> None:
    """The guard is asked before the body's first line too, not only at its awaits: a
    stall between a step's start checkpoint and its body stops the body before any of
    its code runs. (A stall landing inside the body's first synchronous stretch cannot
    be stopped; the fault suite tells that case apart, tests/faults/counters.py.)"""
    from cantata.fencing import InlineBody

    ran: list[str] = []

    async def body() -> str:
        ran.append("first line")  # the side effect a step makes before any await
        await asyncio.sleep(0)
        return "done"

    async def run(lapsed: bool) -> str:
        me = asyncio.current_task()
        assert me is not None
        return await InlineBody(body(), lambda: lapsed, lambda seconds: None, 1.0, me)

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(run(lapsed=True))
    assert ran == []
    assert await asyncio.create_task(run(lapsed=False)) == "done"
    assert ran == ["first line"]


@pytest.mark.parametrize("limit", ["concurrency", "rate"])
async def test_a_limited_step_whose_body_returned_before_a_pause_is_not_run_again(
    sqlite_url: str, limit: str
) -> None:
    """This process is really stopped (SIGSTOP) past the fence in the last line of a
    limited step's body: once it runs again the body returns, and what follows (its
    slot's release) is the engine's, not the body's: the result is kept and recorded
    by the run's fenced checkpoint (no other worker could take the run: this one is
    alone), not thrown away with the step run a second time. (It was, when the pause
    was noticed during the slot's release.)"""
    app = make_app(sqlite_url, lease=LEASE)
    calls: list[int] = []
    wakers: list[subprocess.Popen[bytes]] = []
    limits: dict[str, Any] = (
        {"concurrency": 1} if limit == "concurrency" else {"rate": cantata.Rate(100, 1.0)})

    @app.step(retry=Retry(max_attempts=3), **limits)
    async def charge() -> str:
        calls.append(cantata.step_info().attempt)
        await asyncio.sleep(0.05)
        if len(calls) == 1:
            waker = f"sleep {LEASE * 1.5}; kill -CONT {os.getpid()}"
            wakers.append(subprocess.Popen(["sh", "-c", waker]))  # noqa: ASYNC220 - on purpose
            os.kill(os.getpid(), signal.SIGSTOP)
        return "charged"

    @app.workflow
    async def wf(ctx: cantata.WorkflowContext) -> str:
        return str(await ctx.run(charge))

    async with app:
        handle = await app.start(wf)
        assert await handle.result(timeout=20) == "charged"
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    for waker in wakers:
        waker.wait()
    assert calls == [1]  # the body ran once
    assert [(a.attempt, a.error_type) for a in attempts] == [(1, None)]
