"""Delivery settlements and claims as one statement (migration 0014,
cantata.store.postgres_event_writes.statement): the same rows, holds and audit
records as the transactional path, in one round trip without BEGIN or COMMIT."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import asyncpg
import pytest

from cantata.model.codec import new_id
from cantata.model.event import Event
from cantata.model.records import Declaration
from cantata.store import audit, postgres_event_writes
from cantata.store.base import Settlement
from cantata.store.postgres import PostgresStore
from cantata.store.postgres_pool import Conn
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool
from tests.store.test_postgres import opened
from tests.store.test_postgres_onetrip import statements

pytestmark = pytest.mark.postgres
KEY = audit.AuditKey("0123456789abcdef-settle-test")


@pytest.fixture(scope="module")
def url(postgres_url: str, schema_pool: SchemaPool) -> Iterator[str]:
    """A schema of this module's own, migrated ahead (``schema_pool``, tests/conftest.py)."""
    schema = schema_pool.take()
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)


@pytest.fixture(params=["one statement", "transaction"])
async def store(request: pytest.FixtureRequest, url: str) -> AsyncIterator[PostgresStore]:
    async with opened(url) as s:
        if request.param == "transaction":
            s._w._one = None  # every batch BEGIN ... COMMIT: the path to compare with
        yield s


async def together(store: PostgresStore, *calls: Any, **kw: Any) -> list[Any]:
    """``asyncio.gather(*calls)`` with the store's writer as if a transaction were in
    flight: the calls' writes wait for its next turn and go in one batch, as writes
    that come together do (an idle store's writer sends a first write at once, alone:
    ``postgres_batch._started``)."""
    writer = store._w
    writer._draining += 1
    try:
        return list(await asyncio.gather(*calls, **kw))
    finally:
        writer._draining -= 1


def declarations() -> list[Declaration]:
    return [
        Declaration("handler", "g1", "order.*"),
        Declaration("handler", "g2", "pay.done"),
        Declaration("trigger", "t1", "x.*.y"),
        Declaration("handler", "g3", "order.a.b"),
        Declaration("handler", "g4", "*"),
    ]


async def test_settlements_store_outcomes_events_holds_and_audit(store: PostgresStore) -> None:
    app = f"app-{new_id()[-8:]}"
    store.set_audit_key(app, KEY)
    await store.declare(app, declarations())
    first = Event("order.created", {"n": 1})
    assert await store.append_events(app, [first]) == [1]
    now = time.time()
    [claimed] = await store.claim_deliveries(
        app, "w1", ["g1"], now=now, stale_before=now, limit=10
    )
    assert (claimed.group, claimed.attempts, claimed.fence) == ("g1", 1, 1)
    sent = statements(store)
    paid, other, deeper = Event("pay.done", {"x": "é"}), Event("x.q.y", None), Event(
        "order.a.b", [1]
    )
    done = Settlement(
        "done", 1, events=[paid, other, deeper, paid], hold_for="w1",
        hold=[("g2", paid.id), ("g1", deeper.id), ("t1", other.id)],
    )
    results = await together(
        store,
        store.settle_delivery(app, "g1", first.id, done),
        store.settle_delivery(app, "g1", first.id, Settlement("done", 1)),  # done already
        store.settle_delivery(app, "gX", first.id, Settlement("dead", 2, error="boom")),
        store.settle_delivery(
            app, "gY", first.id, Settlement("retry", 2, error="later", retry_at=now + 5)
        ),
        store.settle_delivery(app, "gZ", first.id, Settlement("dead", 3, error="")),
    )
    assert results == [True, False, True, True, True]
    if store._w._one is not None:
        assert sent == ["SELECT * FROM cantata_settle($1,"]  # one round trip, no BEGIN
    assert sorted(done.held) == sorted([("g2", paid.id), ("t1", other.id)])
    assert done.addressed == [1, 1, 1, 0]  # groups per emitted event (0: repeated)

    async def states(event: Event[Any]) -> list[tuple[str, str, int, int, str | None]]:
        return [
            (d.group, str(d.status), d.attempts, d.fence, d.error)
            for d in await store.deliveries(app, event.id)
        ]

    assert await states(first) == [
        ("g1", "done", 1, 1, None), ("gX", "dead", 2, 0, "boom"),
        ("gY", "pending", 2, 0, "later"), ("gZ", "dead", 3, 0, ""),
    ]
    assert await states(paid) == [("g2", "pending", 1, 1, None)]
    assert await states(other) == [("t1", "pending", 1, 1, None)]
    assert await states(deeper) == [("g3", "pending", 0, 0, None)]
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


