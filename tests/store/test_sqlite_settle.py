"""Settlements, holds and appends on SQLite with fewer statements (issue 19): the same
rows, holds and audit records as before, and the statements that went.

- the declaration version is read once per write transaction (TxConnection.decl_versions),
  and a declaration made since, on this connection or another one, is seen;
- a held delivery is made claimed by its fan-out INSERT (sqlite_core.Hold), not
  inserted and then updated;
- a settlement's UPDATE hands back the owner the delivery had (TxConnection.was), with
  no SELECT first; a fenced checkpoint that changes the run's row likewise.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cantata.errors import LeaseLost
from cantata.model.event import Event
from cantata.model.records import Declaration, RunWrite
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.base import Settlement
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import new_run

KEY = audit.AuditKey("0123456789abcdef-settle-test")


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "s.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def declarations() -> list[Declaration]:
    return [
        Declaration("handler", "g1", "order.*"),
        Declaration("handler", "g2", "pay.done"),
        Declaration("trigger", "t1", "x.*.y"),
        Declaration("handler", "g3", "order.a.b"),
        Declaration("handler", "g4", "pay.*"),
    ]


def statements(store: SQLiteStore) -> list[str]:
    """The SQL the store's connection thread runs from now on."""
    seen: list[str] = []
    conn = store._t._conn
    assert conn is not None
    conn.set_trace_callback(lambda sql: seen.append(" ".join(sql.split())))
    return seen


def count(seen: list[str], start: str) -> int:
    return sum(1 for s in seen if s.startswith(start))


async def test_settlements_store_outcomes_events_holds_and_audit(store: SQLiteStore) -> None:
    app = "shop"
    store.set_audit_key(app, KEY)
    await store.declare(app, declarations())
    first = Event("order.created", {"n": 1})
    assert await store.append_events(app, [first]) == [1]
    now = time.time()
    [claimed] = await store.claim_deliveries(
        app, "w1", ["g1"], now=now, stale_before=now, limit=10
    )
    assert (claimed.group, claimed.attempts, claimed.fence) == ("g1", 1, 1)
    paid, other, deeper = Event("pay.done", {"x": "é"}), Event("x.q.y", None), Event(
        "order.a.b", [1]
    )
    done = Settlement(
        "done", 1, events=[paid, other, deeper, paid], hold_for="w1",
        hold=[("g2", paid.id), ("g1", deeper.id), ("t1", other.id), ("g2", paid.id)],
    )
    results = list(await asyncio.gather(  # (gather gives a list, typed as a tuple)
        store.settle_delivery(app, "g1", first.id, done),
        store.settle_delivery(app, "g1", first.id, Settlement("done", 1)),  # done already
        store.settle_delivery(app, "gX", first.id, Settlement("dead", 2, error="boom")),
        store.settle_delivery(
            app, "gY", first.id, Settlement("retry", 2, error="later", retry_at=now + 5)
        ),
        store.settle_delivery(app, "gZ", first.id, Settlement("dead", 3, error="")),
    ))
    assert results == [True, False, True, True, True]
    assert done.held == [("g2", paid.id), ("t1", other.id)]  # in hold order, each once
    assert done.addressed == [2, 1, 1, 0]  # groups per emitted event (0: repeated)

    async def states(event: Event[Any]) -> list[tuple[str, str, int, int, str | None]]:
        return [
            (d.group, str(d.status), d.attempts, d.fence, d.error)
            for d in await store.deliveries(app, event.id)
        ]

    assert await states(first) == [
        ("g1", "done", 1, 1, None), ("gX", "dead", 2, 0, "boom"),
        ("gY", "pending", 2, 0, "later"), ("gZ", "dead", 3, 0, ""),
    ]
    assert await states(paid) == [("g2", "pending", 1, 1, None), ("g4", "pending", 0, 0, None)]
    assert await states(other) == [("t1", "pending", 1, 1, None)]
    assert await states(deeper) == [("g3", "pending", 0, 0, None)]  # g1: not its group
    assert await store.get_event(app, paid.id) == paid
    letters = sorted((d.group, d.error, d.attempts) for d in await store.dead_letters(app))
    assert letters == [("gX", "boom", 2), ("gZ", "unknown error", 3)]
    report = await store.verify_audit(app, key=KEY)
    assert report.ok, report
    records = [(r.actor, r.action, r.target) for r in await store.audit_records(app)]
    assert records == [
        ("worker:w1", "delivery.done", f"g1:{first.id}"),
        ("system", "delivery.dead", f"gX:{first.id}"),
        ("system", "delivery.dead", f"gZ:{first.id}"),
    ]


