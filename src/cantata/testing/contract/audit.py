"""The store contract, part four: the hash-chained audit log and its verification."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from cantata.errors import DeadLetterNotFound, LeaseLost, StoreCorrupt
from cantata.model.flow import QueueEntry
from cantata.model.records import (
    ENTRY_FAILED,
    ENTRY_RUNNING,
    Attempt,
    AuditRecord,
    AuditReport,
    RunWrite,
    TaskRecord,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.base import Settlement, Store
from cantata.testing.contract.support import StoreFixtures, entry, ev, new_run


def remote(run_id: str, key: str) -> TaskRecord:
    return TaskRecord(f"{run_id}:{key}", run_id, key, key.split("#")[0], "inventory", "[]")


def assert_chained(records: list[AuditRecord]) -> None:
    """Contiguous from #1, each linked to the previous one, each hash recomputable."""
    assert [r.seq for r in records] == list(range(1, len(records) + 1))
    prev = audit.GENESIS_HASH
    for r in records:
        assert r.prev_hash == prev and audit.record_hash(r) == r.hash
        assert json.loads(r.data) is not None
        prev = r.hash


class AuditContract(StoreFixtures):
    """Every state change and operator action, with its actor, in one chain per app."""

    async def log(self, store: Store, app: str | None = None) -> list[AuditRecord]:
        return await store.audit_records(self.app if app is None else app, limit=100_000)

    async def busy(self, store: Store, runs: int = 4) -> int:
        """Make some audited history (3 records per run); returns the record count."""
        for _ in range(runs):
            run, _ = await store.create_run(new_run(self.app))
            await store.commit_run(self.app, run.run_id, 0, RunWrite(
                entries=[entry("a#1", 1)], status=RunStatus.RUNNING
            ))
            await store.commit_run(self.app, run.run_id, 0, RunWrite(
                status=RunStatus.COMPLETED, result="1", release=True
            ))
        return 3 * runs

    async def test_state_changes_are_audited_with_their_actor(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.*"))
        run, _ = await store.create_run(new_run(self.app, correlation_id="c"))
        [claimed] = await self.claim(store, "w1")
        rid, f = run.run_id, claimed.fence

        async def commit(**kw: Any) -> None:
            await store.commit_run(self.app, rid, f, RunWrite(**kw))

        await commit(status=RunStatus.RUNNING)
        # The hot path (an attempt starts, an entry runs) and no-op status: no record.
        await commit(entries=[entry("a#1", 1, ENTRY_RUNNING)], attempts=[Attempt("a#1", 1, 1.0)])
        await commit(status=RunStatus.RUNNING)
        await commit(entries=[entry("a#1", 1)], attempts=[Attempt("a#1", 1, 1.0, 2.0)])
        placed, failed = ev("order.placed"), ev("order.failed")
        await commit(entries=[entry("b#1", 2, ENTRY_FAILED, error="E: x")], events=[placed],
                     tasks=[remote(rid, "inventory.reserve#1")])
        # (the task is claimed while its run is live: a task of an ended run never is)
        [t] = await store.claim_tasks(self.app, "inv-w", ["inventory"], now=time.time(),
                                      stale_before=0, limit=5)
        await store.finish_task(self.app, t.task_id, t.fence, outcome="retry", error="E: r",
                                error_type="E", attempts=[])
        [t] = await store.claim_tasks(self.app, "inv-w", ["inventory"], now=time.time(),
                                      stale_before=0, limit=5)
        await store.finish_task(self.app, t.task_id, t.fence, outcome="done", result="7",
                                attempts=[])
        other, _ = await store.create_run(new_run(self.app))
        await store.request_cancel(self.app, other.run_id, actor="cli:alice")
        await commit(status=RunStatus.COMPLETED, result="1", flagged=True, release=True)
        await store.request_cancel(self.app, rid)  # ended: recorded, not applied
        assert await store.request_cancel(self.app, "missing", actor="x") is None
        [d] = await self.claim_d(store, "w2", ["g"])
        await store.settle_delivery(self.app, "g", placed.id, Settlement(
            "retry", 1, error="E: y", retry_at=0.0))
        [d] = await self.claim_d(store, "w2", ["g"])  # released by the retry: claimed again
        await store.settle_delivery(self.app, "g", placed.id, Settlement("done", 2, [failed]))
        await store.settle_delivery(self.app, "g", failed.id, Settlement(
            "dead", 3, error="E: z", dead_letter_id="dl-1"))
        await store.replay_dead_letter(self.app, "dl-1", time.time(), actor="api:bob")

        records = await self.log(store)
        assert_chained(records)
        summary = [(r.actor, r.action, r.target, json.loads(r.data)) for r in records]
        assert summary == [
            ("system", "run.created", rid, {"workflow": "wf", "correlation_id": "c"}),
            ("worker:w1", "run.status", rid, {"status": "running"}),
            ("worker:w1", "run.checkpoint", rid, {"completed": ["a#1"]}),
            ("worker:w1", "run.checkpoint", rid, {
                "failed": ["b#1"], "events": [placed.id], "tasks": ["inventory.reserve#1"]}),
            ("worker:inv-w", "task.done", t.task_id,
             {"step": "inventory.reserve", "service": "inventory", "attempts": 2}),
            ("system", "run.created", other.run_id,
             {"workflow": "wf", "correlation_id": other.correlation_id}),
            ("cli:alice", "run.cancel_requested", other.run_id,
             {"status": "pending", "applied": True}),
            ("worker:w1", "run.status", rid, {"status": "completed", "flagged": True}),
            ("system", "run.cancel_requested", rid, {"status": "completed", "applied": False}),
            ("worker:w2", "delivery.done", f"g:{placed.id}",
             {"attempts": 2, "events": [failed.id]}),
            ("system", "delivery.dead", f"g:{failed.id}",
             {"attempts": 3, "error": "E: z", "dead_letter_id": "dl-1"}),
            ("api:bob", "dead_letter.replayed", f"g:{failed.id}", {"dead_letter_id": "dl-1"}),
        ]
        assert d.event == placed
        assert all(r.time >= records[0].time - 1 for r in records)

    async def test_child_runs_and_failed_tasks_are_audited(self, store: Store) -> None:
        parent, _ = await store.create_run(new_run(self.app))
        child, _ = await store.create_run(new_run(self.app, parent_run_id=parent.run_id))
        await store.commit_run(self.app, parent.run_id, 0, RunWrite(
            tasks=[remote(parent.run_id, "inventory.reserve#1")]))
        [t] = await store.claim_tasks(self.app, "inv-w", ["inventory"], now=time.time(),
                                      stale_before=0, limit=5)
        await store.finish_task(self.app, t.task_id, t.fence, outcome="failed",
                                error="KeyError: 'sku'", error_type="KeyError", attempts=[])
        records = await self.log(store)
        assert json.loads(records[1].data)["parent_run_id"] == parent.run_id
        assert (records[-1].actor, records[-1].action, json.loads(records[-1].data)) == (
            "worker:inv-w", "task.failed", {"step": "inventory.reserve", "service": "inventory",
                                            "attempts": 1, "error": "KeyError: 'sku'"},
        )
        assert child.parent_run_id == parent.run_id

    async def test_a_run_an_operator_starts_is_created_by_them(
        self, store: Store, peer: Store
    ) -> None:
        ann = "cli:ann@host"
        alone, _ = await store.create_run(new_run(self.app), actor=ann)
        owned = new_run(self.app, owner="w1", fence=1)  # with its first checkpoint
        await store.create_run(owned, RunWrite(status=RunStatus.RUNNING), actor=ann)
        queued, _ = await store.create_queued_run(new_run(self.app), QueueEntry("q"),
                                                  actor="token:bo")
        keyed, created = await store.create_run(
            new_run(self.app, idempotency_key="k", args_hash="h"), actor=ann)
        at_once = [new_run(self.app) for _ in range(4)]  # grouped with others' writes
        await asyncio.gather(*(
            (store if i % 2 else peer).create_run(r, actor=ann if i < 2 else audit.SYSTEM)
            for i, r in enumerate(at_once)))
        plain, _ = await store.create_run(new_run(self.app))
        again, repeated = await peer.create_run(
            new_run(self.app, idempotency_key="k", args_hash="h"), actor="token:bo")
        records = await self.log(store)
        assert_chained(records)
        by = {r.target: r.actor for r in records if r.action == "run.created"}
        assert by == {
            alone.run_id: ann, owned.run_id: ann, queued.run_id: "token:bo",
            keyed.run_id: ann, at_once[0].run_id: ann, at_once[1].run_id: ann,
            at_once[2].run_id: "system", at_once[3].run_id: "system", plain.run_id: "system",
        }
        # the repeated start made nothing: no record of it
        assert created and not repeated and again.run_id == keyed.run_id
        assert [r.action for r in records].count("run.created") == 9
        assert (await store.verify_audit(self.app)).ok

    async def test_an_operator_publish_is_audited_once_with_its_events(
        self, store: Store, peer: Store
    ) -> None:
        """``append_events(actor=)`` (and ``append_held``) records ``event.published`` for
        each event it stores, in its transaction; an event stored before (a retried
        publish, another store's, a racing one) gets no second record."""
        await self.handlers(store, ("g", "order.*"))
        await self.live(store, "w1")
        ann, bo = "cli:ann@host", "token:bo"
        placed, noted, held, raced = (ev(t) for t in (
            "order.placed", "order.noted", "order.held", "order.raced"))
        assert await store.append_events(self.app, [placed, noted], actor=ann) == [1, 1]
        assert await peer.append_events(self.app, [placed], actor=ann) == [0]  # a retry
        counts, pairs = await peer.append_held(
            self.app, [held, placed], hold_for="w1", hold=[("g", held.id), ("g", placed.id)],
            actor=bo)
        assert counts == [1, 0] and pairs in ([], [("g", held.id)])
        await asyncio.gather(*(
            (store if i % 2 else peer).append_events(self.app, [raced], actor=ann)
            for i in range(4)))
        await store.append_events(self.app, [ev()])  # no operator: no record
        records = await self.log(store)
        assert_chained(records)
        assert [(r.actor, r.action, r.target, json.loads(r.data)) for r in records] == [
            (ann, "event.published", placed.id, {"type": "order.placed"}),
            (ann, "event.published", noted.id, {"type": "order.noted"}),
            (bo, "event.published", held.id, {"type": "order.held"}),
            (ann, "event.published", raced.id, {"type": "order.raced"}),
        ]
        assert (await store.verify_audit(self.app)).ok

    async def test_an_append_says_which_events_it_stored(
        self, store: Store, peer: Store
    ) -> None:
        """``stored=``: set, per event, to whether this call stored it (a count of 0
        does not tell: an event stored here may go to no group). Of appends of one new
        id at the same moment, exactly one says so: ``app.publish`` ends the others as
        repeats of it (docs/security.md)."""
        await self.handlers(store, ("g", "order.*"))
        await self.live(store, "w1")
        placed, lonely = ev("order.placed"), ev("nobody.listens")
        said: list[bool] = [True]  # (set, not appended to)
        assert await store.append_events(self.app, [placed, placed, lonely],
                                         stored=said) == [1, 0, 0]
        assert said == [True, False, True]
        again: list[bool] = []
        assert await peer.append_events(self.app, [lonely], actor="cli:ann@host",
                                        stored=again) == [0]
        assert again == [False]
        held, fresh = ev("order.held"), ev("order.fresh")
        told: list[bool] = []
        counts, _ = await peer.append_held(
            self.app, [held, placed, fresh], hold_for="w1",
            hold=[("g", held.id), ("g", placed.id)], stored=told)
        assert counts == [1, 0, 1] and told == [True, False, True]
        for actor in (None, "cli:ann@host"):
            raced = ev("order.raced")
            lists: list[list[bool]] = [[] for _ in range(4)]
            await asyncio.gather(*(
                (store if i % 2 else peer).append_events(
                    self.app, [raced], actor=actor, stored=lists[i])
                for i in range(4)))
            assert sorted(one[0] for one in lists) == [False, False, False, True], lists
        records = await self.log(store)
        assert [r.action for r in records].count("event.published") == 1
        assert (await store.verify_audit(self.app)).ok

    async def test_an_operator_publish_that_cannot_be_audited_stores_nothing(
        self, store: Store
    ) -> None:
        """Its record cannot be appended (one forged past the chain head takes its
        place): the event, its deliveries and the record are all left out."""
        await self.handlers(store, ("g", "order.*"))
        n = await self.busy(store, 1)
        await self.tamper(store, self.app, n, "forge")
        e = ev()
        with pytest.raises(StoreCorrupt, match="tampered"):
            await store.append_events(self.app, [e], actor="cli:ann@host")
        with pytest.raises(StoreCorrupt, match="tampered"):
            await store.append_held(self.app, [e], hold_for="w1", hold=[("g", e.id)],
                                    actor="cli:ann@host")
        assert await store.get_event(self.app, e.id) is None
        assert await store.deliveries(self.app, e.id) == []
        assert len(await self.log(store)) == n + 1  # the chain and the forged record

    async def test_writes_that_change_nothing_record_nothing(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"))
        run, _ = await store.create_run(new_run(self.app, idempotency_key="k", args_hash="h"))
        e = ev()
        await store.commit_run(self.app, run.run_id, 0, RunWrite(
            events=[e], tasks=[remote(run.run_id, "s#1")]))
        await store.settle_delivery(self.app, "g", e.id, Settlement("done", 1))
        before = await self.log(store)
        assert [r.action for r in before] == ["run.created", "run.checkpoint", "delivery.done"]
        await store.create_run(new_run(self.app, idempotency_key="k", args_hash="h"))
        with pytest.raises(LeaseLost):
            await store.commit_run(self.app, run.run_id, 9, RunWrite(
                status=RunStatus.FAILED, entries=[entry("x#1", 1)]))
        assert not await store.settle_delivery(self.app, "g", e.id, Settlement("done", 2))
        with pytest.raises(DeadLetterNotFound):
            await store.replay_dead_letter(self.app, "nope", time.time(), actor="x")
        assert not await store.finish_task(self.app, f"{run.run_id}:s#1", 7, outcome="done",
                                           attempts=[])
        assert await self.log(store) == before

    async def test_audit_records_page_by_seq(self, store: Store) -> None:
        n = await self.busy(store, 2)
        assert [r.seq for r in await store.audit_records(self.app)] == list(range(1, n + 1))
        page = await store.audit_records(self.app, after_seq=2, limit=2)
        assert [r.seq for r in page] == [3, 4]
        assert await store.audit_records(self.app, after_seq=n) == []
        assert await store.audit_records(self.app + "-b") == []

    async def test_each_app_has_its_own_chain(self, store: Store) -> None:
        await store.create_run(new_run(self.app))
        await store.create_run(new_run(self.app + "-b"))
        await store.create_run(new_run(self.app))
        a, b = await self.log(store), await self.log(store, self.app + "-b")
        assert_chained(a)
        assert_chained(b)
        assert (len(a), len(b)) == (2, 1)
        assert (await store.verify_audit(self.app + "-b")).ok

    async def test_concurrent_writers_keep_one_contiguous_chain(
        self, store: Store, peer: Store
    ) -> None:
        async def writer(s: Store, n: int) -> None:
            for _ in range(n):
                run, _ = await s.create_run(new_run(self.app))
                await s.commit_run(self.app, run.run_id, 0, RunWrite(entries=[entry("a#1", 1)]))

        await asyncio.gather(*(writer(store if i % 2 else peer, 6) for i in range(8)))
        records = await self.log(store)
        assert len(records) == 8 * 6 * 2
        assert_chained(records)
        assert await store.verify_audit(self.app) == AuditReport(True, len(records))

    async def test_untouched_log_verifies(self, store: Store) -> None:
        assert await store.verify_audit(self.app) == AuditReport(True, 0, None, None)
        n = await self.busy(store)
        assert await store.verify_audit(self.app) == AuditReport(True, n, None, None)

    @pytest.mark.parametrize("how", ["data", "hash", "prev_hash", "rehash", "delete"])
    async def test_tampering_in_the_middle_is_detected_and_named(
        self, store: Store, how: str
    ) -> None:
        n = await self.busy(store)
        await self.tamper(store, self.app, 5, how)
        report = await store.verify_audit(self.app)
        assert not report.ok and report.first_bad_seq == 5, report
        assert report.records == 4  # verified before the bad one
        expected = {"data": "changed", "hash": "changed", "prev_hash": "link",
                    "rehash": "rewritten", "delete": "missing"}[how]
        assert report.reason is not None and expected in report.reason
        assert "#5" in report.reason
        assert n > 5

    @pytest.mark.parametrize("how", ["data", "rehash", "delete"])
    async def test_tampering_with_the_last_record_is_detected(
        self, store: Store, how: str
    ) -> None:
        n = await self.busy(store, 2)
        await self.tamper(store, self.app, n, how)
        report = await store.verify_audit(self.app)
        assert not report.ok and report.first_bad_seq == n, report
        assert (await store.verify_audit(self.app + "-b")).ok

    async def test_tampering_with_the_first_record_is_detected(self, store: Store) -> None:
        await self.busy(store, 1)
        await self.tamper(store, self.app, 1, "rehash")
        report = await store.verify_audit(self.app)
        assert (report.ok, report.first_bad_seq, report.records) == (False, 1, 0)

    async def test_a_record_forged_past_the_head_is_detected(self, store: Store) -> None:
        n = await self.busy(store, 2)
        last = (await self.log(store))[-1]
        await self.tamper(store, self.app, n, "forge")
        for head in (None, (last.seq, last.hash)):  # with an exported head too
            report = await store.verify_audit(self.app, head=head)
            assert (report.ok, report.first_bad_seq, report.records) == (False, n + 1, n)
            assert report.reason is not None and "past the chain's head" in report.reason
            assert f"#{n + 1}" in report.reason and "outside Cantata" in report.reason
        assert (await store.verify_audit(self.app + "-b")).ok

    async def test_an_append_after_a_forged_record_names_the_tampering(
        self, store: Store
    ) -> None:
        n = await self.busy(store, 1)
        run, _ = await store.create_run(new_run(self.app))
        await self.tamper(store, self.app, n + 1, "forge")
        with pytest.raises(StoreCorrupt, match=r"audit log .* tampered.*cantata audit verify"):
            await store.create_run(new_run(self.app))
        with pytest.raises(StoreCorrupt, match=rf"record #{n + 2} lies past its chain head"):
            await store.commit_run(self.app, run.run_id, 0, RunWrite(
                status=RunStatus.COMPLETED, result="1", release=True))
        with pytest.raises(StoreCorrupt, match="tampered"):
            await store.record_action(self.app, "cli:alice", "run.retried", run.run_id, {})
        assert len(await self.log(store)) == n + 2  # nothing appended, nothing undone
        assert (await store.get_run(self.app, run.run_id)).status == RunStatus.PENDING  # type: ignore[union-attr]
        await store.create_run(new_run(self.app + "-b"))  # another app's chain: unaffected
