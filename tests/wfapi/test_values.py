"""ctx.set_value / handle.get_value: durable values a run publishes to any process."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from cantata import App, RunStatus, SerializationError, WorkflowContext, WorkflowFailed

from .helpers import eventually, make_app, other_process


async def test_values_are_read_while_the_run_waits_and_from_another_process(
    store_url: str,
) -> None:
    app = make_app(store_url)

    @app.workflow
    async def transfer(ctx: WorkflowContext, n: int) -> str:
        await ctx.set_value("progress", 0)
        for i in range(1, n + 1):
            await ctx.set_value("progress", i)  # a key set again is replaced
        await ctx.set_value("detail", {"files": n, "ok": True})
        await ctx.wait_for_event("transfer.approved")
        return "done"

    async with app:
        handle = await app.start(transfer, 3)
        assert await handle.get_value("detail", wait=10) == {"files": 3, "ok": True}
        assert await handle.get_value("progress") == 3
        async with other_process(store_url) as other:
            if other is not None:
                theirs = other.get_handle(handle.run_id)
                assert await theirs.get_value("progress") == 3
                assert await theirs.get_value("detail") == {"files": 3, "ok": True}
        assert await handle.status() == RunStatus.RUNNING
        await app.publish("transfer.approved", {})
        assert await handle.result(timeout=20) == "done"
        assert await handle.get_value("progress") == 3  # still there once the run ended


async def test_get_value_waits_for_a_value_set_later(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def slow(ctx: WorkflowContext) -> None:
        await ctx.sleep(0.3)
        await ctx.set_value("ready", "yes")

    async with app:
        handle = await app.start(slow)
        with pytest.raises(KeyError, match="ready"):
            await handle.get_value("ready")  # no wait: absent now
        assert await handle.get_value("ready", wait=10) == "yes"


async def test_get_value_of_a_key_never_set_raises_key_error(store_url: str) -> None:
    app = make_app(store_url)

    @app.workflow
    async def quiet(ctx: WorkflowContext) -> int:
        await ctx.set_value("a", 1)
        return 1

    async with app:
        handle = await app.start(quiet)
        assert await handle.result(timeout=20) == 1
        with pytest.raises(KeyError, match=r"no value 'b'.*values set: a"):
            await handle.get_value("b", wait=5)  # the run ended: no use waiting


def _resumable(store_url: str, seen: list[int]) -> App:
    app = make_app(store_url)

    @app.step
    async def work(n: int) -> int:
        seen.append(n)
        return n

    @app.workflow
    async def wf(ctx: WorkflowContext) -> int:
        await ctx.set_value("stage", "started")
        await ctx.run(work, 1)
        await ctx.set_value("stage", "waiting")
        ev = await ctx.wait_for_event("go")
        await ctx.set_value("stage", "finished")
        return int(ev.data["n"])

    return app


async def test_set_value_is_replay_safe_and_recorded_once(store_url: str) -> None:
    if store_url.startswith("memory://"):
        pytest.skip("a memory:// store ends with its app: there is nothing to resume")
    seen: list[int] = []
    app = _resumable(store_url, seen)
    async with app:
        handle = await app.start("wf")
        await eventually(lambda: _value(handle, "stage", "waiting"))
    resumed = _resumable(store_url, seen)  # a new worker replays the run's history
    async with resumed:
        await resumed.publish("go", {"n": 7})
        assert await resumed.get_handle(handle.run_id).result(timeout=20) == 7
        entries = await resumed.store.load_history(resumed.name, handle.run_id)
        assert [e.result for e in entries if e.kind == "set_value"] == [
            '"started"', '"waiting"', '"finished"'
        ]
        assert seen == [1]


async def _value(handle: object, key: str, expected: object) -> bool:
    try:
        return bool(await handle.get_value(key) == expected)  # type: ignore[attr-defined]
    except KeyError:
        return False


async def test_a_value_that_does_not_serialise_fails_naming_the_run_and_the_call(
    store_url: str,
) -> None:
    app = make_app(store_url)

    @app.workflow
    async def bad(ctx: WorkflowContext) -> str:
        try:
            await ctx.set_value("when", object())
        except SerializationError as exc:
            await ctx.set_value("error", str(exc))
        await ctx.set_value("later", "fine")
        await ctx.set_value("broken", object())
        return "unreachable"

    async with app:
        handle = await app.start(bad)
        with pytest.raises(WorkflowFailed) as info:
            await handle.result(timeout=20)
        error = await handle.get_value("error")
        assert handle.run_id in error and "ctx.set_value('when')" in error
        assert "not JSON-serialisable" in error
        assert "ctx.set_value('broken')" in str(info.value)
        assert await handle.get_value("later") == "fine"
        with pytest.raises(KeyError):
            await handle.get_value("when")


def test_cantata_run_shows_the_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cantata.cli import common
    from cantata.cli.main import main

    monkeypatch.setattr(common.console, "_width", 200)
    url = f"sqlite:///{tmp_path}/cantata.db"
    app = make_app(url)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> int:
        await ctx.set_value("progress", {"done": 3, "of": 4})
        await ctx.set_value("stage", "copying")
        return 1

    async def go() -> str:
        async with app:
            handle = await app.start(wf)
            await handle.result(timeout=20)
            return handle.run_id

    run_id = asyncio.run(go())
    code = main(["run", run_id, "--app", "shop", "--store", url])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert 'progress = {"done":3,"of":4}' in out and 'stage = "copying"' in out
    assert "set_value:stage#1" in out
