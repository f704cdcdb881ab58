"""A sound check-replay: every recorded call against the calls the current code makes,
in order, with the shapes of their arguments (docs/operating.md)."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cantata import (
    App,
    Cancelled,
    Retry,
    RunStatus,
    WorkflowCancelled,
    WorkflowContext,
    WorkflowFailed,
)
from cantata.engine.replaycheck import check_replay, check_run
from tests.engine.helpers import eventually, make_app

SLOW = Retry(max_attempts=5, initial_interval=3600.0)  # a step stays "retrying"


def trip(
    url: str, calls: Counter[str], *, book_flight_first: bool, hotel_arg: Any = 1,
    version: str | None = None,
) -> App:
    """Temporal's trip booking: book_flight, then book_hotel (which keeps failing)."""
    app = make_app(url, version=version or ("v1" if book_flight_first else "v2"))

    @app.step(retry=SLOW)
    async def book_flight(trip_id: int) -> str:
        calls["flight"] += 1
        return "F1"

    @app.step(retry=SLOW)
    async def book_hotel(trip_id: Any) -> str:
        calls["hotel"] += 1
        raise ConnectionError("hotel API down")

    @app.workflow
    async def book_trip(ctx: WorkflowContext, trip_id: int) -> list[str]:
        out = []
        if book_flight_first:
            out.append(await ctx.run(book_flight, trip_id))
        out.append(await ctx.run(book_hotel, hotel_arg if hotel_arg != 1 else trip_id))
        return out

    return app


async def _retrying_hotel(url: str) -> str:
    calls: Counter[str] = Counter()
    old = trip(url, calls, book_flight_first=True)
    async with old:
        h = await old.start("book_trip", 7)
        await eventually(lambda: calls["hotel"] >= 1, timeout=10)

        async def attempt_recorded() -> bool:
            return any(a.error_type for a in await old.store.load_attempts(old.name, h.run_id))

        await eventually(attempt_recorded, timeout=10)
    return h.run_id


async def test_a_call_deleted_before_the_open_step_is_reported(shared_url: str) -> None:
    run_id = await _retrying_hotel(shared_url)
    new = trip(shared_url, Counter(), book_flight_first=False)  # book_flight deleted
    async with new.client():
        [problem] = await check_replay(new)
    assert (problem.run_id, problem.problem) == (run_id, "non_determinism")
    assert (problem.call, problem.recorded, problem.current) == (1, "book_flight#1",
                                                                 "book_hotel#1")
    assert "book_flight#1" in problem.detail and "book_hotel#1" in problem.detail
    same = trip(shared_url, Counter(), book_flight_first=True)
    async with same.client():
        assert await check_replay(same) == []


async def test_a_changed_argument_shape_is_reported(sqlite_url: str) -> None:
    run_id = await _retrying_hotel(sqlite_url)
    new = trip(sqlite_url, Counter(), book_flight_first=True, hotel_arg={"trip": 7})
    async with new.client():
        [problem] = await check_replay(new)
    assert (problem.run_id, problem.call, problem.recorded) == (run_id, 2, "book_hotel#1")
    assert "[number]" in problem.detail and "[{trip:number}]" in problem.detail


async def test_a_finished_run_is_checked_with_all(sqlite_url: str) -> None:
    app = make_app(sqlite_url)

    @app.step
    async def a() -> int:
        return 1

    @app.workflow(name="flow")
    async def v1(ctx: WorkflowContext) -> int:
        return int(await ctx.run(a)) + int(ctx.random() >= 0)

    async with app:
        await (await app.start("flow")).result(timeout=5)
    new = make_app(sqlite_url)
    new.step(a)

    @new.workflow(name="flow")
    async def v2(ctx: WorkflowContext) -> int:  # drops the recorded ctx.random()
        return int(await ctx.run(a))

    async with new.client():
        assert await check_replay(new) == []  # live runs only
        [problem] = await check_replay(new, all_runs=True)
    assert problem.recorded == "random#1" and "ends there" in problem.detail


