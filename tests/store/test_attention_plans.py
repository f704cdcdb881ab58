"""The overview's counts of what needs attention (dead letters, runs that failed since a
time, whenever created) are index reads, not reads of every run of the app (docs/console.md,
"What needs attention"): SQLite's plan (``EXPLAIN QUERY PLAN``: it keeps no table
statistics, the plan is the one it runs at any size), and what PostgreSQL reads with
thousands of other runs, never analyzed and analyzed."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from cantata import App
from cantata.model.access import RunQuery
from cantata.store import postgres_console, sqlite_console
from tests.helpers import with_schema
from tests.store.plan_watch import Explaining, read


async def test_sqlite_counts_what_needs_attention_by_indexes(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    async with App("plans", store=f"sqlite:///{path}").client():
        pass  # the schema, migrated
    with sqlite3.connect(path) as c:
        steps = [r[3] for r in c.execute(f"EXPLAIN QUERY PLAN {sqlite_console.ATTENTION}",
                                         ("a", "a", 1.0))]
    assert any("dead_letters USING COVERING INDEX" in s and "(app=?)" in s
               for s in steps), steps
    assert any("runs USING COVERING INDEX runs_failed (app=? AND updated_at>?)" in s
               for s in steps), steps
    assert not any(s.startswith("SCAN") and "CONSTANT ROW" not in s for s in steps), steps
    sql, params = sqlite_console.runs_sql("a", RunQuery(failed_since=1.0, limit=51))
    with sqlite3.connect(path) as c:
        steps = [r[3] for r in c.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
    assert any("runs USING INDEX runs_failed (app=? AND updated_at>?)" in s
               for s in steps), steps  # (then the hour's failures sorted)
    assert not any(s.startswith("SCAN") for s in steps), steps


@pytest.mark.postgres
async def test_postgres_counts_the_last_hours_failures_by_their_index(
    postgres_url: str, pooled_schema: str
) -> None:
    now = time.time()
    async with App("plans", store=with_schema(postgres_url, pooled_schema)).client() as app:
        db = app.store._db  # type: ignore[attr-defined]
        async with db.conn() as conn:
            await conn.execute("ALTER TABLE runs SET (autovacuum_enabled = false)")
            # (created, updated): failed long ago; created and failed within the hour;
            # created long ago and failed within the hour
            for prefix, status, n, age, updated in [("done", "completed", 3000, 7200, 7200),
                                                    ("old", "failed", 500, 7200, 7200),
                                                    ("new", "failed", 2, 60, 60),
                                                    ("late", "failed", 1, 7200, 60)]:
                await conn.execute(
                    "INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, "
                    "created_at, updated_at) SELECT 'plans', $1 || i, 'w', $2, '[]', "
                    "'c-' || $1 || i, $3::float8 + i * 0.001, $5::float8 "
                    "FROM generate_series(1, $4::int) i", f"{prefix}-", status, now - age, n,
                    now - updated)
            c = Explaining(conn)
            # the count, and the list the overview links to (GET /api/runs?failed_since=)
            sql, params = postgres_console.runs_sql("plans", RunQuery(failed_since=now - 3600,
                                                                      limit=51))
            for _ in range(2):  # never analyzed, then analyzed
                await c.fetchrow(postgres_console.ATTENTION, "plans", now - 3600)
                await c.fetch(sql, *params)
                await conn.execute("ANALYZE runs")
        counted = await app.store.attention_counts("plans", failed_since=now - 3600)
        page = await app.store.query_runs("plans", RunQuery(failed_since=now - 3600))
    assert (counted.dead_letters, counted.failed_since) == (0, 3)
    assert sorted(r.run_id for r in page) == ["late-1", "new-1", "new-2"]
    for plan in c.plans:
        rows, _, indexes = read(plan)
        # the 3 failures of the last hour, not the 3,500 other runs
        assert rows <= 5, (rows, indexes)
        assert indexes == {"runs_failed"}, indexes
