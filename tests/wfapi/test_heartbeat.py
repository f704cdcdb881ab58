"""Step heartbeats: cantata.heartbeat(details), heartbeat_timeout, details for the retry."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import CantataError, Retry, WorkflowContext

from .beat_app import build
from .helpers import eventually, make_app

HERE = Path(__file__).parent

FAST = Retry(max_attempts=3, initial_interval=0.01)


async def test_heartbeat_outside_a_step_is_a_clear_error(store_url: str) -> None:
    with pytest.raises(CantataError, match=r"cantata.heartbeat\(\) was called outside a step"):
        cantata.heartbeat({"done": 1})
    app = make_app(store_url)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> str:
        try:
            cantata.heartbeat()
        except CantataError as exc:
            return str(exc)
        return "no error"

    async with app:
        handle = await app.start(wf)
        text = await handle.result(timeout=20)
        assert "outside a step" in text and handle.run_id in text and "workflow wf" in text


async def test_a_silent_step_is_a_lost_attempt_and_its_retry_gets_the_last_details(
    store_url: str,
) -> None:
    app = make_app(store_url)
    seen: list[tuple[int, Any]] = []

    @app.step(heartbeat_timeout=0.3, retry=FAST)
    async def transfer(files: int) -> int:
        info = cantata.step_info()
        seen.append((info.attempt, info.heartbeat_details))
        start = (info.heartbeat_details or {}).get("done", 0)
        for i in range(start, files):
            cantata.heartbeat({"done": i + 1})
            if info.attempt == 1 and i == 2:
                await asyncio.sleep(30)  # hangs: silent past its heartbeat_timeout
            await asyncio.sleep(0.01)
        return files

    @app.workflow
    async def wf(ctx: WorkflowContext) -> int:
        return int(await ctx.run(transfer, 6))

    async with app:
        started = time.monotonic()
        handle = await app.start(wf)
        assert await handle.result(timeout=15) == 6
        assert time.monotonic() - started < 10  # not the 30 s hang
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    assert seen == [(1, None), (2, {"done": 3})]
    assert attempts[0].error_type == "HeartbeatTimeout"
    assert "heartbeat_timeout" in (attempts[0].error or "")
    assert attempts[1].error_type is None


async def test_a_sync_step_heartbeats_from_its_thread(store_url: str) -> None:
    app = make_app(store_url)

    @app.step(heartbeat_timeout=0.5, retry=FAST)
    def crunch(n: int) -> int:
        for i in range(n):
            cantata.heartbeat({"i": i})
            time.sleep(0.1)  # 0.1 s apart: alive although n * 0.1 > heartbeat_timeout
        return n

    @app.workflow
    async def wf(ctx: WorkflowContext) -> int:
        return int(await ctx.run(crunch, 8))

    async with app:
        handle = await app.start(wf)
        assert await handle.result(timeout=15) == 8
        attempts = await app.store.load_attempts(app.name, handle.run_id)
    assert len(attempts) == 1


async def test_heartbeats_are_written_throttled_and_kept_for_the_next_attempt(
    store_url: str,
) -> None:
    app = make_app(store_url)
    writes: list[Any] = []

    @app.step(retry=Retry(max_attempts=2, initial_interval=0.01))
    async def busy(n: int) -> int:
        info = cantata.step_info()
        if info.attempt == 2:
            return int(info.heartbeat_details["i"])
        for i in range(n):
            cantata.heartbeat({"i": i})
            await asyncio.sleep(0)
        raise RuntimeError("flaky")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> int:
        return int(await ctx.run(busy, 2000))

    async with app:
        store = app.store
        record = store.record_step_heartbeat

        async def counted(*args: Any) -> None:
            writes.append(args)
            await record(*args)

        store.record_step_heartbeat = counted  # type: ignore[method-assign, assignment]
        handle = await app.start(wf)
        assert await handle.result(timeout=15) == 1999  # the last details reached attempt 2
        kept = await store.last_step_heartbeat(app.name, handle.run_id, "busy#1")
    assert kept is not None and kept.attempt == 1 and kept.details == '{"i":1999}'
    assert 1 <= len(writes) <= 3  # 2000 heartbeats, a handful of writes


async def test_heartbeat_details_must_serialise(store_url: str) -> None:
    app = make_app(store_url)

    @app.step(retry=Retry(max_attempts=1))
    async def bad() -> None:
        cantata.heartbeat(object())

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(bad)

    async with app:
        handle = await app.start(wf)
        with pytest.raises(cantata.WorkflowFailed, match=r"cantata.heartbeat\(details\) in step"
                           r" bad of run"):
            await handle.result(timeout=20)


def _spawn(store_url: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(HERE / "beat_app.py"), store_url,
                             str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.mark.slow
async def test_details_reach_the_retry_in_another_worker_after_a_kill(
    sql_store_url: str, tmp_path: Path
) -> None:
    proc = _spawn(sql_store_url, tmp_path)
    try:
        assert proc.stdout is not None
        run_id = (await asyncio.to_thread(proc.stdout.readline)).strip()
        await eventually(lambda: (tmp_path / "beating").exists() or proc.poll() is not None,
                         timeout=60)
        assert proc.poll() is None, "the worker process ended before it was killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        _, err = await asyncio.to_thread(proc.communicate)
    assert proc.returncode == -signal.SIGKILL, err
    seen: list[object] = []
    app = build(sql_store_url, str(tmp_path), seen)
    async with app:  # this worker takes the run over once the dead one's lease expires
        assert await app.get_handle(run_id).result(timeout=30) == 5
        attempts = await app.store.load_attempts(app.name, run_id)
    assert seen == [{"done": 3}]
    assert [a.error_type for a in attempts] == ["WorkerLost", None]