# -- property: edits of the code against stored histories ------------------------------

Op = tuple[str, str, str]  # (kind, name, argument shape)
NAMES = ("a", "b", "c")
WAIT: Op = ("wait", "go", "")
ops = st.one_of(
    st.tuples(st.just("step"), st.sampled_from(NAMES), st.sampled_from(("int", "dict"))),
    st.just(("now", "now", "")),
)


def keys(program: list[Op]) -> list[tuple[str, str]]:
    """(history key, argument shape) of each call, as the engine names them."""
    seen: Counter[str] = Counter()
    out = []
    for kind, name, arg in program:
        base = {"step": name, "now": "now", "wait": "wait:go"}[kind]
        seen[base] += 1
        out.append((f"{base}#{seen[base]}", arg))
    return out


@st.composite
def edits(draw: st.DrawFn) -> tuple[list[Op], int, str, list[Op]]:
    """A program with a wait at position k, and that program after one edit."""
    before = draw(st.lists(ops, max_size=4))
    after = draw(st.lists(ops, max_size=3))
    program = [*before, WAIT, *after]
    edited = list(program)
    how = draw(st.sampled_from(("insert", "delete", "reorder", "rename", "reshape", "noop")))
    others = [i for i, op in enumerate(program) if op != WAIT]
    if how == "insert":
        edited.insert(draw(st.integers(0, len(program))), draw(ops))
    elif how == "delete" and others:
        del edited[draw(st.sampled_from(others))]
    elif how == "reorder" and len(program) > 1:
        i = draw(st.integers(0, len(program) - 2))
        edited[i], edited[i + 1] = edited[i + 1], edited[i]
    elif how == "rename" and others:
        i = draw(st.sampled_from(others))
        kind, _, arg = edited[i]
        edited[i] = ("step", draw(st.sampled_from(NAMES)), arg or "int")
    elif how == "reshape" and others:
        i = draw(st.sampled_from(others))
        kind, name, arg = edited[i]
        if kind == "step":
            edited[i] = (kind, name, "dict" if arg == "int" else "int")
    return program, len(before), how, edited


def programs_app(url: str, programs: dict[str, list[Op]]) -> App:
    app = make_app(url, "prop")

    def make(name: str) -> Any:
        async def fn(x: Any) -> str:
            return name

        fn.__name__ = name
        return app.step(fn)

    steps = {n: make(n) for n in NAMES}

    @app.workflow
    async def prog(ctx: WorkflowContext, pid: str) -> str:
        for kind, name, arg in programs[pid]:
            if kind == "step":
                await ctx.run(steps[name], 1 if arg == "int" else {"v": 1})
            elif kind == "now":
                ctx.now()
            else:
                await ctx.wait_for_event("go", match={"pid": pid})
        return "done"

    return app


@pytest.mark.slow
def test_every_edit_that_breaks_replay_is_reported(tmp_path: Path) -> None:
    programs: dict[str, list[Op]] = {}
    app = programs_app(f"sqlite:///{tmp_path}/prop.db", programs)
    rng = random.Random(15)

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(case=edits())
    def check(case: tuple[list[Op], int, str, list[Op]]) -> None:
        program, k, how, edited = case
        pid = f"p{rng.getrandbits(48):x}"
        programs[pid] = program

        async def go() -> tuple[bool, str]:
            async with app:  # the old code records the run up to its wait, then stops
                h = await app.start("prog", pid)

                async def parked() -> bool:
                    history = await app.store.load_history(app.name, h.run_id)
                    return any(e.kind == "wait" for e in history)

                await eventually(parked, timeout=10)
            programs[pid] = edited  # the deploy
            async with app.client():
                run = await app.store.get_run(app.name, h.run_id)
                assert run is not None
                problem = await check_run(app.engine, run, app.workflows["prog"])
            async with app:  # the new code resumes it for real
                await app.publish("go", {"pid": pid})
                try:
                    await app.get_handle(h.run_id).result(timeout=10)
                    outcome = "completed"
                except WorkflowFailed as exc:
                    outcome = exc.error or ""
            return problem is not None, outcome

        reported, outcome = asyncio.run(go())
        recorded = keys(program)[: k + 1]
        known = {key for key, _ in recorded}
        # a ctx.now() the code makes anew (no such key recorded) is no difference
        made = [c for c in keys(edited) if c[0] in known or not c[0].startswith("now#")]
        breaks = made[: k + 1] != recorded
        assert reported == breaks, (how, program, edited)
        if not reported:  # sound: what the check lets through replays
            assert outcome == "completed", (how, program, edited, outcome)
        if "NonDeterminismError" in outcome:
            assert reported

    check()


