"""Versions and patches: old and new runs in flight both finish under new code."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Retry, RunStatus, WorkflowContext, WorkflowFailed
from tests.engine.helpers import eventually, make_app


def shop(url: str, calls: Counter[str], *, patched: bool, **kw: Any) -> App:
    """v1: reserve, wait for payment, ship. v2 adds a fraud check behind a patch."""
    app = make_app(url, **kw)

    @app.step
    async def reserve(order_id: int) -> str:
        calls[f"reserve:{order_id}"] += 1
        return "reserved"

    @app.step
    async def fraud_check(order_id: int) -> bool:
        calls[f"fraud:{order_id}"] += 1
        return True

    @app.step
    async def ship(order_id: int) -> str:
        calls[f"ship:{order_id}"] += 1
        return "shipped"

    if patched:
        @app.workflow
        async def order(ctx: WorkflowContext, order_id: int) -> list[str]:
            out = [await ctx.run(reserve, order_id)]
            if ctx.patched("fraud-check"):
                out.append(f"checked={await ctx.run(fraud_check, order_id)}")
            await ctx.wait_for_event("paid", match={"order_id": order_id})
            out.append(await ctx.run(ship, order_id))
            return out
    else:
        @app.workflow
        async def order(ctx: WorkflowContext, order_id: int) -> list[str]:
            out = [await ctx.run(reserve, order_id)]
            await ctx.wait_for_event("paid", match={"order_id": order_id})
            out.append(await ctx.run(ship, order_id))
            return out

    return app


async def _waiting(app: App, run_id: str) -> bool:
    return any(e.kind == "wait" for e in await app.store.load_history(app.name, run_id))


async def test_patched_old_and_new_runs_in_flight_both_finish(shared_url: str) -> None:
    calls: Counter[str] = Counter()
    old = shop(shared_url, calls, patched=False)
    async with old:  # the old code parks a run at its wait, then is replaced
        first = await old.start("order", 1)
        await eventually(lambda: _waiting(old, first.run_id), timeout=10)
    new = shop(shared_url, calls, patched=True)
    assert new.version != old.version
    async with new:
        second = await new.start("order", 2)
        await eventually(lambda: _waiting(new, second.run_id), timeout=10)
        await new.publish("paid", {"order_id": 1})
        await new.publish("paid", {"order_id": 2})
        assert await new.get_handle(first.run_id).result(timeout=10) == [
            "reserved", "shipped"  # recorded before the patch: the old path
        ]
        assert await second.result(timeout=10) == ["reserved", "checked=True", "shipped"]
        assert calls == Counter({"reserve:1": 1, "ship:1": 1, "reserve:2": 1, "fraud:2": 1,
                                 "ship:2": 1})
        first_run, second_run = await new.get_handle(first.run_id).info(), await second.info()
        # the old run, adopted by the new code (it replays), is pinned to it
        assert (first_run.version, second_run.version) == (new.version, new.version)
        keys = [e.key for e in await new.store.load_history(new.name, second.run_id)]
        assert "patch:fraud-check#1" in keys
        # replayed again (as after a crash), each run keeps its answer
        from cantata.engine.replaycheck import check_replay

        assert await check_replay(new, all_runs=True) == []


async def test_a_patch_reached_after_the_old_frontier_is_taken(sqlite_url: str) -> None:
    """A run parked before the patch point takes the new path when it gets there."""
    calls: Counter[str] = Counter()
    old = make_app(sqlite_url)

    @old.workflow(name="flow")
    async def v1(ctx: WorkflowContext) -> str:
        await ctx.wait_for_event("go")
        return "old"

    async with old:
        h = await old.start("flow")
        await eventually(lambda: _waiting(old, h.run_id))
    new = make_app(sqlite_url)

    @new.workflow(name="flow")
    async def v2(ctx: WorkflowContext) -> str:
        await ctx.wait_for_event("go")
        calls["after"] += 1
        return "new" if ctx.patched("after-wait") else "old"

    async with new:
        await new.publish("go", {})
        assert await new.get_handle(h.run_id).result(timeout=10) == "new"


async def test_a_worker_leaves_runs_it_cannot_replay_unless_told(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    old = shop(sqlite_url, calls, patched=False)
    async with old:
        h = await old.start("order", 1)
        await eventually(lambda: _waiting(old, h.run_id), timeout=10)

    # New code that inserts a step without a patch: it cannot replay the old run.
    new = make_app(sqlite_url)

    @new.step(name="reserve")
    async def reserve(order_id: int) -> str:
        return "reserved"

    @new.step
    async def fraud_check(order_id: int) -> bool:
        return True

    @new.workflow(name="order")
    async def order(ctx: WorkflowContext, order_id: int) -> str:
        await ctx.run(fraud_check, order_id)
        await ctx.run(reserve, order_id)
        await ctx.wait_for_event("paid")
        return "done"

    async with new:
        fresh = await new.start("order", 2)  # its own version: taken
        await eventually(lambda: _waiting(new, fresh.run_id), timeout=10)
        await eventually(lambda: _verdict(new, h.run_id), timeout=10)
        run = await new.get_handle(h.run_id).info()
        assert (run.status, run.owner, run.version) == (RunStatus.RUNNING, None, old.version)
    forced = make_app(sqlite_url, any_version=True)
    forced.include(new)
    async with forced:
        with pytest.raises(WorkflowFailed, match="NonDeterminismError"):
            await forced.get_handle(h.run_id).result(timeout=10)


def _verdict(app: App, run_id: str) -> bool:
    seen = app.engine.replay_verdicts.get(run_id)
    return seen is not None and seen[1] is False


async def test_versions_are_recorded_on_runs(sqlite_url: str) -> None:
    app = make_app(sqlite_url, version="2026-12-01.1")

    @app.workflow
    async def noop(ctx: WorkflowContext) -> int:
        return 1

    async with app:
        h = await app.start(noop)
        await h.result(timeout=5)
        assert (await h.info()).version == "2026-12-01.1"
        [info] = await app.find_runs()
        assert info.version == "2026-12-01.1"
    same, other = make_app(sqlite_url), make_app(sqlite_url)
    same.include(app)
    other.include(app)
    assert same.version == other.version and len(same.version) == 12  # a hash of the code

    @other.step
    async def extra() -> None: ...

    assert other.version != same.version


V1 = """
import cantata
app = cantata.App("shop", lease=1.0, poll_interval=0.05)

