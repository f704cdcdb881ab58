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

from cantata import App, Retry, RunStatus, WorkflowContext, WorkflowFailed
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