async def test_check_replay_reports_each_version(sqlite_url: str) -> None:
    run_id = await _retrying_hotel(sqlite_url)
    from cantata.engine.replaycheck import replay_report

    new = trip(sqlite_url, Counter(), book_flight_first=False)
    async with new.client():
        old_version = (await new.get_handle(run_id).info()).version
        report = await replay_report(new)
    assert old_version is not None and old_version != new.version
    assert report.checked == {old_version: 1} and report.broken(old_version) == 1
    assert (await _status(sqlite_url, run_id)) == RunStatus.RUNNING  # nothing changed


async def _status(url: str, run_id: str) -> RunStatus:
    app = make_app(url)
    async with app.client():
        return await app.get_handle(run_id).status()


async def test_the_runtime_refuses_to_rerun_a_step_whose_earlier_calls_are_gone(
    sqlite_url: str,
) -> None:
    """Even taken unchecked (--any-version), the retried step is not run again on a
    history its code no longer matches: the run fails NonDeterminism at once."""
    run_id = await _retrying_hotel(sqlite_url)
    calls: Counter[str] = Counter()
    new = trip(sqlite_url, calls, book_flight_first=False)
    new.any_version = True
    async with new:
        with pytest.raises(WorkflowFailed, match="NonDeterminismError") as info:
            await new.get_handle(run_id).result(timeout=10)
    assert "'book_flight#1'" in (info.value.error or "")
    assert calls == Counter()  # neither step ran under the diverged code


# -- runs that ended cancelled or failed ------------------------------------------------


def cancellable(url: str, *, extra_before_wait: bool = False, cleanup: str = "release") -> App:
    """reserve, then a wait the run is cancelled in; its cleanup runs ``cleanup``."""
    app = make_app(url, "cancels")
    steps = {}
    for name in ("reserve", "audit", "release", "refund"):
        async def fn(order: int) -> str:
            return "done"

        fn.__name__ = name
        steps[name] = app.step(fn)

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> str:
        await ctx.run(steps["reserve"], n)
        if extra_before_wait:
            await ctx.run(steps["audit"], n)
        try:
            await ctx.wait_for_event("invoice.approved", match={"n": n})
        except Cancelled:
            await ctx.run(steps[cleanup], n)
            raise
        return "approved"

    return app


async def test_a_cancelled_run_passes_unchanged_code_and_not_a_changed_one(
    sqlite_url: str,
) -> None:
    """The cancellation history records is no code difference: the check delivers it
    where the run met it, replays the cleanup, and still reports a change before it
    or in the cleanup."""
    old = cancellable(sqlite_url)
    async with old:
        h = await old.start("order", 1)

        async def waiting() -> bool:
            history = await old.store.load_history(old.name, h.run_id)
            return any(e.kind == "wait" for e in history)

        await eventually(waiting, timeout=10)
        await h.cancel()
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=10)
        keys = [e.key for e in await old.store.load_history(old.name, h.run_id)]
    assert keys == ["reserve#1", "wait:invoice.approved#1", "cancelled#1", "release#1"]
    same = cancellable(sqlite_url)
    async with same.client():
        assert await check_replay(same, all_runs=True) == []
    inserted = cancellable(sqlite_url, extra_before_wait=True)
    async with inserted.client():
        [problem] = await check_replay(inserted, all_runs=True)
    assert (problem.problem, problem.call, problem.recorded, problem.current) == (
        "non_determinism", 2, "wait:invoice.approved#1", "audit#1")
    other_cleanup = cancellable(sqlite_url, cleanup="refund")
    async with other_cleanup.client():
        [problem] = await check_replay(other_cleanup, all_runs=True)
    assert (problem.problem, problem.call, problem.recorded, problem.current) == (
        "non_determinism", 4, "release#1", "refund#1")


