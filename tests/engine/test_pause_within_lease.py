"""A pause of the whole process past the fence (3/4 of the lease) but within the lease
(docs/leases.md, "Paused"): the heartbeat sent after it proves the worker's hold never
lapsed (the store found its expiry not passed at the renewal, by its own clock too), so
a handler body in progress goes on, once: it is not stopped and run again. A pause
past the lease still stops it.

The pauses are real: this process is stopped (SIGSTOP, a child sends SIGCONT), right
after a heartbeat got through, so the worker's pause-clock thread and its monotonic
clock see the pause as they would a VM stall or CPU starvation.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, Retry
from cantata.engine.ownership import FENCE_AT
from cantata.fencing import GuardedBody, InlineBody
from tests.helpers import with_schema

from .helpers import eventually, make_app
from .test_outage_pause import stop_this_process

# A lease long enough that a pause past its fence (3.75 s) leaves the heartbeat after it
# a second to get through within the lease, on a loaded machine too.
LEASE = 5.0
WITHIN = 0.8 * LEASE  # past the fence, within the lease
PAST = LEASE + 1.0


async def just_after_a_heartbeat(app: App) -> None:
    """Return as soon as the worker's next heartbeat has got through."""
    ownership = app.engine.ownership
    before = ownership.beat_at
    deadline = time.monotonic() + 3 * LEASE
    while ownership.beat_at == before:
        assert time.monotonic() < deadline, "no heartbeat got through"
        await asyncio.sleep(0.002)


async def handler_across_a_pause(store: str, seconds: float) -> tuple[list[str], int]:
    """A handler body waits while this process is stopped for ``seconds``, from just
    after a heartbeat; it is woken as the process resumes. Returns what its bodies did,
    and the pauses the worker counted as possibly lapsed (``Ownership.pauses``)."""
    app = make_app(store, lease=LEASE)
    began, gate = asyncio.Event(), asyncio.Event()
    outcomes: list[str] = []

    @app.on("order.placed", group="billing")
    async def bill(event: cantata.Event[dict[str, int]]) -> None:
        began.set()
        try:
            await gate.wait()
        except asyncio.CancelledError:
            outcomes.append("stopped")
            raise
        outcomes.append("billed")  # the side effect

    async with app:
        await app.publish("order.placed", {"id": 1})
        await asyncio.wait_for(began.wait(), 20)
        await just_after_a_heartbeat(app)
        stop_this_process(seconds)  # (no await: the loop stands still too)
        gate.set()  # the body's wake-up, queued as the process resumes
        await eventually(lambda: "billed" in outcomes, 30, "the event handled")
        pauses = app.engine.ownership.pauses
    return outcomes, pauses


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def embedded_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store whose deliveries the embedded broker hands out (held by each worker's
    lease in the store alone): a SQLite file, or a PostgreSQL schema of this test's."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shop.db"
    url: str = request.getfixturevalue("postgres_url")
    return with_schema(url, request.getfixturevalue("pooled_schema"))


@pytest.mark.slow
async def test_a_pause_within_the_lease_lets_the_handler_go_on(embedded_store: str) -> None:
    """Stopped for 0.8 of the lease: past the fence, so the body's guard holds it at its
    wake-up, until the heartbeat sent after the pause answers; that heartbeat proves
    the hold never lapsed, and the body goes on, once (before: it was stopped, its
    event handed back, and the same worker ran it again)."""
    assert LEASE * FENCE_AT < WITHIN < LEASE
    outcomes, pauses = await handler_across_a_pause(embedded_store, WITHIN)
    assert outcomes == ["billed"], outcomes
    assert pauses == 0


