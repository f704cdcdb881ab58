"""A VM paused and resumed (docs/leases.md, "Paused"): its monotonic clock stood still
while its wall clock, which the store and the other workers judge its lease by, jumps
ahead when it resumes. The paused worker must judge its own hold by the wall clock too:
it stops its step and handler bodies at once, before another worker's takeover can
make them run twice.

The pause is simulated with the app's injected clock (the system's wall clock plus an
offset the test sets ahead) while monotonic time runs on as usual: no more of it passes
than the other worker needs to take over (the paused worker's event loop is blocked
meanwhile, far less than its fence), so the monotonic clock alone tells the paused
worker nothing, as in a real VM pause.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import cantata
from cantata import App, Retry

from .helpers import eventually, make_app

LEASE = 2.0  # its fence, 1.5 s, well above the time the other worker needs to take over
JUMP = 20.0  # as the pause in CI (dmesg: "crng reseeded due to virtual machine fork")


class WallClock:
    """The system's wall clock, ``ahead`` seconds ahead (a paused VM's, once resumed)."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def now(self) -> float:
        return time.time() + self.ahead

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))


class OtherWorker:
    """Another worker, on another host whose clock agrees with the resumed VM's: an app
    on the same store in a thread of its own (its own event loop), so it runs while the
    paused worker's loop does not."""

    def __init__(self, build: Callable[[str], App], began: threading.Event) -> None:
        self.build = build
        self.began = began  # its body (step or handler) began
        self.done = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        async with self.build("B"):
            await asyncio.to_thread(self.done.wait)

    async def stop(self) -> None:
        self.done.set()
        await asyncio.to_thread(self.thread.join, 10)


def pause_vm(clock: WallClock, other: OtherWorker) -> None:
    """Called on the paused worker's loop: its wall clock jumps ahead, and the other
    worker starts and takes over before this loop runs again."""
    clock.ahead += JUMP
    other.thread.start()
    assert other.began.wait(10), "the other worker did not take over"


class Bodies:
    """What the bodies of the paused worker (A) and the other one (B) did."""

    def __init__(self) -> None:
        self.began: dict[str, threading.Event] = {"A": threading.Event(),
                                                   "B": threading.Event()}
        self.effects: list[str] = []  # their side effects
        self.stopped: list[str] = []  # stopped before it


def a_step_app(url: str, clock: WallClock, bodies: Bodies) -> Callable[[str], App]:
    def build(name: str) -> App:
        app = make_app(url, clock=clock, lease=LEASE)

        # (B charges A's attempt WorkerLost and runs another; A, resumed, excuses it)
        @app.step(retry=Retry(max_attempts=3, initial_interval=0.01))
        async def pay() -> str:
            bodies.began[name].set()
            try:
                # A's wake-up is due after its first heartbeat past the pause, as a
                # paused VM's timers are (they stood still with its monotonic clock).
                await asyncio.sleep(1.5 if name == "A" else 0.1)
            except asyncio.CancelledError:
                bodies.stopped.append(name)
                raise
            bodies.effects.append(name)  # the side effect
            return "paid"

        @app.workflow
        async def checkout(ctx: cantata.WorkflowContext) -> str:
            return str(await ctx.run(pay))

        return app

    return build


async def test_the_hold_is_judged_by_the_wall_clock_as_well(sqlite_url: str) -> None:
    """``expired()`` is true once the wall clock says the fence has passed, monotonic
    time or not; a wall clock set back does not make the hold last longer than
    monotonic time says. A running worker notices the jump, heartbeats and holds again."""
    clock = WallClock()
    app = a_step_app(sqlite_url, clock, Bodies())("A")
    async with app:
        ownership = app.engine.ownership
        assert not ownership.expired()
        clock.ahead = JUMP  # (no await: nothing of the worker runs meanwhile)
        assert ownership.expired()
        clock.ahead = -JUMP
        assert not ownership.expired()
        ownership.beat_at = time.monotonic() - LEASE  # silent for a lease, monotonic
        assert ownership.expired()
        clock.ahead = 0.0
        await eventually(lambda: not ownership.expired(), 5)
        before = ownership.pauses
        clock.ahead = JUMP
        await eventually(lambda: ownership.pauses == before + 1 and not ownership.expired(),
                         5, "the pause noticed, the hold sure again")


