"""Property: whatever the saga's shape and wherever it fails, both modes undo exactly
the steps that finished, in reverse (a failed parallel stage's finished branches
first, in reverse declaration order), each with the result of the step it undoes."""

from __future__ import annotations

from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cantata
from cantata import App, Parallel, Retry, Saga, Step
from tests.engine.helpers import make_app

from .test_modes import MODES

ONCE = Retry(max_attempts=1)


@st.composite
def shapes(draw: st.DrawFn) -> tuple[list[list[tuple[str, bool]]], str]:
    """Stages of (step name, has a compensation), and the step that fails."""
    stages = []
    n = 0
    for _ in range(draw(st.integers(1, 4))):
        width = draw(st.sampled_from([1, 1, 2, 3]))
        stage = []
        for _ in range(width):
            n += 1
            stage.append((f"s{n}", draw(st.booleans())))
        stages.append(stage)
    fail = draw(st.sampled_from([name for stage in stages for name, _ in stage]))
    return stages, fail


def build(mode: str, stages: list[list[tuple[str, bool]]], undone: list[Any]) -> App:
    app = make_app("memory://", name=f"prop-{mode}")

    def make(name: str, undoable: bool) -> Step:
        async def action(order: dict[str, Any]) -> str:
            if order["fail"] == name:
                raise ValueError(f"{name} refused")
            return f"{name}-result"

        async def undo(order: dict[str, Any], result: str) -> None:
            undone.append((name, result))

        action.__name__, undo.__name__ = name, f"undo_{name}"
        return Step(app.step(retry=ONCE)(action),
                    compensate=app.step(undo) if undoable else None)

    items: list[Step | Parallel] = []
    for stage in stages:
        made = [make(name, undoable) for name, undoable in stage]
        items.append(made[0] if len(made) == 1 else Parallel(*made))
    app.include(Saga("order", *items, mode=mode))  # type: ignore[arg-type]
    return app


def expected(stages: list[list[tuple[str, bool]]], fail: str) -> list[str]:
    for i, stage in enumerate(stages):
        names = [n for n, _ in stage]
        if fail in names:
            own = [n for n, u in reversed(stage) if u and n != fail]
            before = [n for s in reversed(stages[:i]) for n, u in reversed(s) if u]
            return own + before
    raise AssertionError(fail)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shape=shapes())
async def test_compensation_order_in_both_modes(
    shape: tuple[list[list[tuple[str, bool]]], str],
) -> None:
    stages, fail = shape
    want = expected(stages, fail)
    for mode in MODES:
        undone: list[Any] = []
        app = build(mode, stages, undone)
        async with app:
            handle = await app.start("order", {"fail": fail})
            try:
                await handle.result(timeout=20)
            except cantata.WorkflowError as exc:
                status = exc.status
        assert status == ("compensated" if want else "failed"), mode
        assert undone == [(n, f"{n}-result") for n in want], mode