@app.step
async def reserve(order_id: int) -> str:
    return "reserved"

@app.step
async def fraud_check(order_id: int) -> bool:
    return True

@app.step
async def ship(order_id: int) -> str:
    return "shipped"

@app.workflow
async def order(ctx, order_id: int) -> list:
    out = [await ctx.run(reserve, order_id)]
    PATCH
    await ctx.wait_for_event("paid", match={"order_id": order_id})
    out.append(await ctx.run(ship, order_id))
    return out
"""
PATCHED = """if ctx.patched("fraud-check"):
        out.append(f"checked={await ctx.run(fraud_check, order_id)}")"""


# Seconds a worker process may take to serve, or to stop: it imports the app and
# cantata and opens the store; on a loaded machine (the suite's other processes) that
# is many seconds of waiting for a core.
WORKER_START = 90.0


def _worker(spec: str, url: str, folder: Path) -> tuple[subprocess.Popen[bytes], int]:
    """``cantata worker SPEC`` in its own process (it inherits PYTHONPATH), and the pipe
    on which it says it serves (``--ready-fd``, as to a supervisor; see
    :func:`_served`). Its stderr goes to ``worker.log`` in ``folder`` (:func:`_log`)."""
    read, write = os.pipe()
    try:
        with (folder / "worker.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "cantata", "worker", spec, "--store", url,
                 "--processes", "1", "--ready-fd", str(write)],
                cwd=folder, stdout=subprocess.DEVNULL, stderr=log, pass_fds=(write,),
            )
    finally:
        os.close(write)
    return proc, read


async def _served(proc: subprocess.Popen[bytes], ready: int, folder: Path) -> None:
    """Wait until the worker ``proc`` serves (it writes to its ready pipe): up to
    :data:`WORKER_START` seconds. Raises AssertionError with its log otherwise."""
    try:
        said = await _read_byte(ready, WORKER_START)
    finally:
        os.close(ready)
    if said == b"r":
        return
    if said is None:
        proc.kill()
    ended = await asyncio.to_thread(proc.wait, WORKER_START)
    why = (f"did not serve within {WORKER_START:g} s" if said is None
           else f"ended (exit status {ended}) before it served")
    raise AssertionError(f"the worker {why}: {_log(folder)}")


async def _read_byte(fd: int, timeout: float) -> bytes | None:
    """The first byte written to ``fd`` (b"" once every writer closed it); None when
    nothing came within ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    def readable() -> None:
        if not got.done():
            got.set_result(os.read(fd, 1))

    loop.add_reader(fd, readable)
    try:
        return await asyncio.wait_for(got, timeout)
    except TimeoutError:
        return None
    finally:
        loop.remove_reader(fd)