async def test_a_paused_vms_step_body_stops_and_the_new_owner_runs_it_once(
    sqlite_url: str,
) -> None:
    clock, bodies = WallClock(), Bodies()
    build = a_step_app(sqlite_url, clock, bodies)
    other = OtherWorker(build, bodies.began["B"])
    app = build("A")
    try:
        async with app:
            handle = await app.start("checkout")
            await eventually(bodies.began["A"].is_set, 10)
            asyncio.get_running_loop().call_soon(pause_vm, clock, other)
            assert await handle.result(timeout=10) == "paid"
            await eventually(lambda: "A" in bodies.stopped + bodies.effects, 5,
                             "the paused body ended")
    finally:
        await other.stop()
    assert bodies.effects == ["B"]  # the paused worker's body stopped before its effect
    assert bodies.stopped == ["A"]


def a_handler_app(url: str, clock: WallClock, bodies: Bodies, **kw: Any) -> Callable[[str], App]:
    def build(name: str) -> App:
        app = make_app(url, clock=clock, lease=LEASE, **kw)

        @app.on("order.placed", group="billing")
        async def bill(event: cantata.Event[dict[str, int]]) -> None:
            bodies.began[name].set()
            try:
                await asyncio.sleep(1.5 if name == "A" else 0.1)
            except asyncio.CancelledError:
                bodies.stopped.append(name)
                raise
            bodies.effects.append(name)

        return app

    return build


async def test_a_paused_vms_handler_stops_and_the_new_holder_runs_it_once(
    sqlite_url: str,
) -> None:
    """The paused worker's handler body resumes only after its first heartbeat past the
    pause got through (its timer stood still): its hold looks sound again by then, but
    the delivery is another worker's; it must not go on."""
    clock, bodies = WallClock(), Bodies()
    build = a_handler_app(sqlite_url, clock, bodies)
    other = OtherWorker(build, bodies.began["B"])
    app = build("A")
    try:
        async with app:
            await app.publish("order.placed", {"id": 1})
            await eventually(bodies.began["A"].is_set, 10)
            asyncio.get_running_loop().call_soon(pause_vm, clock, other)
            await eventually(lambda: "A" in bodies.stopped + bodies.effects, 5,
                             "the paused body ended")
            await eventually(lambda: "B" in bodies.effects, 5, "the new holder handled it")
    finally:
        await other.stop()
    assert bodies.effects == ["B"]
    assert bodies.stopped == ["A"]


async def test_workers_of_one_paused_vm_run_no_handler_twice_in_a_graceful_stop(
    sqlite_url: str,
) -> None:
    """The CI failure (tests/faults/test_stop.py, handlers draining on SIGTERM): both
    workers in the VM paused at once. Neither takes the other's deliveries at once
    (each lapsed itself); the draining worker's handler, resumed after its heartbeat,
    stops and hands its event back; the event is handled once in all."""
    clock, bodies = WallClock(), Bodies()
    build = a_handler_app(sqlite_url, clock, bodies, shutdown_grace=10)
    a, b = build("A"), build("B")
    async with b:
        await a.open()
        try:
            await a.publish("order.placed", {"id": 1})
            await eventually(bodies.began["A"].is_set, 10)
            closing = asyncio.ensure_future(a.close())
            await asyncio.sleep(0.05)  # draining its handler
            clock.ahead += JUMP  # both paused, both resume
            await asyncio.wait_for(closing, 10)
        finally:
            await a.close()
        await eventually(lambda: bool(bodies.effects), 10, "the event handled")
        await asyncio.sleep(0.5)  # (a second run of it would come by now)
    assert len(bodies.effects) == 1, (bodies.effects, bodies.stopped)