async def test_a_missing_delivery_is_created_and_settled(store: PostgresStore) -> None:
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    store.set_audit_key(app, KEY)
    event = Event("other", None)
    await store.append_events(app, [event])
    assert await store.settle_delivery(app, "late", event.id, Settlement("done", 1))
    assert await store.settle_delivery(app, "g4", event.id, Settlement("dead", 1, error="x"))
    assert [(d.group, str(d.status)) for d in await store.deliveries(app, event.id)] == [
        ("g4", "dead"), ("late", "done")
    ]
    assert len(await store.audit_records(app)) == 2  # each alone in its batch
    report = await store.verify_audit(app, key=KEY)
    assert report.ok, report


async def test_an_owner_json_cannot_spell_falls_back_to_a_transaction(
    store: PostgresStore,
) -> None:
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    event = Event("order.created", None)
    await store.append_events(app, [event])
    now = time.time()
    await store.claim_deliveries(app, "wörker", ["g1"], now=now, stale_before=now, limit=1)
    assert await store.settle_delivery(app, "g1", event.id, Settlement("done", 1))
    [record] = await store.audit_records(app)
    assert record.actor == "worker:wörker"
    assert (await store.verify_audit(app)).ok


async def test_claims_of_many_workers_in_one_round_trip(store: PostgresStore) -> None:
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    events = [Event("pay.done", {"i": i}) for i in range(6)]
    await store.append_events(app, events)
    now = time.time()
    for i in range(4):  # live: a claim in the same transaction does not take another's
        await store.heartbeat(app, f"w{i}", now, None, lease=30.0)
    sent = statements(store)
    got = await asyncio.gather(*(
        store.claim_deliveries(app, f"w{i}", ["g2"], now=now, stale_before=now, limit=2)
        for i in range(4)
    ))
    if store._w._one is not None:
        assert all(not s.startswith("BEGIN") for s in sent)
    ids = [d.event.id for claimed in got for d in claimed]
    assert sorted(ids) == sorted(e.id for e in events)
    assert all(d.attempts == 1 and d.fence == 1 for claimed in got for d in claimed)


async def test_settlements_and_claims_of_one_batch_go_together(store: PostgresStore) -> None:
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    first, waiting = Event("order.created", None), Event("pay.done", {"i": 0})
    await store.append_events(app, [first, waiting])
    now = time.time()
    for worker in ("w1", "w2"):
        await store.heartbeat(app, worker, now, None, lease=30.0)
    await store.claim_deliveries(app, "w1", ["g1"], now=now, stale_before=now, limit=1)
    sent = statements(store)
    emitted = Event("pay.done", {"i": 1})
    settled, claimed = await together(
        store,
        store.settle_delivery(app, "g1", first.id, Settlement("done", 1, events=[emitted])),
        store.claim_deliveries(app, "w2", ["g2"], now=now, stale_before=now, limit=5),
    )
    assert settled
    if store._w._one is not None:
        assert sent == ["SELECT * FROM cantata_settle($1,"]
    # the claim comes after the settlement: the event it emitted is claimed too
    assert sorted(d.event.id for d in claimed) == sorted([waiting.id, emitted.id])
    assert [d.event for d in claimed if d.event.id == emitted.id] == [emitted]
    assert all((d.group, d.attempts, d.fence) == ("g2", 1, 1) for d in claimed)