def _log(folder: Path) -> str:
    return (folder / "worker.log").read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.timeout(4 * WORKER_START)
async def test_old_worker_process_parks_runs_and_new_code_finishes_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    (tmp_path / "shop_v1.py").write_text(V1.replace("PATCH", "pass"))
    (tmp_path / "shop_v2.py").write_text(V1.replace("PATCH", PATCHED))
    monkeypatch.syspath_prepend(str(tmp_path))
    url = f"sqlite:///{tmp_path}/shop.db"
    old, ready = _worker("shop_v1:app", url, tmp_path)
    await _served(old, ready, tmp_path)
    try:
        v1 = importlib.import_module("shop_v1").app
        v1.configure(store=url)
        async with v1.client():  # the old service starts orders; its worker parks them
            handles = [await v1.start("order", i) for i in (1, 2)]
            for h in handles:
                await eventually(lambda h=h: _waiting(v1, h.run_id), timeout=30)
    finally:
        old.terminate()
        assert await asyncio.to_thread(old.wait, WORKER_START) == 0, _log(tmp_path)
    v2 = importlib.import_module("shop_v2").app
    v2.configure(store=url)
    try:
        async with v2:  # the new code: old runs in flight, and a new one
            new = await v2.start("order", 3)
            await eventually(lambda: _waiting(v2, new.run_id), timeout=10)
            for i in (1, 2, 3):
                await v2.publish("paid", {"order_id": i})
            for h in handles:
                assert await v2.get_handle(h.run_id).result(timeout=10) == [
                    "reserved", "shipped"
                ]
            assert await new.result(timeout=10) == ["reserved", "checked=True", "shipped"]
    finally:
        sys.modules.pop("shop_v1", None)
        sys.modules.pop("shop_v2", None)


async def test_runs_of_a_served_newer_version_stay_with_it(sqlite_url: str) -> None:
    calls: Counter[str] = Counter()
    old = shop(sqlite_url, calls, patched=False, version="v1")
    new = shop(sqlite_url, calls, patched=True, version="v2")
    async with old:  # v1 serves first
        pass
    client = shop(sqlite_url, calls, patched=True, version="v3-client")
    async with client.client():  # a version that never served: any worker may replay it
        by_client = await client.start("order", 9)
    async with old:
        await eventually(lambda: _waiting(old, by_client.run_id), timeout=10)
        async with new:  # v2 serves after v1: its runs are not v1's to take
            h = await new.start("order", 1)
            await eventually(lambda: _waiting(new, h.run_id), timeout=10)
        old.engine.foreign_checked_at = -1e9
        await old.publish("paid", {"order_id": 9})
        assert await old.get_handle(by_client.run_id).result(timeout=10) == [
            "reserved", "shipped"
        ]
        await asyncio.sleep(0.5)  # v1 looks for runs it may take: not v2's
        run = await old.get_handle(h.run_id).info()
        assert (run.owner, run.version, run.status) == (None, "v2", RunStatus.RUNNING)


def two_waits(url: str, version: str, calls: Counter[str], *, extra: bool) -> App:
    """a, wait go1, b, wait go2; with ``extra``, a step ``x`` before ``b`` (no patch)."""
    app = make_app(url, version=version)

    @app.step
    async def a() -> str:
        calls[f"a@{version}"] += 1
        return "a"

    @app.step
    async def x() -> str:
        calls[f"x@{version}"] += 1
        return "x"

    @app.step
    async def b() -> str:
        calls[f"b@{version}"] += 1
        return "b"

    @app.workflow
    async def flow(ctx: WorkflowContext) -> list[str]:
        out = [await ctx.run(a)]
        await ctx.wait_for_event("go1")
        if extra:
            out.append(await ctx.run(x))
        out.append(await ctx.run(b))
        await ctx.wait_for_event("go2")
        return out

    return app


