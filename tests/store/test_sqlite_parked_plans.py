"""With many runs parked on SQLite, the operator's reads of live work read no parked
run that is not due (docs/performance.md, "A million parked runs"): each part of
``stale_correlations`` (``cantata stalled``, the console's overview) and the runs of a
trace go by their index, checked with ``EXPLAIN QUERY PLAN`` (SQLite keeps no table
statistics: the plan is the one it runs at any size)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from cantata import App
from cantata.store.sqlite_trace import STALE_CORRELATIONS, TRACE_RUNS


async def plan(path: Path, sql: str, args: object) -> list[str]:
    async with App("plans", store=f"sqlite:///{path}").client():
        pass  # the schema, migrated
    with sqlite3.connect(path) as c:
        return [r[3] for r in c.execute(f"EXPLAIN QUERY PLAN {sql}", args)]  # type: ignore[arg-type]


async def test_stalled_reads_the_live_runs_by_their_indexes(tmp_path: Path) -> None:
    steps = await plan(tmp_path / "p.db", STALE_CORRELATIONS,
                       {"app": "a", "older": 1.0, "now": 2.0, "limit": 10})
    runs = [s for s in steps if " runs " in f"{s} "]
    # not parked, parked and due, parked in an event wait
    assert any("runs USING INDEX runs_claimable" in s for s in runs), steps
    due = "runs USING INDEX runs_parked (app=? AND wake_at>? AND wake_at<?)"
    assert any(due in s for s in runs), steps
    assert any("runs USING INDEX runs_waiting (app=?" in s for s in runs), steps
    # none reads every live run (runs_live, runs_status_newest: the parked ones too)
    assert not any("runs_live" in s or "runs_status_newest" in s for s in steps), steps
    # nor every run of the app for the few flagged ones (schema 26's partial index)
    assert any("runs USING INDEX runs_flagged (app=?)" in s for s in runs), steps
    # the runs waiting in a queue: from the queue's index, each run by its key
    assert any("SEARCH r USING INDEX sqlite_autoindex_runs_1 (app=? AND run_id=?)" in s
               for s in steps), steps


async def test_a_trace_reads_its_runs_by_correlation_id(tmp_path: Path) -> None:
    steps = await plan(tmp_path / "p.db", TRACE_RUNS, ("a", "c", 10))
    assert any("runs USING INDEX runs_correlation (app=? AND correlation_id=?)" in s
               for s in steps), steps