async def test_a_missing_delivery_is_created_and_settled(store: SQLiteStore) -> None:
    app = "shop"
    await store.declare(app, declarations())
    store.set_audit_key(app, KEY)
    event = Event("other", None)
    await store.append_events(app, [event])
    assert await store.settle_delivery(app, "late", event.id, Settlement("done", 1))
    assert await store.settle_delivery(app, "g4", event.id, Settlement("dead", 1, error="x"))
    assert [(d.group, str(d.status)) for d in await store.deliveries(app, event.id)] == [
        ("g4", "dead"), ("late", "done")
    ]
    assert not await store.settle_delivery(app, "late", event.id, Settlement("done", 2))
    assert len(await store.audit_records(app)) == 2
    report = await store.verify_audit(app, key=KEY)
    assert report.ok, report


async def test_a_hold_takes_a_free_delivery_that_was_there_before_the_event(
    store: SQLiteStore,
) -> None:
    """A delivery row of an event the store did not have (a settlement of a broker
    copy made it) is held on HOLD_SQL's conditions when the event is stored: by the
    fan-out's upsert (a group it goes to) or by HOLD_SQL (one it does not go to)."""
    app = "shop"
    await store.declare(app, declarations())
    first, fresh = Event("order.created", None), Event("pay.done", {"n": 3})
    await store.append_events(app, [first])
    later = time.time() + 60
    for group in ("g2", "gQ", "g4"):  # free, pending, no attempt: holdable
        assert await store.settle_delivery(
            app, group, fresh.id, Settlement("retry", 0, error="early", retry_at=later)
        )
    # g4's row is busy (an attempt counted): not holdable
    assert await store.settle_delivery(
        app, "g4", fresh.id, Settlement("retry", 1, error="early", retry_at=later)
    )
    done = Settlement("done", 1, events=[fresh], hold_for="w1",
                      hold=[("g4", fresh.id), ("gQ", fresh.id), ("g2", fresh.id)])
    assert await store.settle_delivery(app, "g1", first.id, done)
    assert done.addressed == [2]
    assert done.held == [("gQ", fresh.id), ("g2", fresh.id)]
    states = {d.group: (str(d.status), d.attempts, d.fence, d.error)
              for d in await store.deliveries(app, fresh.id)}
    assert states == {
        "g2": ("pending", 1, 1, "early"), "gQ": ("pending", 1, 1, "early"),
        "g4": ("pending", 1, 0, "early"),
    }


async def test_a_hold_takes_only_deliveries_this_settlement_created(
    store: SQLiteStore,
) -> None:
    app = "shop"
    await store.declare(app, declarations())
    first, before, fresh = (Event("order.created", {"n": 1}), Event("pay.done", {"n": 2}),
                            Event("pay.done", {"n": 3}))
    assert await store.append_events(app, [first, before]) == [1, 2]
    done = Settlement("done", 1, events=[before, fresh], hold_for="w1",
                      hold=[("g2", before.id), ("g2", fresh.id)])
    assert await store.settle_delivery(app, "g1", first.id, done)
    assert done.held == [("g2", fresh.id)]
    assert done.addressed == [0, 2]
    states = {(d.group, d.event.id): (d.attempts, d.fence, d.next_at == 0)
              for e in (before, fresh) for d in await store.deliveries(app, e.id)}
    assert states == {
        ("g2", before.id): (0, 0, True), ("g4", before.id): (0, 0, True),
        ("g2", fresh.id): (1, 1, True), ("g4", fresh.id): (0, 0, True),
    }


async def test_an_append_holds_the_deliveries_it_created(store: SQLiteStore) -> None:
    app = "shop"
    await store.declare(app, declarations())
    before, placed, paid = Event("order.a", 1), Event("order.b", 2), Event("pay.done", 3)
    for worker in ("w1", "w2"):
        await store.heartbeat(app, worker, time.time(), None, lease=30.0)
    assert await store.append_events(app, [before]) == [1]
    hold = [("g1", before.id), ("g1", placed.id), ("g4", placed.id), ("g2", placed.id)]
    (counts, held), (counts2, held2) = await asyncio.gather(
        store.append_held(app, [before, placed], hold_for="w1", hold=hold),
        store.append_held(app, [paid], hold_for="w2", hold=[("g2", paid.id)]),
    )
    assert counts == [0, 1] and held == [("g1", placed.id)]
    assert counts2 == [2] and held2 == [("g2", paid.id)]
    states = {(d.group, d.event.id): (d.attempts, d.fence)
              for e in (before, placed, paid) for d in await store.deliveries(app, e.id)}
    assert states == {
        ("g1", before.id): (0, 0), ("g1", placed.id): (1, 1),
        ("g2", paid.id): (1, 1), ("g4", paid.id): (0, 0),
    }
    now = time.time()
    claimed = await store.claim_deliveries(app, "w3", ["g1", "g2", "g4"], now=now,
                                           stale_before=now, limit=10)
    assert sorted((d.group, d.event.id) for d in claimed) == sorted(
        [("g1", before.id), ("g4", paid.id)]
    )  # held ones are their (live) holders'