async def _waits(app: App, run_id: str, n: int) -> bool:
    history = await app.store.load_history(app.name, run_id)
    return sum(e.kind == "wait" for e in history) >= n


async def test_a_run_adopted_by_newer_code_is_not_given_back_to_the_old(
    sqlite_url: str,
) -> None:
    """A rolling deploy: v2 adopts a v1 run (it replays it) and records its own new call
    in it; a v1 worker still up must not take that run back as its own, unchecked (its
    code cannot replay what v2 recorded: the run would fail NonDeterminismError)."""
    calls: Counter[str] = Counter()
    old = two_waits(sqlite_url, "v1", calls, extra=False)
    new = two_waits(sqlite_url, "v2", calls, extra=True)
    async with old:
        h = await old.start("flow")
        await eventually(lambda: _waits(old, h.run_id, 1), timeout=10)
    async with new:  # v2 serves, adopts the run and goes on with its code
        await new.publish("go1", {})
        await eventually(lambda: _waits(new, h.run_id, 2), timeout=10)
        assert (await new.get_handle(h.run_id).info()).version == "v2"
    async with old:  # the old worker, still up, sees the run due
        await old.publish("go2", {})
        await asyncio.sleep(1.0)
        run = await old.get_handle(h.run_id).info()
        assert (run.status, run.error) == (RunStatus.RUNNING, None)
    async with new:
        assert await new.get_handle(h.run_id).result(timeout=10) == ["a", "x", "b"]
    assert calls == Counter({"a@v1": 1, "x@v2": 1, "b@v2": 1})


def queued(url: str, version: str, calls: Counter[str], *, extra: bool) -> App:
    """A queued workflow: a, wait go; with ``extra``, a step ``x`` before the wait."""
    app = make_app(url, version=version)
    app.queue("q", concurrency=5)

    @app.step
    async def a() -> str:
        calls[f"a@{version}"] += 1
        return "a"

    @app.step
    async def x() -> str:
        calls[f"x@{version}"] += 1
        return "x"

    @app.workflow(queue="q")
    async def qflow(ctx: WorkflowContext) -> list[str]:
        out = [await ctx.run(a)]
        if extra:
            out.append(await ctx.run(x))
        await ctx.wait_for_event("go")
        return out

    return app


async def test_a_queued_run_begun_by_other_code_stays_with_that_code(sqlite_url: str) -> None:
    """A client of new code (v2, no worker of it yet) starts a queued run; the v1 worker
    begins it. Once v2 serves, the run is not v2's to take unchecked: v1's code recorded
    its history, which v2 does not replay."""
    calls: Counter[str] = Counter()
    old = queued(sqlite_url, "v1", calls, extra=False)
    new = queued(sqlite_url, "v2", calls, extra=True)
    async with old:
        async with new.client():
            h = await new.start("qflow")
        await eventually(lambda: _waits(old, h.run_id, 1), timeout=10)
    async with new:  # v2 serves; the run's event comes
        await new.publish("go", {})
        await asyncio.sleep(1.5)  # v2 looks for runs of other versions (once a second)
        run = await new.get_handle(h.run_id).info()
        assert (run.status, run.error) == (RunStatus.RUNNING, None)
    async with old:
        assert await old.get_handle(h.run_id).result(timeout=10) == ["a"]
    assert calls == Counter({"a@v1": 1})


def stamped(url: str, version: str, *, bug: bool = False, **kw: Any) -> App:
    """An app whose one step says which version's code ran it (or, with ``bug``, fails
    saying so)."""
    app = make_app(url, version=version, **kw)

    @app.step(retry=Retry(max_attempts=1))
    async def b() -> str:
        if bug:
            raise RuntimeError(f"the {version} bug")
        return f"executed by {version} code"

    @app.workflow
    async def flow(ctx: WorkflowContext) -> str:
        result: str = await ctx.run(b)
        return result

    return app


