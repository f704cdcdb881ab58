"""Migration 0035 on a live store: runs written by the lean functions of 0032 (an older
release: ``cantata_create_first``, ``cantata_checkpoint_one``, one array per history
and attempt column) go on through 0035's (``cantata_create_rows``,
``cantata_checkpoint_rows``, arrays of rows) once a newer worker migrated the store,
and an older worker still running writes through 0032's functions as before: the same
rows, history, attempts and audit chain as a run written by this release throughout
(docs/deploy.md "Upgrading Cantata"; docs/performance.md, "Round twenty-two")."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import asyncpg
import pytest

from cantata.model.codec import new_id
from cantata.model.records import ENTRY_COMPLETED, ENTRY_RUNNING, Attempt, RunWrite
from cantata.model.status import RunStatus
from cantata.store import audit, postgres_onetrip
from cantata.store.postgres import PostgresStore
from cantata.store.postgres_pool import SCHEMA_VERSION
from cantata.testing.contract.support import entry, new_run
from tests.helpers import with_schema
from tests.store.test_postgres import opened
from tests.store.test_postgres_migrate import older_store

pytestmark = pytest.mark.postgres

KEY = audit.AuditKey("0123456789abcdef-lean-rows")
# The release before 0035: its lean functions take 13 history and 6 attempt arrays.
BEFORE_ROWS = 34


def _columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[]] * width


def _older_create(run: Any, first: RunWrite) -> tuple[str, tuple[Any, ...]]:
    """``cantata_create_first(...)`` as the older release calls it (0032's signature)."""
    a = postgres_onetrip._create_first_args(time.time(), run, first, {run.app: KEY})
    history, attempts = a[27], a[28]
    args = (*a[:27], *_columns(history, 13), *_columns(attempts, 6), *a[29:])
    return f"SELECT cantata_create_first({postgres_onetrip._params(1, 54)})", args


def _older_checkpoint(app: str, run_id: str, w: RunWrite) -> tuple[str, tuple[Any, ...]]:
    """``cantata_checkpoint_one(...)`` as the older release calls it (0032's signature)."""
    a = postgres_onetrip._checkpoint_args(time.time(), (app, run_id, 1, w), {app: KEY})
    args = (*a[:9], *_columns(a[9], 13), *_columns(a[10], 6), *a[11:])
    return f"SELECT cantata_checkpoint_one({postgres_onetrip._params(1, 39)})", args


async def _older(conn: asyncpg.Connection[Any], sql: str, args: tuple[Any, ...]) -> Any:
    return await conn.fetchval(sql, *args)


def _saga() -> tuple[RunWrite, list[RunWrite]]:
    """A saga's writes: the first step started with the run, two steps' ends each with
    the next one's start, the last end with the run's."""
    first = RunWrite(entries=[entry("a#1", 1, ENTRY_RUNNING, started_at=1.0)],
                     attempts=[Attempt("a#1", 1, 1.0)])
    steps = [
        RunWrite(
            entries=[entry(cur, k + 1, ENTRY_COMPLETED, result='"r"', started_at=1.0 + k,
                           ended_at=2.0 + k),
                     entry(nxt, k + 2, ENTRY_RUNNING, started_at=2.0 + k)],
            attempts=[Attempt(cur, 1, 1.0 + k, 2.0 + k), Attempt(nxt, 1, 2.0 + k)])
        for k, (cur, nxt) in enumerate([("a#1", "b#1"), ("b#1", "c#1")])
    ]
    steps.append(RunWrite(
        entries=[entry("c#1", 3, ENTRY_COMPLETED, result='"r"', started_at=3.0,
                       ended_at=4.0)],
        attempts=[Attempt("c#1", 1, 3.0, 4.0, error_type="Paused")],
        status=RunStatus.COMPLETED, result='"done"', release=True))
    return first, steps


async def _written(store: PostgresStore, app: str, run_id: str) -> list[Any]:
    stored = await store.get_run(app, run_id)
    assert stored is not None
    records = [r for r in await store.audit_records(app) if r.target == run_id]
    return [
        dataclasses.replace(stored, run_id="", updated_at=0.0, created_at=0.0),
        await store.load_history(app, run_id),
        sorted(await store.load_attempts(app, run_id), key=lambda a: (a.key, a.attempt)),
        [(r.actor, r.action, r.data) for r in records],
    ]


async def test_runs_in_flight_go_on_across_the_migration_and_older_workers_too(
    postgres_url: str, fresh_schema: str
) -> None:
    app = f"app-{new_id()[-8:]}"
    await older_store(postgres_url, fresh_schema, BEFORE_ROWS)
    older = await asyncpg.connect(postgres_url, server_settings={"search_path": fresh_schema})
    first, steps = _saga()
    runs = {name: new_run(app, owner="w1", fence=1, status=RunStatus.RUNNING,
                          run_id=f"{name}-{new_id()}", correlation_id="saga",
                          created_at=1e9, updated_at=1e9)
            for name in ("across", "older", "newer")}
    try:
        # before the upgrade: a run created and one step done by an older worker
        across = runs["across"]
        assert await _older(older, *_older_create(across, first))
        assert await _older(older, *_older_checkpoint(app, across.run_id, steps[0]))
        async with opened(with_schema(postgres_url, fresh_schema)) as store:  # migrates
            store.set_audit_key(app, KEY)
            assert await older.fetchval(
                "SELECT max(version) FROM schema_version") == SCHEMA_VERSION > BEFORE_ROWS
            # the run goes on with this release's functions...
            for w in steps[1:]:
                await store.commit_run(app, across.run_id, 1, w)
            # ...an older worker still running writes a run of its own as it did...
            old = runs["older"]
            assert await _older(older, *_older_create(old, first))
            for w in steps:
                assert await _older(older, *_older_checkpoint(app, old.run_id, w))
            # ...and this release writes one throughout
            new = runs["newer"]
            assert (await store.create_run(new, first))[1]
            for w in steps:
                await store.commit_run(app, new.run_id, 1, w)
            seen = {name: await _written(store, app, run.run_id) for name, run in runs.items()}
            report = await store.verify_audit(app, key=KEY)
    finally:
        await older.close()
    assert seen["across"] == seen["newer"]
    assert seen["older"] == seen["newer"]
    assert seen["newer"][0].status == RunStatus.COMPLETED and seen["newer"][0].owner is None
    assert [e.key for e in seen["newer"][1]] == ["a#1", "b#1", "c#1"]
    assert report.ok, report
