"""A rolling deploy that changes a choreographed saga's map: old and new code both live.

Both apps share one store (and broker), so both maps' hop groups are declared and an
event of a run goes to the groups of both. Each run's steps must still run exactly once,
under the run's own map, and every run must end, whichever worker its events reach.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Saga, Step, step_info
from tests.helpers import eventually

from ..engine.helpers import make_app

RUNS = 4  # started from each side


def shop(url: str, steps: list[str], effects: Counter[tuple[int, str]]) -> App:
    """An app whose choreographed saga ``order`` runs ``steps`` in that order, each
    step counting its effect per order in ``effects``."""
    # (a lease longer than the suite's: on a loaded machine a 1 s lease lapses, and the
    # deliveries taken over count attempts this test is not about)
    app = make_app(url, lease=5.0)

    def effect(name: str) -> Callable[[dict[str, Any]], Any]:
        async def step(order: dict[str, Any]) -> str:
            effects[(order["id"], name)] += 1
            # a delivery handed back to a worker of the run's map is no failed attempt
            assert step_info().attempt == 1, step_info()
            await asyncio.sleep(0)
            return f"{name}-{order['id']}"

        step.__name__ = step.__qualname__ = name
        return step

    app.include(Saga("order", *(Step(app.step(effect(s))) for s in steps),
                     mode="choreographed"))
    return app


CHANGES = {
    "rename": (["reserve", "charge", "ship"], ["reserve", "charge_card", "ship"]),
    "remove": (["reserve", "charge", "ship"], ["reserve", "ship"]),
    "add": (["reserve", "ship"], ["reserve", "charge", "ship"]),
    "reorder": (["reserve", "charge", "ship"], ["charge", "reserve", "ship"]),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
async def test_each_step_runs_once_per_run_with_old_and_new_code_live(
    tmp_path: Path, change: str
) -> None:
    await both_live(f"sqlite:///{tmp_path}/shop.db", *CHANGES[change])


async def test_a_rename_with_old_and_new_code_live_on_every_backend(shared_store: str) -> None:
    await both_live(shared_store, *CHANGES["rename"], runs=2)


async def both_live(url: str, before: list[str], after: list[str], runs: int = RUNS) -> None:
    """Old and new code live side by side, each starting runs: every run completes,
    having run each step of one of the two maps once, and nothing else."""
    effects: Counter[tuple[int, str]] = Counter()
    old = shop(url, before, effects)
    new = shop(url, after, effects)
    async with old, new:
        handles = [await (old if i % 2 else new).start("order", {"id": i})
                   for i in range(2 * runs)]
        results = await asyncio.gather(*(h.result(30) for h in handles))
        for i, result in enumerate(results):
            # the run followed one map, the one of the code that started its chain
            assert list(result) in (before, after), (i, result)
            ran = {step: n for (order, step), n in effects.items() if order == i}
            assert ran == dict.fromkeys(result, 1), (i, result, ran)
        # the other map's group got each run's event too, and settled it without running:
        # the trace says so on that handler
        for h in handles:
            cid = (await new.get_handle(h.run_id).info()).correlation_id

            async def told(cid: str = cid) -> list[Any]:
                return [n for n in (await new.trace(cid)).walk() if n.kind == "handler"
                        and (n.detail or "").startswith("not a hop of this run's map")]

            # (the other map's copy may be settled after the run has ended)
            nodes = await eventually(told, 20.0, f"run {h.run_id}'s other-map copy told")
            assert all(n.status == "completed" for n in nodes), h.run_id
