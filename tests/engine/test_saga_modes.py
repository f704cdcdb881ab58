"""Declarative sagas: the same map deployed orchestrated or choreographed."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cantata
from cantata import App, Retry, Saga, Step
from cantata.engine.saga import Mode

from .helpers import make_app

MODES: tuple[Mode, ...] = ("orchestrated", "choreographed")


def build(mode: Mode, calls: list[tuple[Any, ...]], fail_at: str | None = None,
          steps: int = 3) -> App:
    app = make_app("memory://", name=f"saga-{mode}")

    def make(name: str) -> tuple[Any, Any]:
        async def action(order: dict[str, Any]) -> str:
            info = cantata.step_info()
            calls.append((name, info.attempt, info.idempotency_key.split(":", 1)[1]))
            if name == fail_at:
                raise ValueError(f"{name} refused")
            return name.upper()

        async def undo(order: dict[str, Any]) -> None:
            calls.append((f"undo-{name}",))

        action.__name__, undo.__name__ = name, f"undo_{name}"
        retry = Retry(max_attempts=2, initial_interval=0.01)
        return app.step(retry=retry)(action), app.step(undo)

    names = [f"s{i}" for i in range(1, steps + 1)]
    defs = [make(n) for n in names]
    app.include(Saga("order", *(Step(a, compensate=u) for a, u in defs), mode=mode))
    return app


async def outcome(app: App, data: dict[str, Any]) -> tuple[str, Any]:
    async with app:
        handle = await app.start("order", data)
        try:
            return "completed", await handle.result(timeout=10)
        except cantata.WorkflowError as exc:
            return exc.status, exc.error


@pytest.mark.parametrize("mode", MODES)
async def test_success_returns_every_step_result(mode: Mode) -> None:
    calls: list[tuple[Any, ...]] = []
    status, result = await outcome(build(mode, calls), {"id": 1})
    assert (status, result) == ("completed", {"s1": "S1", "s2": "S2", "s3": "S3"})
    assert [c[0] for c in calls] == ["s1", "s2", "s3"]


async def test_both_modes_fail_and_compensate_identically() -> None:
    seen = {}
    for mode in MODES:
        calls: list[tuple[Any, ...]] = []
        seen[mode] = (await outcome(build(mode, calls, fail_at="s3"), {"id": 2}), calls)
    assert seen["orchestrated"] == seen["choreographed"]
    (status, error), calls = seen["orchestrated"]
    assert status == "compensated"
    assert error == "StepFailed: step s3 failed after 2 attempt(s): ValueError: s3 refused"
    assert [c[0] for c in calls] == ["s1", "s2", "s3", "s3", "undo-s2", "undo-s1"]
    # the services see the same idempotency keys in both styles
    assert [c[2] for c in calls if len(c) == 3] == ["s1#1", "s2#1", "s3#1", "s3#1"]


@pytest.mark.parametrize("mode", MODES)
async def test_first_step_failing_ends_failed_with_nothing_to_undo(mode: Mode) -> None:
    calls: list[tuple[Any, ...]] = []
    status, error = await outcome(build(mode, calls, fail_at="s1"), {"id": 3})
    assert status == "failed" and "s1 refused" in error
    assert not [c for c in calls if c[0].startswith("undo")]


@pytest.mark.parametrize("mode", MODES)
async def test_choreographed_run_shares_the_trace(mode: Mode) -> None:
    calls: list[tuple[Any, ...]] = []
    app = build(mode, calls, fail_at="s2")
    async with app:
        handle = await app.start("order", {"id": 4})
        with pytest.raises(cantata.WorkflowCompensated):
            await handle.result(timeout=10)
        root = await app.trace(handle.run_id)
    assert root.kind == "run" and root.name == "order" and root.status == "compensated"


def test_saga_needs_steps_and_a_known_mode() -> None:
    with pytest.raises(cantata.ConfigurationError):
        Saga("empty")
    app = App("x", store="memory://")

    @app.step
    async def a(x: dict[str, Any]) -> None: ...

    with pytest.raises(cantata.ConfigurationError, match="mode"):
        Saga("s", Step(a), mode="sideways")  # type: ignore[arg-type]


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.integers(1, 4), data=st.data())
async def test_property_compensation_runs_in_reverse_in_both_modes(steps: int,
                                                                   data: st.DataObject) -> None:
    fail = data.draw(st.integers(1, steps))
    results = []
    for mode in MODES:
        calls: list[tuple[Any, ...]] = []
        results.append((await outcome(build(mode, calls, f"s{fail}", steps), {}), calls))
    assert results[0] == results[1]
    undone = [c[0] for c in results[0][1] if c[0].startswith("undo")]
    assert undone == [f"undo-s{i}" for i in range(fail - 1, 0, -1)]