async def test_claims_with_settlements_judge_each_holder_by_its_own_lease(
    store: PostgresStore,
) -> None:
    """A claim batched with a settlement (cantata_settle's claims, migration 0030) takes
    a delivery only once its holder's own expiry (heartbeat + its lease) has passed:
    a holder with lease 30 that heartbeat at t0 keeps it at t0 + 5 against a claimer
    whose own lease is 2 s, and loses it at t0 + 31."""
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    held, first, second = Event("pay.done", {"i": 0}), Event("order.a", 1), Event("order.b", 2)
    await store.append_events(app, [held, first, second])
    t0 = time.time()
    await store.heartbeat(app, "long", t0, None, lease=30.0)
    await store.heartbeat(app, "short", t0, None, lease=2.0)
    [d] = await store.claim_deliveries(app, "long", ["g2"], now=t0, stale_before=t0, limit=1)
    assert d.event.id == held.id
    await store.claim_deliveries(app, "w1", ["g1"], now=t0, stale_before=0, limit=2)

    async def batched(event: Event[Any], at: float) -> list[str]:
        sent = statements(store)
        settled, claimed = await together(
            store,
            store.settle_delivery(app, "g1", event.id, Settlement("done", 1)),
            store.claim_deliveries(app, "short", ["g2"], now=at, stale_before=at, limit=5),
        )
        assert settled
        if store._w._one is not None:
            assert sent == ["SELECT * FROM cantata_settle($1,"]
        return [c.event.id for c in claimed]

    assert await batched(first, t0 + 5) == []
    assert await batched(second, t0 + 31) == [held.id]


async def test_appends_go_with_settlements_and_count_their_groups(store: PostgresStore) -> None:
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    first = Event("order.created", None)
    await store.append_events(app, [first])
    sent = statements(store)
    emitted, published, again = Event("pay.done", 1), Event("x.a.y", 2), Event("no.body", 3)
    settled, counts, counts_again, stored = await together(
        store,
        store.settle_delivery(app, "g1", first.id, Settlement("done", 1, events=[emitted])),
        store.append_events(app, [published, again, published, Event("order.new", 4)]),
        store.append_events(app, [published, again]),
        store.append_events(app, [first]),
    )
    assert settled
    assert counts == [1, 0, 0, 1] and counts_again == [0, 0] and stored == [0]
    if store._w._one is not None:
        assert sent == ["SELECT * FROM cantata_settle($1,"]
    assert [d.group for d in await store.deliveries(app, published.id)] == ["t1"]
    assert [d.group for d in await store.deliveries(app, emitted.id)] == ["g2"]
    assert await store.get_event(app, again.id) == again
    assert (await store.verify_audit(app)).ok


async def test_a_hold_takes_only_deliveries_this_settlement_created(
    store: PostgresStore,
) -> None:
    """An emitted event whose id was stored before keeps its delivery free: a broker
    copy of it may be in a handler at another worker right now (both paths)."""
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    first, before, fresh = (Event("order.created", {"n": 1}), Event("pay.done", {"n": 2}),
                            Event("pay.done", {"n": 3}))
    assert await store.append_events(app, [first, before]) == [1, 1]
    done = Settlement("done", 1, events=[before, fresh], hold_for="w1",
                      hold=[("g2", before.id), ("g2", fresh.id)])
    assert await store.settle_delivery(app, "g1", first.id, done)
    assert done.held == [("g2", fresh.id)]
    assert done.addressed == [0, 1]  # stored before: addressed to nobody new
    [d_before] = await store.deliveries(app, before.id)
    [d_fresh] = await store.deliveries(app, fresh.id)
    assert (d_before.attempts, d_before.fence) == (0, 0)
    assert (d_fresh.attempts, d_fresh.fence) == (1, 1)


