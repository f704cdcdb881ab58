"""The lean one-write functions (``cantata_create_first`` and ``cantata_checkpoint_one``,
migrations 0019, 0023, 0032) leave what the batch function (``cantata_write_runs``)
leaves for the same writes: the run, its history, its attempts, its audit records and
each write's outcome, for any mix of entries, attempts, status changes, releases, an
owner released by its worker's removal, and a stale fence."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cantata.errors import CantataError
from cantata.model.codec import new_id
from cantata.model.records import (
    ENTRY_COMPLETED,
    ENTRY_FAILED,
    ENTRY_RUNNING,
    Attempt,
    RunWrite,
)
from cantata.model.status import RunStatus
from cantata.store import audit, postgres_onetrip
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import entry, new_run
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool
from tests.store.test_postgres import opened

pytestmark = pytest.mark.postgres

KEY = audit.AuditKey("0123456789abcdef-lean-same")
KEYS = ("a#1", "b#1", "c#1", "d#1")


@pytest.fixture(scope="module")
def url(postgres_url: str, schema_pool: SchemaPool) -> Iterator[str]:
    """A schema of this module's own, migrated ahead (``schema_pool``, tests/conftest.py)."""
    schema = schema_pool.take()
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)


_times = st.sampled_from([1.0, 2.5, 7.0])
_entries = st.lists(
    st.builds(
        lambda key, seq, status, result, started, ended: entry(
            key, seq, status, result=result, started_at=started, ended_at=ended,
            attempts=seq, error="E: x" if status == ENTRY_FAILED else None,
            error_type="E" if status == ENTRY_FAILED else None),
        st.sampled_from(KEYS), st.integers(1, 4),
        st.sampled_from([ENTRY_RUNNING, ENTRY_COMPLETED, ENTRY_FAILED]),
        st.sampled_from([None, "1", '{"a":"é\\n"}']), st.none() | _times, st.none() | _times,
    ),
    max_size=4, unique_by=lambda e: e.key,
)
_attempts = st.lists(
    st.builds(
        Attempt, st.sampled_from(KEYS), st.integers(1, 2), _times, st.none() | _times,
        st.sampled_from([None, "Paused", "WorkerLost", "ValueError"]),
        st.sampled_from([None, "boom"]),
    ),
    max_size=4, unique_by=lambda a: (a.key, a.attempt),
)
_writes = st.builds(
    RunWrite, entries=_entries, attempts=_attempts,
    status=st.sampled_from([None, None, RunStatus.RUNNING, RunStatus.COMPLETED,
                            RunStatus.COMPENSATING, RunStatus.FAILED]),
    result=st.sampled_from([None, '"r"']), error=st.sampled_from([None, "boom"]),
    flagged=st.sampled_from([None, True, False]), release=st.booleans(),
)
# each checkpoint: its write, the fence it is sent with (2: stale), and whether the
# worker is removed (its runs' owner cleared) before it
_steps = st.lists(st.tuples(_writes, st.sampled_from([1, 1, 1, 2]), st.booleans()),
                  min_size=1, max_size=4)


async def _apply(
    store: PostgresStore, app: str, name: str, first: RunWrite | None,
    steps: list[tuple[RunWrite, int, bool]], owner: str, lean: bool,
) -> list[Any]:
    postgres_onetrip.LEAN = lean
    run = new_run(app, owner=owner, fence=1, status=RunStatus.RUNNING,
                  run_id=f"{name}-{lean}-{new_id()}", correlation_id=name,
                  created_at=1e9, updated_at=1e9)
    assert (await store.create_run(run, first))[1]
    outcomes: list[str] = []
    for write, fence, removed in steps:
        if removed:
            await store.remove_worker(app, owner)
        try:
            await store.commit_run(app, run.run_id, fence, write)
            outcomes.append("ok")
        except CantataError as exc:
            outcomes.append(type(exc).__name__)
    stored = await store.get_run(app, run.run_id)
    assert stored is not None
    records = [r for r in await store.audit_records(app) if r.target == run.run_id]
    return [
        outcomes,
        dataclasses.replace(stored, run_id="", updated_at=0.0),
        await store.load_history(app, run.run_id),
        sorted(await store.load_attempts(app, run.run_id),
               key=lambda a: (a.key, a.attempt)),
        [(r.actor, r.action, r.data) for r in records],
    ]


@pytest.mark.slow
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(first=st.none() | _writes.filter(lambda w: not w.release), steps=_steps,
       owner=st.sampled_from(["w1", "vm:12:ab"]))
async def test_the_lean_functions_write_what_the_batch_function_writes(
    url: str, first: RunWrite | None, steps: list[tuple[RunWrite, int, bool]], owner: str
) -> None:
    app = f"app-{new_id()[-8:]}"
    name = new_id()[-6:]
    try:
        async with opened(url) as store:
            store.set_audit_key(app, KEY)
            lean = await _apply(store, app, name, first, steps, owner, lean=True)
            batch = await _apply(store, app, name, first, steps, owner, lean=False)
            assert lean == batch
            report = await store.verify_audit(app, key=KEY)
            assert report.ok, report
    finally:
        postgres_onetrip.LEAN = True
