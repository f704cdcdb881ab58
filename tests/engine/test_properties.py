"""Property tests: JSON values survive a workflow; replay after a restart is equivalent."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cantata
from cantata import App, RunStatus, WorkflowContext

from .helpers import eventually, make_app

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=5),
    max_leaves=20,
)


def echo_app(url: str) -> App:
    app = make_app(url)

    @app.step
    async def echo(value: Any) -> Any:
        return value

    @app.workflow
    async def round_trip(ctx: WorkflowContext, *values: Any) -> Any:
        back = [await ctx.run(echo, v) for v in values]
        return {"args": list(values), "from_steps": back}

    return app


def test_json_values_round_trip_through_a_workflow(store_url: str) -> None:
    with asyncio.Runner() as runner:
        app = echo_app(store_url)
        runner.run(app.open())
        try:

            @settings(max_examples=60, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
            @given(values=st.lists(json_values, min_size=1, max_size=3))
            def check(values: list[Any]) -> None:
                async def go() -> Any:
                    h = await app.start("round_trip", *values)
                    return await h.result(timeout=5)

                out = runner.run(go())
                assert out == {"args": values, "from_steps": values}
                # and type for type (True is not 1, -0.0 stays -0.0)
                assert orjson.dumps(out) == orjson.dumps({"args": values, "from_steps": values})

            check()
        finally:
            runner.run(app.close())


STEPS = ("inc", "double", "negate")
plans = st.lists(st.tuples(st.sampled_from(STEPS), st.integers(-1000, 1000)),
                 min_size=1, max_size=8)


def apply(name: str, x: int) -> int:
    return {"inc": x + 1, "double": x * 2, "negate": -x}[name]


def plan_app(url: str, executed: list[tuple[str, int, str]]) -> App:
    app = make_app(url)

    def make(name: str) -> None:
        async def fn(x: int, token: str) -> int:
            executed.append((cantata.step_info().key, x, token))
            return apply(name, x)

        fn.__name__ = name
        app.step(fn)

    for name in STEPS:
        make(name)

    @app.workflow
    async def follow(ctx: WorkflowContext, plan: list[list[Any]], pause_at: int) -> list[Any]:
        token = str(ctx.uuid())  # recorded: the same after the restart
        out: list[Any] = []
        for i, (name, x) in enumerate(plan):
            if i == pause_at:
                await ctx.wait_for_event("plan.resume", match={"run": ctx.run_id})
            out.append(await ctx.run(name, x, token))
        if pause_at >= len(plan):
            await ctx.wait_for_event("plan.resume", match={"run": ctx.run_id})
        return [token, out]

    return app


def test_replay_after_a_restart_is_equivalent() -> None:
    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(plan=plans, data=st.data())
    def check(plan: list[tuple[str, int]], data: st.DataObject) -> None:
        pause_at = data.draw(st.integers(0, len(plan)), label="pause_at")
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'c.db'}"
            executed: list[tuple[str, int, str]] = []

            async def scenario() -> tuple[Any, list[tuple[str, int, str]]]:
                first = plan_app(url, executed)
                async with first:
                    h = await first.start("follow", [list(p) for p in plan], pause_at)

                    async def paused() -> bool:
                        history = await first.store.load_history(first.name, h.run_id)
                        return any(e.kind == "wait" for e in history)

                    await eventually(paused)
                    assert await h.status() == RunStatus.RUNNING
                before_restart = list(executed)
                second = plan_app(url, executed)  # a new process: replays the history
                async with second:
                    await second.publish("plan.resume", {"run": h.run_id})
                    result = await second.get_handle(h.run_id).result(timeout=10)
                return result, before_restart

            result, before_restart = asyncio.run(scenario())

        token, out = result
        assert out == [apply(name, x) for name, x in plan]  # same as a clean run
        assert len(before_restart) == pause_at
        # every step ran exactly once in all: completed ones were not re-executed
        keys = [k for k, _, _ in executed]
        assert len(keys) == len(plan) == len(set(keys))
        assert [x for _, x, _ in executed] == [x for _, x in plan]
        assert {t for _, _, t in executed} == {token}  # ctx.uuid() replayed, not redrawn

    check()


def test_ids_are_uuid7_and_sort_by_their_time() -> None:
    """Ids made later never sort before ids made earlier (by their millisecond), so the
    rows of runs in flight stay close together in the store's indexes."""
    import time
    import uuid

    from cantata.model.codec import new_id

    ids = []
    for _ in range(2000):
        ids.append(new_id())
        if len(ids) % 500 == 0:
            time.sleep(0.002)
    assert len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert u.version == 7 and u.variant == uuid.RFC_4122 and u.hex == text
    stamps = [int(text[:12], 16) for text in ids]
    assert stamps == sorted(stamps)
    assert abs(stamps[-1] / 1000 - time.time()) < 5


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_a_forked_child_makes_ids_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The random bits of ids are read ahead in blocks: a forked child (``cantata worker
    --processes N``) must not make the ids its parent makes next, even in the same
    clock tick."""
    import os

    from cantata.model import codec

    monkeypatch.setattr("cantata.model.codec.time.time_ns", lambda: 1_800_000_000_123_456_789)
    codec.new_id()  # a block read ahead, mostly unused
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next ids, to the parent
        os.close(read)
        os.write(write, ",".join(codec.new_id() for _ in range(20)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split(",")
    os.waitpid(pid, 0)
    parent = [codec.new_id() for _ in range(20)]
    assert len(child) == 20
    # the same clock, so the same stamps: only the random bits tell them apart
    assert {c[16:] for c in child}.isdisjoint({p[16:] for p in parent})


def test_ids_made_by_one_process_strictly_increase_even_when_the_clock_stands_still(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Runs queued in the same microsecond fall back to their ids for FIFO order: ids
    made one after another in a process sort in the order they were made, also when
    the clock does not move or steps back."""
    import uuid

    from cantata.model import codec

    frozen = [1_800_000_000_123_456_789]
    monkeypatch.setattr("cantata.model.codec.time.time_ns", lambda: frozen[0])
    ids = [codec.new_id() for _ in range(5000)]
    frozen[0] -= 10_000_000  # a step back of 10 ms
    ids += [codec.new_id() for _ in range(100)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    for text in ids:
        u = uuid.UUID(text)
        assert u.version == 7 and u.variant == uuid.RFC_4122


BRANCHES = ("a", "b", "c")


def undo_app(url: str, finish: list[str], undone: list[str], stop_at: str | None) -> App:
    """``order``: three ``asyncio.gather`` branches whose steps complete in the order of
    ``finish``, then ``gate`` fails: the run undoes them. ``stop_at`` (``"gate"``, or
    ``"undo"``: the first compensation) blocks there, for the worker to stop."""
    app = make_app(url)
    done: list[str] = []

    def make(name: str) -> None:
        async def step(n: int) -> int:
            turn = finish.index(name)
            await eventually(lambda: done == finish[:turn])  # the ones before it ended
            await asyncio.sleep(0.02)
            done.append(name)
            return n

        async def undo(n: int) -> None:
            undone.append(name)
            if stop_at == "undo":
                await asyncio.Event().wait()  # the worker stops here

        step.__name__, undo.__name__ = name, f"undo_{name}"
        app.step(retry=cantata.Retry(max_attempts=1))(step)
        app.step(undo)

    for name in BRANCHES:
        make(name)

    @app.step(retry=cantata.Retry(max_attempts=1))
    async def gate(n: int) -> None:
        if stop_at == "gate":
            await asyncio.Event().wait()  # the worker stops here
        raise RuntimeError("declined")

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> None:
        await asyncio.gather(*(ctx.run(b, n, compensate=f"undo_{b}") for b in BRANCHES))
        await ctx.run(gate, n)

    return app


def test_compensations_run_in_reverse_completion_order_with_or_without_a_restart() -> None:
    """Branches completing in any order are undone newest completion first, also by a
    worker that resumes the run (replaying the branches' results in the code's order)
    after the first one stopped before the undo or in its middle."""

    @settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(finish=st.permutations(BRANCHES),
           stop_at=st.sampled_from([None, "gate", "undo"]))
    def check(finish: list[str], stop_at: str | None) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{Path(tmp) / 'c.db'}"
            undone: list[str] = []

            async def scenario() -> None:
                first = undo_app(url, finish, undone, stop_at)
                async with first:
                    h = await first.start("order", 1)
                    if stop_at is None:
                        with pytest.raises(cantata.WorkflowCompensated):
                            await h.result(timeout=10)
                        return

                    async def stopped_there() -> bool:
                        history = await first.store.load_history(first.name, h.run_id)
                        keys = [e.key for e in history]
                        return ("gate#1" in keys if stop_at == "gate"
                                else any(k.startswith("compensate:") for k in keys))

                    await eventually(stopped_there)
                second = undo_app(url, finish, undone, None)  # resumes from the history
                async with second:
                    with pytest.raises(cantata.WorkflowCompensated):
                        await second.get_handle(h.run_id).result(timeout=10)

            asyncio.run(scenario())
            if stop_at == "undo":  # the compensation cut short ran again, first
                assert undone[:1] == undone[1:2]
                undone.pop(0)
            assert undone == list(reversed(finish))

    check()


@settings(max_examples=1000, deadline=None)
@given(whole=st.integers(min_value=0, max_value=253_402_300_796),  # (to 9999-12-31)
       micro=st.integers(min_value=0, max_value=1_999_999),
       nudge=st.sampled_from([0.0, 5e-7, -5e-7, 1e-9, 0.49e-6]),
       other=st.floats(min_value=0, max_value=4e9))
def test_event_times_are_what_datetime_writes(
    whole: int, micro: int, nudge: float, other: float
) -> None:
    """``now_iso`` (every event's ``time``) gives what
    ``datetime.fromtimestamp(ts, UTC).isoformat()`` gives, ``Z`` for ``+00:00``: the
    same rounding to the microsecond (half to even, up into the next second), no
    fraction on a whole second, for a timestamp just after another in the same second
    (its date and time of day kept) and for any other."""
    import datetime as dt

    from cantata.model.codec import now_iso

    def written(ts: float) -> str:
        return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")

    for ts in (whole + micro / 1e6 + nudge, whole + 0.9999995, float(whole), other):
        if ts >= 0:
            assert now_iso(ts) == written(ts), ts
