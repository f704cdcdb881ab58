"""One app's audit chain that cannot take a record fails only that app's writes in a
PostgreSQL write batch (docs/security.md, the audit log).

The writes of a PostgreSQL store are group-committed (store/postgres_batch.py): the
operations of every app queued at once run in one transaction, and their audit records
are appended at its end, every app's in one statement. Before, when one app's records
could not be appended — its chain tampered with (a record forged past its head), or a
record the database refuses — that statement failed the whole transaction, and so
every other app's write in it with the first app's error. Now the failing app's writes
fail (with the error that names it, and what to do) and every other write lands.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cantata.errors import CantataError, StoreCorrupt
from cantata.model.records import Declaration, RunWrite
from cantata.store.audit import AuditKey
from cantata.store.base import Settlement
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import entry, ev, new_run
from tests.helpers import with_schema
from tests.store.tamper import pg_tamper, record

pytestmark = pytest.mark.postgres

KEY = AuditKey("audit-batch-key-0123456789abcdef")


@pytest.fixture
def schema(pooled_schema: str) -> str:
    return pooled_schema


@pytest.fixture
async def store(postgres_url: str, schema: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(with_schema(postgres_url, schema))
    await s.open()
    yield s
    await s.close()


async def forge(store: PostgresStore, url: str, app: str) -> None:
    """A record inserted past ``app``'s chain head, behind the store's back."""
    last = await record(store, app, await store.audit_head_seq(app))
    await pg_tamper(url, store._db.schema, app, last, "forge")


ROUNDS = 3


async def prepare(store: PostgresStore, *apps: str) -> dict[str, list[tuple[str, str]]]:
    """Each app's handler group, and per round a run to checkpoint and an event whose
    delivery to settle (made before any chain is tampered with)."""
    made: dict[str, list[tuple[str, str]]] = {}
    for app in apps:
        await store.declare(app, [Declaration("handler", "g", "order.*")])
        made[app] = []
        for _ in range(ROUNDS):
            run, _ = await store.create_run(new_run(app))
            delivered = ev("order.placed")
            await store.append_events(app, [delivered])
            made[app].append((run.run_id, delivered.id))
    return made


async def audited_writes(store: PostgresStore, app: str, run_id: str, event_id: str,
                         ) -> list[Any]:
    """Audited writes of every kind the batch groups, for ``app``, all at once: a run
    created, one created with its first checkpoint, a checkpoint, an operator's
    publish, a settled delivery, an operator's action."""
    return list(await asyncio.gather(
        store.create_run(new_run(app)),
        store.create_run(new_run(app), RunWrite(entries=[entry("s#1", 1)])),
        store.commit_run(app, run_id, 0, RunWrite(entries=[entry("t#1", 1)])),
        store.append_events(app, [ev("order.placed")], actor="cli:ann@host"),
        store.settle_delivery(app, "g", event_id, Settlement("done", 1)),
        store.record_action(app, "cli:ann@host", "run.cancel_requested", run_id, {}),
        return_exceptions=True,
    ))


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
async def test_a_forged_chain_fails_only_its_apps_writes_in_a_batch(
    store: PostgresStore, postgres_url: str, keyed: bool
) -> None:
    bad, good, other = (f"app-{uuid.uuid4().hex[:6]}" for _ in range(3))
    if keyed:
        for app in (bad, good, other):
            store.set_audit_key(app, KEY)
    made = await prepare(store, bad, good, other)
    await forge(store, postgres_url, bad)
    for n in range(ROUNDS):  # several batches, each with all three apps' writes
        results = await asyncio.gather(*(audited_writes(store, a, *made[a][n])
                                         for a in (bad, good, other)))
        failed, *landed = results
        assert all(isinstance(r, StoreCorrupt) for r in failed), failed
        assert all(f"app {bad!r} was tampered with" in str(r) for r in failed)
        assert all("cantata audit verify" in str(r) for r in failed)
        for outcomes in landed:
            assert not [r for r in outcomes if isinstance(r, BaseException)], outcomes
    for app in (good, other):
        report = await store.verify_audit(app, key=KEY if keyed else None)
        assert report.ok, report
        actions = [r.action for r in await store.audit_records(app, limit=1000)]
        assert actions.count("run.created") == ROUNDS * 3
        assert actions.count("run.checkpoint") >= ROUNDS * 2
        assert actions.count("event.published") == ROUNDS
        assert actions.count("delivery.done") == ROUNDS
        assert actions.count("run.cancel_requested") == ROUNDS
    assert not (await store.verify_audit(bad)).ok


async def test_a_record_the_database_refuses_fails_only_its_own_write(
    store: PostgresStore,
) -> None:
    """A record PostgreSQL cannot store (a NUL in its actor: text cannot hold one)
    fails its own write with an error that says so; the others in its batch land."""
    bad, good = (f"app-{uuid.uuid4().hex[:6]}" for _ in range(2))
    await prepare(store, bad, good)
    for _ in range(ROUNDS):
        results = await asyncio.gather(
            store.create_run(new_run(bad), actor="cli:a\x00b"),
            store.create_run(new_run(bad)),
            *(store.create_run(new_run(good)) for _ in range(3)),
            store.append_events(good, [ev("order.placed")], actor="cli:ann@host"),
            return_exceptions=True,
        )
        refused, *rest = results
        assert isinstance(refused, CantataError), refused
        assert "audit" in str(refused) and "NUL" in str(refused), refused
        assert not [r for r in rest if isinstance(r, BaseException)], rest
    for app in (bad, good):
        assert (await store.verify_audit(app)).ok
    actions = [r.action for r in await store.audit_records(good, limit=1000)]
    assert actions.count("run.created") == ROUNDS * 4
    assert actions.count("event.published") == ROUNDS