async def test_an_append_holds_the_deliveries_it_created_in_one_round_trip(
    store: PostgresStore,
) -> None:
    """app.publish's first hop (EventStore.append_held): the deliveries the append
    created, for this worker's groups, claimed with it; never one of an event stored
    before, nor one of a group the event does not go to (both paths)."""
    app = f"app-{new_id()[-8:]}"
    await store.declare(app, declarations())
    await store.heartbeat(app, "w1", time.time(), None, lease=30.0)
    before, placed, paid = Event("order.a", 1), Event("order.b", 2), Event("pay.done", 3)
    assert await store.append_events(app, [before]) == [1]
    sent = statements(store)
    hold = [("g1", before.id), ("g1", placed.id), ("g4", placed.id), ("g2", placed.id)]
    (counts, held), (counts2, held2) = await together(
        store,
        store.append_held(app, [before, placed], hold_for="w1", hold=hold),
        store.append_held(app, [paid], hold_for="w2", hold=[("g2", paid.id)]),
    )
    if store._w._one is not None:
        assert sent == ["SELECT * FROM cantata_settle($1,"]
    assert counts == [0, 1] and held == [("g1", placed.id)]
    assert counts2 == [1] and held2 == [("g2", paid.id)]
    states = {(d.group, d.event.id): (d.attempts, d.fence)
              for e in (before, placed, paid) for d in await store.deliveries(app, e.id)}
    assert states == {
        ("g1", before.id): (0, 0), ("g1", placed.id): (1, 1), ("g2", paid.id): (1, 1),
    }
    assert (await store.verify_audit(app)).ok


class _Clock:
    """``time`` for postgres_event_writes: 1e9, 1e9 + 1, ... (both paths alike)."""

    def __init__(self) -> None:
        self.now = 1e9

    def time(self) -> float:
        self.now += 1.0
        return self.now


async def _one_at_a_time(store: PostgresStore, app: str) -> list[Any]:
    """Each write alone in its batch (the latency case): settlements of every outcome,
    with events (one repeated, one stored before) and holds, one done already, one of a
    missing delivery, appends with and without holds; what each returned."""
    store.set_audit_key(app, KEY)
    await store.declare(app, declarations())
    at = "2026-12-02T00:00:00Z"
    first, second = Event("order.created", {"n": 1}, id="e-first", time=at), Event(
        "z", 2, id="e-2", time=at)
    paid, other = (Event("pay.done", {"x": "é"}, id="e-paid", time=at),
                   Event("x.q.y", None, id="e-x", time=at))
    deeper, placed = (Event("order.a.b", [1], id="e-deeper", time=at),
                      Event("order.b", 3, id="e-pl", time=at))
    out: list[Any] = [await store.append_events(app, [first, second])]
    await store.claim_deliveries(app, "w1", ["g1"], now=1.0, stale_before=0.0, limit=10)
    done = Settlement(
        "done", 1, events=[paid, other, deeper, paid, second], hold_for="w1",
        hold=[("g2", paid.id), ("g1", deeper.id), ("t1", other.id), ("g4", second.id)],
    )
    out.append(await store.settle_delivery(app, "g1", first.id, done))
    out.append((done.held, done.addressed))
    for group, event_id, s in [
        ("g1", first.id, Settlement("done", 1, events=[placed])),  # done already
        ("gX", second.id, Settlement("dead", 2, error="boom", dead_letter_id="dl-1")),
        ("gY", second.id, Settlement("retry", 2, error="later", retry_at=7.5)),
        ("gZ", second.id, Settlement("dead", 3, error="", dead_letter_id="dl-2")),
        ("g4", second.id, Settlement("done", 1)),
        ("late", second.id, Settlement("retry", 1, error="x", retry_at=9.0)),  # missing
    ]:
        out.append(await store.settle_delivery(app, group, event_id, s))
    out.append(await store.append_held(
        app, [first, placed], hold_for="w2", hold=[("g1", first.id), ("g1", placed.id)]
    ))
    out.append(await store.append_events(app, [Event("pay.done", 4, id="e-p2", time=at)] * 2))
    return out


