"""What a saga's commits write on SQLite (docs/performance.md, "Round twenty-four (saga,
SQLite)"), and a store of the version before (29) migrated with runs in flight.

Each page a commit changed is a WAL frame its COMMIT writes and syncs. Migration 0030
drops `runs_live`, which no statement reads and which a run's creation and its end
each wrote a page of.
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
from collections import Counter
from pathlib import Path

import cantata
from cantata import App
from cantata.store import migrations
from tests.helpers import make_app
from tests.store.wal_frames import frame_pages, mx_frame

KEY = "saga-pages-key-0123456789abcdef"


def _saga_app(url: str) -> App:
    app = make_app(url, audit_key=KEY)

    @app.step
    async def one(n: int) -> int:
        return n + 1

    @app.step
    async def two(n: int) -> int:
        return n + 2

    @app.step
    async def three(n: int) -> int:
        return n + 3

    @app.workflow
    async def saga(ctx: cantata.WorkflowContext, n: int) -> int:
        result: int = await ctx.run(three, await ctx.run(two, await ctx.run(one, n)))
        return result

    return app


async def _run_sagas(app: App, n: int, start: int = 0) -> None:
    async with app:
        for i in range(start, start + n):
            assert await (await app.start("saga", i)).result(timeout=30) == i + 6


async def test_a_sagas_commits_write_no_page_of_an_index_nothing_reads(
    tmp_path: Path,
) -> None:
    """A run's creation and its end write no `runs_live` page (the live runs are read
    by `runs_claimable`, `runs_parked`, `runs_waiting`, `runs_owner` and
    `runs_status_newest`)."""
    path = str(tmp_path / "s.db")
    app = _saga_app(f"sqlite:///{path}")
    commits: list[list[int]] = []
    async with app:
        for i in range(120):
            before = mx_frame(path)
            handle = await app.start("saga", i)
            assert await handle.result(timeout=30) == i + 6
            after = mx_frame(path)
            if after > before:  # (a WAL that started over: skip)
                commits.append(frame_pages(path, before + 1, after))
    conn = sqlite3.connect(path)
    try:
        tree = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    finally:
        conn.close()
    named = [Counter(tree.get(p, "?") for p in pages) for pages in commits[40:]]
    assert len(named) >= 50
    assert not [n for n in named if "runs_live" in n], named[:3]
    # (36 WAL pages at the median saga before migration 0030, 34 after; splits come
    # and go)
    assert statistics.median(sum(n.values()) for n in named) <= 35, named[:3]


# -- a version 29 store, migrated --------------------------------------------------------


async def test_a_version_29_store_is_migrated_with_runs_in_flight(tmp_path: Path) -> None:
    """A store with `runs_live` (schema 29) and runs asleep in it: the index goes, the
    runs wake and end, new runs run, and the audit chain verifies."""
    path = tmp_path / "s.db"
    url = f"sqlite:///{path}"
    app = _saga_app(url)

    @app.workflow
    async def napper(ctx: cantata.WorkflowContext, n: int) -> int:
        await ctx.sleep(1.0)
        return n

    async with app:
        handles = [await app.start(napper, i) for i in range(3)]
        await _wait_asleep(path, 3)
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE INDEX IF NOT EXISTS runs_live ON runs (app, workflow) "
                     "WHERE (status='pending' OR status='running' OR status='compensating')")
        conn.execute("UPDATE cantata_meta SET value='29' WHERE key='schema_version'")
    app = _saga_app(url)
    app.workflow(napper)
    async with app:
        for i, h in enumerate(handles):
            assert await app.get_handle(h.run_id).result(timeout=30) == i
        assert await (await app.start("saga", 1)).result(timeout=30) == 7
        report = await app.store.verify_audit("shop", key=app.audit_key)
        assert report.ok, report
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT value FROM cantata_meta WHERE key='schema_version'"
                            ).fetchone()[0] == str(migrations.latest("sqlite"))
        assert not conn.execute("SELECT 1 FROM sqlite_master WHERE name='runs_live'").fetchall()


async def _wait_asleep(path: Path, n: int) -> None:
    for _ in range(250):
        with sqlite3.connect(path) as conn:
            if conn.execute("SELECT count(*) FROM history WHERE kind='sleep'").fetchone()[0] >= n:
                return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{n} runs never went to sleep")
