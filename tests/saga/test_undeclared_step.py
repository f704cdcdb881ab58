"""A saga step that no service declares: both modes end the run the same way.

Orchestrated, the run reaches the step, finds no service that declares it and fails
(undoing what finished). Choreographed, the hop before it finds the same and fails
the step there, rather than emitting an event only a service that does not exist
would react to: same status, same error, same compensations (docs/styles.md)."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import App, Parallel, Saga, Step
from cantata.errors import WorkflowError
from cantata.model.status import RunStatus

from ..engine.helpers import make_app

MODES = ("orchestrated", "choreographed")


def shop(url: str, mode: str, shape: str, ledger: list[str]) -> App:
    app = make_app(url)

    @app.step
    async def reserve(order: dict[str, Any]) -> str:
        ledger.append("reserve")
        return "r-1"

    @app.step
    async def release(order: dict[str, Any]) -> None:
        ledger.append("release")

    @app.step
    async def stock(order: dict[str, Any]) -> bool:
        ledger.append("stock")
        return True

    @app.step
    async def unstock(order: dict[str, Any]) -> None:
        ledger.append("unstock")

    @app.step
    async def ship(order: dict[str, Any]) -> str:
        ledger.append("ship")
        return "s-1"

    steps: dict[str, tuple[Step | Parallel, ...]] = {
        # no service declares payments.charge: a typo, or a service never deployed
        "first": (Step("payments.charge"), Step(ship)),
        "middle": (Step(reserve, compensate=release), Step("payments.charge"), Step(ship)),
        "parallel": (Step(reserve, compensate=release),
                     Parallel(Step(stock, compensate=unstock), Step("payments.charge")),
                     Step(ship)),
    }
    app.include(Saga("order", *steps[shape], mode=mode))  # type: ignore[arg-type]
    return app


async def outcome(url: str, mode: str, shape: str) -> tuple[RunStatus, str | None, list[str]]:
    ledger: list[str] = []
    async with shop(url, mode, shape, ledger) as app:
        handle = await app.start("order", {"id": 1})
        with pytest.raises(WorkflowError):  # failed or compensated
            await handle.result(20)
        info = await handle.info()
    return info.status, info.error, ledger


@pytest.mark.parametrize(("shape", "status", "effects"), [
    ("first", RunStatus.FAILED, []),
    ("middle", RunStatus.COMPENSATED, ["reserve", "release"]),
    ("parallel", RunStatus.COMPENSATED, ["reserve", "release"]),
])
async def test_a_step_no_service_declares_ends_the_run_alike_in_both_modes(
    shared_store: str, shape: str, status: RunStatus, effects: list[str]
) -> None:
    seen = {}
    for mode in MODES:
        seen[mode] = await outcome(shared_store, mode, shape)
    assert seen["choreographed"] == seen["orchestrated"]
    got_status, error, ledger = seen["choreographed"]
    assert (got_status, ledger) == (status, effects)
    assert error is not None
    for words in ("UnknownStep", "'payments.charge'", "saga order", "no service declares",
                  "@app.step"):
        assert words in error, error