async def test_a_newer_version_that_just_served_keeps_its_runs(sqlite_url: str) -> None:
    """An old worker that read the versions before the new one served (its read is
    kept for a lease) still leaves the new version's runs alone."""
    old = stamped(sqlite_url, "v1", lease=30.0)
    async with old:
        warm = await old.start("flow")  # v1 serves, and has read the served versions
        assert await warm.result(timeout=10) == "executed by v1 code"
        await eventually(lambda: old.engine.version_order is not None, timeout=10)
        new = stamped(sqlite_url, "v2", lease=30.0)
        async with new:  # v2 serves (and stops): it is now the newest version
            pass
        async with new.client():
            h = await new.start("flow")
        await asyncio.sleep(1.5)  # v1 looks for runs of other versions (once a second)
        run = await old.get_handle(h.run_id).info()
        assert (run.version, run.status, run.owner) == ("v2", RunStatus.PENDING, None)
    async with new:
        assert await new.get_handle(h.run_id).result(timeout=10) == "executed by v2 code"


async def test_a_run_retried_for_a_fix_stays_with_the_fix(sqlite_url: str) -> None:
    old = stamped(sqlite_url, "v1", bug=True, lease=30.0)
    async with old:
        h = await old.start("flow")
        with pytest.raises(WorkflowFailed, match="the v1 bug"):
            await h.result(timeout=10)
        await eventually(lambda: old.engine.version_order is not None, timeout=10)
        fixed = stamped(sqlite_url, "v2", lease=30.0)
        async with fixed:  # the fix serves (and stops) while v1 still runs
            pass
        async with fixed.client():
            await fixed.get_handle(h.run_id).retry(actor="ops")
        await asyncio.sleep(1.5)  # v1 looks for runs of other versions (once a second)
        run = await old.get_handle(h.run_id).info()
        assert (run.version, run.owner) == ("v2", None)
        assert run.status in (RunStatus.PENDING, RunStatus.RUNNING)
    async with fixed:
        assert await fixed.get_handle(h.run_id).result(timeout=10) == "executed by v2 code"


async def test_a_parked_run_of_an_older_version_is_taken_when_due(sqlite_url: str) -> None:
    """A run of an older version parked on its timer is adopted once the timer is due."""
    def napper(version: str) -> App:
        app = make_app(sqlite_url, version=version, park_after=0.0)

        @app.workflow
        async def nap(ctx: WorkflowContext) -> str:
            await ctx.sleep(1.5)
            return "woke"

        return app

    old = napper("v1")
    async with old:
        h = await old.start("nap")
        await eventually(lambda: _parked(old, h.run_id), timeout=10)
    new = napper("v2")
    async with new:
        assert await new.get_handle(h.run_id).result(timeout=10) == "woke"


async def _parked(app: App, run_id: str) -> bool:
    run = await app.get_handle(run_id).info()
    return run.status == RunStatus.RUNNING and run.owner is None  # released, asleep


async def test_stalled_names_a_run_no_live_worker_may_take(sqlite_url: str) -> None:
    old, new = stamped(sqlite_url, "v1"), stamped(sqlite_url, "v2")
    async with old:  # v1 serves first, then v2: v2's runs are not v1's to take
        pass
    async with new:
        pass
    async with new.client():
        h = await new.start("flow")
    async with old:  # only v1 is deployed (a rollback)
        await asyncio.sleep(1.5)  # v1 heartbeats, and looks for runs it may take
        assert (await old.get_handle(h.run_id).info()).status == RunStatus.PENDING
        [stall] = [s for s in await old.stalled(older_than=0) if s.node.ref == h.run_id]
    assert stall.reason == "pending_step"
    assert stall.hint == (
        "no live worker takes version v2 of this run (live workers run v1): deploy that "
        "version, re-pin its runs to the live code (`cantata runs repin --from-version v2 "
        "--app MODULE:app`), or run a worker with --any-version"
    )


def _saga_app(**change: Any) -> App:
    """An app with one saga, its steps declared once; ``change`` edits the saga."""
    from cantata import Saga, Step

    app = App("sagaver")

    @app.step
    async def reserve(data: dict[str, Any]) -> str:
        return "r"

    @app.step
    async def release(data: dict[str, Any]) -> None: ...

    @app.step
    async def release_v2(data: dict[str, Any]) -> None: ...

    @app.step
    async def charge(data: dict[str, Any]) -> str:
        return "c"

    undo = release_v2 if change.get("compensate") else release
    charge_step = Step(charge, retry=change.get("retry"), timeout=change.get("timeout"))
    app.include(Saga("order", Step(reserve, compensate=undo), charge_step,
                     mode=change.get("mode", "orchestrated"),
                     max_state=change.get("max_state", 262144)))
    return app


