"""The store contract, part four: events from the broker, re-drives and the store's id."""

from __future__ import annotations

import asyncio
import time

from cantata.model.records import Declaration
from cantata.store.base import Settlement, Store
from cantata.testing.contract.support import StoreFixtures, ev


class OutboxContract(StoreFixtures):
    """The outbox seen from a broker that may lose what it was given."""

    async def test_external_events_are_never_relayed(self, store: Store) -> None:
        await store.declare(self.app, [Declaration("handler", "billing", "order.placed")])
        outside, own = ev(), ev()
        assert await store.append_external(self.app, [outside]) == [1]
        await store.append_events(self.app, [own])
        assert [e.id for e in await store.unpublished_events(self.app, limit=10)] == [own.id]
        assert await store.get_event(self.app, outside.id) == outside
        assert [d.group for d in await store.deliveries(self.app, outside.id)] == ["billing"]
        # ... and a re-drive leaves them alone, although billing has it pending.
        await store.mark_published(self.app, [own.id])
        redriven = await store.redrive_events(self.app, stored_before=time.time() + 60,
                                              limit=100)
        assert [e.id for e in redriven] == [own.id]
        assert [e.id for e in await store.unpublished_events(self.app, limit=10)] == [own.id]

    async def test_redrive_returns_published_pending_events_to_the_outbox(
        self, store: Store
    ) -> None:
        await store.declare(self.app, [Declaration("handler", "billing", "order.*"),
                                       Declaration("handler", "ship", "order.placed")])
        handled, pending, half, fresh = (ev() for _ in range(4))
        unrouted = ev("user.created")
        await store.append_events(self.app, [handled, pending, half, unrouted])
        for group in ("billing", "ship"):
            await store.settle_delivery(self.app, group, handled.id, Settlement("done", 1))
        await store.settle_delivery(self.app, "billing", half.id, Settlement("done", 1))
        await store.mark_published(self.app, [handled.id, pending.id, half.id, unrouted.id])
        cutoff = time.time() + 0.001
        await asyncio.sleep(0.01)
        await store.append_events(self.app, [fresh])
        await store.mark_published(self.app, [fresh.id])
        # Only events stored before the cut-off that a group still has pending.
        redriven = await store.redrive_events(self.app, stored_before=cutoff, limit=100)
        assert [e.id for e in redriven] == [pending.id, half.id]
        assert redriven[0] == pending
        out = {e.id for e in await store.unpublished_events(self.app, limit=10)}
        assert out == {pending.id, half.id}
        # Nothing published is pending any more: a second re-drive finds nothing.
        assert await store.redrive_events(self.app, stored_before=cutoff, limit=100) == []

    async def test_redrive_takes_at_most_limit(self, store: Store) -> None:
        await store.declare(self.app, [Declaration("handler", "billing", "order.placed")])
        events = [ev() for _ in range(5)]
        await store.append_events(self.app, events)
        await store.mark_published(self.app, [e.id for e in events])
        first = await store.redrive_events(self.app, stored_before=time.time() + 1, limit=3)
        assert [e.id for e in first] == [e.id for e in events[:3]]
        rest = await store.redrive_events(self.app, stored_before=time.time() + 1, limit=3)
        assert [e.id for e in rest] == [e.id for e in events[3:]]

    async def test_identity_is_stable_and_shared_by_instances_of_one_store(
        self, store: Store, peer: Store
    ) -> None:
        first = await store.identity()
        assert first and first == await store.identity()
        # peer is another instance on the same database: the same store
        assert await peer.identity() == first

    async def test_location_is_stable_and_shared_by_instances_of_one_store(
        self, store: Store, peer: Store
    ) -> None:
        # (a copy of the store elsewhere has its identity but shares no mark of this)
        marks = await store.location()
        assert marks and all(isinstance(m, str) and m for m in marks)
        assert await store.location() == marks
        assert set(await peer.location()) & set(marks)
