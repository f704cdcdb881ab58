"""The store contract, part five: operating runs — lookups by key, attribute and id
prefix, version-aware claims, retry with superseded history, fork, discarded dead
letters (docs/operating.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cantata.errors import (
    DeadLetterNotFound,
    RunInProgress,
    RunNotFound,
    RunNotRetryable,
    StepNotInHistory,
)
from cantata.model import codec
from cantata.model.access import RunQuery
from cantata.model.records import (
    ATTRS,
    COMPENSATION,
    ENTRY_FAILED,
    ENTRY_RUNNING,
    Attempt,
    EntryStatus,
    HistoryEntry,
    RunRecord,
    RunWrite,
)
from cantata.model.status import RunStatus
from cantata.store.base import Settlement, Store
from cantata.testing.contract.support import LEASE, StoreFixtures, entry, ev, new_run


def attrs(key: str, seq: int, **values: str) -> HistoryEntry:
    """A ``set_attributes`` history entry (``detail`` holds the indexed text)."""
    return HistoryEntry(key, ATTRS, "set_attributes", EntryStatus.COMPLETED, seq=seq,
                        result=codec.dumps(values), detail=codec.dumps(values))


class OperateContract(StoreFixtures):
    async def _run(
        self, store: Store, *entries: HistoryEntry, status: RunStatus = RunStatus.RUNNING,
        attempts: tuple[Attempt, ...] = (), **kw: Any,
    ) -> RunRecord:
        """A run with ``entries`` in its history, ended with ``status``."""
        run, _ = await store.create_run(new_run(self.app, owner="w", fence=1, **kw))
        await store.commit_run(self.app, run.run_id, 1, RunWrite(
            entries=list(entries), attempts=list(attempts), status=status,
            error="StepFailed: boom" if status == RunStatus.FAILED else None,
            release=status.is_final,
        ))
        stored = await store.get_run(self.app, run.run_id)
        assert stored is not None
        return stored

    async def _snapshot(self, store: Store, run_id: str) -> tuple[Any, ...]:
        return (
            await store.get_run(self.app, run_id), await store.load_history(self.app, run_id),
            await store.load_attempts(self.app, run_id),
            len(await store.audit_records(self.app)),
            len(await store.find_runs(self.app, limit=1000)),
        )

    # -- lookups ---------------------------------------------------------------------

    async def test_find_runs_by_key_workflow_status_and_attributes(self, store: Store) -> None:
        a = await self._run(store, attrs("set_attributes#1", 1, customer_id="42", tier="gold"),
                            idempotency_key="order-1", version="v1")
        b = await self._run(store, attrs("set_attributes#1", 1, customer_id="42"),
                            status=RunStatus.COMPLETED, workflow="other", version="v2")
        await self._run(store, attrs("set_attributes#1", 1, customer_id="7"))

        def ids(runs: list[RunRecord]) -> list[str]:
            return [r.run_id for r in runs]

        assert ids(await store.find_runs(self.app, idempotency_key="order-1")) == [a.run_id]
        assert ids(await store.find_runs(self.app, attributes={"customer_id": "42"})) == [
            b.run_id, a.run_id  # newest first
        ]
        both = {"customer_id": "42", "tier": "gold"}
        assert ids(await store.find_runs(self.app, attributes=both)) == [a.run_id]
        assert ids(await store.find_runs(
            self.app, attributes={"customer_id": "42"}, workflow="other",
            status=RunStatus.COMPLETED,
        )) == [b.run_id]
        assert await store.find_runs(self.app, attributes={"customer_id": "9"}) == []
        assert ids(await store.find_runs(self.app, version="v1")) == [a.run_id]
        assert ids(await store.find_runs(
            self.app, version="v2", attributes={"customer_id": "42"})) == [b.run_id]
        assert await store.find_runs(self.app, version="v3") == []
        assert len(await store.find_runs(self.app, limit=2)) == 2
        assert await store.find_runs(self.app + "-b", idempotency_key="order-1") == []
        assert await store.attribute_names(self.app) == ["customer_id", "tier"]
        assert await store.run_attributes(self.app, [a.run_id, b.run_id, "nope"]) == {
            a.run_id: {"customer_id": "42", "tier": "gold"}, b.run_id: {"customer_id": "42"},
        }

    async def test_runs_created_at_one_instant_come_in_the_consoles_order(
        self, store: Store
    ) -> None:
        """Newest first, and runs sharing a creation time by id, descending: the order of
        the console's pages (``query_runs``), so ``cantata runs`` and ``GET /api/runs``
        list the same runs in the same order."""
        first, _ = await store.create_run(new_run(self.app))
        same = []
        for _ in range(4):
            run = new_run(self.app)
            run.created_at = first.created_at
            same.append((await store.create_run(run))[0])
        want = [r.run_id for r in sorted([first, *same], key=lambda r: r.run_id, reverse=True)]
        assert [r.run_id for r in await store.find_runs(self.app)] == want
        assert [r.run_id for r in await store.list_runs(self.app)] == want
        assert [r.run_id for r in await store.query_runs(self.app, RunQuery())] == want

    async def test_a_later_set_attributes_wins(self, store: Store) -> None:
        run = await self._run(store, attrs("set_attributes#1", 1, stage="new", n="1"))
        await store.commit_run(self.app, run.run_id, run.fence, RunWrite(
            entries=[attrs("set_attributes#2", 2, stage="paid")]
        ))
        assert await store.run_attributes(self.app, [run.run_id]) == {
            run.run_id: {"stage": "paid", "n": "1"}
        }
        assert await store.find_runs(self.app, attributes={"stage": "new"}) == []

    async def test_runs_by_prefix(self, store: Store) -> None:
        one = await self._run(store, run_id="abc_1")
        two = await self._run(store, run_id="abc%2")
        await self._run(store, run_id="abd-3")
        assert [r.run_id for r in await store.runs_by_prefix(self.app, "ab", limit=10)] == [
            "abc%2", "abc_1", "abd-3"
        ]
        assert [r.run_id for r in await store.runs_by_prefix(self.app, "abc", limit=10)] == [
            two.run_id, one.run_id
        ]
        assert [r.run_id for r in await store.runs_by_prefix(self.app, "abc_", limit=10)] == [
            one.run_id  # '_' and '%' are not wildcards
        ]
        assert len(await store.runs_by_prefix(self.app, "a", limit=2)) == 2
        assert await store.runs_by_prefix(self.app, "x", limit=10) == []

    # -- versions ----------------------------------------------------------------------

    async def test_claims_by_version_and_by_id(self, store: Store) -> None:
        v1, _ = await store.create_run(new_run(self.app, version="v1"))
        v2, _ = await store.create_run(new_run(self.app, version="v2"))
        anyv, _ = await store.create_run(new_run(self.app))
        now = await self.live(store, "w1", "w2")
        foreign = await store.foreign_runs(
            self.app, "w1", ["wf"], versions=["v2"], stale_before=now, limit=10
        )
        assert [r.run_id for r in foreign] == [v1.run_id]  # pinned elsewhere; not "any"
        mine = await store.claim_runs(
            self.app, "w1", ["wf"], stale_before=now, limit=10, versions=["v2"]
        )
        assert sorted(r.run_id for r in mine) == sorted([v2.run_id, anyv.run_id])
        assert await store.claim_runs(
            self.app, "w2", ["wf"], stale_before=now, limit=10, run_ids=[v2.run_id]
        ) == []  # owned by a live worker
        [got] = await store.claim_runs(
            self.app, "w2", ["wf"], stale_before=now, limit=10, run_ids=[v1.run_id]
        )
        assert got.run_id == v1.run_id and got.version == "v1"
        assert await store.foreign_runs(
            self.app, "w1", ["wf"], versions=["v2"], stale_before=now, limit=10
        ) == []  # now owned by w2, alive

    async def test_a_claim_pins_the_runs_it_takes_to_a_version(self, store: Store) -> None:
        v1, _ = await store.create_run(new_run(self.app, version="v1"))
        none, _ = await store.create_run(new_run(self.app))
        kept, _ = await store.create_run(new_run(self.app, version="v1"))
        now = await self.live(store, "w2")
        got = await store.claim_runs(self.app, "w2", ["wf"], stale_before=now, limit=10,
                                     run_ids=[v1.run_id, none.run_id], pin_version="v2")
        assert sorted((r.run_id, r.version) for r in got) == sorted(
            [(v1.run_id, "v2"), (none.run_id, "v2")]
        )
        for run_id, version in ((v1.run_id, "v2"), (none.run_id, "v2"), (kept.run_id, "v1")):
            stored = await store.get_run(self.app, run_id)
            assert stored is not None and stored.version == version
        [same] = await store.claim_runs(self.app, "w2", ["wf"], stale_before=now, limit=10)
        assert (same.run_id, same.version) == (kept.run_id, "v1")  # no pin: kept as it was

    async def test_a_claim_keeps_the_version_of_the_runs_it_is_told_to(
        self, store: Store
    ) -> None:
        """``keep_versions_of``: a claimed run of one of those workflows (a saga's)
        pinned to another version keeps it, one pinned to none is pinned, and the runs
        of other workflows are pinned as ever (docs/operating.md, versions); a queue's
        claim does the same (``claim_queued_runs``)."""
        saga_v1, _ = await store.create_run(new_run(self.app, "saga", version="v1"))
        saga_none, _ = await store.create_run(new_run(self.app, "saga"))
        plain_v1, _ = await store.create_run(new_run(self.app, version="v1"))
        now = await self.live(store, "w2")
        got = await store.claim_runs(self.app, "w2", ["wf", "saga"], stale_before=now,
                                     limit=10, pin_version="v2", keep_versions_of=["saga"])
        expected = [(saga_v1.run_id, "v1"), (saga_none.run_id, "v2"), (plain_v1.run_id, "v2")]
        assert sorted((r.run_id, r.version) for r in got) == sorted(expected)
        for run_id, version in expected:
            stored = await store.get_run(self.app, run_id)
            assert stored is not None and stored.version == version
        # as checked (run_ids, unchanged: a worker of another version takes it)
        saga_v0, _ = await store.create_run(new_run(self.app, "saga", version="v0"))
        [taken] = await store.claim_runs(
            self.app, "w2", ["saga"], stale_before=now, limit=10, run_ids=[saga_v0.run_id],
            unchanged=[saga_v0.updated_at], pin_version="v2", keep_versions_of=["saga"])
        assert (taken.run_id, taken.version) == (saga_v0.run_id, "v0")

    async def test_a_claim_of_runs_as_read_leaves_a_run_moved_on_since(
        self, store: Store
    ) -> None:
        """``unchanged``: a worker that checked a run as it read it does not claim it once
        another worker has moved it on (its check no longer holds)."""
        run, _ = await store.create_run(new_run(self.app, version="v1"))
        now = await self.live(store, "w1", "w2")
        [read] = await store.foreign_runs(self.app, "w2", ["wf"], versions=["v2"],
                                          stale_before=now, limit=10)
        [mine] = await store.claim_runs(self.app, "w1", ["wf"], stale_before=now, limit=10,
                                        versions=["v1"])  # the run's own worker, meanwhile
        await asyncio.sleep(0.01)  # (a later time than the read)
        await store.commit_run(self.app, run.run_id, mine.fence, RunWrite(
            entries=[entry("a#1", 1)], release=True))
        assert await store.claim_runs(
            self.app, "w2", ["wf"], stale_before=now, limit=10, run_ids=[run.run_id],
            unchanged=[read.updated_at], pin_version="v2",
        ) == []
        moved = await store.get_run(self.app, run.run_id)
        assert moved is not None and (moved.owner, moved.version) == (None, "v1")
        [got] = await store.claim_runs(
            self.app, "w2", ["wf"], stale_before=now, limit=10, run_ids=[run.run_id],
            unchanged=[moved.updated_at], pin_version="v2",
        )
        assert (got.run_id, got.owner, got.version) == (run.run_id, "w2", "v2")

    async def test_a_repin_moves_a_live_run_held_by_nobody_as_it_was_read(
        self, store: Store
    ) -> None:
        """``repin_run`` (a rollback's re-pin, docs/operating.md): a live run of
        ``from_version`` that nobody holds, as the caller read it, is pinned to
        ``to_version`` and audited; a run held by a live worker, moved on since, of
        another version, or ended, is left as it is."""
        now = await self.live(store, "w1")
        free, _ = await store.create_run(new_run(self.app, version="v2"))
        held, _ = await store.create_run(new_run(self.app, version="v2"))
        other, _ = await store.create_run(new_run(self.app, version="v3"))
        ended = await self._run(store, status=RunStatus.FAILED, version="v2")
        [mine] = await store.claim_runs(self.app, "w1", ["wf"], stale_before=now, limit=1,
                                        run_ids=[held.run_id])
        before = len(await store.audit_records(self.app))

        async def repin(run: RunRecord, unchanged: float | None = None) -> RunRecord | None:
            return await store.repin_run(
                self.app, run.run_id, from_version="v2", to_version="v1",
                unchanged=run.updated_at if unchanged is None else unchanged,
                stale_before=time.time(), actor="ops:ann",
            )

        assert await repin(free, unchanged=free.updated_at - 1.0) is None  # read before
        assert await repin(mine) is None  # a live worker holds it
        assert await repin(other) is None  # pinned to another version
        assert await repin(ended) is None  # not live
        got = await repin(free)
        assert got is not None and (got.run_id, got.version, got.owner) == (
            free.run_id, "v1", None)
        for run, version in ((free, "v1"), (held, "v2"), (other, "v3"), (ended, "v2")):
            stored = await store.get_run(self.app, run.run_id)
            assert stored is not None and stored.version == version
        assert await repin(free) is None  # (no longer of v2)
        records = await store.audit_records(self.app, after_seq=before)
        assert [(r.actor, r.action, r.target, codec.loads(r.data)) for r in records] == [
            ("ops:ann", "run.repinned", free.run_id,
             {"from_version": "v2", "to_version": "v1"})]
        assert (await store.verify_audit(self.app)).ok
        # once its holder is gone (its lease ran out), the held run may be re-pinned too
        stored = await store.get_run(self.app, held.run_id)
        assert stored is not None
        assert (await store.repin_run(
            self.app, held.run_id, from_version="v2", to_version="v1",
            unchanged=stored.updated_at, stale_before=time.time() + LEASE + 1, actor="ops",
        )) is not None

    # -- retry -------------------------------------------------------------------------

    async def test_retry_supersedes_the_failed_step_and_what_followed(
        self, store: Store
    ) -> None:
        t = time.time()
        run = await self._run(
            store,
            attrs("set_attributes#1", 1, stage="start"),
            entry("a#1", 2),
            entry("b#1", 3, status=ENTRY_FAILED, error="E: x", attempts=2),
            attrs("set_attributes#2", 4, stage="failing"),
            HistoryEntry("compensate:undo#1", COMPENSATION, "undo", EntryStatus.COMPLETED, seq=5),
            status=RunStatus.FAILED,
            attempts=(Attempt("a#1", 1, t, t), Attempt("b#1", 1, t, t, "E", "x"),
                      Attempt("b#1", 2, t, t, "E", "x")),
            deadline_at=1.0,
        )
        before = len(await store.audit_records(self.app))
        retried = await store.retry_run(
            self.app, run.run_id, include_compensated=False, version="v9", actor="ops:ann",
            now=time.time(),
        )
        assert (retried.status, retried.epoch, retried.version) == (
            RunStatus.PENDING, 1, "v9"
        )
        assert (retried.error, retried.owner, retried.flagged, retried.deadline_at) == (
            None, None, False, None  # a deadline already passed is dropped
        )
        assert [e.key for e in await store.load_history(self.app, run.run_id)] == [
            "set_attributes#1", "a#1"
        ]
        assert [a.key for a in await store.load_attempts(self.app, run.run_id)] == ["a#1"]
        old = await store.superseded_history(self.app, run.run_id)
        assert [(epoch, e.key) for epoch, e in old] == [
            (1, "b#1"), (1, "set_attributes#2"), (1, "compensate:undo#1")
        ]
        assert old[0][1].status == ENTRY_FAILED and old[0][1].attempts == 2
        assert [(epoch, a.key, a.attempt, a.error) for epoch, a in
                await store.superseded_attempts(self.app, run.run_id)] == [
            (1, "b#1", 1, "x"), (1, "b#1", 2, "x")
        ]
        assert await store.run_attributes(self.app, [run.run_id]) == {
            run.run_id: {"stage": "start"}
        }
        records = await store.audit_records(self.app, after_seq=before)
        assert [(r.actor, r.action, r.target) for r in records] == [
            ("ops:ann", "run.retried", run.run_id)
        ]
        assert (await store.verify_audit(self.app)).ok
        # The retried run is claimable again, and a second failure is retried as epoch 2.
        [claimed] = await self.claim(store, "w9")
        await store.commit_run(self.app, run.run_id, claimed.fence, RunWrite(
            entries=[entry("b#1", 3, status=ENTRY_FAILED, error="E: y")],
            status=RunStatus.FAILED, release=True,
        ))
        again = await store.retry_run(
            self.app, run.run_id, include_compensated=False, version=None, actor="ops",
            now=time.time(),
        )
        assert again.epoch == 2 and again.version is None
        assert [(epoch, e.key) for epoch, e in
                await store.superseded_history(self.app, run.run_id)][-1] == (2, "b#1")

    async def test_retry_keeps_compensations_run_before_the_failed_step(
        self, store: Store
    ) -> None:
        run = await self._run(
            store, entry("a#1", 1),
            HistoryEntry("compensate:undo#1", COMPENSATION, "undo", EntryStatus.COMPLETED, seq=2),
            entry("b#1", 3, status=ENTRY_FAILED, error="E: x"),
            HistoryEntry("compensate:undo#2", COMPENSATION, "undo", EntryStatus.COMPLETED, seq=4),
            status=RunStatus.FAILED,
        )
        await store.retry_run(self.app, run.run_id, include_compensated=False, version=None,
                              actor="ops", now=time.time())
        assert [e.key for e in await store.load_history(self.app, run.run_id)] == [
            "a#1", "compensate:undo#1"  # the workflow's own ctx.compensate stays done
        ]

    async def test_retry_without_a_failed_step_replays_all_but_compensations(
        self, store: Store
    ) -> None:
        run = await self._run(
            store, entry("a#1", 1),
            HistoryEntry("compensate:undo#1", COMPENSATION, "undo", EntryStatus.COMPLETED, seq=2),
            status=RunStatus.COMPENSATED,
        )
        with pytest.raises(RunNotRetryable, match="include_compensated"):
            await store.retry_run(self.app, run.run_id, include_compensated=False,
                                  version=None, actor="ops", now=time.time())
        await store.retry_run(self.app, run.run_id, include_compensated=True, version=None,
                              actor="ops", now=time.time())
        assert [e.key for e in await store.load_history(self.app, run.run_id)] == ["a#1"]

    @pytest.mark.parametrize("status", [RunStatus.RUNNING, RunStatus.COMPLETED,
                                        RunStatus.CANCELLED])
    async def test_retry_refusals_change_nothing(
        self, store: Store, status: RunStatus
    ) -> None:
        run = await self._run(
            store, entry("a#1", 1, status=ENTRY_FAILED if status.is_final else ENTRY_RUNNING),
            status=status,
        )
        before = await self._snapshot(store, run.run_id)
        error = RunInProgress if status == RunStatus.RUNNING else RunNotRetryable
        with pytest.raises(error, match=run.run_id):
            await store.retry_run(self.app, run.run_id, include_compensated=True,
                                  version=None, actor="ops", now=time.time())
        assert await self._snapshot(store, run.run_id) == before
        with pytest.raises(RunNotFound):
            await store.retry_run(self.app, "nope", include_compensated=True, version=None,
                                  actor="ops", now=time.time())

    # -- fork --------------------------------------------------------------------------

    async def test_fork_copies_the_history_before_a_step(self, store: Store) -> None:
        t = time.time()
        source = await self._run(
            store, attrs("set_attributes#1", 1, customer="c1"), entry("a#1", 2),
            entry("b#1", 3), attrs("set_attributes#2", 4, customer="c2"), entry("c#1", 5),
            HistoryEntry("compensate:undo#1", COMPENSATION, "undo", EntryStatus.COMPLETED, seq=6),
            attempts=(Attempt("a#1", 1, t, t), Attempt("b#1", 1, t, t)),
            status=RunStatus.COMPLETED,
        )
        new = new_run(self.app, run_id=codec.new_id(), args=source.args, version="v2")
        forked = await store.fork_run(self.app, source.run_id, new, before_key="b#1",
                                      actor="ops:bob")
        assert forked.run_id == new.run_id
        got = await store.get_run(self.app, new.run_id)
        assert got is not None and (got.status, got.version, got.owner) == (
            RunStatus.PENDING, "v2", None
        )
        assert [e.key for e in await store.load_history(self.app, new.run_id)] == [
            "set_attributes#1", "a#1"
        ]
        assert [a.key for a in await store.load_attempts(self.app, new.run_id)] == ["a#1"]
        assert await store.run_attributes(self.app, [new.run_id]) == {
            new.run_id: {"customer": "c1"}
        }
        actions = [(r.actor, r.action) for r in await store.audit_records(self.app)][-2:]
        assert actions == [("ops:bob", "run.created"), ("ops:bob", "run.forked")]
        # the source is untouched
        assert len(await store.load_history(self.app, source.run_id)) == 6

    async def test_fork_refusals_change_nothing(self, store: Store) -> None:
        live = await self._run(store, entry("a#1", 1))
        ended = await self._run(store, entry("a#1", 1), status=RunStatus.FAILED)
        before = await self._snapshot(store, ended.run_id)
        with pytest.raises(RunInProgress):
            await store.fork_run(self.app, live.run_id, new_run(self.app), before_key="a#1",
                                 actor="ops")
        with pytest.raises(StepNotInHistory, match="a#1"):
            await store.fork_run(self.app, ended.run_id, new_run(self.app),
                                 before_key="never#1", actor="ops")
        with pytest.raises(RunNotFound):
            await store.fork_run(self.app, "nope", new_run(self.app), before_key="a#1",
                                 actor="ops")
        assert await self._snapshot(store, ended.run_id) == before

    # -- dead letters --------------------------------------------------------------------

    async def test_discard_dead_letter(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"))
        e = ev()
        await store.append_events(self.app, [e])
        await store.settle_delivery(self.app, "g", e.id, Settlement(
            "dead", 3, error="E: bad", dead_letter_id="dl-x"
        ))
        dl = await store.discard_dead_letter(self.app, "dl-x", actor="ops:cy")
        assert (dl.id, dl.group, dl.event.id) == ("dl-x", "g", e.id)
        assert await store.dead_letters(self.app) == []
        assert await self.claim_d(store, "w", ["g"]) == []  # not redelivered
        last = (await store.audit_records(self.app))[-1]
        assert (last.actor, last.action) == ("ops:cy", "dead_letter.discarded")
        with pytest.raises(DeadLetterNotFound):
            await store.discard_dead_letter(self.app, "dl-x", actor="ops")
