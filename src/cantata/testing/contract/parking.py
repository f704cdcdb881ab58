"""Parked runs (store/roles/parking.py): released with what wakes them, claimed when due,
woken by an event match, a child's end or a cancel request."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cantata.errors import LeaseLost
from cantata.model.parking import FOREVER, Parking, candidates, event_wait
from cantata.model.records import RunWrite
from cantata.model.status import RunStatus
from cantata.store.base import RUNS, Store
from cantata.testing.contract.support import StoreFixtures, new_run
from cantata.testing.wait import eventually


class ParkingContract(StoreFixtures):
    """Runs released with a :class:`Parking` stay unclaimed until due or woken."""

    async def parked(self, store: Store, parking: Parking, **kw: Any) -> str:
        run = new_run(self.app, status=RunStatus.RUNNING, **kw)
        await store.create_run(run)
        [claimed] = await store.claim_runs(self.app, "w1", ["wf"], stale_before=0,
                                           limit=10, run_ids=[run.run_id])
        await store.park_run(self.app, run.run_id, claimed.fence, parking)
        return run.run_id

    async def take(self, store: Store, now: float | None = None) -> set[str]:
        claimed = await store.claim_runs(self.app, "w2", ["wf"], stale_before=0, limit=100,
                                         now=now)
        return {r.run_id for r in claimed}

    async def test_a_parked_run_is_claimed_only_once_due(self, store: Store) -> None:
        now = time.time()
        soon = await self.parked(store, Parking(now + 60))
        later = await self.parked(store, Parking(now + 120))
        stored = await store.get_run(self.app, soon)
        assert stored is not None and stored.owner is None and not stored.status.is_final
        assert await self.take(store) == set()  # no clock given: only woken runs
        assert await self.take(store, now) == set()
        assert await store.next_wake(self.app, ["wf"], after=now) == pytest.approx(now + 60)
        assert await store.next_wake(self.app, ["other"], after=now) is None
        assert await self.take(store, now + 61) == {soon}
        claimed = await store.get_run(self.app, soon)
        assert claimed is not None and claimed.owner == "w2"
        # Claimed, it is no longer parked: a later clock does not take it twice.
        assert await self.take(store, now + 200) == {later}
        assert await store.next_wake(self.app, ["wf"], after=now) is None

    async def test_park_is_fenced_and_a_cancel_request_wakes(self, store: Store) -> None:
        run = new_run(self.app, status=RunStatus.RUNNING)
        await store.create_run(run)
        [claimed] = await store.claim_runs(self.app, "w1", ["wf"], stale_before=0, limit=10)
        with pytest.raises(LeaseLost):
            await store.park_run(self.app, run.run_id, claimed.fence - 1, Parking(FOREVER))
        await store.park_run(self.app, run.run_id, claimed.fence, Parking(FOREVER))
        assert await self.take(store, time.time()) == set()
        await store.request_cancel(self.app, run.run_id)
        assert await self.take(store, time.time()) == {run.run_id}

    async def test_a_park_after_a_cancel_request_leaves_the_run_claimable(
        self, store: Store
    ) -> None:
        run = new_run(self.app, status=RunStatus.RUNNING)
        await store.create_run(run)
        [claimed] = await store.claim_runs(self.app, "w1", ["wf"], stale_before=0, limit=10)
        await store.request_cancel(self.app, run.run_id)
        await store.park_run(self.app, run.run_id, claimed.fence, Parking(FOREVER))
        assert await self.take(store) == {run.run_id}

    async def test_wake_runs_and_a_childs_end_wake_a_parked_run(self, store: Store) -> None:
        heard: list[str] = []
        store.add_listener(heard.append)
        parent = await self.parked(store, Parking(FOREVER))
        other = await self.parked(store, Parking(FOREVER))
        assert await store.wake_runs(self.app, [other, "nope"]) == 1
        await eventually(lambda: RUNS in heard)
        assert await store.wake_runs(self.app, [other]) == 0  # not parked any more
        child = new_run(self.app, "child", owner="w3", fence=1, parent_run_id=parent)
        await store.create_run(child)
        assert await self.take(store) == {other}
        await store.commit_run(self.app, child.run_id, 1, RunWrite(
            status=RunStatus.COMPLETED, result="1", release=True, wake=parent))
        assert await self.take(store) == {parent}

    async def test_an_event_wakes_the_waits_it_matches(self, store: Store) -> None:
        kind, match7 = event_wait("invoice.approved", {"order": 7})
        _, match8 = event_wait("invoice.approved", {"order": 8})
        any_kind, any_match = event_wait("invoice.approved", None)
        seven = await self.parked(store, Parking(FOREVER, kind, match7))
        eight = await self.parked(store, Parking(FOREVER, kind, match8))
        anything = await self.parked(store, Parking(FOREVER, any_kind, any_match))
        assert sorted(await store.parked_waits(self.app)) == sorted({kind, any_kind})
        data = [{"order": 7.0, "amount": 3}]  # 7.0 matches 7, as in ctx.wait_for_event
        assert candidates(["order"], data) == [match7]
        assert await store.wake_waiting(self.app, kind, candidates(["order"], data)) == 1
        assert await store.wake_waiting(self.app, any_kind, candidates([], data)) == 1
        assert await self.take(store) == {seven, anything}
        assert await store.parked_waits(self.app) == [kind]
        assert await store.wake_waiting(self.app, kind, []) == 0
        assert eight not in await self.take(store)

    async def test_concurrent_claimers_of_due_runs_never_share_one(
        self, store: Store, peer: Store
    ) -> None:
        now = await self.live(store, "wa", "wb")  # claimed runs stay with their claimer
        ids = {await self.parked(store, Parking(now - 1)) for _ in range(20)}

        async def claim(s: Store, worker: str) -> list[str]:
            got: list[str] = []
            for _ in range(10):
                got += [r.run_id for r in await s.claim_runs(
                    self.app, worker, ["wf"], stale_before=0, limit=3, now=now)]
            return got

        a, b = await asyncio.gather(claim(store, "wa"), claim(peer, "wb"))
        assert not set(a) & set(b)
        assert set(a) | set(b) == ids

    async def test_foreign_runs_skip_parked_runs_until_due(self, store: Store) -> None:
        now = time.time()
        waiting = await self.parked(store, Parking(now + 60), version="old")
        running = new_run(self.app, status=RunStatus.RUNNING, version="old")
        await store.create_run(running)

        async def found(at: float | None) -> set[str]:
            runs = await store.foreign_runs(self.app, "w2", ["wf"], versions=["new"],
                                            stale_before=0, limit=10, now=at)
            return {r.run_id for r in runs}

        assert await found(None) == {running.run_id}
        assert await found(now) == {running.run_id}
        assert await found(now + 61) == {running.run_id, waiting}

    async def test_parked_runs_are_those_neither_woken_nor_due(self, store: Store) -> None:
        now = time.time()
        kind, match = event_wait("go", {"n": 1})
        waiting = await self.parked(store, Parking(FOREVER, kind, match))
        woken = await self.parked(store, Parking(FOREVER, kind, match))
        later = await self.parked(store, Parking(now + 60))
        running = new_run(self.app, status=RunStatus.RUNNING)
        await store.create_run(running)
        assert await store.wake_runs(self.app, [woken]) == 1
        ids = [waiting, woken, later, running.run_id, "nope"]
        assert await store.parked_runs(self.app, ids, now=now) == {waiting, later}
        assert await store.parked_runs(self.app, ids, now=now + 61) == {waiting}
        assert await store.parked_runs(self.app + "-b", ids, now=now) == set()
        assert await store.parked_runs(self.app, [], now=now) == set()

    async def test_the_mark_of_the_looks_for_parked_waits_only_moves_forward(
        self, store: Store
    ) -> None:
        other = self.app + "-b"
        assert await store.waits_looked(self.app) is None
        await store.mark_waits_looked(self.app, 10, 1000.5)
        assert await store.waits_looked(self.app) == (10, 1000.5)
        await store.mark_waits_looked(self.app, 9, 2000.0)  # a look that began earlier
        await store.mark_waits_looked(self.app, 10, 2000.0)
        assert await store.waits_looked(self.app) == (10, 1000.5)
        await store.mark_waits_looked(self.app, 12, 1999.25)
        assert await store.waits_looked(self.app) == (12, 1999.25)
        assert await store.waits_looked(other) is None  # one mark per app
        await store.mark_waits_looked(other, 3, 5.0)
        assert await store.waits_looked(other) == (3, 5.0)
        assert await store.waits_looked(self.app) == (12, 1999.25)
