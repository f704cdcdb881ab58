"""The sagas the tests run in both modes: sequential, and with a parallel stage.

Every step records what it was called with (the input, the earlier results it was
given, its idempotency key) and every compensation the result it undoes, in a
ledger keyed by idempotency key, so a step repeated after a crash is one effect. A
step fails when the input names it (``{"fail": "charge"}``), so one app serves every
failure position.
"""

from __future__ import annotations

from typing import Any

import cantata
from cantata import App, Parallel, Retry, Saga, Step

SHAPES = ("sequential", "parallel")
FAST = Retry(max_attempts=2, initial_interval=0.01, non_retryable=(ValueError,))


def step_names(shape: str) -> list[str]:
    if shape == "sequential":
        return ["reserve", "charge", "ship"]
    return ["reserve", "stock", "fraud", "charge"]


def build(app: App, shape: str, mode: str, ledger: dict[str, Any]) -> Saga:
    """Register the steps of ``shape`` in ``app`` and include its saga in ``mode``."""

    def make(name: str, undoable: bool = True) -> tuple[Any, Any]:
        async def action(order: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
            info = cantata.step_info()
            key = info.idempotency_key
            ledger.setdefault(key, (name, order["id"], sorted(results.items())))
            if order.get("fail") == name:
                raise ValueError(f"{name} refused order {order['id']}")
            return {"id": f"{name}-{order['id']}"}

        async def undo(order: dict[str, Any], result: dict[str, Any]) -> None:
            info = cantata.step_info()
            key = info.idempotency_key
            ledger.setdefault(key, (f"undo {name}", order["id"], result))
            order_log = ledger.setdefault(f"order:{order['id']}", [])
            if name not in order_log:
                order_log.append(name)

        action.__name__, undo.__name__ = name, f"undo_{name}"
        return app.step(retry=FAST)(action), app.step(undo) if undoable else None

    if shape == "sequential":
        reserve, charge, ship = make("reserve"), make("charge"), make("ship", undoable=False)
        saga = Saga("order", Step(reserve[0], compensate=reserve[1]),
                    Step(charge[0], compensate=charge[1]), Step(ship[0]), mode=mode)  # type: ignore[arg-type]
    else:
        reserve, stock, fraud, charge = (make(n) for n in step_names("parallel"))
        saga = Saga("order", Step(reserve[0], compensate=reserve[1]),
                    Parallel(Step(stock[0], compensate=stock[1]),
                             Step(fraud[0], compensate=fraud[1]), name="checks"),
                    Step(charge[0], compensate=charge[1]), mode=mode)  # type: ignore[arg-type]
    app.include(saga)
    return saga


def expected_undo(shape: str, fail: str | None) -> list[str]:
    """The compensation order a failure at ``fail`` must give (finished branches first)."""
    if fail is None:
        return []
    if shape == "sequential":
        return {"reserve": [], "charge": ["reserve"], "ship": ["charge", "reserve"]}[fail]
    return {"reserve": [], "stock": ["fraud", "reserve"], "fraud": ["stock", "reserve"],
            "charge": ["fraud", "stock", "reserve"]}[fail]
