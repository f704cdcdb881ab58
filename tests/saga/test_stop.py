"""Cancelling a saga, or its deadline passing, stops it: no later step starts, what
finished is undone. A cancel lets the step in flight finish (both modes); the deadline
cuts an orchestrated step in flight, as its timeout would (a choreographed step runs
in another service's handler: it finishes, then is undone)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cantata
from cantata import App, Saga, Step
from tests.engine.helpers import eventually, make_app

from .test_modes import MODES


def gated(mode: str, calls: list[str], gate: asyncio.Event) -> App:
    app = make_app("memory://", name=f"stop-{mode}")

    def make(name: str) -> Step:
        async def action(order: dict[str, Any]) -> str:
            calls.append(name)
            if name == "charge":
                await gate.wait()
            return name

        async def undo(order: dict[str, Any], result: str) -> None:
            calls.append(f"undo {result}")

        action.__name__, undo.__name__ = name, f"undo_{name}"
        return Step(app.step(action), compensate=app.step(undo))

    app.include(Saga("order", make("reserve"), make("charge"), make("ship"),
                     mode=mode))  # type: ignore[arg-type]
    return app


@pytest.mark.parametrize("mode", MODES)
async def test_a_cancelled_saga_undoes_what_finished_and_ends_cancelled(mode: str) -> None:
    calls: list[str] = []
    gate = asyncio.Event()
    app = gated(mode, calls, gate)
    async with app:
        handle = await app.start("order", {"id": 1})
        await eventually(lambda: "charge" in calls)
        await handle.cancel()
        await asyncio.sleep(0.2)
        gate.set()
        with pytest.raises(cantata.WorkflowCancelled) as info:
            await handle.result(timeout=10)
    assert calls == ["reserve", "charge", "undo charge", "undo reserve"]
    assert info.value.error == "Cancelled: the run was cancelled"


@pytest.mark.parametrize("mode", MODES)
async def test_a_saga_past_its_deadline_compensates(mode: str) -> None:
    calls: list[str] = []
    gate = asyncio.Event()
    app = gated(mode, calls, gate)
    async with app:
        handle = await app.start("order", {"id": 1}, deadline=0.3)
        await asyncio.sleep(0.6)
        gate.set()
        with pytest.raises(cantata.WorkflowCompensated) as info:
            await handle.result(timeout=10)
    if mode == "orchestrated":  # charge was cut at the deadline: it never finished
        assert calls == ["reserve", "charge", "undo reserve"]
    else:
        assert calls == ["reserve", "charge", "undo charge", "undo reserve"]
    assert info.value.error == f"DeadlineExceeded: run {handle.run_id} passed its deadline"
