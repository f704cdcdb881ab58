"""A real crash at every hop of a choreographed saga: the worker SIGKILLs itself at
its n-th checkpoint (each run commit, each handler completion with the events it
emits), before and after the write; a fresh worker finishes the saga. Outcome,
compensation order and side effects (one per idempotency key) match a clean run."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest

import cantata
from tests.helpers import eventually

from .switch_worker import build_app
from .test_mode_switch import Worker

pytestmark = [pytest.mark.slow]


async def one(tmp: Path, mode: str, crash: str) -> tuple[Any, list[str], set[Any], int]:
    """Run the failing saga with the worker dying at ``crash``; what came out."""
    markers = tmp / "markers"
    markers.mkdir(parents=True)
    store = f"sqlite:///{tmp}/shop.db"
    worker = Worker(store, mode, markers, crash)
    try:
        await eventually(
            lambda: list(markers.glob("ready-*")) or worker.proc.poll() is not None, 30.0,
            "the worker",
        )
        app = build_app(store, mode, markers, gate=False)
        async with app.client():
            handle = await app.start("order", {"id": 1, "fail": "fraud"})
            ended = False

            async def finished() -> bool:
                run = await app.store.get_run(app.name, handle.run_id)
                return run is not None and run.status.is_final

            loop = asyncio.get_running_loop()
            end = loop.time() + 30
            while worker.proc.poll() is None and loop.time() < end:
                if await finished():
                    ended = True
                    break
                await asyncio.sleep(0.05)
            assert ended or worker.proc.poll() == -9, "the worker neither died nor finished"
    finally:
        worker.kill()
    checkpoints = int((markers / "checkpoints").read_text())
    fresh = build_app(store, mode, markers, gate=False)
    async with fresh:
        try:
            outcome: Any = await fresh.get_handle(handle.run_id).result(timeout=30)
        except cantata.WorkflowError as exc:
            outcome = (exc.status, re.sub(r" after \d+ attempt\(s\)", "", exc.error or ""))
        assert await fresh.dead_letters() == []
    effects = [json.loads(x) for x in (markers / "effects.jsonl").read_text().splitlines()]
    undo: list[str] = []
    for e in effects:
        if e["step"].startswith("undo") and e["step"] not in undo:
            undo.append(e["step"])
    return outcome, undo, {(e["step"], e["key"].split(":", 1)[1]) for e in effects}, checkpoints


@pytest.mark.parametrize("mode", ["choreographed"])
async def test_a_worker_killed_at_every_hop_changes_nothing(tmp_path: Path, mode: str) -> None:
    clean = await one(tmp_path / "clean", mode, "100000:before")
    outcome, undo, _, hops = clean
    assert outcome == ("compensated", "StepFailed: step fraud failed: ValueError: fraud refused")
    assert undo == ["undo stock", "undo reserve"]
    assert hops >= 8
    points = [(k, when) for k in range(1, hops + 1) for when in ("before", "after")]
    gate = asyncio.Semaphore(3)  # each point mostly waits (start-up, lease): overlap them

    async def point(k: int, when: str) -> None:
        async with gate:
            got = await one(tmp_path / f"{k}-{when}", mode, f"{k}:{when}")
        killed = tmp_path / f"{k}-{when}" / "markers" / "killed"
        assert killed.read_text() == f"{k}:{when}"
        assert got[:3] == clean[:3], f"killed {when} checkpoint {k}"

    await asyncio.gather(*(point(k, when) for k, when in points))
