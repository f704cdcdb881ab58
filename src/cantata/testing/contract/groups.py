"""The store contract, handler groups: listing every declared group and trigger with
its backlog, and retiring one (docs/operating.md, "Retiring a group")."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from cantata.model.event import Event
from cantata.model.records import (
    DELIVERY_DONE,
    DELIVERY_PENDING,
    Declaration,
    is_retired,
)
from cantata.store.base import Settlement, Store
from cantata.testing.contract.support import LEASE, StoreFixtures, ev


class GroupsContract(StoreFixtures):
    async def _statuses(self, store: Store, event_id: str) -> dict[str, str]:
        return {d.group: str(d.status) for d in await store.deliveries(self.app, event_id)}

    async def test_group_stats_list_every_group_with_its_backlog(self, store: Store) -> None:
        await store.declare(self.app, [
            Declaration("handler", "ledger", "order.placed"),
            Declaration("handler", "ledger", "order.paid"),
            Declaration("trigger", "start:wf", "order.placed"),
            Declaration("handler", "mail", "user.*"),
            Declaration("workflow", "wf"),
        ])
        assert [(s.group, s.kind, s.patterns, s.pending, s.dead_letters)
                for s in await store.group_stats(self.app, now=time.time())] == [
            ("ledger", "handler", ("order.paid", "order.placed"), 0, 0),
            ("mail", "handler", ("user.*",), 0, 0),
            ("start:wf", "trigger", ("order.placed",), 0, 0),
        ]
        first, second, user = ev("order.placed"), ev("order.paid"), ev("user.created")
        before = time.time()
        await store.append_events(self.app, [first])
        await store.append_events(self.app, [second, user])
        now = time.time()
        await store.heartbeat(self.app, "w1", now, None, lease=LEASE)
        [claimed] = await store.claim_deliveries(self.app, "w1", ["ledger"], now=now,
                                                 stale_before=now, limit=1)
        assert claimed.event.id == first.id  # the oldest first
        assert await store.settle_delivery(self.app, "mail", user.id, Settlement(
            "dead", 1, error="E: boom", dead_letter_id=f"dl-{self.app}"))
        stats = {s.group: s for s in await store.group_stats(self.app, now=now)}
        ledger = stats["ledger"]
        assert (ledger.pending, ledger.in_progress) == (2, 1)
        assert ledger.oldest_pending_at is not None
        assert before - 1 <= ledger.oldest_pending_at <= now + 1
        assert (stats["start:wf"].pending, stats["start:wf"].in_progress) == (1, 0)
        assert (stats["mail"].pending, stats["mail"].dead_letters) == (0, 1)
        assert stats["mail"].oldest_pending_at is None
        # once w1's lease has run out its delivery is no longer in progress
        later = {s.group: s for s in await store.group_stats(self.app, now=now + LEASE + 1)}
        assert (later["ledger"].pending, later["ledger"].in_progress) == (2, 0)

    async def test_retire_ends_pending_deliveries_and_later_events_skip_the_group(
        self, store: Store, peer: Store
    ) -> None:
        await store.declare(self.app, [
            Declaration("handler", "ledger", "order.placed"),
            Declaration("handler", "ledger", "order.*"),
            Declaration("handler", "audit", "order.placed"),
        ])
        a, b, c = ev("order.placed"), ev("order.placed"), ev("order.placed")
        await store.append_events(self.app, [a, b, c])
        now = time.time()
        # one claimed by a live worker, one by a worker gone since (its lease ran out)
        await store.heartbeat(self.app, "gone", now - 10 * LEASE, None, lease=LEASE)
        await store.heartbeat(self.app, "live", now, None, lease=LEASE)
        [held] = await store.claim_deliveries(
            self.app, "live", ["ledger"], now=now, stale_before=now, limit=1,
        )
        [lost] = await store.claim_deliveries(
            self.app, "gone", ["ledger"], now=now, stale_before=now - 10 * LEASE, limit=1,
        )
        a, c = [e for e in (a, b, c) if e.id != held.event.id]
        b = held.event
        assert lost.event.id in (a.id, c.id)
        audited = len(await store.audit_records(self.app, limit=10_000))

        done = await peer.retire_group(self.app, "ledger", now=now, actor="ops:ann")

        assert done.group == "ledger"
        assert sorted((d.kind, d.name, d.pattern) for d in done.declarations) == [
            ("handler", "ledger", "order.*"), ("handler", "ledger", "order.placed"),
        ]
        assert (done.ended, done.held, done.dead_letters) == (2, 1, 0)
        assert done.changed
        for e in (a, c):
            [mine] = [d for d in await store.deliveries(self.app, e.id) if d.group == "ledger"]
            assert mine.status == DELIVERY_DONE and is_retired(mine.status, mine.error)
            assert mine.error is not None and "ops:ann" in mine.error
        # the live worker's delivery is left to it; the other group is untouched
        assert await self._statuses(store, b.id) == {"audit": "pending", "ledger": "pending"}
        assert (await self._statuses(store, a.id))["audit"] == DELIVERY_PENDING
        assert [d for d in await store.declarations(self.app) if d.name == "ledger"] == []
        # an event stored after the retire (through either instance) skips the group
        later, paid = ev("order.placed"), ev("order.paid")
        assert await store.append_events(self.app, [later, paid]) == [1, 0]
        assert await self._statuses(store, later.id) == {"audit": "pending"}
        # audited once, with the actor
        records = (await store.audit_records(self.app, limit=10_000))[audited:]
        retired = [r for r in records if r.action == "group.retired"]
        assert [(r.actor, r.target) for r in retired] == [("ops:ann", "ledger")]
        assert json.loads(retired[0].data) == {
            "declarations": [["handler", "order.*"], ["handler", "order.placed"]],
            "ended": 2, "held": 1, "dead_letters": 0,
        }
        assert (await store.verify_audit(self.app)).ok

        # again: nothing left to retire (the live holder keeps its delivery), nothing audited
        again = await store.retire_group(self.app, "ledger", now=now, actor="ops:ann")
        assert (again.declarations, again.ended, again.held, again.changed) == ((), 0, 1, False)
        assert len(await store.audit_records(self.app, limit=10_000)) == audited + 1
        stats = {s.group: s for s in await store.group_stats(self.app, now=now)}
        assert (stats["ledger"].kind, stats["ledger"].pending) == (None, 1)

        # a process that declares the group again wins: later events are addressed to it
        await peer.declare(self.app, [Declaration("handler", "ledger", "order.placed")])
        back = ev("order.placed")
        await store.append_events(self.app, [back])
        assert await self._statuses(store, back.id) == {"audit": "pending", "ledger": "pending"}

    async def test_pending_events_are_a_groups_pending_deliveries_first_stored_first(
        self, store: Store
    ) -> None:
        await store.declare(self.app, [Declaration("handler", "ledger", "order.*"),
                                       Declaration("handler", "mail", "order.paid")])
        first, second, third = ev("order.placed"), ev("order.paid"), ev("order.shipped")
        await store.append_events(self.app, [first])
        await store.append_events(self.app, [second, third])
        assert [e.id for e in await store.pending_events(self.app, "ledger", limit=10)] == [
            first.id, second.id, third.id]
        now = time.time()
        await store.heartbeat(self.app, "w1", now, None, lease=LEASE)
        [held] = await store.claim_deliveries(self.app, "w1", ["ledger"], now=now,
                                              stale_before=now, limit=1)
        assert await store.settle_delivery(self.app, "ledger", second.id,
                                           Settlement("done", 1))
        pending = await store.pending_events(self.app, "ledger", limit=10)
        assert [e.id for e in pending] == [first.id, third.id]  # held ones too
        assert pending[0].data == first.data and pending[0].type == "order.placed"
        assert [e.id for e in await store.pending_events(self.app, "ledger", limit=1)] == [
            first.id]
        assert [e.id for e in await store.pending_events(self.app, "mail", limit=10)] == [
            second.id]
        assert await store.pending_events(self.app, "nobody", limit=10) == []
        assert held.event.id == first.id

    async def test_retire_a_trigger_keeps_dead_letters(self, store: Store) -> None:
        await store.declare(self.app, [
            Declaration("trigger", "start:wf", "order.placed"),
            Declaration("handler", "start:wf-not-a-trigger", "order.placed"),
        ])
        failed, waiting = ev("order.placed"), ev("order.placed")
        await store.append_events(self.app, [failed, waiting])
        assert await store.settle_delivery(self.app, "start:wf", failed.id, Settlement(
            "dead", 3, error="E: boom", dead_letter_id=f"dl-{self.app}"))
        done = await store.retire_group(self.app, "start:wf", now=time.time(), actor="ops")
        assert [(d.kind, d.pattern) for d in done.declarations] == [("trigger", "order.placed")]
        assert (done.ended, done.held, done.dead_letters) == (1, 0, 1)
        assert [dl.event.id for dl in await store.dead_letters(self.app)] == [failed.id]
        assert await self._statuses(store, failed.id) == {
            "start:wf": "dead", "start:wf-not-a-trigger": "pending",
        }
        assert [d.name for d in await store.declarations(self.app)] == ["start:wf-not-a-trigger"]
        stats = {s.group: s for s in await store.group_stats(self.app, now=time.time())}
        assert (stats["start:wf"].kind, stats["start:wf"].dead_letters) == (None, 1)

    async def test_retire_an_unknown_group_changes_nothing(self, store: Store) -> None:
        await store.declare(self.app, [Declaration("handler", "g", "order.placed")])
        e = ev("order.placed")
        await store.append_events(self.app, [e])
        audited = len(await store.audit_records(self.app, limit=10_000))
        done = await store.retire_group(self.app, "nope", now=time.time(), actor="ops")
        assert (done.declarations, done.ended, done.held, done.changed) == ((), 0, 0, False)
        assert await self._statuses(store, e.id) == {"g": "pending"}
        assert len(await store.audit_records(self.app, limit=10_000)) == audited

    async def test_no_delivery_for_the_group_outlives_a_retire_among_appends(
        self, store: Store, peer: Store
    ) -> None:
        """Events appended while the group is retired (by other connections too) either
        got their delivery before the retire, which ends it, or get none: none is left
        pending for the retired group. (Several rounds: a race is seldom met at once.)"""
        await store.declare(self.app, [Declaration("handler", "audit", "order.placed")])
        rounds, each = 10, 120
        for n in range(rounds):
            group = f"ledger-{n}"
            await store.declare(self.app, [Declaration("handler", group, "order.placed")])
            events = [ev("order.placed") for _ in range(each)]
            started = asyncio.Event()

            async def append(i: int, events: list[Event[Any]] = events,
                             started: asyncio.Event = started) -> None:
                if i == each // 3:
                    started.set()
                await (store if i % 2 else peer).append_events(self.app, [events[i]])

            async def retire(group: str = group, started: asyncio.Event = started) -> None:
                await started.wait()
                await peer.retire_group(self.app, group, now=time.time(), actor="ops")

            await asyncio.gather(retire(), *(append(i) for i in range(each)))
        stats = {s.group: s for s in await store.group_stats(self.app, now=time.time())}
        assert stats["audit"].pending == rounds * each
        assert {g: s.pending for g, s in stats.items() if g != "audit" and s.pending} == {}
