"""The store contract, leases: each worker is judged by its own lease.

Workers of one app may heartbeat with different leases (``App("shop", lease=30)`` in one
process, ``lease=2`` in another, during a rolling change of the setting). A worker is
live until its own expiry, its last heartbeat + the lease it heartbeat with, and every
method that takes work from dead workers gets ``stale_before``, the time it judges at:
the claimer's current time, never the claimer's time minus the claimer's lease. So at
t0 + 5 the short-lease worker takes nothing of a long-lease worker that heartbeat at t0
with lease 30 (a live worker heartbeats every lease / 4, 7.5 s here), and at t0 + 31 it
takes all of it; the long-lease worker takes the short one's work at t0 + 5.
"""

from __future__ import annotations

import time

import pytest

from cantata.errors import ConfigurationError, QueueConflict
from cantata.model.flow import QueueSpec
from cantata.model.records import RunWrite
from cantata.store.base import Store
from cantata.testing.contract.support import StoreFixtures, ev, new_run
from cantata.testing.contract.tasks import task

LONG, SHORT = 30.0, 2.0  # the two workers' leases
STILL_LIVE, EXPIRED = 5.0, 31.0  # seconds after both heartbeats


class LeasesContract(StoreFixtures):
    """Liveness by each worker's own lease: runs, slots, deliveries, tasks, queues."""

    async def two_leases(self, store: Store) -> float:
        """Workers ``long`` (lease 30) and ``short`` (lease 2) heartbeat at the time
        returned (t0)."""
        t0 = time.time()
        await store.heartbeat(self.app, "long", t0, None, lease=LONG)
        await store.heartbeat(self.app, "short", t0, None, lease=SHORT)
        return t0

    async def test_workers_report_their_own_lease_and_expiry(self, store: Store) -> None:
        t0 = await self.two_leases(store)
        got = {w.worker_id: w for w in await store.workers(self.app)}
        assert (got["long"].lease, got["long"].expires_at) == (LONG, t0 + LONG)
        assert (got["short"].lease, got["short"].expires_at) == (SHORT, t0 + SHORT)
        await store.heartbeat(self.app, "short", t0 + 1, None, lease=LONG)  # a new lease
        [short] = [w for w in await store.workers(self.app) if w.worker_id == "short"]
        assert (short.heartbeat_at, short.expires_at) == (t0 + 1, t0 + 1 + LONG)

    async def test_a_heartbeat_says_whether_the_hold_it_renews_was_still_held(
        self, store: Store
    ) -> None:
        """``True`` only when the worker's row was there and its expiry had not passed
        at the renewal, by the renewal's own time and by the store's clock: what lets a
        worker paused past 3/4 of its lease keep its bodies going (docs/leases.md)."""
        t0 = time.time()
        assert await store.heartbeat(self.app, "w", t0, None, lease=SHORT) is False  # new
        assert await store.heartbeat(self.app, "w", t0 + 1, None, lease=SHORT) is True
        # Its own time past the expiry (t0 + 1 + SHORT): lapsed.
        assert await store.heartbeat(self.app, "w", t0 + 4, None, lease=SHORT) is False
        # Its own time within the expiry, but not the store's clock: lapsed.
        past = time.time() - 3 * SHORT
        await store.heartbeat(self.app, "w", past, None, lease=SHORT)
        assert await store.heartbeat(self.app, "w", past + 1, None, lease=SHORT) is False
        # Removed meanwhile (its work released): not held, though the time is within.
        now = time.time()
        await store.heartbeat(self.app, "w", now, None, lease=LONG)
        await store.remove_worker(self.app, "w")
        assert await store.heartbeat(self.app, "w", now + 1, None, lease=LONG) is False
        assert await store.heartbeat(self.app, "w", now + 2, None, lease=LONG) is True

    async def test_a_heartbeat_refuses_a_lease_that_is_not_seconds(self, store: Store) -> None:
        for bad in (0, -1.0, float("nan"), float("inf")):
            with pytest.raises(ConfigurationError, match="lease of a worker's heartbeat"):
                await store.heartbeat(self.app, "w", time.time(), None, lease=bad)
        assert await store.workers(self.app) == []

    async def test_a_run_is_taken_only_past_its_owners_own_lease(self, store: Store) -> None:
        long_run, _ = await store.create_run(new_run(self.app, owner="long", fence=1, version="v1"))
        short_run, _ = await store.create_run(new_run(self.app, owner="short", fence=1))
        t0 = await self.two_leases(store)

        async def claim(worker: str, at: float, run_id: str) -> list[str]:
            got = await store.claim_runs(
                self.app, worker, ["wf"], stale_before=at, limit=9, run_ids=[run_id], now=at
            )
            return [r.run_id for r in got]

        async def foreign(at: float) -> list[str]:  # claimable, of another version
            got = await store.foreign_runs(
                self.app, "short", ["wf"], versions=["v2"], stale_before=at, limit=9, now=at
            )
            return [r.run_id for r in got]

        assert await foreign(t0 + STILL_LIVE) == []
        assert await claim("short", t0 + STILL_LIVE, long_run.run_id) == []
        # the long-lease worker judges the short one by the short lease, not its own
        assert await claim("long", t0 + STILL_LIVE, short_run.run_id) == [short_run.run_id]
        assert await foreign(t0 + EXPIRED) == [long_run.run_id]
        assert await claim("short", t0 + EXPIRED, long_run.run_id) == [long_run.run_id]

    async def test_a_slot_is_freed_only_past_its_holders_own_lease(self, store: Store) -> None:
        t0 = await self.two_leases(store)

        async def take(holder: str, worker: str, at: float) -> bool:
            grant = await store.acquire_slot(
                self.app,
                "step:pay",
                holder,
                worker,
                concurrency=1,
                rate=None,
                now=at,
                stale_before=at,
            )
            return grant.granted

        assert await take("run-a", "long", t0)
        assert not await take("run-b", "short", t0 + STILL_LIVE)
        assert await store.slots_held(self.app, "step:pay") == 1
        assert await take("run-b", "short", t0 + EXPIRED)
        assert await store.slots_held(self.app, "step:pay") == 1  # the long one's is freed

    async def test_a_delivery_is_taken_only_past_its_holders_own_lease(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"))
        e = ev()
        await store.append_events(self.app, [e])
        t0 = await self.two_leases(store)

        async def claim(worker: str, at: float) -> list[str]:
            got = await store.claim_deliveries(
                self.app, worker, ["g"], now=at, stale_before=at, limit=9
            )
            return [d.event.id for d in got]

        assert await claim("long", t0) == [e.id]
        assert await claim("short", t0 + STILL_LIVE) == []
        [hold] = (
            await store.delivery_holds(self.app, "g", [e.id], stale_before=t0 + STILL_LIVE)
        ).values()
        assert hold.holder == "long"
        [hold] = (
            await store.delivery_holds(self.app, "g", [e.id], stale_before=t0 + EXPIRED)
        ).values()
        assert hold.holder is None
        assert await claim("short", t0 + EXPIRED) == [e.id]

    async def test_a_task_is_taken_only_past_its_holders_own_lease(self, store: Store) -> None:
        run, _ = await store.create_run(new_run(self.app))
        [claimed] = await store.claim_runs(self.app, "orders-w", ["wf"], stale_before=0, limit=1)
        await store.commit_run(
            self.app, run.run_id, claimed.fence, RunWrite(tasks=[task(run.run_id)])
        )
        t0 = await self.two_leases(store)

        async def claim(worker: str, at: float) -> list[str]:
            got = await store.claim_tasks(
                self.app, worker, ["inventory"], now=at, stale_before=at, limit=9
            )
            return [t.task_id for t in got]

        [task_id] = await claim("long", t0)
        assert await claim("short", t0 + STILL_LIVE) == []
        assert (
            await store.withdraw_tasks(
                self.app, run.run_id, stale_before=t0 + STILL_LIVE, error="Withdrawn: x"
            )
            == []
        )
        assert await claim("short", t0 + EXPIRED) == [task_id]

    async def test_a_queue_declaration_stands_until_its_declarers_own_lease_ends(
        self, store: Store
    ) -> None:
        t0 = await self.two_leases(store)
        mine, theirs = QueueSpec("q", concurrency=1), QueueSpec("q", concurrency=2)
        await store.declare_queue(self.app, mine, worker_id="long", stale_before=t0)
        with pytest.raises(QueueConflict):
            await store.declare_queue(
                self.app, theirs, worker_id="short", stale_before=t0 + STILL_LIVE
            )
        await store.declare_queue(self.app, theirs, worker_id="short", stale_before=t0 + EXPIRED)
        assert await store.queues(self.app) == [theirs]
