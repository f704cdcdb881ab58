"""The runs pinned to a code version (``GET /api/runs?version=V``, ``cantata runs --version
V``, ``app.find_runs(version=V)``) are read by an index of the runs by version, not by
walking every newer run of the app (docs/console.md, docs/performance.md "Round
twenty-six (fixes)"): SQLite's plan (``EXPLAIN QUERY PLAN``: it keeps no table
statistics, so the plan is the one it runs at any size), and what PostgreSQL reads
with thousands of newer runs of another version, never analyzed and analyzed."""

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

# (prefix, version, runs, age in seconds): an old version's few runs behind many newer ones
RUNS = [("old-", "v-old", 20, 7200), ("new-", "v-new", 3000, 60), ("any-", None, 500, 30)]


async def test_sqlite_reads_a_versions_runs_by_their_index(tmp_path: Path) -> None:
    path = tmp_path / "p.db"
    url = f"sqlite:///{path}"
    async with App("plans", store=url).client():
        pass  # the schema, migrated
    now = time.time()
    with sqlite3.connect(path) as c:
        for prefix, version, n, age in RUNS:
            c.executemany(
                "INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, "
                "created_at, updated_at, version) VALUES ('plans', ?, 'w', 'completed', '[]', "
                "?, ?, ?, ?)",
                [(f"{prefix}{i}", f"c-{prefix}{i}", now - age + i * 0.001,
                  now - age + i * 0.001, version) for i in range(n)])
    for q in (RunQuery(version="v-old", limit=51),
              RunQuery(version="v-old", after=(now, "z"), limit=51)):
        sql, params = sqlite_console.runs_sql("plans", q)
        with sqlite3.connect(path) as c:
            steps = [r[3] for r in c.execute(f"EXPLAIN QUERY PLAN {sql}", params)]
        assert any("runs USING INDEX runs_version (app=? AND version=?" in s
                   for s in steps), steps
        assert not any(s.startswith("SCAN") or "TEMP B-TREE" in s for s in steps), steps
    async with App("plans", store=url).client() as app:
        page = await app.store.query_runs("plans", RunQuery(version="v-old", limit=5))
    assert [r.run_id for r in page] == ["old-19", "old-18", "old-17", "old-16", "old-15"]


@pytest.mark.postgres
async def test_postgres_reads_a_versions_runs_by_their_index(
    postgres_url: str, pooled_schema: str
) -> None:
    now = time.time()
    async with App("plans", store=with_schema(postgres_url, pooled_schema)).client() as app:
        db = app.store._db  # type: ignore[attr-defined]
        async with db.conn() as conn:
            await conn.execute("ALTER TABLE runs SET (autovacuum_enabled = false)")
            for prefix, version, n, age in RUNS:
                await conn.execute(
                    "INSERT INTO runs (app, run_id, workflow, status, args, correlation_id, "
                    "created_at, updated_at, version) SELECT 'plans', $1 || i, 'w', "
                    "'completed', '[]', 'c-' || $1 || i, $3::float8 + i * 0.001, "
                    "$3::float8 + i * 0.001, $4 FROM generate_series(0, $2::int - 1) i",
                    prefix, n, now - age, version)
            c = Explaining(conn)
            queries = [RunQuery(version="v-old", limit=51),
                       RunQuery(version="v-old", after=(now, "z"), limit=51)]
            for _ in range(2):  # never analyzed, then analyzed
                for q in queries:
                    sql, params = postgres_console.runs_sql("plans", q)
                    await c.fetch(sql, *params)
                await conn.execute("ANALYZE runs")
        page = await app.store.query_runs("plans", RunQuery(version="v-old", limit=5))
    assert [r.run_id for r in page] == ["old-19", "old-18", "old-17", "old-16", "old-15"]
    for plan in c.plans:
        rows, _, indexes = read(plan)
        # the 20 runs of the old version, not the 3,500 newer ones
        assert rows <= 25, (rows, indexes)
        assert indexes == {"runs_version"}, indexes