def test_a_sagas_version_covers_its_steps_options_not_its_mode() -> None:
    """As a plain workflow's source covers what each ``ctx.run`` runs, undoes and
    retries, a saga's version covers each ``Step``'s compensation, retry and timeout
    (and its ``max_state``); its ``mode=`` is not code (docs/styles.md)."""
    base = _saga_app().version
    assert _saga_app().version == base  # the same code: the same version
    assert _saga_app(mode="choreographed").version == base
    changed = {
        "compensate": _saga_app(compensate=True).version,
        "retry": _saga_app(retry=Retry(max_attempts=5)).version,
        "retry backoff": _saga_app(retry=Retry(backoff=3.0)).version,
        "timeout": _saga_app(timeout=5.0).version,
        "max_state": _saga_app(max_state=4096).version,
    }
    assert all(v != base for v in changed.values()), changed
    assert len(set(changed.values())) == len(changed), changed


def retried_queued(url: str, version: str, calls: Counter[str], *, bug: bool = False,
                   first: str | None = None) -> App:
    """A queued workflow: a, then b (which fails with ``bug``); with ``first``, a step
    of that name before a (code that does not replay a history recorded without it)."""
    app = make_app(url, version=version)
    app.queue("q", concurrency=5)

    @app.step
    async def a() -> str:
        calls[f"a@{version}"] += 1
        return "a"

    @app.step(retry=Retry(max_attempts=1))
    async def b() -> str:
        calls[f"b@{version}"] += 1
        if bug:
            raise RuntimeError(f"the {version} bug")
        return "b"

    @app.step(name=first or "unused")
    async def extra() -> str:
        calls[f"{first}@{version}"] += 1
        return "extra"

    @app.workflow(queue="q")
    async def rq(ctx: WorkflowContext) -> list[str]:
        out = [await ctx.run(extra)] if first else []
        out.append(await ctx.run(a))
        out.append(await ctx.run(b))
        return out

    return app


async def _retried_in_queue(url: str, calls: Counter[str]) -> str:
    """A run of v1 failed in b, retried by v1's code (pinned to v1, back in its queue
    with its history: a#1), while v1's workers are gone."""
    old = retried_queued(url, "v1", calls, bug=True)
    async with old:
        h = await old.start("rq")
        with pytest.raises(WorkflowFailed, match="the v1 bug"):
            await h.result(timeout=10)
    async with old.client():  # v1's code retries it: pinned to v1
        await old.get_handle(h.run_id).retry(actor="ops")
        run = await old.store.get_run(old.name, h.run_id)
    assert run is not None and (run.version, run.status) == ("v1", RunStatus.PENDING)
    return h.run_id


async def test_a_retried_queued_run_is_begun_by_other_code_only_if_it_replays(
    sqlite_url: str,
) -> None:
    """A queued run with history, of another version, goes through the replay check
    as a run outside a queue does: code that does not replay it leaves it waiting for
    a worker of its version (and ``stalled`` says so); code that replays it begins it
    and pins it to its own version."""
    calls: Counter[str] = Counter()
    run_id = await _retried_in_queue(sqlite_url, calls)
    other = retried_queued(sqlite_url, "v2", calls, first="x")  # inserts x before a
    async with other:
        await asyncio.sleep(2.5)  # v2 claims its queue, and looks at older runs
        run = await other.store.get_run(other.name, run_id)
        assert run is not None
        assert (run.status, run.owner, run.version) == (RunStatus.PENDING, None, "v1")
        assert calls["x@v2"] == 0 and calls["a@v2"] == 0
        [stall] = [s for s in await other.stalled(older_than=0) if s.node.ref == run_id]
        assert stall.hint is not None and "no live worker runs version v1" in stall.hint
    fixed = retried_queued(sqlite_url, "v3", calls)  # replays a#1, b fixed
    async with fixed:
        assert await fixed.get_handle(run_id).result(timeout=10) == ["a", "b"]
        run = await fixed.store.get_run(fixed.name, run_id)
        assert run is not None and run.version == "v3"
    assert calls == Counter({"a@v1": 1, "b@v1": 1, "b@v3": 1})