async def test_a_hop_runs_fewer_statements(store: SQLiteStore) -> None:
    """One choreographed hop in one transaction: no SELECT of the delivery, no hold
    UPDATE, and the declaration version read once for all the batch's appends."""
    app = "shop"
    await store.declare(app, declarations())
    firsts = [Event("order.created", {"n": i}) for i in range(3)]
    await store.append_events(app, firsts)
    now = time.time()
    await store.claim_deliveries(app, "w1", ["g1"], now=now, stale_before=now, limit=10)
    seen = statements(store)
    paid = [Event("pay.done", {"n": i}) for i in range(3)]
    settlements = [Settlement("done", 1, events=[p], hold_for="w1", hold=[("g2", p.id)])
                   for p in paid]
    assert await asyncio.gather(*(
        store.settle_delivery(app, "g1", f.id, s) for f, s in zip(firsts, settlements,
                                                                  strict=True)
    )) == [True] * 3
    assert [s.held for s in settlements] == [[("g2", p.id)] for p in paid]
    assert count(seen, "BEGIN") == 1  # one group-committed batch
    assert count(seen, "SELECT value FROM cantata_meta") == 1
    assert count(seen, "SELECT status, owner FROM deliveries") == 0
    assert count(seen, "UPDATE deliveries SET owner=") == 0  # the hold
    # each traced twice: SQLite traces the statement again as it starts the trigger of
    # migration 0019 (whose WHEN, dead to done, is false here)
    assert count(seen, "UPDATE deliveries SET status='done'") == 3 * 2
    assert count(seen, "INSERT INTO deliveries") == 6  # held g2 and free g4 per event
    records = await store.audit_records(app)
    assert [r.actor for r in records] == ["worker:w1"] * 3
    assert (await store.verify_audit(app)).ok


async def test_a_declaration_by_another_connection_is_seen_by_the_next_append(
    store: SQLiteStore, tmp_path: Path
) -> None:
    """The version is cached per write transaction only: another connection (another
    process) that redeclares between two of this store's transactions is seen."""
    app = "shop"
    await store.declare(app, [Declaration("handler", "g1", "order.*")])
    e1, e2, e3 = (Event("order.a", i) for i in range(3))
    assert await store.append_events(app, [e1]) == [1]
    other = SQLiteStore(str(tmp_path / "s.db"))
    await other.open()
    try:
        await other.declare(app, [Declaration("handler", "g2", "order.*")])
    finally:
        await other.close()
    assert await store.append_events(app, [e2]) == [2]
    # declared on this connection in the same batch as appends: the later ones see it
    first, _, last = await asyncio.gather(
        store.append_events(app, [e3]),
        store.declare(app, [Declaration("handler", "g3", "order.*")]),
        store.append_events(app, [Event("order.b", 4)]),
    )
    assert first == [2] and last == [3]


async def test_a_fenced_checkpoint_records_the_owner_and_status_it_replaced(
    store: SQLiteStore,
) -> None:
    app = "shop"
    store.set_audit_key(app, KEY)
    run = new_run(app, owner="w1")
    await store.create_run(run)
    seen = statements(store)
    for write in (
        RunWrite(status=RunStatus.RUNNING),  # pending -> running: a status record
        RunWrite(status=RunStatus.RUNNING, flagged=True),  # running already: a checkpoint
        RunWrite(status=RunStatus.COMPLETED, result='{"ok": 1}', release=True),
    ):
        await store.commit_run(app, run.run_id, run.fence, write)
    assert count(seen, "SELECT fence, owner, status") == 0
    got = await store.get_run(app, run.run_id)
    assert got is not None and got.status == RunStatus.COMPLETED and got.owner is None
    records = [(r.actor, r.action) for r in await store.audit_records(app)][1:]
    assert records == [
        ("worker:w1", "run.status"), ("worker:w1", "run.checkpoint"),
        ("worker:w1", "run.status"),  # the owner it had, not the NULL it got
    ]
    with pytest.raises(LeaseLost):
        await store.commit_run(app, run.run_id, run.fence + 1,
                               RunWrite(status=RunStatus.FAILED, error="x"))
    assert (await store.verify_audit(app, key=KEY)).ok
