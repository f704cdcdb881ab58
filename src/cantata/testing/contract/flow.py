"""The store contract, part four: flow control (queues, slots, schedules)."""

from __future__ import annotations

import asyncio
import time

import pytest

from cantata.errors import IdempotencyConflict, QueueConflict
from cantata.model.flow import QueueEntry, QueueSpec, Rate, ScheduleRow, SlotGrant
from cantata.model.records import EntryKind, EntryStatus, HistoryEntry, RunWrite
from cantata.model.status import RunStatus
from cantata.store.base import SCHEDULES, SLOTS, Store
from cantata.testing.contract.support import LEASE, StoreFixtures, new_run
from cantata.testing.wait import eventually


class FlowContract(StoreFixtures):
    """Queues, cluster-wide slots and schedules, enforced by the store."""

    async def queued(self, store: Store, n: int, queue: str = "q", **entry: object) -> list[str]:
        ids = []
        for _ in range(n):
            run, created = await store.create_queued_run(
                new_run(self.app), QueueEntry(queue, **entry)  # type: ignore[arg-type]
            )
            assert created
            ids.append(run.run_id)
        return ids

    async def claim_q(self, store: Store, worker: str, queue: str = "q", now: float | None = None,
                      limit: int = 50) -> list[str]:
        now = time.time() if now is None else now
        claim = await store.claim_queued_runs(self.app, worker, queue, ["wf"], now=now,
                                              limit=limit)
        return [r.run_id for r in claim.runs]

    async def end(self, store: Store, run_id: str) -> None:
        run = await store.get_run(self.app, run_id)
        assert run is not None
        await store.commit_run(self.app, run_id, run.fence,
                               RunWrite(status=RunStatus.COMPLETED, release=True))

    # -- queues -------------------------------------------------------------------

    async def test_queue_declarations_agree_or_name_what_differs(self, store: Store) -> None:
        await self.live(store, "w1", "w2")
        spec = QueueSpec("q", concurrency=2, rate=Rate(5, per=1.0))
        await store.declare_queue(self.app, spec, worker_id="w1", stale_before=0)
        await store.declare_queue(self.app, spec, worker_id="w2", stale_before=0)
        assert await store.queues(self.app) == [spec]
        other = QueueSpec("q", concurrency=3, rate=Rate(5, per=1.0))
        with pytest.raises(QueueConflict, match=r"concurrency: 3 vs 2"):
            await store.declare_queue(self.app, other, worker_id="w2", stale_before=0)
        # The declarer is gone (its lease ran out): the new limits replace its own.
        await store.declare_queue(self.app, other, worker_id="w2",
                                  stale_before=time.time() + LEASE + 1)
        assert await store.queues(self.app) == [other]

    async def test_queued_runs_wait_for_their_queue_not_claim_runs(self, store: Store) -> None:
        await store.declare_queue(self.app, QueueSpec("q"), worker_id="w", stale_before=0)
        [rid] = await self.queued(store, 1)
        assert await self.claim(store, "w") == []
        # Parked until admitted (store/roles/parking.py): no clock makes it due.
        assert await store.claim_runs(self.app, "w", ["wf"], stale_before=0, limit=10,
                                      now=time.time() + 1e9) == []
        assert (await store.queue_position(self.app, rid)).ahead == 0  # type: ignore[union-attr]
        assert await self.claim_q(store, "w") == [rid]
        run = await store.get_run(self.app, rid)
        assert run is not None and run.owner == "w" and run.status == RunStatus.PENDING
        assert await store.queue_position(self.app, rid) is None

    async def test_queued_run_is_idempotent_by_key(self, store: Store) -> None:
        first = new_run(self.app, idempotency_key="k", args_hash="h")
        a, created = await store.create_queued_run(first, QueueEntry("q"))
        b, again = await store.create_queued_run(
            new_run(self.app, idempotency_key="k", args_hash="h"), QueueEntry("q")
        )
        assert created and not again and a.run_id == b.run_id
        with pytest.raises(IdempotencyConflict):
            await store.create_queued_run(
                new_run(self.app, idempotency_key="k", args="[2]", args_hash="other"),
                QueueEntry("q"),
            )
        c, again = await store.create_queued_run(  # equal arguments, another hash
            new_run(self.app, idempotency_key="k", args_hash="legacy"), QueueEntry("q")
        )
        assert not again and c.run_id == a.run_id

    async def test_concurrency_per_worker_and_release_on_end(self, store: Store) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=3, per_worker=2),
                                  worker_id="w", stale_before=0)
        ids = await self.queued(store, 5)
        got1 = await self.claim_q(store, "w1")
        got2 = await self.claim_q(store, "w2")
        assert got1 == ids[:2] and got2 == ids[2:3]
        assert await self.claim_q(store, "w3") == []
        await self.end(store, ids[0])
        assert await self.claim_q(store, "w3") == ids[3:4]

    async def test_runs_of_a_dead_worker_are_taken_over_within_per_worker_first(
        self, store: Store
    ) -> None:
        """A worker takes over the runs in progress of a worker whose lease lapsed only
        within the queue's ``per_worker``, counted with its own runs of the queue; the
        others stay claimable, and the room that frees goes to them before new runs."""
        await store.declare_queue(self.app, QueueSpec("q", per_worker=2), worker_id="w",
                                  stale_before=0)
        now = time.time()
        await store.heartbeat(self.app, "dead", now - 3 * LEASE, None, lease=LEASE)
        await self.live(store, "w2")
        ids = await self.queued(store, 5)
        assert await self.claim_q(store, "w2", limit=1) == ids[:1]
        assert await self.claim_q(store, "dead", now=now - 3 * LEASE) == ids[1:3]
        dead = ids[1:3]
        # w2 has room for one of the dead worker's two runs.
        [first] = [r.run_id for r in await self.claim(store, "w2")]
        assert first in dead
        assert await self.claim(store, "w2") == []
        assert await self.claim_q(store, "w2") == []
        # Its own run ends: the room goes to the dead worker's other run, not to ids[3].
        await self.end(store, ids[0])
        assert await self.claim_q(store, "w2") == []
        assert [r.run_id for r in await self.claim(store, "w2")] == [
            next(i for i in dead if i != first)
        ]
        assert await self.claim_q(store, "w2") == []
        for run_id in dead:
            await self.end(store, run_id)
        assert await self.claim_q(store, "w2") == ids[3:5]

    async def test_cancelled_waiting_run_goes_to_claim_runs(self, store: Store) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1), worker_id="w",
                                  stale_before=0)
        ids = await self.queued(store, 2)
        await store.request_cancel(self.app, ids[1])
        assert [r.run_id for r in await self.claim(store, "w")] == [ids[1]]
        assert await self.claim_q(store, "w") == ids[:1]

    async def test_a_run_cancelled_while_it_waits_no_longer_counts_as_waiting(
        self, store: Store
    ) -> None:
        """From its cancel on (before any worker ends it, before any claim meets its
        row), a waiting run leaves the depth, the oldest waiting time and the places
        of the runs behind it; so does one that ended."""
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1), worker_id="w",
                                  stale_before=0)
        ids = await self.queued(store, 5)
        assert await self.claim_q(store, "w") == ids[:1]  # holds the one slot
        await store.request_cancel(self.app, ids[1])
        [ended] = [r for r in await self.claim(store, "w2") if r.run_id == ids[1]]
        await store.commit_run(self.app, ended.run_id, ended.fence,
                               RunWrite(status=RunStatus.CANCELLED, release=True))
        await store.request_cancel(self.app, ids[3])  # asked, not ended yet
        [stats] = await store.queue_stats(self.app, now=time.time())
        third = await store.get_run(self.app, ids[2])
        assert third is not None
        assert (stats.waiting, stats.in_progress) == (2, 1)
        assert stats.oldest_waiting_at == pytest.approx(third.created_at, abs=1e-5)
        assert [(await store.queue_position(self.app, i)).ahead  # type: ignore[union-attr]
                for i in (ids[2], ids[4])] == [0, 1]

    async def test_one_claim_begins_the_next_runs_past_cancelled_waiting_ones(
        self, store: Store
    ) -> None:
        """A freed slot goes to the next run that can begin, in the claim that meets the
        cancelled runs ahead of it (ended or only asked), not in a later one."""
        await store.declare_queue(self.app, QueueSpec("q", concurrency=2), worker_id="w",
                                  stale_before=0)
        ids = await self.queued(store, 7)
        assert await self.claim_q(store, "w") == ids[:2]  # holds both slots
        await store.request_cancel(self.app, ids[2])
        [ended] = [r for r in await self.claim(store, "w2") if r.run_id == ids[2]]
        await store.commit_run(self.app, ended.run_id, ended.fence,
                               RunWrite(status=RunStatus.CANCELLED, release=True))
        for i in (3, 5):
            await store.request_cancel(self.app, ids[i])  # asked, not ended yet
        await self.end(store, ids[0])
        await self.end(store, ids[1])
        claim = await store.claim_queued_runs(self.app, "w", "q", ["wf"], now=time.time(),
                                              limit=50)
        assert [r.run_id for r in claim.runs] == [ids[4], ids[6]]
        assert not claim.waiting
        assert await self.claim_q(store, "w") == []

    async def test_a_queue_claim_leaves_the_runs_of_excluded_versions_waiting(
        self, store: Store
    ) -> None:
        """``exclude_versions`` and ``only_versions`` keep a newer version's runs waiting
        in their place (docs/operating.md, versions); runs of no version are taken."""
        await store.declare_queue(self.app, QueueSpec("q"), worker_id="w", stale_before=0)
        ids = {}
        for v in ("v1", "v2", None, "v3"):
            run, _ = await store.create_queued_run(new_run(self.app, version=v), QueueEntry("q"))
            ids[v] = run.run_id

        async def claim(**versions: object) -> list[str]:
            got = await store.claim_queued_runs(self.app, "w", "q", ["wf"], now=time.time(),
                                                limit=50, **versions)  # type: ignore[arg-type]
            return [r.run_id for r in got.runs]

        assert await claim(only_versions=[]) == [ids[None]]
        assert await claim(exclude_versions=["v2"], only_versions=["v1", "v2"]) == [ids["v1"]]
        assert await claim(exclude_versions=["v2"]) == [ids["v3"]]
        assert await claim() == [ids["v2"]]  # it kept its place, and begins for its own

    async def test_a_queue_claim_pins_the_runs_it_begins(self, store: Store) -> None:
        """``pin_version``: each run begun is pinned to the version of the code that
        begins it (docs/operating.md, versions); the runs left waiting are not."""
        await store.declare_queue(self.app, QueueSpec("q", concurrency=2), worker_id="w",
                                  stale_before=0)
        ids = []
        for v in ("v9", None, "v0"):
            run, _ = await store.create_queued_run(new_run(self.app, version=v), QueueEntry("q"))
            ids.append(run.run_id)
        claim = await store.claim_queued_runs(self.app, "w", "q", ["wf"], now=time.time(),
                                              limit=50, pin_version="v1")
        assert [(r.run_id, r.version) for r in claim.runs] == [(ids[0], "v1"), (ids[1], "v1")]
        for run_id, version in zip(ids, ("v1", "v1", "v0"), strict=True):
            stored = await store.get_run(self.app, run_id)
            assert stored is not None and stored.version == version
        waiting = await store.get_run(self.app, ids[2])
        assert waiting is not None and waiting.owner is None  # not begun: over the limit

    async def test_a_queue_claim_keeps_the_version_of_the_runs_it_is_told_to(
        self, store: Store
    ) -> None:
        """``keep_versions_of``: a run of one of those workflows (a saga's) pinned to
        another version keeps it when it begins, one pinned to none is pinned, and the
        runs of other workflows are pinned as ever: as ``Store.claim_runs`` does
        (docs/operating.md, versions)."""
        await store.declare_queue(self.app, QueueSpec("q"), worker_id="w", stale_before=0)
        expected = []
        for workflow, version, pinned in (("saga", "v0", "v0"), ("saga", None, "v1"),
                                          ("wf", "v0", "v1")):
            run, _ = await store.create_queued_run(
                new_run(self.app, workflow, version=version), QueueEntry("q"))
            expected.append((run.run_id, pinned))
        claim = await store.claim_queued_runs(self.app, "w", "q", ["wf", "saga"],
                                              now=time.time(), limit=50, pin_version="v1",
                                              keep_versions_of=["saga"])
        assert [(r.run_id, r.version) for r in claim.runs] == expected
        for run_id, version in expected:
            stored = await store.get_run(self.app, run_id)
            assert stored is not None and stored.version == version

    async def test_a_queued_run_with_history_of_another_version_begins_once_checked(
        self, store: Store
    ) -> None:
        """``replay_checked``: a queued run with history (here a retry's) pinned to
        another version than the claimer's waits in its place until the caller has
        checked that its code replays that history, as it was then;
        ``foreign_runs(queued=True)`` finds it. A run without history begins unchecked
        (docs/operating.md, versions)."""
        await store.declare_queue(self.app, QueueSpec("q"), worker_id="w", stale_before=0)
        old, _ = await store.create_queued_run(new_run(self.app, version="v1"), QueueEntry("q"))
        claim = await store.claim_queued_runs(self.app, "w", "q", ["wf"], now=time.time(),
                                              limit=50, pin_version="v1")
        assert [r.run_id for r in claim.runs] == [old.run_id]
        await store.commit_run(self.app, old.run_id, claim.runs[0].fence, RunWrite(
            entries=[HistoryEntry("s#1", EntryKind.STEP, "s", EntryStatus.COMPLETED, seq=1)],
            status=RunStatus.FAILED, error="E: x", release=True,
        ))
        await store.retry_run(self.app, old.run_id, include_compensated=False, version="v1",
                              actor="ops", now=time.time(), queue=QueueEntry("q"))
        fresh, _ = await store.create_queued_run(new_run(self.app, version="v1"),
                                                 QueueEntry("q"))
        [read] = await store.foreign_runs(self.app, "w2", ["wf"], versions=["v2"],
                                          stale_before=0.0, limit=10, queued=True)
        assert (read.run_id, read.version) == (old.run_id, "v1")  # (fresh: no history)

        async def claim_checked(checked: dict[str, float]) -> list[tuple[str, str | None]]:
            got = await store.claim_queued_runs(self.app, "w2", "q", ["wf"], now=time.time(),
                                                limit=50, pin_version="v2",
                                                replay_checked=checked)
            return [(r.run_id, r.version) for r in got.runs]

        assert await claim_checked({}) == [(fresh.run_id, "v2")]
        # checked as it was at another time: not the run as it is now
        assert await claim_checked({old.run_id: read.updated_at - 1.0}) == []
        assert await claim_checked({old.run_id: read.updated_at}) == [(old.run_id, "v2")]
        assert await store.foreign_runs(self.app, "w2", ["wf"], versions=["v2"],
                                        stale_before=0.0, limit=10, queued=True) == []

    async def test_sliding_window_rate(self, store: Store) -> None:
        rate = Rate(2, per=10.0)
        await store.declare_queue(self.app, QueueSpec("q", rate=rate), worker_id="w",
                                  stale_before=0)
        ids = await self.queued(store, 5)
        t0 = 1_000.25  # not a whole second: begin times are kept exactly
        assert await self.claim_q(store, "w", now=t0) == ids[:2]
        claim = await store.claim_queued_runs(self.app, "w", "q", ["wf"], now=t0 + 5, limit=9)
        assert claim.runs == [] and claim.retry_at == pytest.approx(t0 + rate.window)
        assert await self.claim_q(store, "w", now=t0 + rate.window - 0.01) == []
        assert await self.claim_q(store, "w", now=t0 + rate.window + 0.01) == ids[2:4]

    async def test_priorities_then_age(self, store: Store) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1, priorities=True),
                                  worker_id="w", stale_before=0)
        low = await self.queued(store, 1, priority=5)
        high = await self.queued(store, 2, priority=1)
        pos = await store.queue_position(self.app, low[0])
        assert pos is not None and pos.ahead == 2
        order = []
        for _ in range(3):
            [got] = await self.claim_q(store, "w")
            order.append(got)
            await self.end(store, got)
        assert order == [*high, *low]

    async def test_partitions_have_their_own_limits(self, store: Store) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1), worker_id="w",
                                  stale_before=0)
        a = await self.queued(store, 2, partition="a")
        b = await self.queued(store, 2, partition="b")
        assert sorted(await self.claim_q(store, "w")) == sorted([a[0], b[0]])
        assert await self.claim_q(store, "w") == []
        stats = await store.queue_stats(self.app, now=time.time())
        assert [(s.name, s.waiting, s.in_progress) for s in stats] == [("q", 2, 2)]
        # the sums are of both keys; each limit is read against one key's figure
        assert (stats[0].partitioned, stats[0].partition_peak_in_progress,
                stats[0].began_last_window, stats[0].partition_peak_began) == (True, 1, 2, 1)

    async def test_queue_stats_give_the_oldest_waiting_run_as_posix_seconds(
        self, store: Store
    ) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1), worker_id="w",
                                  stale_before=0)
        assert (await store.queue_stats(self.app, now=time.time()))[0].oldest_waiting_at is None
        ids = await self.queued(store, 3)
        assert await self.claim_q(store, "w") == ids[:1]
        [stats] = await store.queue_stats(self.app, now=time.time())
        second = await store.get_run(self.app, ids[1])
        assert second is not None
        # a float, as every time of the store (`now - oldest_waiting_at` is the wait)
        assert type(stats.oldest_waiting_at) is float
        assert stats.oldest_waiting_at == pytest.approx(second.created_at, abs=1e-5)
        assert (stats.waiting, stats.in_progress, stats.began_last_window) == (2, 1, 1)

    async def test_racing_claimers_never_exceed_concurrency(
        self, store: Store, peer: Store
    ) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=4), worker_id="w",
                                  stale_before=0)
        await self.queued(store, 30)
        got = await asyncio.gather(*[
            self.claim_q(s, f"w{i}", limit=3) for i, s in enumerate([store, peer] * 5)
        ])
        assert sum(len(g) for g in got) == 4
        assert len({r for g in got for r in g}) == 4

    async def test_run_queue_tells_where_a_run_waits_or_runs(self, store: Store) -> None:
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1, priorities=True),
                                  worker_id="w", stale_before=0)
        [a] = await self.queued(store, 1, partition="p", priority=-3)
        assert await store.run_queue(self.app, a) == QueueEntry("q", "p", -3)
        assert await self.claim_q(store, "w") == [a]
        assert await store.run_queue(self.app, a) == QueueEntry("q", "p", -3)  # in progress
        plain, _ = await store.create_run(new_run(self.app))
        assert await store.run_queue(self.app, plain.run_id) is None
        assert await store.run_queue(self.app, "no-such-run") is None

    async def test_pruning_deletes_only_ended_runs_rows_begun_before_the_cutoff(
        self, store: Store
    ) -> None:
        await store.declare_queue(self.app, QueueSpec("q"), worker_id="w", stale_before=0)
        t0 = 1_000.0
        old = await self.queued(store, 4)
        assert sorted(await self.claim_q(store, "w", now=t0)) == sorted(old)
        recent = await self.queued(store, 1)
        assert await self.claim_q(store, "w", now=t0 + 50) == recent
        waiting = await self.queued(store, 1)
        for rid in (*old[:3], *recent):
            await self.end(store, rid)
        await store.request_cancel(self.app, waiting[0])  # ended, never began
        [cancelled] = [r for r in await self.claim(store, "w") if r.run_id == waiting[0]]
        await store.commit_run(self.app, cancelled.run_id, cancelled.fence,
                               RunWrite(status=RunStatus.CANCELLED, release=True))
        # At most ``limit`` a pass; the row of old[3] stays (its run is in progress), as
        # do those of runs begun after the cutoff or never begun (no claim met it yet).
        assert await store.prune_queue_runs(self.app, "q", before=t0 + 10, limit=2) == 2
        assert await store.prune_queue_runs(self.app, "q", before=t0 + 10, limit=2) == 1
        assert await store.prune_queue_runs(self.app, "q", before=t0 + 10, limit=2) == 0
        assert [await store.run_queue(self.app, r) is None for r in old] == [True] * 3 + [False]
        assert await store.run_queue(self.app, recent[0]) is not None
        assert await store.run_queue(self.app, waiting[0]) is not None
        assert await store.prune_queue_runs(self.app, "other", before=t0 + 100, limit=9) == 0
        await self.end(store, old[3])
        assert await store.prune_queue_runs(self.app, "q", before=t0 + 100, limit=9) == 2
        assert await store.run_queue(self.app, recent[0]) is None

    async def test_pruning_keeps_a_rate_and_the_stats_counting_the_same(
        self, store: Store
    ) -> None:
        rate = Rate(2, per=10.0)
        await store.declare_queue(self.app, QueueSpec("q", rate=rate), worker_id="w",
                                  stale_before=0)
        ids = await self.queued(store, 5)
        t0 = 1_000.25
        assert await self.claim_q(store, "w", now=t0) == ids[:2]
        assert await self.claim_q(store, "w", now=t0 + rate.window + 0.01) == ids[2:4]
        for rid in ids[:4]:
            await self.end(store, rid)
        now = t0 + rate.window + 1
        [before] = await store.queue_stats(self.app, now=now)
        # Only the rows that left every window go (the caller's cutoff: now less the
        # longest window), twice over: a second pruner finds nothing left to do.
        cutoff = now - max(rate.window, QueueSpec("q", rate=rate).stats_window)
        pruned = await asyncio.gather(*[
            store.prune_queue_runs(self.app, "q", before=cutoff, limit=10) for _ in range(2)
        ])
        assert sum(pruned) == 2
        assert await store.prune_queue_runs(self.app, "q", before=cutoff, limit=10) == 0
        assert await store.queue_stats(self.app, now=now) == [before]
        assert before.began_last_window == 2 and before.waiting == 1
        assert await self.claim_q(store, "w", now=now) == []  # the window is still full
        assert await self.claim_q(store, "w", now=t0 + 2 * rate.window + 0.02) == ids[4:]

    # -- slots ------------------------------------------------------------------------

    async def test_slots_limit_release_and_lapse_with_the_worker(self, store: Store) -> None:
        now = await self.live(store, "w1", "w2")

        async def take(holder: str, worker: str, at: float = now) -> bool:
            grant = await store.acquire_slot(self.app, "step:pay", holder, worker,
                                             concurrency=2, rate=None, now=at,
                                             stale_before=at)
            return grant.granted

        assert await take("a", "w1") and await take("b", "w2")
        assert not await take("c", "w1")
        assert await take("a", "w1")  # the holder keeps its slot
        await store.release_slot(self.app, "step:pay", "a", "w1")
        assert await take("c", "w1")
        assert await store.slots_held(self.app, "step:pay") == 2
        # w2 stops heartbeating: after the lease its slot is free again.
        await store.heartbeat(self.app, "w1", now + 20, None, lease=LEASE)
        assert await take("d", "w1", at=now + 20)

    async def _slot_held_and_awaited(
        self, store: Store, peer: Store
    ) -> tuple[float, list[str], list[str]]:
        """Worker w1 holds the one slot of step ``s`` (through ``store``), w2 waits for
        it (through ``peer``); the changes each instance's listeners hear are listed."""
        now = await self.live(store, "w1", "w2")
        heard: list[str] = []
        elsewhere: list[str] = []
        store.add_listener(heard.append)
        if peer is not store:
            peer.add_listener(elsewhere.append)
        assert (await store.acquire_slot(self.app, "step:s", "h", "w1", concurrency=1,
                                         rate=None, now=now, stale_before=now)).granted
        assert not (await peer.acquire_slot(self.app, "step:s", "a", "w2", concurrency=1,
                                            rate=None, now=now, stale_before=now)).granted
        return now, heard, elsewhere

    async def test_a_release_and_a_withdrawal_say_slots(self, store: Store,
                                                        peer: Store) -> None:
        """The waiters of a slot wake on ``slots``: a release and a withdrawal say it to
        the store's listeners, and to those of another instance of the store (another
        process) where the store says it ``hears_others``. A waiter there asks the
        store only to keep its place meanwhile (docs/flow-control.md)."""
        _, heard, elsewhere = await self._slot_held_and_awaited(store, peer)
        await store.release_slot(self.app, "step:s", "h", "w1")
        await eventually(lambda: SLOTS in heard)
        if peer is not store and peer.hears_others:
            await eventually(lambda: SLOTS in elsewhere)
        heard.clear()
        elsewhere.clear()
        await peer.withdraw_slot_request(self.app, "step:s", "a", "w2")
        if peer is store or peer.hears_others:
            await eventually(lambda: SLOTS in heard)
        else:
            await eventually(lambda: SLOTS in elsewhere)

    async def test_a_removed_workers_slots_are_free_and_say_slots(self, store: Store,
                                                                   peer: Store) -> None:
        """A worker removed from the store (a clean stop, or its supervisor once its
        process died) holds no slot any more, and its removal says ``slots``, so that a
        waiter takes the slot now rather than at its next periodic ask."""
        now, heard, elsewhere = await self._slot_held_and_awaited(store, peer)
        await store.remove_worker(self.app, "w1")
        await eventually(lambda: SLOTS in heard)
        if peer is not store and peer.hears_others:
            await eventually(lambda: SLOTS in elsewhere)
        assert (await peer.acquire_slot(self.app, "step:s", "a", "w2", concurrency=1,
                                        rate=None, now=now, stale_before=now)).granted

    async def test_slot_rate_is_a_sliding_window(self, store: Store) -> None:
        now = await self.live(store, "w")
        rate = Rate(2, per=10.0)

        async def take(holder: str, at: float) -> tuple[bool, float | None]:
            g = await store.acquire_slot(self.app, "step:x", holder, "w", concurrency=None,
                                         rate=rate, now=at, stale_before=now)
            await store.release_slot(self.app, "step:x", holder, "w")
            return g.granted, g.retry_at

        assert (await take("a", now))[0] and (await take("b", now + 1))[0]
        ok, retry = await take("c", now + 5)
        assert not ok and retry == pytest.approx(now + rate.window)
        assert not (await take("c", now + rate.window - 0.01))[0]
        assert (await take("c", now + rate.window + 0.01))[0]
        assert not (await take("d", now + rate.window + 0.5))[0]

    async def test_a_holder_asking_again_retimes_its_begin(self, store: Store) -> None:
        now = await self.live(store, "w")
        rate = Rate(1, per=10.0)

        async def take(holder: str, at: float) -> tuple[bool, float | None]:
            g = await store.acquire_slot(self.app, "step:y", holder, "w", concurrency=None,
                                         rate=rate, now=at, stale_before=now)
            return g.granted, g.retry_at

        assert (await take("a", now))[0]
        assert (await take("a", now + 3))[0]  # its code begins later than first recorded
        ok, retry = await take("b", now + rate.window + 1)
        assert not ok and retry == pytest.approx(now + 3 + rate.window)
        await store.release_slot(self.app, "step:y", "a", "w")
        assert (await take("b", now + 3 + rate.window + 0.01))[0]

    async def test_slot_waiters_are_served_first_come(self, store: Store, peer: Store) -> None:
        now = await self.live(store, "w1", "w2")

        async def take(s: Store, holder: str, worker: str, at: float = now,
                       lapse: float = 5.0) -> bool:
            grant = await s.acquire_slot(self.app, "step:one", holder, worker, concurrency=1,
                                         rate=None, now=at, stale_before=at,
                                         lapsed_before=at - lapse, forget_before=at - 10)
            return grant.granted

        assert await take(store, "h", "w1")
        assert not await take(store, "a", "w1", now + 1)  # A waits
        await store.release_slot(self.app, "step:one", "h", "w1")
        # Newcomer B asks first after the release, from another worker: A is owed it.
        assert not await take(peer, "b", "w2", now + 2)
        assert not await take(peer, "b", "w2", now + 2.5)  # (asking again changes nothing)
        assert await take(store, "a", "w1", now + 3)
        assert await store.slots_held(self.app, "step:one") == 1
        await store.release_slot(self.app, "step:one", "a", "w1")
        # B waits since now + 2: ahead of C, a newcomer on B's own worker.
        assert not await take(peer, "c", "w2", now + 4)
        assert await take(store, "b", "w2", now + 4.5)
        await store.release_slot(self.app, "step:one", "b", "w2")
        # C stops asking (since now + 4): once its waiter lapses, D is let through.
        await self.live(store, "w1", "w2")
        assert not await take(store, "d", "w1", now + 8)
        assert await take(store, "d", "w1", now + 9.5, lapse=5.0)

    async def test_a_lapsed_waiter_that_asks_again_keeps_its_place(self, store: Store) -> None:
        now = await self.live(store, "w")

        async def take(holder: str, at: float, lapse: float = 1.0) -> bool:
            grant = await store.acquire_slot(self.app, "handler:g", holder, "w", concurrency=1,
                                             rate=None, now=at, stale_before=at,
                                             lapsed_before=at - lapse, forget_before=at - 10)
            return grant.granted

        assert await take("h", now)
        assert not await take("a", now + 1)
        assert not await take("b", now + 3)  # A lapsed: it blocks no one, B is the head
        assert not await take("a", now + 3.5)  # A asks again within the lease: first again
        await store.release_slot(self.app, "handler:g", "h", "w")
        assert not await take("b", now + 4)
        assert await take("a", now + 4)

    async def test_a_withdrawn_waiter_blocks_no_one(self, store: Store, peer: Store) -> None:
        now = await self.live(store, "w1", "w2")

        async def take(s: Store, holder: str, worker: str) -> bool:
            grant = await s.acquire_slot(self.app, "step:two", holder, worker, concurrency=2,
                                         rate=None, now=now, stale_before=now,
                                         forget_before=now - 10)
            return grant.granted

        assert await take(store, "h1", "w1") and await take(store, "h2", "w1")
        assert not await take(store, "a", "w1")
        await store.release_slot(self.app, "step:two", "h1", "w1")
        assert not await take(peer, "b", "w2")
        await store.withdraw_slot_request(self.app, "step:two", "a", "w1")  # A's run was cancelled
        await store.withdraw_slot_request(self.app, "step:two", "nobody", "w1")  # (nothing)
        assert await take(peer, "b", "w2")

    async def test_waiters_of_a_dead_worker_block_no_one(self, store: Store) -> None:
        now = await self.live(store, "w1", "w2")

        async def take(holder: str, worker: str, at: float) -> bool:
            grant = await store.acquire_slot(self.app, "step:three", holder, worker,
                                             concurrency=1, rate=None, now=at,
                                             stale_before=at, forget_before=at - 10)
            return grant.granted

        assert await take("h", "w1", now)
        assert not await take("a", "w2", now)
        await store.release_slot(self.app, "step:three", "h", "w1")
        assert not await take("b", "w1", now + 1)
        # w2 stops heartbeating (A was its): after the lease, B is the head.
        await store.heartbeat(self.app, "w1", now + 11, None, lease=LEASE)
        assert await take("b", "w1", now + 11)

    async def test_the_oldest_rate_waiter_gets_the_next_begin(self, store: Store) -> None:
        now = await self.live(store, "w")
        rate = Rate(1, per=10.0)

        async def take(holder: str, at: float) -> tuple[bool, float | None]:
            g = await store.acquire_slot(self.app, "step:r", holder, "w", concurrency=None,
                                         rate=rate, now=at, stale_before=at,
                                         forget_before=at - 100)
            if g.granted:
                await store.release_slot(self.app, "step:r", holder, "w")
            return g.granted, g.retry_at

        assert (await take("h", now))[0]
        ok, retry = await take("a", now + 1)
        assert not ok and retry == pytest.approx(now + rate.window)
        # B waits behind A: the window's next begin is A's, B's is the one after it.
        assert await take("b", now + 2) == (False, None)
        opened = now + rate.window + 0.01
        assert not (await take("b", opened))[0]  # B asks first as the window opens
        assert not (await take("c", opened))[0]
        assert (await take("a", opened + 0.01))[0]
        ok, retry = await take("b", opened + 0.02)
        assert not ok and retry == pytest.approx(opened + 0.01 + rate.window)

    async def test_a_begin_recorded_ahead_counts_from_its_own_time(self, store: Store) -> None:
        """``begin_at``: a grant (or a holder's re-timing) records its begin at a later
        time than it asked (the caller begins its code then, after a slow round trip);
        the window frees that begin ``window`` seconds after it, not after the ask."""
        now = await self.live(store, "w")
        rate = Rate(1, per=1.0)  # (a window of 1.1 s)

        async def take(holder: str, at: float, begin_at: float | None = None) -> SlotGrant:
            return await store.acquire_slot(self.app, "step:ahead", holder, "w",
                                            concurrency=None, rate=rate, now=at,
                                            stale_before=at, forget_before=at - 100,
                                            begin_at=begin_at)

        assert (await take("a", now, begin_at=now + 0.3)).granted
        late = await take("b", now + 0.1)
        assert not late.granted and late.retry_at == pytest.approx(now + 0.3 + rate.window)
        assert (await take("a", now + 0.4, begin_at=now + 0.7)).granted  # re-timed ahead
        late = await take("b", now + 1.45)  # (a's first begin would have left by now)
        assert not late.granted and late.retry_at == pytest.approx(now + 0.7 + rate.window)
        assert (await take("b", now + 0.7 + rate.window + 0.01)).granted

    async def test_a_slot_held_by_another_live_worker_is_not_taken_over(
        self, store: Store, peer: Store
    ) -> None:
        """A grant belongs to the worker it was granted to: another live worker asking
        under the same holder (the run's new owner while a stale execution of it still
        holds the slot, or that stale execution) is not granted that row, and its
        release or withdrawal frees nothing of the holding worker's."""
        now = await self.live(store, "w1", "w2")

        async def take(s: Store, holder: str, worker: str) -> bool:
            grant = await s.acquire_slot(self.app, "step:own", holder, worker, concurrency=2,
                                         rate=None, now=now, stale_before=now)
            return grant.granted

        assert await take(store, "run-1:pay#1", "w1")
        assert not await take(peer, "run-1:pay#1", "w2")  # not w2's: no takeover
        await peer.release_slot(self.app, "step:own", "run-1:pay#1", "w2")
        await peer.withdraw_slot_request(self.app, "step:own", "run-1:pay#1", "w2")
        assert await store.slots_held(self.app, "step:own") == 1  # still w1's
        assert await take(store, "run-1:pay#1", "w1")  # w1 keeps it (nothing counted twice)
        assert await take(peer, "run-2:pay#1", "w2")
        assert await store.slots_held(self.app, "step:own") == 2
        await store.release_slot(self.app, "step:own", "run-1:pay#1", "w1")
        assert await store.slots_held(self.app, "step:own") == 1

    async def test_a_stale_holder_frees_only_its_own_slot(self, store: Store, peer: Store) -> None:
        """A worker paused past its lease held the one slot of a step; another worker
        took the run over and its slot (the same holder: run and step). The paused
        worker resumes, asks again under that holder and lets the run go: the new
        owner's slot stays held, and no one else is granted it while it is."""
        now = await self.live(store, "w1", "w2")
        h = "run-1:pay#1"

        async def take(s: Store, holder: str, worker: str, at: float) -> bool:
            grant = await s.acquire_slot(self.app, "step:one", holder, worker, concurrency=1,
                                         rate=None, now=at, stale_before=at,
                                         forget_before=at - LEASE)
            return grant.granted

        assert await take(store, h, "w1", now)
        later = now + LEASE + 1  # w1 silent past its lease: w2 takes the run and the slot
        await peer.heartbeat(self.app, "w2", later, None, lease=LEASE)
        assert await take(peer, h, "w2", later)
        await store.heartbeat(self.app, "w1", later + 0.1, None, lease=LEASE)  # w1 resumes
        assert not await take(store, h, "w1", later + 0.1)
        await store.withdraw_slot_request(self.app, "step:one", h, "w1")
        await store.release_slot(self.app, "step:one", h, "w1")
        assert await store.slots_held(self.app, "step:one") == 1
        assert not await take(store, "run-2:pay#1", "w1", later + 0.2)  # still w2's
        await peer.release_slot(self.app, "step:one", h, "w2")
        assert await take(store, "run-2:pay#1", "w1", later + 0.3)

    async def test_racing_slot_takers_never_exceed(self, store: Store, peer: Store) -> None:
        now = await self.live(store, *[f"w{i}" for i in range(10)])
        grants = await asyncio.gather(*[
            s.acquire_slot(self.app, "handler:g", f"h{i}", f"w{i}", concurrency=3, rate=None,
                           now=now, stale_before=now)
            for i, s in enumerate([store, peer] * 5)
        ])
        assert sum(g.granted for g in grants) == 3

    # -- schedules ---------------------------------------------------------------------

    async def test_schedules_compare_and_set(self, store: Store) -> None:
        row = ScheduleRow("nightly", '{"a":1}', "code", False, '{"s":1}')
        assert await store.put_schedule(self.app, row)
        assert not await store.put_schedule(self.app, ScheduleRow(
            "nightly", '{"a":2}', "code", False, '{"s":"ignored"}'
        ))
        [got] = await store.schedules(self.app)
        assert (got.spec, got.state, got.paused) == ('{"a":2}', '{"s":1}', False)
        assert await store.update_schedule(self.app, "nightly", got.version, state='{"s":2}')
        assert not await store.update_schedule(self.app, "nightly", got.version, paused=True)
        [now] = await store.schedules(self.app)
        assert now.state == '{"s":2}' and now.version == got.version + 1
        assert await store.update_schedule(self.app, "nightly", now.version, paused=True)
        assert (await store.schedules(self.app))[0].paused
        assert await store.delete_schedule(self.app, "nightly")
        assert not await store.delete_schedule(self.app, "nightly")
        assert await store.schedules(self.app) == []

    async def test_a_schedule_put_without_replace_keeps_the_one_there(
        self, store: Store, peer: Store
    ) -> None:
        """``replace=False`` (``app.schedules.create(..., replace=False)``, the console's
        create): a name taken is left as it is, unrecorded; of simultaneous puts of one
        name, exactly one inserts."""
        one, two = ('{"workflow": "wf", "cron": "0 1 * * *"}',
                    '{"workflow": "wf", "cron": null, "every": 60.0}')
        row = ScheduleRow("s", one, "api", False, '{"s":1}')
        assert await store.put_schedule(self.app, row, actor="t:a", replace=False)
        assert not await store.put_schedule(self.app, ScheduleRow(
            "s", two, "api", False, "{}"), actor="t:b", replace=False)
        [got] = await store.schedules(self.app)
        assert (got.spec, got.state, got.version) == (one, '{"s":1}', 1)

        def spec(i: int) -> str:
            return f'{{"workflow": "wf{i}", "cron": "0 1 * * *"}}'

        made = await asyncio.gather(*[
            each.put_schedule(self.app, ScheduleRow("race", spec(i), "api", False, "{}"),
                              actor=f"t:{i}", replace=False)
            for i, each in enumerate([store, peer] * 4)])
        assert made.count(True) == 1
        [winner] = [i for i, m in enumerate(made) if m]
        assert {r.name: r.spec for r in await store.schedules(self.app)}["race"] == spec(winner)
        records = await store.audit_records(self.app)
        assert [(r.actor, r.action, r.target) for r in records] == [
            ("t:a", "schedule.created", "s"), (f"t:{winner}", "schedule.created", "race")]

    async def test_a_schedules_change_says_schedules(self, store: Store, peer: Store) -> None:
        """Schedulers wait for ``schedules`` while the store hears other processes
        (docs/flow-control.md): a schedule created, replaced, paused, resumed or deleted
        says it to the store's listeners, and to those of another instance (another
        process) where the store ``hears_others``; a scheduler's bookkeeping of its
        ticks (the state alone) says nothing."""
        heard: list[str] = []
        elsewhere: list[str] = []
        store.add_listener(heard.append)
        told = [heard]
        if peer is not store:
            peer.add_listener(elsewhere.append)
            if peer.hears_others:
                told.append(elsewhere)

        async def said(times: int = 1) -> None:
            for got in told:
                await eventually(lambda got=got: got.count(SCHEDULES) >= times)
                await asyncio.sleep(0.05)  # (and no more)
                assert got.count(SCHEDULES) == times, got
                got.clear()

        row = ScheduleRow("s", '{"a":1}', "api", False, "{}")
        assert await store.put_schedule(self.app, row)
        await said()
        assert not await store.put_schedule(self.app, row)
        await said()
        [got] = await store.schedules(self.app)
        # the state alone, then a pause: only the pause is heard (in commit order)
        assert await store.update_schedule(self.app, "s", got.version, state='{"x":1}')
        assert await store.update_schedule(self.app, "s", got.version + 1, paused=True)
        assert await store.update_schedule(self.app, "s", got.version + 2, paused=False)
        await said(2)
        assert await store.delete_schedule(self.app, "s")
        await said()

    async def test_schedule_changes_with_an_actor_are_audited(self, store: Store) -> None:
        spec = '{"workflow": "wf", "cron": null, "every": 60.0}'
        row = ScheduleRow("s", spec, "api", False, "{}")
        assert await store.put_schedule(self.app, row, actor="cli:a@h")
        assert not await store.put_schedule(self.app, row, actor="cli:a@h")
        assert await store.put_schedule(self.app, ScheduleRow("c", spec, "code", False, "{}"))
        [c, got] = await store.schedules(self.app)
        assert await store.update_schedule(self.app, "s", got.version, paused=True, actor="t:b")
        assert not await store.update_schedule(self.app, "s", got.version, paused=False,
                                               actor="t:b")  # lost the race: no record
        assert await store.update_schedule(self.app, "s", got.version + 1, state="{}",
                                           actor="t:b")  # bookkeeping: no record
        assert await store.delete_schedule(self.app, "s", actor="cli:a@h")
        assert not await store.delete_schedule(self.app, "s", actor="cli:a@h")
        assert await store.delete_schedule(self.app, "c")
        records = await store.audit_records(self.app)
        assert [(r.actor, r.action, r.target, r.data) for r in records] == [
            ("cli:a@h", "schedule.created", "s", '{"when":"every 60s","workflow":"wf"}'),
            ("cli:a@h", "schedule.replaced", "s", '{"when":"every 60s","workflow":"wf"}'),
            ("t:b", "schedule.paused", "s", "{}"),
            ("cli:a@h", "schedule.deleted", "s", "{}"),
        ]
        assert (await store.verify_audit(self.app)).ok and c.name == "c"

    # -- queued runs retried, forked and cancelled (docs/flow-control.md#queues) -----

    async def fail(self, store: Store, run_id: str) -> None:
        run = await store.get_run(self.app, run_id)
        assert run is not None
        await store.commit_run(self.app, run_id, run.fence,
                               RunWrite(status=RunStatus.FAILED, error="E: x", release=True))

    async def test_a_retried_runs_earlier_begin_still_counts_in_the_rate_window(
        self, store: Store
    ) -> None:
        """The window holds every begin inside it: a retry does not take back the begin
        of the attempt that failed, and the retry's own begin counts once admitted."""
        rate = Rate(2, per=60.0)
        await store.declare_queue(self.app, QueueSpec("q", rate=rate), worker_id="w",
                                  stale_before=0)
        t0 = time.time()
        [a] = await self.queued(store, 1)
        assert await self.claim_q(store, "w", now=t0) == [a]
        await self.fail(store, a)
        await store.retry_run(self.app, a, include_compensated=False, version=None,
                              actor="ops", now=t0 + 1, queue=QueueEntry("q"))
        [b] = await self.queued(store, 1)
        # a's first begin is in the window: one more may begin (b, the older in line)
        assert await self.claim_q(store, "w", now=t0 + 2) == [b]
        [stats] = await store.queue_stats(self.app, now=t0 + 2)
        assert (stats.began_last_window, stats.waiting, stats.in_progress) == (2, 1, 1)
        assert await self.claim_q(store, "w", now=t0 + 3) == []
        assert await store.run_queue(self.app, a) == QueueEntry("q")
        # once the first begin leaves the window, the retry begins, and its begin counts
        assert await self.claim_q(store, "w", now=t0 + rate.window + 0.5) == [a]
        [stats] = await store.queue_stats(self.app, now=t0 + rate.window + 0.5)
        assert (stats.began_last_window, stats.waiting, stats.in_progress) == (2, 0, 2)
        # the earlier begin's row goes with the pruning, as an ended run's row does
        await self.end(store, a)
        await self.end(store, b)
        assert await store.prune_queue_runs(self.app, "q", before=t0 + 1, limit=10) == 1
        assert await store.run_queue(self.app, a) == QueueEntry("q")

    async def test_a_fork_keeps_its_sources_begin_and_counts_its_own(
        self, store: Store
    ) -> None:
        rate = Rate(2, per=60.0)
        await store.declare_queue(self.app, QueueSpec("q", rate=rate), worker_id="w",
                                  stale_before=0)
        t0 = time.time()
        [a] = await self.queued(store, 1)
        assert await self.claim_q(store, "w", now=t0) == [a]
        run = await store.get_run(self.app, a)
        assert run is not None
        await store.commit_run(self.app, a, run.fence, RunWrite(
            entries=[HistoryEntry("s#1", EntryKind.STEP, "s", EntryStatus.COMPLETED, seq=1)],
            status=RunStatus.COMPLETED, release=True,
        ))
        fork = new_run(self.app)
        await store.fork_run(self.app, a, fork, before_key="s#1", actor="ops",
                             queue=QueueEntry("q"))
        [b] = await self.queued(store, 1)
        assert await self.claim_q(store, "w", now=t0 + 2) == [fork.run_id]
        assert await self.claim_q(store, "w", now=t0 + 3) == []
        assert await self.claim_q(store, "w", now=t0 + rate.window + 0.5) == [b]

    async def test_a_retried_runs_place_tells_since_when_it_waits(self, store: Store) -> None:
        """The wait of a retried run is the retry's own, not the time since the run was
        created (a trace's queued run says how long it waits)."""
        await store.declare_queue(self.app, QueueSpec("q", concurrency=1), worker_id="w",
                                  stale_before=0)
        [a, b] = await self.queued(store, 2)
        created = await store.get_run(self.app, b)
        assert created is not None
        pos = await store.queue_position(self.app, b)
        assert pos is not None and pos.since == pytest.approx(created.created_at, abs=1e-5)
        assert await self.claim_q(store, "w") == [a]
        await self.fail(store, a)
        t = time.time() + 100
        await store.retry_run(self.app, a, include_compensated=False, version=None,
                              actor="ops", now=t, queue=QueueEntry("q"))
        pos = await store.queue_position(self.app, a)
        assert pos is not None and pos.ahead == 1
        assert pos.since == pytest.approx(t, abs=1e-5)

    async def test_a_cancelled_queued_run_that_never_began_is_any_versions_to_end(
        self, store: Store
    ) -> None:
        """A run pinned to a version that no live worker runs, cancelled while it waits in
        its queue, is claimed by a worker of another version (to end it cancelled: it
        never began, nothing of its code is needed); one that began is left for its own
        version (its code compensates), and so is one that waits without a cancel."""
        await store.declare_queue(self.app, QueueSpec("q", concurrency=2), worker_id="w",
                                  stale_before=0)
        began, _ = await store.create_queued_run(new_run(self.app, version="v2"),
                                                 QueueEntry("q"))
        got = await store.claim_queued_runs(self.app, "w2", "q", ["wf"], now=time.time(),
                                            limit=1)
        assert [r.run_id for r in got.runs] == [began.run_id]
        await store.commit_run(self.app, began.run_id, got.runs[0].fence,
                               RunWrite(status=RunStatus.RUNNING, release=True))
        waiting, _ = await store.create_queued_run(new_run(self.app, version="v2"),
                                                   QueueEntry("q"))
        cancelled, _ = await store.create_queued_run(new_run(self.app, version="v2"),
                                                     QueueEntry("q"))
        for rid in (began.run_id, cancelled.run_id):
            await store.request_cancel(self.app, rid)

        async def claim(**versions: object) -> list[str]:
            got = await store.claim_runs(self.app, "w1", ["wf"], stale_before=time.time(),
                                         limit=10, **versions)  # type: ignore[arg-type]
            return [r.run_id for r in got]

        # Its row is met (and dropped, never begun) by a queue claim that leaves the
        # version's waiting runs in their place: it is still to be ended by any version.
        got = await store.claim_queued_runs(self.app, "w1", "q", ["wf"], now=time.time(),
                                            limit=9, exclude_versions=["v2"])
        assert got.runs == []
        assert await claim(versions=["v1"]) == [cancelled.run_id]
        assert await claim(versions=["v1"]) == []
        assert await claim(versions=["v1"], run_ids=[began.run_id, waiting.run_id]) == []
        # Ended, its row goes with the pruning; the run waiting keeps its place.
        run = await store.get_run(self.app, cancelled.run_id)
        assert run is not None
        await store.commit_run(self.app, run.run_id, run.fence,
                               RunWrite(status=RunStatus.CANCELLED, release=True))
        assert await store.prune_queue_runs(self.app, "q", before=time.time(), limit=9) == 1
        assert await store.run_queue(self.app, cancelled.run_id) is None
        assert await store.queue_position(self.app, waiting.run_id) is not None