async def _tables(store: PostgresStore, app: str) -> list[list[tuple[Any, ...]]]:
    """Every row ``app`` has in the tables a settlement writes (but the app's name and
    the events' sequence numbers, which differ between apps), the audit hashes too."""
    queries = [
        "SELECT grp, event_id, status, attempts, next_at, owner, fence, error, updated_at "
        "FROM deliveries WHERE app=$1 ORDER BY grp, event_id",
        "SELECT id, type, source, subject, time, data, correlation_id, causation_id, "
        "traceparent, signature, stored_at, published FROM events WHERE app=$1 ORDER BY seq",
        "SELECT id, grp, event_id, error, attempts, failed_at FROM dead_letters "
        "WHERE app=$1 ORDER BY id",
        "SELECT seq, time, actor, action, target, data, prev_hash, hash FROM audit "
        "WHERE app=$1 ORDER BY seq",
        "SELECT seq, prev_hash, hash FROM audit_head WHERE app=$1",
    ]
    return [[tuple(r) for r in await store._db.fetch(q, app)] for q in queries]


# The lean path's calls: cantata_settle_hop for at most one event (migration 0042) and
# cantata_settle_one for the rest, or cantata_settle_one alone (HOP off).
_LEAN_CALLS = {
    True: ("SELECT * FROM cantata_settle_hop(", "SELECT * FROM cantata_settle_one("),
    False: ("SELECT * FROM cantata_settle_one(",),
}


@pytest.mark.parametrize("hop", [True, False], ids=["hop", "settle_one"])
async def test_the_lean_path_writes_what_cantata_settle_writes(
    url: str, monkeypatch: pytest.MonkeyPatch, hop: bool
) -> None:
    """A batch of one settlement or append through cantata_settle_one (migration 0020)
    or cantata_settle_hop (0042, at most one event) leaves the rows, results and keyed
    audit chain (hash for hash) that cantata_settle leaves for it (at the same clock)."""
    seen: dict[bool, tuple[list[Any], list[list[tuple[Any, ...]]]]] = {}
    async with opened(url) as store:
        for lean in (True, False):
            monkeypatch.setattr(postgres_event_writes, "LEAN", lean)
            monkeypatch.setattr(postgres_event_writes, "HOP", hop)
            monkeypatch.setattr(postgres_event_writes, "time", _Clock())
            app = f"app-{lean}-{new_id()[-8:]}"
            sent = statements(store)
            results = await _one_at_a_time(store, app)
            assert sent, sent
            assert all(
                s.startswith(_LEAN_CALLS[hop] if lean
                             else ("SELECT * FROM cantata_settle(",)) or "pick" in s
                for s in sent if "cantata_settle" in s or not s.startswith("WITH")
            ), sent
            assert (await store.verify_audit(app, key=KEY)).ok
            seen[lean] = (results, await _tables(store, app))
    assert seen[True][0] == seen[False][0]
    for lean_rows, big_rows in zip(seen[True][1], seen[False][1], strict=True):
        assert lean_rows == big_rows
    results, (_, _, letters, records, _) = seen[True]
    assert results[2] == ([("g2", "e-paid"), ("t1", "e-x")], [1, 1, 1, 0, 0])
    assert results[3:9] == [False, True, True, True, True, True]
    assert results[9] == ([0, 1], [("g1", "e-pl")])
    assert results[10] == [1, 0]
    assert len(letters) == 2 and len(records) == 4


