"""`cantata stalled` after a deploy: a run no live worker may take says why.

A run whose history the deployed code cannot replay, and a run of a workflow the
deployed code no longer has, make no progress while workers serve the app; the stall
names the cause and what to do (docs/operating.md, versions), as it does for a run of
a newer version.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from cantata import App, Event, RunStatus, WorkflowContext, WorkflowFailed
from tests.engine.helpers import eventually, make_app


def _napper(
    url: str, version: str, *, insert: bool = False, keep: bool = True, **kw: Any
) -> App:
    """v1: ``first`` then a sleep. ``insert``: a step inserted before ``first`` (old runs
    no longer replay). ``keep=False``: the workflow ``old_flow`` is removed."""
    app = make_app(url, version=version, park_after=0.0, **kw)

    @app.step
    async def first() -> str:
        return "first"

    @app.step
    async def inserted() -> str:
        return "inserted"

    @app.workflow
    async def nap(ctx: WorkflowContext) -> str:
        if insert:
            await ctx.run(inserted)
        await ctx.run(first)
        await ctx.sleep(0.5)
        return version

    if keep:
        @app.workflow
        async def old_flow(ctx: WorkflowContext) -> str:
            await ctx.sleep(0.5)
            return version

    return app


async def _released(app: App, run_id: str) -> bool:
    run = await app.get_handle(run_id).info()
    return run.status == RunStatus.RUNNING and run.owner is None


async def _stall_of(app: App, run_id: str) -> str | None:
    found = [s for s in await app.stalled(older_than=0) if s.node.ref == run_id
             or s.correlation_id == run_id]
    assert len(found) == 1, found
    return found[0].hint


async def test_a_run_the_deployed_code_cannot_replay_or_lacks_says_so(sqlite_url: str) -> None:
    old = _napper(sqlite_url, "v1")
    async with old:  # v1 serves, its runs park in their sleep
        changed = await old.start("nap")
        removed = await old.start("old_flow")
        for h in (changed, removed):
            await eventually(lambda h=h: _released(old, h.run_id), timeout=10)
    new = _napper(sqlite_url, "v2", insert=True, keep=False)
    async with new:  # only v2 is deployed: it replays neither run
        await asyncio.sleep(1.5)  # both runs are due; v2 heartbeats and looks
        assert (await new.get_handle(changed.run_id).info()).owner is None
        assert await _stall_of(new, changed.run_id) == (
            "no live worker runs version v1 of this run (live workers run v2, which take "
            "it only if their code replays its history: cantata check-replay APP names "
            "the first call that differs): deploy version v1, or guard the change with "
            "ctx.patched"
        )
        assert await _stall_of(new, removed.run_id) == (
            "no live worker serves workflow 'old_flow' (live workers run v2): deploy code "
            "that declares it (or run a worker of its service), or cancel the run"
        )
    async with old:  # the rollback finishes both, with the code that matches them
        assert await old.get_handle(changed.run_id).result(timeout=10) == "v1"
        assert await old.get_handle(removed.run_id).result(timeout=10) == "v1"


def _waiter(url: str, version: str, *, insert: bool = False) -> App:
    """v1: ``first`` then a wait for ``go`` matching the run's ``n``. ``insert``: a step
    inserted before ``first`` (old runs no longer replay)."""
    app = make_app(url, version=version, park_after=0.0)

    @app.step
    async def first() -> str:
        return "first"

    @app.step
    async def inserted() -> str:
        return "inserted"

    @app.workflow
    async def waits(ctx: WorkflowContext, n: int) -> str:
        if insert:
            await ctx.run(inserted)
        await ctx.run(first)
        await ctx.wait_for_event("go", match={"n": n}, timeout=3600)
        return version

    return app


async def test_a_run_whose_event_came_but_no_live_worker_replays_says_so(
    sqlite_url: str,
) -> None:
    """The event a parked run waited for came: the run is due, but no live worker may
    take it. Its stall says why (it said only that the run waits for the event,
    matching what was published: the operator looked for a wrong match)."""
    old = _waiter(sqlite_url, "v1")
    async with old:
        h = await old.start("waits", 7)
        await eventually(lambda: _released(old, h.run_id), timeout=10)
    new = _waiter(sqlite_url, "v2", insert=True)
    async with new:
        assert await _stall_of(new, h.run_id) is None  # waits, as it should: no hint
        await new.publish("go", {"n": 7})
        await asyncio.sleep(1.5)  # v2 wakes the run; it does not replay it
        assert (await new.get_handle(h.run_id).info()).owner is None
        assert await _stall_of(new, h.run_id) == (
            "no live worker runs version v1 of this run (live workers run v2, which take "
            "it only if their code replays its history: cantata check-replay APP names "
            "the first call that differs): deploy version v1, or guard the change with "
            "ctx.patched"
        )
    async with old:  # the rollback finishes it: the event is there
        assert await old.get_handle(h.run_id).result(timeout=10) == "v1"


async def test_a_run_failed_by_a_code_change_says_how_to_finish_it(sqlite_url: str) -> None:
    """A worker told ``--any-version`` fails a run its code cannot replay; the error
    says what finishes it (a retry from code that replays it), and that works. It said
    "deploy the old code to finish this run, or cancel it": a failed run cannot be
    cancelled, and the old code alone does not take a failed run."""
    old = _napper(sqlite_url, "v1")
    async with old:
        h = await old.start("nap")
        await eventually(lambda: _released(old, h.run_id), timeout=10)
    forced = _napper(sqlite_url, "v2", insert=True, any_version=True)
    async with forced:
        with pytest.raises(WorkflowFailed) as failed:
            await forced.get_handle(h.run_id).result(timeout=10)
    message = str(failed.value)
    assert "NonDeterminismError" in message and "or cancel it" not in message, message
    assert ("the run fails: retry it from code that replays its history (the old code, "
            "or the change guarded by ctx.patched): cantata retry --app MODULE:app ID"
            ) in message, message
    async with old:  # the advice, followed
        await old.get_handle(h.run_id).retry()
        assert await old.get_handle(h.run_id).result(timeout=10) == "v1"


def _billing(url: str, *, audit: bool) -> App:
    """Handler groups of one app: ``billing``, and ``audit`` unless a deploy removed it."""
    app = make_app(url)

    @app.on("order.placed", group="billing")
    async def bill(event: Event[Any], ctx: object) -> None: ...

    if audit:
        @app.on("order.placed", group="audit")
        async def keep(event: Event[Any], ctx: object) -> None: ...

    return app


async def test_an_event_for_a_group_no_live_worker_serves_says_so(sqlite_url: str) -> None:
    async with _billing(sqlite_url, audit=True):
        pass  # both groups declared
    new = _billing(sqlite_url, audit=False)
    async with new:  # the deploy that removed the audit group
        event = await new.publish("order.placed", {"order_id": 1})
        await asyncio.sleep(0.5)  # billing handles it, audit never will
        [stall] = await new.stalled(older_than=0)
        assert (stall.correlation_id, stall.reason, stall.node.group) == (
            event.id, "unhandled_event", "audit")
        assert stall.hint == (
            "no live worker serves group 'audit' (live workers serve: billing): start the "
            "service that declares it; a group removed from the code still gets the events "
            "it was declared for: retire it with `cantata groups retire audit`"
        )
    async with _billing(sqlite_url, audit=True) as both:  # the service that serves it
        await eventually(lambda: _none_stalled(both), timeout=10)


async def _none_stalled(app: App) -> bool:
    return await app.stalled(older_than=0) == []
