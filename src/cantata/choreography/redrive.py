"""Re-driving events a group has had pending too long through an external broker
(``app.redrive``, ``cantata events redrive``; docs/deploy.md)."""

from __future__ import annotations

import time

from cantata.broker.base import Broker
from cantata.errors import EventsRefused
from cantata.store.base import Store

from .relay import dead_letter_refused


async def redrive(store: Store, broker: Broker, app: str, older_than: float) -> int:
    """Publish again the events of ``app`` some group has had pending for over
    ``older_than`` seconds; returns how many went out (0 for a broker that reads the
    store's deliveries itself)."""
    if not broker.relays_outbox:
        return 0
    total, batch = 0, 1000
    before = time.time() - older_than  # stored_at is wall-clock time
    while True:
        events = await store.redrive_events(app, stored_before=before, limit=batch)
        if events:
            # Straight to the broker, as new messages; if this fails the outbox
            # relay publishes them (they are unpublished again).
            try:
                await broker.publish(app, events, again=True)
            except EventsRefused as exc:
                for event in events:
                    if event.id in exc.refused:
                        await dead_letter_refused(store, app, event, exc.refused[event.id])
            await store.mark_published(app, [e.id for e in events])
        total += len(events)
        if len(events) < batch:
            return total
