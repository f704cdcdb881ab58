"""The shortcuts on a plain step's path (docs/performance.md, round twenty-seven) give
what the general path gives: a plain step's body awaited without a coroutine around it
(``invoke.scoped_step``), and a one-argument call's shape without the set and its sort
(``versioning.args_shape``)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import pytest

import cantata
from cantata import WorkflowContext
from cantata.engine.steps import _ONE_SCALAR_DETAIL, _shape_detail
from cantata.engine.versioning import args_shape, shape
from cantata.errors import StepFailed
from cantata.model import codec

from .helpers import make_app


def test_args_shape_of_one_argument_is_the_general_one() -> None:
    """The one-argument shortcut gives the text of the general path for every value
    (the plain scalars it takes, and the rest it leaves to the general path)."""
    values: list[Any] = [None, True, False, 0, -3, 2**70, 1.5, "", "x", [1], {"a": 1}, [None]]
    for v in values:
        assert args_shape([v]) == shape([v]), v
    for a, b in itertools.product(values[:9], repeat=2):  # (two: the general path)
        assert args_shape([a, b]) == args_shape([b, a])


def test_a_step_of_one_scalar_records_the_detail_of_the_general_path() -> None:
    """steps.call_step takes the entry's detail of one plain scalar argument from a table
    (round twenty-eight): it is what the general path (args_shape, then the detail's
    JSON) gives for every value, and the general path is taken for the rest."""
    values: list[Any] = [None, True, False, 0, -3, 2**70, 1.5, -0.0, "", "x", [1], {"a": 1}]
    for v in values:
        detail = _ONE_SCALAR_DETAIL.get(type(v))
        if detail is not None:
            assert detail == codec.dumps({"shape": shape([v])}), v
            assert detail == _shape_detail(args_shape([v])), v
    assert set(_ONE_SCALAR_DETAIL) == {type(None), bool, int, float, str}


def test_args_shape_of_one_scalar_names_its_kind() -> None:
    assert [args_shape([v]) for v in (None, True, 1, 1.0, "s")] == [
        "[null]", "[bool]", "[number]", "[number]", "[str]"]


@pytest.mark.parametrize("sync", [False, True])
async def test_a_plain_step_sees_its_own_step_and_leaves_the_workflow_outside_it(
    sqlite_url: str, sync: bool
) -> None:
    """A plain step's body (async, or sync in a thread) runs with its step info and
    heartbeat set, its arguments restored; the workflow's code around it stays outside
    any step, and a bad argument fails the step as before."""
    app = make_app(sqlite_url)
    seen: list[tuple[Any, ...]] = []

    def look(n: int) -> int:
        info = cantata.step_info()
        cantata.heartbeat({"n": n})  # (inside a step: no error)
        seen.append((info.step, info.key, info.attempt, n))
        return n + 1

    bump: Callable[[int], Any]  # a sync or an async step
    if sync:
        @app.step
        def bump(n: int) -> int:
            return look(n)
    else:
        @app.step
        async def bump(n: int) -> int:
            await asyncio.sleep(0)  # (the body yields: resumed through its guard)
            return look(n)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> list[Any]:
        first = await ctx.run(bump, n)
        outside = cantata.engine.stepinfo.current()
        second = await ctx.run(bump, first)
        try:
            await ctx.run(bump, "not a number")
        except StepFailed as exc:
            failed = exc.error_type
        return [first, second, outside is None, failed]

    async with app:
        h = await app.start(order, 1)
        assert await h.result(timeout=10) == [2, 3, True, "TypeError"]
    assert seen[:2] == [("bump", "bump#1", 1, 1), ("bump", "bump#2", 1, 2)]
    retried = seen[2:]  # the bad argument's attempts, each with its own number
    assert retried and retried == [
        ("bump", "bump#3", i, "not a number") for i in range(1, len(retried) + 1)]
