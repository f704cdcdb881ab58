"""The store contract, part two: the event log, deliveries, dead letters and outbox."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from cantata.errors import ConfigurationError, DeadLetterNotFound
from cantata.model.event import match_data
from cantata.model.records import (
    DELIVERY_DEAD,
    DELIVERY_DONE,
    DELIVERY_PENDING,
    Declaration,
    RunWrite,
)
from cantata.model.signing import Signer
from cantata.store.base import Settlement, Store
from cantata.testing.contract.support import LEASE, StoreFixtures, ev, new_run


class EventsContract(StoreFixtures):
    """Events and their per-group deliveries (collected through :class:`StoreContract`)."""

    # -- events and deliveries -----------------------------------------------------------

    async def test_append_fans_out_to_matching_handler_and_trigger_groups(
        self, store: Store
    ) -> None:
        await store.declare(self.app, [
            Declaration("handler", "exact", "order.placed"),
            Declaration("handler", "wild", "order.*"),
            Declaration("handler", "wild", "*.placed"),  # one group, two matching patterns
            Declaration("trigger", "starter", "*.placed"),
            Declaration("handler", "deep", "order.placed.v2"),
            Declaration("workflow", "order.placed"),
            Declaration("step", "order.placed", "order.placed"),
        ])
        placed, nested, other = ev("order.placed"), ev("order.placed.v2"), ev("user.created")
        assert await store.append_events(self.app, [placed, nested, other]) == [3, 1, 0]
        ds = await store.deliveries(self.app, placed.id)
        assert [d.group for d in ds] == ["exact", "starter", "wild"]
        assert all(
            d.status == DELIVERY_PENDING and d.attempts == 0 and d.event == placed for d in ds
        )
        assert [d.group for d in await store.deliveries(self.app, nested.id)] == ["deep"]
        assert await store.deliveries(self.app, other.id) == []

    async def test_declarations_by_another_instance_route_later_events(
        self, store: Store, peer: Store
    ) -> None:
        before = ev()
        assert await store.append_events(self.app, [before]) == [0]
        await peer.declare(self.app, [Declaration("handler", "late", "order.placed")])
        after = ev()
        assert await store.append_events(self.app, [after]) == [1]
        assert [d.group for d in await store.deliveries(self.app, after.id)] == ["late"]
        assert await store.deliveries(self.app, before.id) == []

    async def test_append_is_idempotent_by_event_id(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"))
        e = ev(subject="s", correlation_id="c", causation_id="x", traceparent="00-ab-cd-01",
               signature="sig", source="tests")
        assert await store.append_events(self.app, [e, e]) == [1, 0]
        await store.declare(self.app, [Declaration("handler", "late", "order.placed")])
        assert await store.append_events(self.app, [ev(id=e.id, data={"other": True})]) == [0]
        assert await store.get_event(self.app, e.id) == e
        assert [d.group for d in await store.deliveries(self.app, e.id)] == ["g"]
        assert [x.id for x in await store.unpublished_events(self.app, limit=10)] == [e.id]
        assert await store.get_event(self.app, "missing") is None
        assert await store.append_events(self.app, []) == []

    async def test_find_events_by_type_since_and_exclude(self, store: Store) -> None:
        a, b, other = ev("t.a"), ev("t.a"), ev("t.b")
        await store.append_events(self.app, [a, other, b])
        await asyncio.sleep(0.02)
        cut = time.time()
        await asyncio.sleep(0.02)
        c = ev("t.a")
        await store.append_events(self.app, [c])

        async def ids(**kw: Any) -> list[str]:
            args: dict[str, Any] = {"since": 0.0, "exclude": [], "limit": 100} | kw
            return [e.id for e in await store.find_events(self.app, "t.a", **args)]

        assert await ids() == [a.id, b.id, c.id]
        assert await ids(since=cut) == [c.id]
        assert await ids(exclude=[a.id, c.id]) == [b.id]
        assert await ids(limit=2) == [a.id, b.id]
        assert await ids(since=time.time() + 60) == []
        assert await store.find_events(self.app + "-b", "t.a", since=0, exclude=[], limit=9) == []

    async def test_find_events_by_match_leaves_out_no_event_that_matches(
        self, store: Store
    ) -> None:
        """``match`` may leave out events that cannot match (SQLite and PostgreSQL do, in
        their queries), never one that does, as ``ctx.wait_for_event`` compares the
        values (an int equal to a float or a bool; a string jsonb refuses)."""
        datas: list[Any] = [
            {"order": 7}, {"order": 7.0}, {"order": True}, {"order": "7"}, {"order": 8},
            {"order": None}, {"order": 0.1}, {"order": [7]}, {"order": {"id": 7}},
            {"order": {"id": 7, "x": "é \" ' ."}, "n": 2**62}, {"o.d": 7}, {'k"q': "v"},
            {"order": "x'); DROP TABLE events; --"}, {}, [7], "text", None, b"\x00\xff",
            {"order": 2**62, "big": 2**63 - 1}, {"order": 1}, {"order": False},
            {"order": 7, "note": "a\x00b"}, {"order": 2**53, "n": 2.0**53},
            {"k\x1fy": "v", "order": 1.5}, {"b\\s": "v", "t\tab": 3},
            {"order": 1e15, "deep": {"order": "x"}}, {"order": -12.0, "who": "caf\u00e9"},
            {"big": 1e16},
        ]
        events = [ev("t.m", data) for data in datas]
        await store.append_events(self.app, events)
        matches: list[dict[str, Any]] = [
            {}, {"order": 7}, {"order": 7.0}, {"order": True}, {"order": "7"},
            {"order": None}, {"order": 0.1}, {"order": [7]}, {"order": {"id": 7}},
            {"order.id": 7}, {"order.id": 7, "n": 2**70}, {"order.x": "é \" ' ."},
            {"o.d": 7}, {'k"q': "v"}, {"order": "x'); DROP TABLE events; --"},
            {"order": 2**62}, {"big": 2**63 - 1}, {"big": 2**63}, {"order": 7, "missing": 1},
            {"order": 9}, {"order": 1}, {"order": 0}, {"order": False}, {"n": 2**53},
            {"order": 2**53}, {"k\x1fy": "v"}, {"order": 1.5}, {"order": 7, "note": "a\x00b"},
            {"b\\s": "v"}, {"t\tab": 3}, {"order": 10**15}, {"deep.order": "x"},
            {"order": -12}, {"who": "caf\u00e9"}, {"order": "x"},
            {"big": 10**16},
        ]
        for match in matches:
            found = await store.find_events(self.app, "t.m", since=0, exclude=[],
                                            limit=100, match=match)
            assert [e.id for e in found] == sorted(
                {e.id for e in found}, key=[x.id for x in events].index
            )  # oldest first, each once
            assert {e.id for e in found} >= {
                e.id for e in events if match_data(e.data, match)
            }, match

    async def test_find_events_after_an_event_follows_the_log_not_the_clocks(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        early, trigger = ev("t.a"), ev("t.b")
        await store.append_events(self.app, [early])
        await store.append_events(self.app, [trigger])
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 10.0)  # a writer 10 s slow
        reply = ev("t.a")
        await store.append_events(self.app, [reply])
        monkeypatch.setattr(time, "time", real)
        later = ev("t.a")
        await store.append_events(self.app, [later])
        future = time.time() + 3600  # e.g. the run was created long after its trigger

        async def ids(**kw: Any) -> list[str]:
            args: dict[str, Any] = {"since": future, "exclude": [], "limit": 100} | kw
            return [e.id for e in await store.find_events(self.app, "t.a", **args)]

        assert await ids(after=trigger.id) == [reply.id, later.id]
        assert await ids(after=trigger.id, exclude=[reply.id]) == [later.id]
        assert await ids(after=trigger.id, limit=1) == [reply.id]
        assert await ids(after=trigger.id, since=0.0) == [early.id, reply.id, later.id]
        assert await ids(after="not-stored") == []
        assert await ids(after="not-stored", since=0.0) == [early.id, reply.id, later.id]
        assert await ids(after=early.id) == [reply.id, later.id]

    async def test_find_events_after_a_log_position_follows_the_log_not_the_clocks(
        self, store: Store, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        start = await store.log_position(self.app)
        assert start >= 0
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 20.0)  # a writer 20 s slow
        early = ev("t.a")
        await store.append_events(self.app, [early])
        position = await store.log_position(self.app)
        assert position > start
        monkeypatch.setattr(time, "time", lambda: real() - 10.0)  # a writer 10 s slow
        slow = ev("t.a")
        await store.append_events(self.app, [slow])
        monkeypatch.setattr(time, "time", real)
        later, other = ev("t.a"), ev("t.b")
        await store.append_events(self.app, [later, other])
        assert await store.log_position(self.app) > position
        cut = time.time() - 5.0  # after the slow writer's stamp, before the others'

        async def ids(kind: str = "t.a", **kw: Any) -> list[str]:
            args: dict[str, Any] = {"since": cut, "exclude": [], "limit": 100} | kw
            return [e.id for e in await store.find_events(self.app, kind, **args)]

        assert await ids() == [later.id]  # by the clocks alone, the slow one is missed
        assert await ids(position=position) == [slow.id, later.id]
        assert await ids("t.*", position=position) == [slow.id, later.id, other.id]
        assert await ids(position=position, exclude=[slow.id]) == [later.id]
        assert await ids(position=position, limit=1) == [slow.id]
        assert await ids(position=position, since=0.0) == [early.id, slow.id, later.id]
        assert await ids(position=start) == [early.id, slow.id, later.id]
        assert await ids(position=await store.log_position(self.app)) == [later.id]
        with pytest.raises(ConfigurationError, match="after= or position="):
            await ids(position=position, after=early.id)

    async def test_delivery_states_of_a_group_for_many_events(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.*"), ("h", "order.placed"))
        placed, paid, other = ev("order.placed"), ev("order.paid"), ev("user.created")
        await store.append_events(self.app, [placed, paid, other])
        assert await store.settle_delivery(
            self.app, "g", paid.id, Settlement("retry", 1, error="E: x", retry_at=1.0)
        )
        ids = [placed.id, paid.id, other.id, "never-stored", placed.id]
        assert await store.delivery_states(self.app, "g", ids) == {
            placed.id: (DELIVERY_PENDING, 0), paid.id: (DELIVERY_PENDING, 1),
        }
        assert await store.delivery_states(self.app, "h", ids) == {
            placed.id: (DELIVERY_PENDING, 0)
        }
        assert await store.settle_delivery(self.app, "h", placed.id, Settlement("done", 1))
        [(status, _)] = (await store.delivery_states(self.app, "h", [placed.id])).values()
        assert status == DELIVERY_DONE
        assert await store.delivery_states(self.app, "g", []) == {}
        many = [ev("order.placed") for _ in range(600)]  # more than one chunk of ids
        await store.append_events(self.app, many)
        got = await store.delivery_states(self.app, "g", [e.id for e in many])
        assert len(got) == 600

    async def test_delivery_holds_name_a_live_holder_only(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.*"), ("h", "order.placed"))
        first, placed, paid = ev("order.placed"), ev("order.placed"), ev("order.paid")
        await store.append_events(self.app, [first])
        now = time.time()
        await store.heartbeat(self.app, "w1", now, None, lease=LEASE)
        held = Settlement("done", 1, [placed, paid], hold_for="w1",
                          hold=[("g", placed.id), ("h", placed.id)])
        assert await store.settle_delivery(self.app, "g", first.id, held)
        assert sorted(held.held) == [("g", placed.id), ("h", placed.id)]
        ids = [placed.id, paid.id, "never-stored"]
        got = await store.delivery_holds(self.app, "g", ids, stale_before=now)
        assert set(got) == {placed.id, paid.id}
        assert (got[placed.id].status, got[placed.id].attempts) == (DELIVERY_PENDING, 1)
        assert got[placed.id].holder == "w1"
        assert got[paid.id].holder is None and got[paid.id].attempts == 0
        # each carries the stored event, read in the same query
        stored = got[placed.id].event
        assert stored is not None and stored.id == placed.id and stored.same_content(placed)
        # a delivery of an event the store does not hold (settled by an older version)
        assert await store.settle_delivery(self.app, "g", "not-stored", Settlement("retry", 1,
                                           error="E: x", retry_at=now))
        [bare] = (await store.delivery_holds(self.app, "g", ["not-stored"],
                                             stale_before=now)).values()
        assert (bare.status, bare.event) == (DELIVERY_PENDING, None)
        # a holder whose expiry (heartbeat + its own lease) is before stale_before, the
        # time it is judged at, is presumed dead
        still = await store.delivery_holds(self.app, "g", ids, stale_before=now + LEASE)
        assert still[placed.id].holder == "w1"
        stale = await store.delivery_holds(self.app, "g", ids, stale_before=now + LEASE + 1)
        assert stale[placed.id].holder is None
        anyone = await store.delivery_holds(self.app, "g", ids, stale_before=float("-inf"))
        assert anyone[placed.id].holder == "w1"
        # settled by its holder: nobody holds it, and a retry says when it is due
        assert await store.settle_delivery(
            self.app, "h", placed.id, Settlement("retry", 1, error="E: x", retry_at=now + 50)
        )
        [h] = (await store.delivery_holds(self.app, "h", [placed.id],
                                          stale_before=now)).values()
        assert (h.status, h.attempts, h.holder, h.next_at) == (DELIVERY_PENDING, 1, None,
                                                                 now + 50)
        assert await store.delivery_holds(self.app, "g", [], stale_before=0) == {}

    async def test_a_delivery_is_taken_by_one_live_worker_until_it_lets_go(
        self, store: Store
    ) -> None:
        await self.handlers(store, ("g", "order.*"))
        free, done, later = ev("order.placed"), ev("order.placed"), ev("order.paid")
        await store.append_events(self.app, [free, done, later])
        now = time.time()
        for worker in ("w1", "w2"):
            await store.heartbeat(self.app, worker, now, None, lease=LEASE)
        assert await store.settle_delivery(self.app, "g", done.id, Settlement("done", 1))
        assert await store.settle_delivery(
            self.app, "g", later.id, Settlement("retry", 2, error="E: x", retry_at=now + 50)
        )

        async def take(worker: str, *ids: str, at: float = now) -> dict[str, str | None]:
            got = await store.take_deliveries(self.app, "g", list(ids), worker,
                                              stale_before=at)
            return {k: h.holder for k, h in got.items()}

        ids = (free.id, done.id, later.id, "never-stored")
        assert await take("w1", *ids) == {free.id: "w1", done.id: None, later.id: "w1"}
        # attempts, due time, status and the stored event as they were
        [h] = (await store.take_deliveries(self.app, "g", [later.id], "w1",
                                           stale_before=now)).values()
        assert (h.status, h.attempts, h.next_at, h.error) == (DELIVERY_PENDING, 2,
                                                               now + 50, "E: x")
        assert h.event is not None and h.event.same_content(later)
        # held: another live worker is told so, and gets nothing
        assert await take("w2", free.id, later.id) == {free.id: "w1", later.id: "w1"}
        assert not await store.release_delivery(self.app, "g", free.id, "w2")
        reads = await store.delivery_holds(self.app, "g", [free.id], stale_before=now)
        assert reads[free.id].holder == "w1"
        # let go unsettled: the next worker takes it
        assert await store.release_delivery(self.app, "g", free.id, "w1")
        assert not await store.release_delivery(self.app, "g", free.id, "w1")
        assert await take("w2", free.id) == {free.id: "w2"}
        # taken over once its holder is presumed dead (its expiry before stale_before)
        assert await take("w1", free.id, at=now + LEASE) == {free.id: "w2"}
        assert await take("w1", free.id, at=now + LEASE + 1) == {free.id: "w1"}
        assert not await store.release_delivery(self.app, "g", free.id, "w2")
        # a settlement lets go: retried, it is free again; done, nobody takes it
        assert await store.settle_delivery(
            self.app, "g", free.id, Settlement("retry", 1, error="E: y", retry_at=now)
        )
        assert await take("w2", free.id) == {free.id: "w2"}
        assert await store.settle_delivery(self.app, "g", free.id, Settlement("done", 2))
        assert await take("w1", free.id) == {free.id: None}
        assert not await store.release_delivery(self.app, "g", free.id, "w2")
        assert await store.take_deliveries(self.app, "g", [], "w1", stale_before=now) == {}

    async def test_of_workers_taking_one_delivery_at_once_one_gets_it(
        self, store: Store, peer: Store
    ) -> None:
        await self.handlers(store, ("g", "order.*"))
        events = [ev("order.placed") for _ in range(20)]
        await store.append_events(self.app, events)
        ids = [e.id for e in events]
        workers = [f"w{n}" for n in range(6)]
        now = time.time()
        for worker in workers:
            await store.heartbeat(self.app, worker, now, None, lease=LEASE)

        async def take(worker: str, on: Store) -> dict[str, str | None]:
            got = await on.take_deliveries(self.app, "g", ids, worker, stale_before=now)
            return {k: h.holder for k, h in got.items()}

        seen = await asyncio.gather(
            *(take(w, store if n % 2 else peer) for n, w in enumerate(workers))
        )
        holders = {k: h.holder for k, h in (await store.delivery_holds(
            self.app, "g", ids, stale_before=now)).items()}
        assert set(holders) == set(ids) and None not in holders.values()
        for worker, got in zip(workers, seen, strict=True):
            # each worker was told it holds exactly the deliveries it does
            assert {k for k, v in got.items() if v == worker} == {
                k for k, v in holders.items() if v == worker
            }

    async def test_a_settlements_hold_takes_only_deliveries_it_created(
        self, store: Store
    ) -> None:
        """The delivery of an emitted event stored before stays free: a broker copy of
        it may be in a handler at another worker (the store cannot see it)."""
        await self.handlers(store, ("g", "order.*"), ("h", "order.paid"))
        first, before, fresh = ev("order.placed"), ev("order.paid"), ev("order.paid")
        await store.append_events(self.app, [first, before])
        await store.heartbeat(self.app, "w1", time.time(), None, lease=LEASE)
        held = Settlement("done", 1, [before, fresh], hold_for="w1",
                          hold=[("h", before.id), ("h", fresh.id)])
        assert await store.settle_delivery(self.app, "g", first.id, held)
        assert held.held == [("h", fresh.id)]
        assert await store.delivery_states(self.app, "h", [before.id, fresh.id]) == {
            before.id: (DELIVERY_PENDING, 0), fresh.id: (DELIVERY_PENDING, 1),
        }

    async def test_append_held_holds_only_new_deliveries(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.*"), ("h", "order.placed"))
        before, placed = ev("order.placed"), ev("order.placed")
        await store.append_events(self.app, [before])
        await store.heartbeat(self.app, "w1", time.time(), None, lease=LEASE)
        hold = [("g", placed.id), ("g", before.id), ("x", placed.id)]
        counts, held = await store.append_held(self.app, [before, placed], hold_for="w1",
                                               hold=hold)
        assert counts == [0, 2]
        # a store may hold none; never one stored before, nor one not addressed
        assert held in ([("g", placed.id)], [])
        states = await store.delivery_states(self.app, "g", [placed.id, before.id])
        assert states == {placed.id: (DELIVERY_PENDING, len(held)),
                          before.id: (DELIVERY_PENDING, 0)}
        [h] = (await store.delivery_holds(self.app, "g", [placed.id],
                                          stale_before=float("-inf"))).values()
        assert h.holder == ("w1" if held else None)

    async def test_claim_deliveries_due_only_counting_attempts(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"), ("h", "order.placed"))
        e = ev()
        await store.append_events(self.app, [e])
        assert await store.claim_deliveries(
            self.app, "w1", [], now=time.time(), stale_before=0, limit=5
        ) == []
        [d] = await self.claim_d(store, "w1", ["g"])
        assert (d.group, d.event, d.attempts, d.status) == ("g", e, 1, DELIVERY_PENDING)
        assert await self.claim_d(store, "w1", ["g"]) == []  # own delivery: never again
        now = time.time()
        assert await store.settle_delivery(
            self.app, "g", e.id, Settlement("retry", 1, error="E: x", retry_at=now + 100)
        )
        [row] = [x for x in await store.deliveries(self.app, e.id) if x.group == "g"]
        assert (row.status, row.attempts, row.error, row.next_at) == (
            DELIVERY_PENDING, 1, "E: x", now + 100
        )
        assert await self.claim_d(store, "w1", ["g"], now) == []  # not due yet
        await store.heartbeat(self.app, "w1", now + 100, None, lease=LEASE)  # alive at claim time
        [again] = await self.claim_d(store, "w2", ["g"], now + 100)  # due, and released
        assert again.attempts == 2 and again.fence > d.fence

    async def test_claim_deliveries_skips_live_owners_takes_stale(self, store: Store) -> None:
        now = await self.live(store, "w1", "w2")
        await self.handlers(store, ("g", "order.*"))
        await store.append_events(self.app, [ev(), ev()])
        assert len(await self.claim_d(store, "w1", ["g"])) == 2
        assert await self.claim_d(store, "w2", ["g"]) == []
        await store.heartbeat(self.app, "w1", now - 60, None, lease=LEASE)
        taken = await self.claim_d(store, "w2", ["g"])
        assert len(taken) == 2 and all(d.attempts == 2 for d in taken)

    async def test_competing_delivery_claimers_split_without_overlap(
        self, store: Store, peer: Store
    ) -> None:
        await self.live(store, "w1", "w2")
        await self.handlers(store, ("g", "order.placed"))
        events = [ev() for _ in range(30)]
        await store.append_events(self.app, events)
        seen: list[str] = []
        now = time.time()
        while True:
            a, b = await asyncio.gather(
                store.claim_deliveries(self.app, "w1", ["g"], now=now, stale_before=now,
                                       limit=4),
                peer.claim_deliveries(self.app, "w2", ["g"], now=now, stale_before=now,
                                      limit=4),
            )
            if not a and not b:
                break
            seen += [d.event.id for d in a] + [d.event.id for d in b]
        assert sorted(seen) == sorted(e.id for e in events)

    async def test_settle_done_appends_emitted_once(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"), ("ship", "order.paid"))
        e = ev()
        await store.append_events(self.app, [e])
        assert len(await self.claim_d(store, "w1", ["g"])) == 1
        paid = ev("order.paid", causation_id=e.id)
        assert await store.settle_delivery(self.app, "g", e.id, Settlement("done", 1, [paid]))
        [row] = await store.deliveries(self.app, e.id)
        assert (row.status, row.attempts) == (DELIVERY_DONE, 1)
        assert await store.get_event(self.app, paid.id) == paid
        assert [x.group for x in await store.deliveries(self.app, paid.id)] == ["ship"]
        dup = ev("order.paid")
        assert not await store.settle_delivery(self.app, "g", e.id, Settlement("done", 2, [dup]))
        assert await store.get_event(self.app, dup.id) is None
        assert not await store.settle_delivery(
            self.app, "g", e.id, Settlement("dead", 2, error="E: late")
        )
        assert await store.dead_letters(self.app) == []
        assert (await store.deliveries(self.app, e.id))[0].status == DELIVERY_DONE
        assert await self.claim_d(store, "w2", ["g"]) == []

    async def test_a_settlement_says_which_emitted_events_it_stored(
        self, store: Store
    ) -> None:
        """Two handlers that emit one event (one id: a choreographed saga's join) store
        it once; each settlement says whether it stored it, so that it counts once. An
        event addressed to no group is stored all the same."""
        await self.handlers(store, ("g", "order.placed"), ("h", "order.placed"),
                            ("ship", "order.paid"))
        e = ev()
        await store.append_events(self.app, [e])
        joined, unheard = ev("order.paid"), ev("order.noted")
        first = Settlement("done", 1, [joined, unheard, joined])
        assert await store.settle_delivery(self.app, "g", e.id, first)
        assert first.stored == [True, True, False]  # an id repeated counts once
        assert first.addressed == [1, 0, 0]
        assert first.stored_events() == [joined, unheard]
        later = ev("order.paid")
        second = Settlement("done", 1, [joined, later])
        assert await store.settle_delivery(self.app, "h", e.id, second)
        assert second.stored == [False, True]
        assert second.stored_events() == [later]
        assert Settlement("done", 1, [joined]).stored_events() == [joined]  # not said

    async def test_settle_creates_a_missing_delivery_row(self, store: Store) -> None:
        e = ev()
        await store.append_events(self.app, [e])
        assert await store.settle_delivery(self.app, "late", e.id, Settlement("done", 1))
        [row] = await store.deliveries(self.app, e.id)
        assert (row.group, row.status) == ("late", DELIVERY_DONE)

    async def test_dead_letters_list_and_replay(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"))
        e1, e2 = ev(), ev()
        await store.append_events(self.app, [e1, e2])
        before = time.time()
        assert await store.settle_delivery(
            self.app, "g", e1.id, Settlement("dead", 5, error="ValueError: bad",
                                             dead_letter_id="dl-1")
        )
        await store.settle_delivery(self.app, "g", e2.id, Settlement("dead", 2, error="E: 2"))
        dls = await store.dead_letters(self.app)
        assert [(x.id, x.group, x.event, x.error, x.attempts) for x in dls[:1]] == [
            ("dl-1", "g", e1, "ValueError: bad", 5)
        ]
        assert [x.event.id for x in dls] == [e1.id, e2.id]
        assert dls[0].failed_at.timestamp() >= before - 1
        assert len(await store.dead_letters(self.app, limit=1)) == 1
        assert (await store.deliveries(self.app, e1.id))[0].status == DELIVERY_DEAD
        assert await self.claim_d(store, "w1", ["g"]) == []  # dead: not delivered
        now = time.time()
        replayed = await store.replay_dead_letter(self.app, "dl-1", now)
        assert (replayed.id, replayed.event) == ("dl-1", e1)
        assert [x.event.id for x in await store.dead_letters(self.app)] == [e2.id]
        [row] = await store.deliveries(self.app, e1.id)
        assert (row.status, row.attempts) == (DELIVERY_PENDING, 0)
        [d] = await self.claim_d(store, "w1", ["g"], now)
        assert d.event == e1 and d.attempts == 1
        with pytest.raises(DeadLetterNotFound):
            await store.replay_dead_letter(self.app, "dl-1", now)
        await store.settle_delivery(self.app, "g", e1.id, Settlement("dead", 1, error="E: again"))
        assert [(x.event.id, x.error) for x in await store.dead_letters(self.app)] == [
            (e2.id, "E: 2"), (e1.id, "E: again")
        ]
        with pytest.raises(DeadLetterNotFound):
            await store.replay_dead_letter(self.app + "-b", dls[1].id, now)

    async def test_dead_letters_filtered_by_group_and_type_before_the_limit(
        self, store: Store
    ) -> None:
        await self.handlers(store, ("a", "order.*"), ("b", "order.refunded"))
        placed = [ev("order.placed") for _ in range(3)]
        refunded = ev("order.refunded")
        await store.append_events(self.app, [*placed, refunded])
        for e in placed:
            await store.settle_delivery(self.app, "a", e.id, Settlement("dead", 1, error="E"))
        for g in ("a", "b"):
            await store.settle_delivery(self.app, g, refunded.id,
                                        Settlement("dead", 1, error="E"))

        async def ids(**kw: Any) -> list[tuple[str, str]]:
            return [(d.group, d.event.id) for d in await store.dead_letters(self.app, **kw)]

        assert await ids(limit=1, group="b") == [("b", refunded.id)]
        assert sorted(await ids(limit=2, type="order.refunded")) == [
            ("a", refunded.id), ("b", refunded.id)]
        assert await ids(limit=1, group="a", type="order.refunded") == [("a", refunded.id)]
        assert sorted(await ids(limit=10, type="order.placed")) == sorted(
            ("a", e.id) for e in placed)
        assert await ids(group="c") == []
        assert await ids(limit=10, group="b", type="order.placed") == []

    async def test_a_delivery_handled_after_its_dead_letter_leaves_none_to_replay(
        self, store: Store
    ) -> None:
        """Two copies of one delivery run at once (a broker redelivered it while the
        first still ran, or a worker's lease ran out): one dead-letters it, the other
        completes. The completion is what happened: the dead letter goes with it, and
        nothing can put the handled delivery back to be handled (and its effect
        applied) again."""
        await self.handlers(store, ("g", "order.placed"), ("ship", "order.paid"))
        e, other = ev(), ev()
        await store.append_events(self.app, [e, other])
        assert await store.settle_delivery(self.app, "g", e.id, Settlement(
            "dead", 1, error="E: one copy", dead_letter_id="dl-gone"))
        assert await store.settle_delivery(self.app, "g", other.id, Settlement(
            "dead", 1, error="E: stays", dead_letter_id="dl-stays"))
        paid = ev("order.paid", causation_id=e.id)
        assert await store.settle_delivery(self.app, "g", e.id, Settlement("done", 1, [paid]))
        assert [x.id for x in await store.dead_letters(self.app)] == ["dl-stays"]
        with pytest.raises(DeadLetterNotFound):
            await store.replay_dead_letter(self.app, "dl-gone", time.time())
        [row] = await store.deliveries(self.app, e.id)
        assert row.status == DELIVERY_DONE
        assert await self.claim_d(store, "w1", ["g"]) == []
        again = ev("order.paid")
        assert not await store.settle_delivery(self.app, "g", e.id, Settlement("done", 2, [again]))
        assert await store.get_event(self.app, again.id) is None

    async def test_a_dead_lettered_delivery_takes_no_retry_nor_second_dead_letter(
        self, store: Store
    ) -> None:
        """Two copies of one delivery fail at once: the first dead-letters it. The
        second's retry does not put it back to pending (it would run again while its
        dead letter is listed), nor does its dead add a second dead letter; both say
        they were not recorded. Its replay is what puts it back, and then it takes
        retries again."""
        await self.handlers(store, ("g", "order.placed"))
        e = ev()
        await store.append_events(self.app, [e])
        assert await store.settle_delivery(self.app, "g", e.id, Settlement(
            "dead", 3, error="E: first copy", dead_letter_id="dl-1"))
        assert not await store.settle_delivery(self.app, "g", e.id, Settlement(
            "retry", 2, error="E: second copy", retry_at=time.time()))
        assert not await store.settle_delivery(self.app, "g", e.id, Settlement(
            "dead", 3, error="E: second copy", dead_letter_id="dl-2"))
        [row] = await store.deliveries(self.app, e.id)
        assert (row.status, row.attempts, row.error) == (DELIVERY_DEAD, 3, "E: first copy")
        assert [x.id for x in await store.dead_letters(self.app)] == ["dl-1"]
        assert await self.claim_d(store, "w1", ["g"]) == []
        await store.replay_dead_letter(self.app, "dl-1", time.time())
        assert await store.settle_delivery(self.app, "g", e.id, Settlement(
            "retry", 1, error="E: after the replay", retry_at=time.time()))
        [row] = await store.deliveries(self.app, e.id)
        assert row.status == DELIVERY_PENDING
        assert await store.dead_letters(self.app) == []

    async def test_binary_data_comes_back_as_bytes_and_its_signature_verifies(
        self, store: Store
    ) -> None:
        """An event whose data is bytes (a CloudEvent's ``data_base64``) is read back as
        the same bytes on every path that reads events, and a signature made before it
        was stored verifies after (docs/security.md)."""
        signer = Signer({"k1": "contract-secret-0123456789"}, app=self.app)
        await self.handlers(store, ("g", "blob.*"))
        raw = bytes(range(256))
        text = base64.b64encode(raw).decode()  # bytes vs the string of their base64
        appended = [signer.sign(ev("blob.put", raw)), signer.sign(ev("blob.put", b"")),
                    signer.sign(ev("blob.put", text))]
        await store.append_events(self.app, appended)
        run, _ = await store.create_run(new_run(self.app))
        from_run = signer.sign(ev("blob.run", raw))
        await store.commit_run(self.app, run.run_id, 0, RunWrite(events=[from_run]))
        first = appended[0]
        assert len(await self.claim_d(store, "w1", ["g"])) == 4
        from_handler = signer.sign(ev("blob.handled", raw, causation_id=first.id))
        await store.settle_delivery(self.app, "g", first.id,
                                    Settlement("done", 1, [from_handler]))
        await store.settle_delivery(self.app, "g", appended[1].id,
                                    Settlement("dead", 1, error="E: x"))
        expected = [*appended, from_run, from_handler]
        read = [await store.get_event(self.app, e.id) for e in expected]
        read += [d.event for d in await store.deliveries(self.app, first.id)]
        read += await store.unpublished_events(self.app, limit=10)
        read += await store.find_events(self.app, "blob.put", since=0, exclude=[], limit=9)
        read += [d.event for d in await store.dead_letters(self.app)]
        by_id = {e.id: e for e in expected}
        assert len(read) == 5 + 1 + 5 + 3 + 1
        for got in read:
            assert got is not None
            assert got == by_id[got.id]
            assert type(got.data) is type(by_id[got.id].data)
            assert signer.problem(got) is None

    async def test_outbox_unpublished_and_mark_published(self, store: Store) -> None:
        events = [ev() for _ in range(4)]
        await store.append_events(self.app, events)
        run, _ = await store.create_run(new_run(self.app))
        emitted = ev("run.did")
        await store.commit_run(self.app, run.run_id, 0, RunWrite(events=[emitted]))
        pending = await store.unpublished_events(self.app, limit=10)
        assert [e.id for e in pending] == [e.id for e in [*events, emitted]]
        assert [e.id for e in await store.unpublished_events(self.app, limit=2)] == [
            events[0].id, events[1].id
        ]
        await store.mark_published(self.app, [events[0].id, events[2].id])
        await store.mark_published(self.app, [])
        assert [e.id for e in await store.unpublished_events(self.app, limit=10)] == [
            events[1].id, events[3].id, emitted.id
        ]