def rollback_app(url: str, version: str, *, newer: bool, **kw: Any) -> App:
    """a, then (newer code, for a run started with ``extra``) x, a wait for go, then b."""
    app = make_app(url, version=version, **kw)

    @app.step
    async def a() -> str:
        return f"a@{version}"

    @app.step
    async def x() -> str:
        return f"x@{version}"

    @app.step
    async def b() -> str:
        return f"b@{version}"

    @app.workflow
    async def flow(ctx: WorkflowContext, extra: bool) -> list[str]:
        out = [await ctx.run(a)]
        if extra and newer:
            out.append(await ctx.run(x))
        await ctx.wait_for_event("go")
        out.append(await ctx.run(b))
        return out

    return app


async def test_a_rollback_repins_the_runs_old_code_replays_and_no_one_holds(
    sqlite_url: str,
) -> None:
    """``app.repin_runs``: after a rollback, the runs of the newer version that the old
    code replays move to it (a dry run first changes nothing); a run it does not replay
    and a run a live worker holds stay, each with why. The old code's workers then take
    the moved runs without --any-version."""
    old = rollback_app(sqlite_url, "v1", newer=False)
    async with old:  # v1 served first
        pass
    new = rollback_app(sqlite_url, "v2", newer=True, park_after=0.0)
    async with new:
        ok, bad = await new.start("flow", False), await new.start("flow", True)
        for h in (ok, bad):
            await eventually(lambda h=h: _parked(new, h.run_id), timeout=10)
    async with new.client():  # (not begun yet: a worker may claim it at once)
        held = await new.start("flow", False)
    async with old.client():  # the rollback's operator, with the old code
        now = old.clock.now()
        await old.store.heartbeat(old.name, "busy-worker", now, None, lease=60.0)
        await old.store.claim_runs(old.name, "busy-worker", ["flow"], stale_before=now,
                                   limit=1, run_ids=[held.run_id])
        dry = await old.repin_runs("v2", dry_run=True, actor="ops")
        outcome = {r.run_id: (r.moved, r.reason or "") for r in dry.runs}
        assert outcome[ok.run_id] == (True, "")
        assert outcome[bad.run_id][0] is False
        assert "does not replay on this code: call 2: history recorded 'x#1'" in \
            outcome[bad.run_id][1]
        assert outcome[held.run_id][0] is False
        assert "live worker busy-worker holds it" in outcome[held.run_id][1]
        assert {r.version for r in await old.find_runs(workflow="flow")} == {"v2"}
        report = await old.repin_runs("v2", "v1", actor="ops")
        assert [r.run_id for r in report.moved] == [ok.run_id]
        assert {r.run_id for r in report.left} == {bad.run_id, held.run_id}
        assert [r.run_id for r in await old.find_runs(version="v1")] == [ok.run_id]
        [record] = [r for r in await old.store.audit_records(old.name)
                    if r.action == "run.repinned"]
        assert (record.actor, record.target) == ("ops", ok.run_id)
    async with old:  # v1's workers take the moved run, as their own
        await old.publish("go", {})
        assert await old.get_handle(ok.run_id).result(timeout=10) == ["a@v2", "b@v1"]
        await asyncio.sleep(1.5)  # v1 looks at older and newer runs (once a second)
        run = await old.get_handle(bad.run_id).info()
        assert (run.version, run.status) == ("v2", RunStatus.RUNNING)


async def test_a_queued_run_without_history_waiting_its_turn_gets_no_version_hint(
    sqlite_url: str,
) -> None:
    """A queued run of an older version that never began has nothing to replay: a newer
    worker begins it when the queue lets it, so ``stalled`` does not blame its version
    while it waits its turn (it does for one with history, above)."""
    def gated(version: str) -> App:
        app = make_app(sqlite_url, version=version)
        app.queue("one", concurrency=1)

        @app.workflow(queue="one")
        async def gate(ctx: WorkflowContext) -> str:
            await ctx.wait_for_event("open")
            return version

        return app

    old, new = gated("v1"), gated("v2")
    async with old:
        first = await old.start("gate")
        await eventually(lambda: _waiting(old, first.run_id), timeout=10)
        second = await old.start("gate")  # behind it, in the queue's one slot
    async with new:
        await asyncio.sleep(1.5)  # v2 takes the first (it replays), the second waits
        [stall] = [s for s in await new.stalled(older_than=0) if s.node.ref == second.run_id]
        assert stall.reason == "queued" and stall.hint is None
        await new.publish("open", {})
        assert await new.get_handle(second.run_id).result(timeout=10) == "v2"