async def _hops(store: PostgresStore, app: str) -> list[Any]:
    """Writes of one event each alone in their batch, the hops of a chain (migration
    0022's statement for one event): held for the worker, held for a group the event
    does not go to, stored before, with no hold, held in two groups of one event; and
    holds the general statement takes (another event's, one given twice)."""
    store.set_audit_key(app, KEY)
    await store.declare(app, [*declarations(), Declaration("handler", "g5", "order.r")])
    at = "2026-12-02T00:00:00Z"
    o1, o2 = Event("order.x", 1, id="h-o1", time=at), Event("order.y", 2, id="h-o2", time=at)
    p1, z = Event("pay.done", 3, id="h-p1", time=at), Event("z", 4, id="h-z", time=at)
    q, r = Event("x.q.y", 5, id="h-q", time=at), Event("order.r", 6, id="h-r", time=at)
    s1 = Event("order.s", 7, id="h-s1", time=at)
    out: list[Any] = [await store.append_held(app, [o1], hold_for="w1", hold=[("g1", o1.id)])]
    for group, event_id, s in [
        ("g1", o1.id, Settlement("done", 1, events=[p1], hold_for="w1",
                                 hold=[("g2", p1.id)])),
        ("g2", p1.id, Settlement("done", 1, events=[o2], hold_for="w1",
                                 hold=[("g3", o2.id)])),  # o2 does not go to g3
        ("g1", o2.id, Settlement("done", 2, events=[p1], hold_for="w1",
                                 hold=[("g2", p1.id)])),  # p1 stored before
        ("g4", "h-none", Settlement("done", 1, events=[z])),  # missing, no hold
        ("g4", z.id, Settlement("done", 1, events=[q], hold_for="w2",
                                hold=[("t1", "h-other")])),  # another event's
        ("t1", q.id, Settlement("done", 1, events=[r], hold_for="w2",
                                hold=[("g5", r.id)])),  # r goes to g1 and g5
        ("g5", r.id, Settlement("done", 1, events=[], hold_for="w2", hold=[])),
    ]:
        out.append((await store.settle_delivery(app, group, event_id, s), s.held,
                    s.addressed))
    out.append(await store.append_held(
        app, [s1], hold_for="w3", hold=[("g1", s1.id), ("g1", s1.id)]  # given twice
    ))
    out.append(await store.append_held(
        app, [Event("order.t", 8, id="h-t", time=at)], hold_for="w3", hold=[]
    ))
    return out


@pytest.mark.parametrize("hop", [True, False], ids=["hop", "settle_one"])
async def test_the_lean_path_holds_one_event_as_cantata_settle_does(
    url: str, monkeypatch: pytest.MonkeyPatch, hop: bool
) -> None:
    """The hops of a chain (one event each, a delivery of it held or not) through
    cantata_settle_one (migration 0022: the held delivery inserted held) leave what
    cantata_settle leaves for them, hash for hash."""
    seen: dict[bool, tuple[list[Any], list[list[tuple[Any, ...]]]]] = {}
    async with opened(url) as store:
        for lean in (True, False):
            monkeypatch.setattr(postgres_event_writes, "LEAN", lean)
            monkeypatch.setattr(postgres_event_writes, "HOP", hop)
            monkeypatch.setattr(postgres_event_writes, "time", _Clock())
            app = f"hop-{lean}-{new_id()[-8:]}"
            results = await _hops(store, app)
            assert (await store.verify_audit(app, key=KEY)).ok
            seen[lean] = (results, await _tables(store, app))
    assert seen[True][0] == seen[False][0]
    for lean_rows, big_rows in zip(seen[True][1], seen[False][1], strict=True):
        assert lean_rows == big_rows
    results, (deliveries, _, _, records, _) = seen[True]
    assert results[0] == ([1], [("g1", "h-o1")])
    assert results[1] == (True, [("g2", "h-p1")], [1])
    assert results[2] == (True, [], [1])
    assert results[3] == (True, [], [0])
    assert results[5] == (True, [], [1])
    assert results[6] == (True, [("g5", "h-r")], [2])
    assert results[8] == ([1], [("g1", "h-s1")])
    owners = {(g, e): (owner, fence, attempts)
              for g, e, _, attempts, _, owner, fence, _, _ in deliveries}
    assert owners[("g1", "h-r")] == (None, 0, 0)
    assert owners[("g1", "h-t")] == (None, 0, 0)
    assert owners[("g1", "h-s1")] == ("w3", 1, 1)
    assert len(records) == 7