async def test_a_run_cancelled_between_two_steps_passes_unchanged_code(sqlite_url: str) -> None:
    """Cancelled while a step ran: the cancellation reached the code at the next
    call, which was never made; the check replays it the same way."""
    gate = asyncio.Event()

    def build() -> App:
        app = make_app(sqlite_url, "between")

        @app.step
        async def slow(n: int) -> int:
            await gate.wait()
            return n

        @app.step
        async def after(n: int) -> int:
            return n

        @app.workflow
        async def flow(ctx: WorkflowContext, n: int) -> int:
            await ctx.run(slow, n)
            return int(await ctx.run(after, n))

        return app

    app = build()
    async with app:
        h = await app.start("flow", 1)

        async def running() -> bool:
            return bool(await app.store.load_attempts(app.name, h.run_id))

        await eventually(running, timeout=10)
        await h.cancel()
        gate.set()
        with pytest.raises(WorkflowCancelled):
            await h.result(timeout=10)
        keys = [e.key for e in await app.store.load_history(app.name, h.run_id)]
    assert keys == ["slow#1", "cancelled#1"]
    same = build()
    async with same.client():
        assert await check_replay(same, all_runs=True) == []


def failing(url: str, message: str) -> App:
    app = make_app(url, "fails")

    @app.step
    async def check(n: int) -> int:
        return n

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        await ctx.run(check, n)
        raise ValueError(message)

    @app.workflow
    async def two(ctx: WorkflowContext, a: int, b: int) -> int:
        return a + b

    return app


async def test_a_run_that_failed_in_its_own_code_fails_the_same_way_and_passes(
    sqlite_url: str,
) -> None:
    app = failing(sqlite_url, "order 1 is invalid")
    async with app:
        with pytest.raises(WorkflowFailed, match="order 1 is invalid"):
            await (await app.start("order", 1)).result(timeout=10)
        with pytest.raises(WorkflowFailed, match="missing 1 required positional argument"):
            await (await app.start("two", 1)).result(timeout=10)
    same = failing(sqlite_url, "order 1 is invalid")
    async with same.client():
        assert await check_replay(same, all_runs=True) == []
    changed = failing(sqlite_url, "order 1 is refused")
    async with changed.client():
        [problem] = await check_replay(changed, all_runs=True)
    assert (problem.workflow, problem.problem) == ("order", "would_fail")
    assert problem.detail == "ValueError: order 1 is refused"


async def test_code_that_now_raises_before_recorded_calls_would_fail(sqlite_url: str) -> None:
    app = make_app(sqlite_url)

    @app.step
    async def a() -> int:
        return 1

    @app.step
    async def b() -> int:
        return 2

    @app.workflow(name="flow")
    async def v1(ctx: WorkflowContext) -> int:
        y = int(await ctx.run(a))
        return y + int(await ctx.run(b))

    async with app:
        run = await app.start("flow")
        assert await run.result(timeout=5) == 3
    new = make_app(sqlite_url)
    new.step(a)
    new.step(b)

    @new.workflow(name="flow")
    async def v2(ctx: WorkflowContext) -> int:
        y = int(await ctx.run(a))
        y = y // 0  # a bug inserted before the recorded b#1
        return y + int(await ctx.run(b))

    async with new.client():
        [problem] = await check_replay(new, all_runs=True)
    assert (problem.problem, problem.call, problem.recorded) == ("would_fail", 2, "b#1")
    assert problem.detail == (
        "call 2: history recorded 'b#1' but the code now fails there: "
        "ZeroDivisionError: integer division or modulo by zero"
    )
