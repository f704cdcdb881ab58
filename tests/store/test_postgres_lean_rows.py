"""Migration 0037 on a live store: runs written by the lean functions of 0032 (an older
release: ``cantata_create_first``, ``cantata_checkpoint_one``, one array per history
and attempt column) go on through 0037's (``cantata_create_rows``,
``cantata_checkpoint_rows``, arrays of rows) once a newer worker migrated the store,
and an older worker still running writes through 0032's functions as before: the same
rows, history, attempts and audit chain as a run written by this release throughout
(docs/deploy.md "Upgrading Cantata"; docs/performance.md, "Round twenty-two")."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

from cantata.model.codec import new_id
from cantata.model.records import ENTRY_COMPLETED, ENTRY_RUNNING, Attempt, RunWrite
from cantata.model.status import RunStatus
from cantata.store import audit, postgres_onetrip
from cantata.store import postgres_writes as writes
from cantata.store.postgres import PostgresStore
from cantata.store.postgres_pool import SCHEMA_VERSION
from cantata.testing.contract.support import entry, new_run
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool
from tests.store.test_postgres import opened
from tests.store.test_postgres_migrate import older_store
from tests.store.test_postgres_onetrip import statements

pytestmark = pytest.mark.postgres


@pytest.fixture
def url(postgres_url: str, schema_pool: SchemaPool) -> Iterator[str]:
    schema = schema_pool.take()
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)

KEY = audit.AuditKey("0123456789abcdef-lean-rows")
# The release before 0037: its lean functions take 13 history and 6 attempt arrays.
BEFORE_ROWS = 36


def _columns(call: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    """A checkpoint's history entries and attempts as 0032's 13 + 6 arrays."""
    history = postgres_onetrip.merged_rows(
        writes.history_rows([call]), 15, writes.HISTORY_KEPT, 3)
    attempts = postgres_onetrip.merged_rows(
        writes.attempt_rows([call]), 8, writes.ATTEMPT_KEPT, 4)
    return _transposed(history, 13), _transposed(attempts, 6)


def _transposed(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [list(col) for col in zip(*rows, strict=True)] if rows else [[]] * width


def _older_create(run: Any, first: RunWrite) -> tuple[str, tuple[Any, ...]]:
    """``cantata_create_first(...)`` as the older release calls it (0032's signature)."""
    a = postgres_onetrip._create_first_args(time.time(), run, first, {run.app: KEY})
    history, attempts = _columns((run.app, run.run_id, run.fence, first))
    args = (*a[:27], *history, *attempts, *a[29:])
    return f"SELECT cantata_create_first({postgres_onetrip._params(1, 54)})", args


def _older_checkpoint(app: str, run_id: str, w: RunWrite) -> tuple[str, tuple[Any, ...]]:
    """``cantata_checkpoint_one(...)`` as the older release calls it (0032's signature)."""
    call = (app, run_id, 1, w)
    a = postgres_onetrip._checkpoint_args(time.time(), call, {app: KEY})
    history, attempts = _columns(call)
    args = (*a[:9], *history, *attempts, *a[11:])
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


AWKWARD = ['', ' ', '"', '\\', '\\"', '""', 'a,b', '(x)', '(a,"b")', 'NULL', 'é\n\t😀',
           '{"a":"é\\n"}', "it's"]


async def test_texts_and_numbers_of_a_row_arrive_as_written(url: str) -> None:
    """A row goes as its record's text (0037): quotes, backslashes, commas, brackets,
    empty and blank texts, the text NULL, non-ASCII; floats to the last bit, -0.0 and
    the infinities, NULLs: all read back as written, through both lean functions."""
    app = f"app-{new_id()[-8:]}"
    floats = [1.0, -0.0, 0.1 + 0.2, 5e-324, 1.7976931348623157e308, float("inf"),
              float("-inf"), 1e-7, 123456789.123456789]
    first = RunWrite(
        entries=[entry(f"t{i}#1", i + 1, ENTRY_COMPLETED, result=text, error=text or None,
                       error_type=text, started_at=floats[i % len(floats)], ended_at=None)
                 for i, text in enumerate(AWKWARD)],
        attempts=[Attempt(f"t{i}#1", 1, floats[i % len(floats)], None, error=text)
                  for i, text in enumerate(AWKWARD)])
    pairs = list(enumerate(zip(AWKWARD, floats, strict=False)))
    later = RunWrite(
        entries=[entry(f"u{i}#1", i + 1, ENTRY_RUNNING, result=None, detail=text, wake_at=f)
                 for i, (text, f) in pairs],
        attempts=[Attempt(f"u{i}#1", 2, f, f, error_type=text) for i, (text, f) in pairs])
    run = new_run(app, owner="w1", fence=1, status=RunStatus.RUNNING)
    async with opened(url) as store:
        sent = statements(store)
        assert (await store.create_run(run, first))[1]
        await store.commit_run(app, run.run_id, 1, later)
        # each in one call of the lean functions (a refused call would have gone on by
        # the transactional path instead)
        assert sent == ["SELECT cantata_create_rows($1, $2, $3,",
                        "SELECT cantata_checkpoint_rows($1, $2, $3,"], sent
        history = {e.key: e for e in await store.load_history(app, run.run_id)}
        attempts = {(a.key, a.attempt): a for a in await store.load_attempts(app, run.run_id)}
    for w in (first, later):
        for e in w.entries:
            assert history[e.key] == e, (history[e.key], e)
        for a in w.attempts:
            got = attempts[(a.key, a.attempt)]
            assert got == a and repr(got.started_at) == repr(a.started_at), (got, a)
