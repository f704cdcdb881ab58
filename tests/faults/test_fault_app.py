"""What the fault app writes to its ledger, checked in-process against a real worker.

The counters (tests/faults/counters.py) excuse a step run again after its own worker
stopped it for a hold in doubt only when the ledger's ``cut`` line says so
(``fenced``, fault_app.stopped_in_doubt). Every way the worker stops its own step
bodies must be recorded so, or a loaded run counts the documented restart as a live
double (``twice_live``).
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from . import fault_app

LEASE = 1.0


async def test_a_step_cut_because_its_workers_loop_was_held_is_recorded_as_fenced(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker whose event loop was held past the fence (by a body's own code, or CPU
    starvation; the process itself ran on) stops its step bodies (``Engine.fence_self``).
    When a heartbeat got through before a body handles its stop (one in flight through
    the hold, seen in a loaded CI run), its hold is no longer in doubt at the cut: the
    ledger's cut says ``fenced`` all the same, and the step is run again to its end.

    The watchdog's notice is called as it calls it (``Ownership._paused``), with the
    heartbeat fresh: a real hold cannot place that heartbeat at will."""
    ledger = tmp_path / "ledger.jsonl"
    monkeypatch.setenv("FAULT_LEDGER", str(ledger))
    app = fault_app.build({"FAULT_LEASE": str(LEASE), "FAULT_LONG_SECONDS": "1.0",
                           "FAULT_STEP_SECONDS": "0.01"})
    app.configure(store=sqlite_url)

    def lines() -> list[dict[str, Any]]:
        if not ledger.exists():
            return []
        return [json.loads(line) for line in ledger.read_text().splitlines()]

    async with app:
        handle = await app.start("long_run", {"id": "o-1"})
        deadline = time.monotonic() + 10
        while not any(r["k"] == "begin" for r in lines()):
            assert time.monotonic() < deadline, "the slow step never began"
            await asyncio.sleep(0.02)
        ownership = app.engine.ownership
        assert not ownership.in_doubt()
        ownership._paused(LEASE * 0.9)
        assert await handle.result(timeout=20) == ["slow:o-1", "ship:o-1"]
    slow = [r for r in lines() if str(r.get("key", "")).startswith("slow")]
    cuts = [r for r in slow if r["k"] == "cut"]
    assert len(cuts) == 1 and "in_doubt=False" in cuts[0]["why"], slow
    assert cuts[0].get("fenced") is True, cuts
    assert [r["k"] for r in slow][-3:] == ["begin", "effect", "end"], slow