async def test_a_delivery_owner_sql_cannot_spell_goes_as_a_transaction(url: str) -> None:
    """The lean path's record of a settlement (migration 0022: the owner read as the
    delivery is locked) leaves an owner SQL cannot spell to the transactional path."""
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        store.set_audit_key(app, KEY)
        await store.declare(app, declarations())
        first = Event("order.created", 1)
        await store.append_events(app, [first])
        claimed = await store.claim_deliveries(
            app, "wörker\n1", ["g1"], now=1.0, stale_before=0.0, limit=1
        )
        assert [d.event.id for d in claimed] == [first.id]
        sent = statements(store)
        paid = Event("pay.done", 2)
        s = Settlement("done", 1, events=[paid], hold_for="wörker\n1", hold=[("g2", paid.id)])
        assert await store.settle_delivery(app, "g1", first.id, s)
        assert sent[0].startswith("SELECT * FROM cantata_settle_hop("), sent
        assert any(x.startswith("BEGIN") for x in sent), sent
        assert s.held == [("g2", paid.id)] and s.addressed == [1]
        records = await store.audit_records(app)
        assert records[-1].actor == "worker:wörker\n1"
        assert (await store.verify_audit(app, key=KEY)).ok


@pytest.mark.parametrize("path", ["lean", "one statement", "transaction"])
async def test_each_path_says_which_emitted_events_a_settlement_stored(
    url: str, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Settlement.stored on each way a batch is written: an event two handlers emit
    with one id is stored by the first only, so that it is counted once."""
    monkeypatch.setattr(postgres_event_writes, "LEAN", path == "lean")
    async with opened(url) as store:
        if path == "transaction":
            store._w._one = None
        app = f"stored-{new_id()[-8:]}"
        await store.declare(app, [*declarations(), Declaration("handler", "g6", "order.new"),
                                  Declaration("handler", "g7", "order.new")])
        placed = Event("order.new", 1)
        await store.append_events(app, [placed])
        joined, unheard, later = Event("pay.done", 2), Event("no.one.hears", 3), Event("z", 4)
        first = Settlement("done", 1, [joined, unheard, joined])
        assert await store.settle_delivery(app, "g6", placed.id, first)
        assert (first.stored, first.addressed) == ([True, True, False], [1, 0, 0])
        second = Settlement("done", 1, [joined, later])
        assert await store.settle_delivery(app, "g7", placed.id, second)
        assert (second.stored, second.addressed) == ([False, True], [0, 1])
        alone = Settlement("done", 1, [joined])  # one event: the lean path's fast path
        assert await store.settle_delivery(app, "g1", placed.id, alone)
        assert (alone.stored, alone.addressed) == ([False], [0])


@pytest.mark.parametrize("hop", [True, False], ids=["hop", "settle_one"])
async def test_a_hop_through_the_lean_path_notifies_and_writes_as_before(
    url: str, monkeypatch: pytest.MonkeyPatch, hop: bool
) -> None:
    """The hops of a chain through cantata_settle_hop and cantata_settle_one (migration
    0042: the one event's statements taken apart) write, answer and notify as
    migration 0026's cantata_settle_one did: no notice when the only delivery it
    stored is held for the worker that settles; a notice when a delivery is left
    pending, one was there before (not held), a wait matches the event, the settlement
    is a retry or a dead letter; none for an event stored before or a settlement done
    with nothing emitted; a dead letter's delivery settled done drops its dead
    letter."""
    monkeypatch.setattr(postgres_event_writes, "HOP", hop)
    app = f"hop-notice-{new_id()[-8:]}"
    async with opened(url) as store:
        await store.declare(app, [
            Declaration("handler", "a", "hop.a"), Declaration("handler", "b", "hop.b"),
            Declaration("handler", "c1", "hop.c"), Declaration("trigger", "c2", "hop.c"),
            Declaration("handler", "wg", "hop.w"), Declaration("wait", "w", "hop.w"),
            Declaration("handler", "star", "star.*"),
        ])
        base, _, query = url.partition("?")
        schema = dict(kv.split("=", 1) for kv in query.split("&"))["schema"]
        c = await asyncpg.connect(base, server_settings={"search_path": schema})
        notices: list[str] = []
        channel = await c.fetchval("SELECT cantata_channel()")
        await c.add_listener(channel, lambda *a: notices.append(a[3]))
        at = "2026-12-06T00:00:00Z"
        e = {n: Event(t, n, id=f"hn-{n}", time=at) for n, t in [
            ("e0", "hop.a"), ("e1", "hop.b"), ("e2", "hop.c"), ("e3", "hop.w"),
            ("e4", "star.x"), ("e5", "hop.b"), ("e6", "hop.a"), ("e7", "hop.a")]}
        w = postgres_event_writes

        async def call(many: Any, arg: Any) -> tuple[Any, bool]:
            (out,) = await w.write(cast(Conn, c), [(many, arg)], {app: KEY})
            await asyncio.sleep(0.05)  # the commit's notice, to this connection too
            heard = bool(notices)
            notices.clear()
            return out, heard

        async def settle(group: str, event_id: str, s: Settlement) -> tuple[Any, ...]:
            settled, heard = await call(w.settle_many, (app, group, event_id, s))
            return settled, s.held, s.addressed, heard

        def done(*events: Event[Any], hold: list[tuple[str, str]] | None = None) -> Settlement:
            return Settlement("done", 1, events=list(events), hold_for="w1" if hold else None,
                              hold=hold or [])

        store.set_audit_key(app, KEY)
        got = [await call(w.append_held_many, (app, [e["e0"]], "w1", [("a", "hn-e0")]))]
        got.append(await settle("a", "hn-e0", done(e["e1"], hold=[("b", "hn-e1")])))
        got.append(await settle("b", "hn-e1", done(e["e2"], hold=[("c1", "hn-e2")])))
        got.append(await settle("c1", "hn-e2", done(e["e3"], hold=[("wg", "hn-e3")])))
        got.append(await settle("wg", "hn-e3", done(e["e1"], hold=[("b", "hn-e1")])))
        got.append(await settle("c2", "hn-e2", done(e["e4"])))
        got.append(await settle("b", "hn-e5", Settlement("retry", 1, error="x", retry_at=5.0)))
        got.append(await settle("star", "hn-e4", done(e["e5"], hold=[("b", "hn-e5")])))
        got.append(await settle("b", "hn-e5", Settlement("dead", 2, error="boom",
                                                          dead_letter_id="hn-dl")))
        got.append(await settle("b", "hn-e5", done()))
        got.append(await settle("b", "hn-e5", done()))  # done already: nothing written
        got.append(await call(w.append_held_many, (app, [e["e6"]], "w1", [("a", "hn-e6")])))
        got.append(await call(w.append_many, (app, [e["e7"]])))
        await c.close()
        assert got == [
            (([1], [("a", "hn-e0")]), False),
            (True, [("b", "hn-e1")], [1], False),  # held, nothing else
            (True, [("c1", "hn-e2")], [2], True),  # c2's delivery pending
            (True, [("wg", "hn-e3")], [1], True),  # a wait matches hop.w
            (True, [], [0], False),  # e1 stored before
            (True, [], [1], True),  # no hold: star's delivery pending
            (True, [], [], True),  # a retry (of a delivery created for it)
            (True, [], [1], True),  # b's delivery of e5 was there before: not held
            (True, [], [], True),  # a dead letter
            (True, [], [], False),  # done, nothing emitted; its dead letter dropped
            (False, [], [], False),
            (([1], [("a", "hn-e6")]), False),
            ([1], True),
        ]
        rows = {(r[0], r[1]): tuple(r)[2:] for r in await store._db.fetch(
            "SELECT grp, event_id, status, attempts, owner, fence FROM deliveries "
            "WHERE app=$1", app)}
        assert rows == {
            ("a", "hn-e0"): ("done", 1, None, 1), ("b", "hn-e1"): ("done", 1, None, 1),
            ("c1", "hn-e2"): ("done", 1, None, 1), ("c2", "hn-e2"): ("done", 1, None, 0),
            ("wg", "hn-e3"): ("done", 1, None, 1), ("star", "hn-e4"): ("done", 1, None, 0),
            ("b", "hn-e5"): ("done", 1, None, 0), ("a", "hn-e6"): ("pending", 1, "w1", 1),
            ("a", "hn-e7"): ("pending", 0, None, 0),
        }
        assert await store._db.fetch("SELECT id FROM dead_letters WHERE app=$1", app) == []
        assert (await store.verify_audit(app, key=KEY)).ok
