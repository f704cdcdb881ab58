"""ctx.compensate(): explicit compensation, replay-safe; what catching StepFailed does."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from cantata import (
    App,
    Retry,
    RunStatus,
    StepFailed,
    WorkflowCompensated,
    WorkflowContext,
    WorkflowFailed,
)

from .helpers import eventually, history_keys, make_app

ONCE = Retry(max_attempts=1)


def trip_app(store_url: str, booked: dict[str, list[str]], *, compensate: bool = True) -> App:
    """Temporal's trip-booking sample: book car, hotel and flight, each with its undo;
    a failure after them is caught, the bookings are compensated, and the workflow
    returns "Booking canceled"."""
    app = make_app(store_url)

    def book(kind: str) -> Any:
        async def do(trip: dict[str, Any]) -> str:
            booked[kind].append(trip["id"])
            return f"{kind}-{trip['id']}"

        async def undo(trip: dict[str, Any]) -> None:
            booked[kind].remove(trip["id"])

        do.__name__, undo.__name__ = f"book_{kind}", f"undo_{kind}"
        return app.step(do), app.step(undo)

    book_car, undo_car = book("car")
    book_hotel, undo_hotel = book("hotel")
    book_flight, undo_flight = book("flight")

    @app.step(retry=ONCE)
    async def confirm(trip: dict[str, Any]) -> None:
        raise RuntimeError("card declined")

    @app.workflow
    async def book_trip(ctx: WorkflowContext, trip: dict[str, Any]) -> str:
        try:
            await ctx.run(book_car, trip, compensate=undo_car)
            await ctx.run(book_hotel, trip, compensate=undo_hotel)
            await ctx.run(book_flight, trip, compensate=undo_flight)
            await ctx.run(confirm, trip)
        except StepFailed:
            if compensate:
                await ctx.compensate()
            return "Booking canceled"
        return "Booked"

    return app


async def test_trip_sample_compensates_and_returns(store_url: str) -> None:
    booked: dict[str, list[str]] = {"car": [], "hotel": [], "flight": []}
    app = trip_app(store_url, booked)
    async with app:
        handle = await app.start("book_trip", {"id": "t1"})
        with pytest.raises(WorkflowCompensated) as info:
            await handle.result(timeout=20)
        assert info.value.result == "Booking canceled"
        assert await handle.status() == RunStatus.COMPENSATED
        assert booked == {"car": [], "hotel": [], "flight": []}  # the flight is un-booked
        keys = await history_keys(app, handle.run_id)
        assert keys[-3:] == ["compensate:undo_flight#1", "compensate:undo_hotel#1",
                             "compensate:undo_car#1"]


async def test_catching_step_failed_without_compensate_keeps_bookings_and_warns(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    booked: dict[str, list[str]] = {"car": [], "hotel": [], "flight": []}
    app = trip_app(store_url, booked, compensate=False)
    with caplog.at_level(logging.WARNING, logger="cantata"):
        async with app:
            handle = await app.start("book_trip", {"id": "t2"})
            assert await handle.result(timeout=20) == "Booking canceled"
    assert booked == {"car": ["t2"], "hotel": ["t2"], "flight": ["t2"]}
    warned = [r.getMessage() for r in caplog.records if "were not run" in r.getMessage()]
    assert warned and handle.run_id in warned[0]
    assert "undo_flight, undo_hotel, undo_car" in warned[0]


async def test_compensate_twice_runs_only_what_was_registered_since(store_url: str) -> None:
    app = make_app(store_url)
    undone: list[str] = []

    @app.step
    async def act(name: str) -> str:
        return name

    @app.step
    async def undo(name: str) -> None:
        undone.append(name)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> list[int]:
        await ctx.run(act, "a", compensate=undo)
        await ctx.run(act, "b", compensate=undo)
        first = await ctx.compensate()
        await ctx.run(act, "c", compensate=undo)
        second = await ctx.compensate()
        third = await ctx.compensate()  # nothing registered since: runs nothing
        return [first, second, third]

    async with app:
        handle = await app.start(wf)
        with pytest.raises(WorkflowCompensated) as info:
            await handle.result(timeout=20)
        assert info.value.result == [2, 1, 0]
        assert undone == ["b", "a", "c"]
        keys = await history_keys(app, handle.run_id)
        assert [k for k in keys if k.startswith("compensate:")] == [
            "compensate:undo#1", "compensate:undo#2", "compensate:undo#3"
        ]


async def test_a_workflow_may_go_on_after_compensate_and_a_later_failure_unwinds_the_rest(
    store_url: str,
) -> None:
    app = make_app(store_url)
    undone: list[str] = []

    @app.step
    async def act(name: str) -> str:
        return name

    @app.step
    async def undo(name: str) -> None:
        undone.append(name)

    @app.step(retry=ONCE)
    async def boom(name: str) -> None:
        raise ValueError(name)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(act, "a", compensate=undo)
        await ctx.compensate()
        await ctx.run(act, "b", compensate=undo)
        await ctx.run(boom, "x")  # fails the run: the unwind runs only "b"'s undo

    async with app:
        handle = await app.start(wf)
        with pytest.raises(WorkflowCompensated):
            await handle.result(timeout=20)
        assert undone == ["a", "b"]


async def test_a_failing_compensation_raises_step_failed_after_trying_the_others(
    store_url: str,
) -> None:
    app = make_app(store_url)
    undone: list[str] = []

    @app.step
    async def act(name: str) -> str:
        return name

    @app.step(retry=ONCE)
    async def undo(name: str) -> None:
        if name == "b":
            raise RuntimeError("cannot undo b")
        undone.append(name)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        await ctx.run(act, "a", compensate=undo)
        await ctx.run(act, "b", compensate=undo)
        await ctx.compensate()
        return "unreachable"

    async with app:
        handle = await app.start(wf)
        with pytest.raises(WorkflowFailed) as info:
            await handle.result(timeout=20)
        assert "compensation failed" in str(info.value) and "cannot undo b" in str(info.value)
        assert undone == ["a"]
        assert (await handle.info()).flagged


def _resumable(store_url: str, undone: list[str]) -> App:
    app = make_app(store_url)

    @app.step
    async def act(name: str) -> str:
        return name

    @app.step
    async def undo(name: str) -> None:
        undone.append(name)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        await ctx.run(act, "a", compensate=undo)
        await ctx.compensate()
        await ctx.set_value("compensated", True)
        await ctx.wait_for_event("resume")
        await ctx.run(act, "b", compensate=undo)
        await ctx.compensate()
        return "done"

    return app


async def test_compensate_is_replay_safe(store_url: str) -> None:
    if store_url.startswith("memory://"):
        pytest.skip("a memory:// store ends with its app: there is nothing to resume")
    undone: list[str] = []
    app = _resumable(store_url, undone)
    async with app:
        handle = await app.start("wf")
        assert await handle.get_value("compensated", wait=10) is True
        await eventually(lambda: _waiting(app, handle.run_id))
    resumed = _resumable(store_url, undone)  # replays history: "a" is not undone again
    async with resumed:
        await resumed.publish("resume", {})
        with pytest.raises(WorkflowCompensated) as info:
            await resumed.get_handle(handle.run_id).result(timeout=20)
        assert info.value.result == "done"
    assert undone == ["a", "b"]


async def _waiting(app: App, run_id: str) -> bool:
    return any(e.kind == "wait" for e in await app.store.load_history(app.name, run_id))
