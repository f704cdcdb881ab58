"""The same sagas in both modes, on every backend: same results passed forward, same
statuses, same compensation order, same side effects, and a trace rooted at the run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import cantata
from cantata import App, RunStatus
from cantata.engine.saga import Mode
from tests.engine.helpers import make_app

from .flows import SHAPES, build, expected_undo, step_names

MODES: tuple[Mode, ...] = ("orchestrated", "choreographed")


async def run_all(store_url: str, shape: str, mode: str) -> dict[str, Any]:
    """Run the saga once per failure position (and once without); what each run did."""
    ledger: dict[str, Any] = {}
    app = make_app(store_url, name=f"saga-{shape}-{mode}")
    build(app, shape, mode, ledger)
    cases: list[str | None] = [None, *step_names(shape)]
    seen: dict[str, Any] = {}
    async with app:
        handles = [await app.start("order", {"id": i, "fail": fail})
                   for i, fail in enumerate(cases)]
        for i, (fail, handle) in enumerate(zip(cases, handles, strict=True)):
            try:
                outcome: Any = ("completed", await handle.result(timeout=30))
            except cantata.WorkflowError as exc:
                outcome = (exc.status, exc.error)
            info = await handle.info()
            root = await app.trace(handle.run_id)
            calls = sorted((v for k, v in ledger.items()
                            if k.startswith(handle.run_id)), key=repr)
            seen[str(fail)] = {
                "outcome": outcome, "status": str(info.status), "flagged": info.flagged,
                "calls": calls, "undo": ledger.get(f"order:{i}", []),
                "trace": (root.kind, root.name, str(root.status)),
                "trace_steps": trace_steps(root),
            }
    return seen


def trace_steps(root: Any) -> list[tuple[str, str, str, str | None]]:
    """The steps and compensations a trace shows, as (kind, name, status, error): nodes
    of the run's own steps when orchestrated, the services' handlers (named as the steps
    they run) when choreographed, where a step's handler counts as a step; a parallel
    stage's join is the choreography's own."""
    seen: set[tuple[str, str, str, str | None]] = set()

    def walk(node: Any) -> None:
        if node.kind in ("step", "compensation", "handler") and not node.name.startswith("join"):
            kind = "step" if node.kind == "handler" else node.kind
            seen.add((kind, node.name, node.status, node.error))
        for child in node.children:
            walk(child)

    walk(root)
    return sorted(seen)


@pytest.mark.parametrize("shape", SHAPES)
async def test_both_modes_do_the_same_at_every_failure_position(
    store_url: str, shape: str
) -> None:
    orchestrated, choreographed = await asyncio.gather(
        *(run_all(store_url, shape, mode) for mode in MODES)
    )
    assert orchestrated == choreographed
    names = step_names(shape)
    ok = orchestrated["None"]
    assert ok["outcome"] == ("completed", {n: {"id": f"{n}-0"} for n in names})
    assert ok["status"] == RunStatus.COMPLETED and ok["trace"] == ("run", "order", "completed")
    # results flow forward: each step got the results of the steps before it (only)
    given = {name: dict(results) for name, _, results in ok["calls"]}
    if shape == "sequential":
        assert given == {"reserve": {}, "charge": {"reserve": {"id": "reserve-0"}},
                         "ship": {"reserve": {"id": "reserve-0"}, "charge": {"id": "charge-0"}}}
    else:
        before_checks = {"reserve": {"id": "reserve-0"}}
        assert given["stock"] == given["fraud"] == before_checks
        assert given["charge"] == {**before_checks, "stock": {"id": "stock-0"},
                                   "fraud": {"id": "fraud-0"}}
    for i, fail in enumerate(names, 1):
        got = orchestrated[fail]
        undo = expected_undo(shape, fail)
        status = "compensated" if undo else "failed"
        assert got["outcome"] == (status, f"StepFailed: step {fail} failed after 1 attempt(s): "
                                          f"ValueError: {fail} refused order {i}")
        assert got["status"] == status and not got["flagged"]
        assert got["undo"] == undo
        # the trace shows the steps that ran and the compensations that ran, no other
        ran = names[: names.index(fail) + 1]
        if fail in ("stock", "fraud"):
            ran = names[:3]  # the other branch ran too
        assert sorted(name for _, name, _, _ in got["trace_steps"]) == sorted(
            [*ran, *(f"undo_{n}" for n in undo)])
        # each shown as it went: the failed step with its error, the undos as compensations
        error = f"ValueError: {fail} refused order {i}"
        assert sorted(got["trace_steps"]) == sorted(
            [*(("step", n, "completed", None) for n in ran if n != fail),
             ("step", fail, "failed", error),
             *(("compensation", f"undo_{n}", "completed", None) for n in undo)])
        # each compensation got the result of the step it undoes
        undone = {name.removeprefix("undo "): result for name, _, result in got["calls"]
                  if name.startswith("undo ")}
        assert undone == {n: {"id": f"{n}-{i}"} for n in undo}


async def run_one(app: App, data: dict[str, Any]) -> tuple[str, Any]:
    async with app:
        handle = await app.start("order", data)
        try:
            return "completed", await handle.result(timeout=30)
        except cantata.WorkflowError as exc:
            return exc.status, exc.error


async def trace_of_failed_undo(mode: Mode) -> tuple[Any, ...]:
    """A saga whose step fails and whose compensation fails too: what the trace and
    the stalls show of its steps."""
    app = App(f"undo-fails-{mode}", store="memory://", poll_interval=0.02)
    once = cantata.Retry(max_attempts=1)

    @app.step
    async def hold(x: int) -> int:
        return x

    @app.step(retry=once)
    async def release(x: int) -> None:
        raise KeyError("hold gone")

    @app.step(retry=once)
    async def pay(x: int) -> None:
        raise RuntimeError("card declined")

    app.include(cantata.Saga("book", cantata.Step(hold, compensate=release),
                             cantata.Step(pay), mode=mode))
    async with app:
        handle = await app.start("book", 1)
        with pytest.raises(cantata.WorkflowFailed):
            await handle.result(timeout=10)
        root = await app.trace(handle.run_id)
        stalls = await app.stalled(older_than=0)
    return (trace_steps(root), [(s.reason, s.node.kind, s.node.name) for s in stalls])


async def test_a_failed_compensation_shows_the_same_in_both_modes() -> None:
    orchestrated, choreographed = [await trace_of_failed_undo(mode) for mode in MODES]
    assert orchestrated == choreographed
    assert orchestrated == (
        [("compensation", "release", "failed", "KeyError: 'hold gone'"),
         ("step", "hold", "completed", None),
         ("step", "pay", "failed", "RuntimeError: card declined")],
        [("compensation_failed", "compensation", "release")],
    )