@pytest.mark.slow
async def test_a_pause_past_the_lease_still_stops_the_handler(shared_store: str) -> None:
    """Stopped for longer than the lease: the hold lapsed (another worker could have
    taken the delivery), the heartbeat after the pause proves nothing, and the body is
    stopped, its event handed back and handled again."""
    outcomes, pauses = await handler_across_a_pause(shared_store, PAST)
    assert outcomes == ["stopped", "billed"], outcomes
    assert pauses == 1


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.nats
async def test_a_pause_within_the_lease_still_stops_a_nats_handler(distributed_url: str) -> None:
    """A NATS message is not held by the worker's lease alone: NATS delivers it again
    once its ack wait (the lease) has passed since the last "in progress" the worker
    sent, whatever the store says, and a paused worker sent none. The heartbeat after
    the pause proves the store's hold (no pause counted as lapsed), but the handler body
    is stopped all the same and its event handled again. (Let go on, it ran beside
    another worker's copy in the fault suite: tests/faults/test_pause.py.)"""
    outcomes, pauses = await handler_across_a_pause(distributed_url, WITHIN)
    assert outcomes == ["stopped", "billed"], outcomes
    assert pauses == 0


async def step_across_a_pause(store: str, seconds: float) -> tuple[list[tuple[int, str]], Any]:
    """A step body waits while this process is stopped for ``seconds``, from just after
    a heartbeat; it is woken as the process resumes. Returns what its bodies did (by
    attempt), and the run's attempts as the store has them."""
    app = make_app(store, lease=LEASE)
    began, gate = asyncio.Event(), asyncio.Event()
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
        await asyncio.wait_for(began.wait(), 20)
        await just_after_a_heartbeat(app)
        stop_this_process(seconds)  # (no await: the loop stands still too)
        gate.set()  # the body's wake-up, queued as the process resumes
        assert await handle.result(timeout=30) == "paid"
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    return outcomes, [(a.attempt, a.error_type) for a in attempts]


@pytest.mark.slow
async def test_a_pause_within_the_lease_lets_the_step_go_on(shared_store: str) -> None:
    """The same for a step body: held at its wake-up until the heartbeat after the
    pause answers, then let go on, once (before: stopped at once, and begun again as
    the same attempt once the run proved still this worker's: the body twice)."""
    outcomes, attempts = await step_across_a_pause(shared_store, WITHIN)
    assert outcomes == [(1, "charged")], outcomes
    assert attempts == [(1, None)]


@pytest.mark.slow
async def test_a_pause_past_the_lease_still_stops_the_step(shared_store: str) -> None:
    """Past the lease: stopped, and begun again as the same attempt (not counted)."""
    outcomes, attempts = await step_across_a_pause(shared_store, PAST)
    assert outcomes == [(1, "stopped"), (1, "charged")], outcomes
    assert attempts == [(1, None)]


@pytest.mark.parametrize("inline", [True, False], ids=["InlineBody", "GuardedBody"])
@pytest.mark.parametrize("held", [True, False], ids=["held", "lapsed"])
async def test_a_guard_holds_a_body_until_its_verdict(inline: bool, held: bool) -> None:
    """A guard that answers with a future (a verdict still to come) holds the body: its
    wake-up waits, neither resumed nor stopped, until the future is done; then the guard
    is asked again, and the body goes on (the hold never lapsed) or is stopped."""
    loop = asyncio.get_running_loop()
    verdict: asyncio.Future[bool] = loop.create_future()
    gate = asyncio.Event()
    done: list[str] = []

    def fenced() -> bool | asyncio.Future[bool]:
        if not gate.is_set():
            return False  # (until the body waits: its first resumption goes on)
        return verdict if not verdict.done() else not verdict.result()

    async def body() -> str:
        try:
            await gate.wait()
        except asyncio.CancelledError:
            done.append("stopped")
            raise
        done.append("went on")
        return "ok"

    async def run() -> str:
        if inline:
            me = asyncio.current_task()
            assert me is not None
            return await InlineBody(body(), fenced, lambda _: None, 10.0, me, in_body=False)
        return await asyncio.ensure_future(GuardedBody(body(), fenced, lambda _: None, 10.0))

    task = asyncio.ensure_future(run())
    await asyncio.sleep(0.01)
    gate.set()  # the body's wake-up, while the verdict is pending
    for _ in range(20):
        await asyncio.sleep(0)
    assert done == [] and not task.done(), "the body was not held"
    verdict.set_result(held)
    if held:
        assert await task == "ok"
        assert done == ["went on"]
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done == ["stopped"]
