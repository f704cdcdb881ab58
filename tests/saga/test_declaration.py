"""Bad input is refused at declaration, or fails the run naming the run and the step;
per-step options override the step's own, in both modes."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cantata
from cantata import App, Parallel, Retry, Saga, SagaStateTooLarge, Step
from tests.engine.helpers import make_app

from .test_modes import MODES, run_one


def steps(app: App) -> dict[str, Any]:
    @app.step
    async def reserve(order: dict[str, Any]) -> str:
        return "r"

    @app.step
    async def release(order: dict[str, Any]) -> None: ...

    @app.step
    async def check(order: dict[str, Any]) -> str:
        return "c"

    return {"reserve": reserve, "release": release, "check": check}


def test_a_function_that_is_not_a_step_is_refused_at_declaration() -> None:
    async def not_a_step(order: dict[str, Any]) -> None: ...

    with pytest.raises(cantata.UnknownStep, match=r"not_a_step.*@app\.step"):
        Step(not_a_step)
    app = App("x", store="memory://")
    s = steps(app)
    with pytest.raises(cantata.UnknownStep, match="not_a_step"):
        Step(s["reserve"], compensate=not_a_step)


def test_a_step_name_that_nobody_registered_is_refused_when_included() -> None:
    app = App("x", store="memory://")
    steps(app)
    with pytest.raises(cantata.UnknownStep, match="saga order: step 'reserv' is not registered"):
        app.include(Saga("order", Step("reserve"), Step("reserv")))
    # a step of another service, qualified by its name, is served elsewhere: allowed
    app.include(Saga("order2", Step("reserve"), Step("payments.charge")))


def test_parallel_needs_two_steps() -> None:
    app = App("x", store="memory://")
    s = steps(app)
    with pytest.raises(cantata.ConfigurationError, match="at least two branches, got 1"):
        Parallel(Step(s["check"]))
    with pytest.raises(cantata.ConfigurationError, match="at least two branches, got 0"):
        Parallel()
    with pytest.raises(cantata.ConfigurationError, match="must be a Step"):
        Parallel(Step(s["check"]), s["reserve"])
    with pytest.raises(cantata.ConfigurationError, match="cannot contain another Parallel"):
        Parallel(Step(s["check"]), Parallel(Step(s["reserve"]), Step(s["release"])))  # type: ignore[arg-type]


def test_unknown_mode_reused_step_and_bad_options_are_refused() -> None:
    app = App("x", store="memory://")
    s = steps(app)
    with pytest.raises(cantata.ConfigurationError, match="mode 'sideways' is unknown"):
        Saga("order", Step(s["reserve"]), mode="sideways")  # type: ignore[arg-type]
    with pytest.raises(cantata.ConfigurationError, match="uses a step"):
        Saga("order", Step(s["reserve"]), Parallel(Step(s["reserve"]), Step(s["check"])))
    with pytest.raises(cantata.ConfigurationError, match=r"timeout must be > 0 seconds, got 0"):
        Step(s["reserve"], timeout=0)
    with pytest.raises(cantata.ConfigurationError, match=r"needs a cantata\.Retry"):
        Step(s["reserve"], retry=3)  # type: ignore[arg-type]
    with pytest.raises(cantata.ConfigurationError, match="max_state"):
        Saga("order", Step(s["reserve"]), max_state=10)
    with pytest.raises(cantata.ConfigurationError, match="cannot prefix event types"):
        Saga("order placed", Step(s["reserve"]))
    with pytest.raises(cantata.ConfigurationError, match="stage name 'all checks'"):
        Saga("order", Parallel(Step(s["reserve"]), Step(s["check"]), name="all checks"))


def saga_with(mode: str, result: Any, max_state: int = 4096) -> App:
    app = make_app("memory://", name=f"bad-{mode}")

    @app.step
    async def reserve(order: dict[str, Any]) -> str:
        return "r-1"

    @app.step
    async def release(order: dict[str, Any]) -> None: ...

    @app.step
    async def charge(order: dict[str, Any]) -> Any:
        return result

    app.include(Saga("order", Step(reserve, compensate=release), Step(charge),
                     mode=mode, max_state=max_state))  # type: ignore[arg-type]
    return app


@pytest.mark.parametrize("mode", MODES)
async def test_a_result_that_does_not_serialise_fails_its_step_naming_run_and_step(
    mode: str,
) -> None:
    app = saga_with(mode, {"when": object()})
    async with app:
        handle = await app.start("order", {"id": 1})
        with pytest.raises(cantata.WorkflowCompensated) as info:
            await handle.result(timeout=10)
    error = info.value.error or ""
    assert error.startswith("StepFailed: step charge failed after 1 attempt(s): "
                            "SerializationError: result of step charge in run ")
    assert handle.run_id in error and "not JSON-serialisable" in error


@pytest.mark.parametrize("mode", MODES)
async def test_state_over_the_bound_fails_the_step_naming_run_and_step(mode: str) -> None:
    app = saga_with(mode, "x" * 5000)
    async with app:
        handle = await app.start("order", {"id": 1})
        with pytest.raises(cantata.WorkflowCompensated) as info:
            await handle.result(timeout=10)
    error = info.value.error or ""
    assert "SagaStateTooLarge: saga order run " in error and handle.run_id in error
    assert "the result of step charge makes the saga's state" in error
    assert "over its bound of 4096 bytes" in error


@pytest.mark.parametrize("mode", MODES)
async def test_an_input_over_the_bound_fails_the_run_before_any_step(mode: str) -> None:
    app = saga_with(mode, "ok")
    async with app:
        handle = await app.start("order", {"blob": "x" * 5000})
        with pytest.raises(cantata.WorkflowFailed) as info:
            await handle.result(timeout=10)
    assert (info.value.error or "").startswith(
        f"SagaStateTooLarge: saga order run {handle.run_id}: its input is ")
    assert issubclass(SagaStateTooLarge, cantata.SerializationError)


@pytest.mark.parametrize("mode", MODES)
async def test_step_options_in_the_saga_override_the_steps_own(mode: str) -> None:
    app = make_app("memory://", name=f"opts-{mode}")
    attempts: list[int] = []

    @app.step(retry=Retry(max_attempts=1))
    async def flaky(order: dict[str, Any]) -> str:
        attempts.append(cantata.step_info().attempt)
        if len(attempts) < 3:
            raise ConnectionError("inventory busy")
        return "ok"

    @app.step(timeout=60)
    async def slow(order: dict[str, Any]) -> str:
        await asyncio.sleep(5)
        return "late"

    app.include(Saga("order", Step(flaky, retry=Retry(max_attempts=3, initial_interval=0.01)),
                     Step(slow, timeout=0.2, retry=Retry(max_attempts=1)), mode=mode))  # type: ignore[arg-type]
    status, error = await run_one(app, {"id": 1})
    assert attempts == [1, 2, 3]
    assert (status, error) == ("failed", "StepFailed: step slow failed after 1 attempt(s): "
                               "StepTimeout: step slow attempt 1 ran longer than its timeout "
                               "of 0.2 s")
