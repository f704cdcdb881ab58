"""The executable definition of the :class:`~cantata.store.base.Store` protocol.

``StoreContract`` has no ``Test`` prefix, so pytest collects it only through the
one small subclass per backend (``tests/contract/test_store_*.py`` in Cantata, or a
third-party package's own test module), which overrides
:meth:`~cantata.testing.contract.support.StoreFixtures.make_store` and
:meth:`~cantata.testing.contract.support.StoreFixtures.tamper`. Every test uses a
fresh random app name, so backends on a shared database (PostgreSQL) do not see
each other's leftovers. One module per role: the event log in ``events.py``, tasks
in ``tasks.py``, the audit log in ``audit.py`` (whose tampering tests need each
backend's ``tamper``) and its keyed chain through every write in ``keyed.py``, trace
reads in ``trace.py``, liveness by each worker's own lease in ``leases.py``, ...;
fixtures and helpers are in ``support.py``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from cantata.errors import IdempotencyConflict, LeaseLost, StoreUnavailable
from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import (
    DELIVERY_DEAD,
    DELIVERY_PENDING,
    ENTRY_RUNNING,
    Attempt,
    AuditReport,
    Declaration,
    RunWrite,
)
from cantata.model.status import RunStatus
from cantata.store.base import CANCEL, CLAIMS, EVENTS, RUNS, Settlement, Store
from cantata.testing.contract.audit import AuditContract
from cantata.testing.contract.console import ConsoleContract
from cantata.testing.contract.events import EventsContract
from cantata.testing.contract.first_attempts import FirstAttemptsContract
from cantata.testing.contract.flow import FlowContract
from cantata.testing.contract.groups import GroupsContract
from cantata.testing.contract.keyed import KeyedChainContract
from cantata.testing.contract.leases import LeasesContract
from cantata.testing.contract.operate import OperateContract
from cantata.testing.contract.outbox import OutboxContract
from cantata.testing.contract.parking import ParkingContract
from cantata.testing.contract.support import LEASE, entry, ev, json_values, new_run
from cantata.testing.contract.tasks import TasksContract
from cantata.testing.contract.trace import TraceContract
from cantata.testing.contract.wfapi import WorkflowApiContract
from cantata.testing.wait import eventually


class StoreContract(
    EventsContract,
    TasksContract,
    AuditContract,
    KeyedChainContract,
    OutboxContract,
    WorkflowApiContract,
    TraceContract,
    ConsoleContract,
    OperateContract,
    GroupsContract,
    FlowContract,
    ParkingContract,
    LeasesContract,
    FirstAttemptsContract,
):
    """Behaviour every store backend must have.

    Subclasses override :meth:`make_store` and :meth:`tamper`.
    """

    # -- lifecycle ----------------------------------------------------------------

    async def test_is_a_store_and_reopen_is_harmless(self, store: Store) -> None:
        assert isinstance(store, Store)
        await store.open()
        assert await store.get_run(self.app, "nope") is None

    async def test_unopened_store_raises_unavailable(self) -> None:
        s = await self.make_store()
        with pytest.raises(StoreUnavailable):
            await s.get_run(self.app, "x")
        await s.close()

    async def test_listeners_hear_own_writes(self, store: Store) -> None:
        heard: list[str] = []
        store.add_listener(heard.append)
        run, _ = await store.create_run(new_run(self.app))
        await eventually(lambda: RUNS in heard)
        await store.append_events(self.app, [ev()])
        await eventually(lambda: EVENTS in heard and CLAIMS in heard)
        await store.request_cancel(self.app, run.run_id)
        await eventually(lambda: CANCEL in heard)

    async def test_commits_that_may_make_claims_say_claims(self, store: Store) -> None:
        """``claims`` (a consumer may find a delivery to claim) comes with every commit
        that stores events with a delivery pending or makes a delivery pending again;
        a store may leave it out for a settlement whose caller said ``wake=False``, or
        one that made no delivery claimable, never otherwise."""
        await store.declare(self.app, [Declaration("handler", "g", "order.*")])
        heard: list[str] = []
        store.add_listener(heard.append)
        placed, paid = ev("order.placed"), ev("order.paid")
        await store.append_events(self.app, [placed])
        await eventually(lambda: CLAIMS in heard)
        heard.clear()
        assert await store.settle_delivery(self.app, "g", placed.id, Settlement(
            "retry", 1, error="E: x", retry_at=time.time()))
        await eventually(lambda: CLAIMS in heard)
        heard.clear()
        assert await store.settle_delivery(self.app, "g", placed.id, Settlement(
            "done", 2, [paid]))
        await eventually(lambda: CLAIMS in heard)

    async def test_close_finishes_pending_writes(self) -> None:
        s = await self.make_store()
        await s.open()
        run = new_run(self.app)
        pending = asyncio.create_task(s.create_run(run))
        await asyncio.sleep(0)
        await s.close()
        assert (await pending)[1]
        if self.shares_database:
            again = await self.make_store()
            await again.open()
            try:
                assert await again.get_run(self.app, run.run_id) == run
            finally:
                await again.close()

    async def test_a_failing_write_does_not_undo_concurrent_ones(self, store: Store) -> None:
        a, _ = await store.create_run(new_run(self.app))
        b, _ = await store.create_run(new_run(self.app))
        emitted, published = ev("b.did"), ev("x.happened")
        results = await asyncio.gather(
            store.commit_run(self.app, a.run_id, 7, RunWrite(status=RunStatus.COMPLETED)),
            store.commit_run(self.app, b.run_id, 0, RunWrite(
                status=RunStatus.COMPLETED, events=[emitted])),
            store.append_events(self.app, [published]),
            return_exceptions=True,
        )
        assert isinstance(results[0], LeaseLost) and list(results[1:]) == [None, [0]]
        stored_a, stored_b = [await store.get_run(self.app, r.run_id) for r in (a, b)]
        assert stored_a is not None and stored_a.status == RunStatus.PENDING
        assert stored_b is not None and stored_b.status == RunStatus.COMPLETED
        assert await store.get_event(self.app, emitted.id) == emitted
        assert await store.get_event(self.app, published.id) == published

    async def test_many_concurrent_writes_all_land(self, store: Store) -> None:
        """Writes from many tasks at once (group-committed where the backend does)."""
        await self.handlers(store, ("g", "order.*"))
        runs = [(await store.create_run(new_run(self.app)))[0] for _ in range(30)]
        events = [ev() for _ in range(10)]
        results = await asyncio.gather(
            *(store.commit_run(self.app, r.run_id, 0, RunWrite(
                entries=[entry("a#1", 1)], attempts=[Attempt("a#1", 1, 1.0, 2.0)],
                status=RunStatus.COMPLETED, release=True,
            )) for r in runs),
            *(store.append_events(self.app, [e]) for e in events),
            *(store.create_run(new_run(self.app)) for _ in range(10)),
        )
        assert results[:40] == [None] * 30 + [[1]] * 10
        assert all(created for _, created in results[40:])  # type: ignore[misc]
        for r in runs:
            stored = await store.get_run(self.app, r.run_id)
            assert stored is not None and stored.status == RunStatus.COMPLETED
            assert [h.key for h in await store.load_history(self.app, r.run_id)] == ["a#1"]
            assert len(await store.load_attempts(self.app, r.run_id)) == 1
        for e in events:
            assert [d.group for d in await store.deliveries(self.app, e.id)] == ["g"]
        assert len(await store.list_runs(self.app, limit=100)) == 40
        assert await store.verify_audit(self.app) == AuditReport(True, 30 + 30 + 10)

    async def test_load_histories_is_load_history_and_attempts_of_each(
        self, store: Store
    ) -> None:
        """Many runs' histories in one call: the same entries and attempts, in the same
        order, as one run at a time; a run with none (or no such run) maps to empties."""
        runs = [(await store.create_run(new_run(self.app)))[0] for _ in range(3)]
        for i, r in enumerate(runs[:2]):
            for n in range(1, 4 + i):  # two attempts a step, the second unfinished
                await store.commit_run(self.app, r.run_id, 0, RunWrite(
                    entries=[entry(f"s{n}#1", n)],
                    attempts=[Attempt(f"s{n}#1", 1, 10.0 * n, 10.0 * n + 1),
                              Attempt(f"s{n}#1", 2, 10.0 * n + 2, None)],
                ))
        other = new_run(self.app + "-other")
        await store.create_run(other)
        ids = [r.run_id for r in runs] + [other.run_id, "no-such-run", runs[0].run_id]
        got = await store.load_histories(self.app, ids)
        assert set(got) == set(ids)
        for r in runs:
            assert got[r.run_id] == (await store.load_history(self.app, r.run_id),
                                     await store.load_attempts(self.app, r.run_id))
        assert [len(got[r.run_id][0]) for r in runs] == [3, 4, 0]
        assert [len(got[r.run_id][1]) for r in runs] == [6, 8, 0]
        assert got[other.run_id] == got["no-such-run"] == ([], [])  # another app's run
        assert await store.load_histories(self.app, []) == {}

    # -- declarations and workers ---------------------------------------------------

    async def test_declare_is_a_union_by_key(self, store: Store) -> None:
        await store.declare(
            self.app, [Declaration("workflow", "wf"), Declaration("handler", "g", "a.b")]
        )
        await store.declare(
            self.app, [Declaration("handler", "g", "a.b", service="svc", detail='{"x":1}'),
                       Declaration("trigger", "t", "a.*")]
        )
        got = sorted(await store.declarations(self.app), key=lambda d: (d.kind, d.name))
        assert got == [
            Declaration("handler", "g", "a.b", service="svc", detail='{"x":1}'),
            Declaration("trigger", "t", "a.*"),
            Declaration("workflow", "wf"),
        ]

    async def test_heartbeat_workers_and_remove(self, store: Store) -> None:
        await store.heartbeat(self.app, "w1", 100.0, "host-a", lease=LEASE)
        await store.heartbeat(self.app, "w2", 150.0, None, lease=LEASE)
        await store.heartbeat(self.app, "w1", 200.0, "host-b", lease=LEASE)
        workers = {w.worker_id: w for w in await store.workers(self.app)}
        assert set(workers) == {"w1", "w2"}
        assert (workers["w1"].started_at, workers["w1"].heartbeat_at) == (100.0, 200.0)
        assert workers["w1"].info == "host-b"
        await store.remove_worker(self.app, "w1")
        assert [w.worker_id for w in await store.workers(self.app)] == ["w2"]

    async def test_remove_worker_releases_its_runs_and_deliveries(self, store: Store) -> None:
        await self.live(store, "w1", "w2")
        await store.create_run(new_run(self.app))
        await self.handlers(store, ("g", "order.placed"))
        await store.append_events(self.app, [ev()])
        assert len(await self.claim(store, "w1")) == 1
        assert len(await self.claim_d(store, "w1", ["g"])) == 1
        assert await self.claim(store, "w2") == []
        assert await self.claim_d(store, "w2", ["g"]) == []
        await store.remove_worker(self.app, "w1")
        [run] = await self.claim(store, "w2")
        assert run.owner == "w2" and run.fence == 2
        assert len(await self.claim_d(store, "w2", ["g"])) == 1

    # -- runs -------------------------------------------------------------------------

    async def test_create_and_get_round_trip_every_field(self, store: Store) -> None:
        run = new_run(
            self.app, causation_id="cause", idempotency_key="k", args_hash="h",
            parent_run_id="parent", deadline_at=1_800_000_000.5, result='{"r":1}',
            error="E: x", cancel_requested=True, owner=None, fence=0, flagged=True,
            service="svc", status=RunStatus.RUNNING,
        )
        stored, created = await store.create_run(run)
        assert created and stored == run
        assert await store.get_run(self.app, run.run_id) == run
        assert await store.get_run(self.app, "missing") is None

    async def test_create_run_is_idempotent_by_key_and_args_hash(self, store: Store) -> None:
        first, created = await store.create_run(
            new_run(self.app, idempotency_key="k", args_hash="h")
        )
        assert created
        again, created = await store.create_run(
            new_run(self.app, idempotency_key="k", args_hash="h")
        )
        assert not created and again == first
        with pytest.raises(IdempotencyConflict, match="with different arguments"):
            await store.create_run(
                new_run(self.app, idempotency_key="k", args="[2]", args_hash="other"))
        with pytest.raises(IdempotencyConflict,
                           match=f"belongs to run {first.run_id} of workflow wf, not wf2"):
            await store.create_run(new_run(self.app, "wf2", idempotency_key="k", args_hash="h"))
        assert [r.run_id for r in await store.list_runs(self.app)] == [first.run_id]
        other_app, created = await store.create_run(
            new_run(self.app + "-b", idempotency_key="k", args_hash="x")
        )
        assert created and other_app.run_id != first.run_id

    async def test_create_run_compares_arguments_as_canonical_json(self, store: Store) -> None:
        """A hash of other text (a run stored before hashes were canonical, or dict keys
        in another order) does not make equal arguments conflict: the arguments are
        compared as JSON with sorted keys."""
        first, created = await store.create_run(new_run(
            self.app, idempotency_key="k", args='[{"id": 42, "total": 5}]', args_hash="old"))
        assert created
        again, created = await store.create_run(new_run(
            self.app, idempotency_key="k", args='[{"total":5,"id":42}]', args_hash="new"))
        assert not created and again == first
        for other in ('[{"total":5,"id":43}]', '[{"total":5,"id":42,"x":null}]',
                      '[{"total":5,"id":true}]', '[{"total":5,"id":42.5}]'):
            with pytest.raises(IdempotencyConflict, match="with different arguments"):
                await store.create_run(new_run(
                    self.app, idempotency_key="k", args=other, args_hash="new"))
        assert [r.run_id for r in await store.list_runs(self.app)] == [first.run_id]

    async def test_create_run_with_its_first_checkpoint(self, store: Store) -> None:
        """The first checkpoint commits with the run when it is created, and is dropped
        when the idempotency key names an existing run."""
        first = RunWrite(
            entries=[entry("a#1", 1)], attempts=[Attempt("a#1", 1, 1.0)],
            events=[ev("order.placed")], status=RunStatus.RUNNING,
        )
        run = new_run(self.app, idempotency_key="k", args_hash="h", owner="w1", fence=1)
        stored, created = await store.create_run(run, first)
        assert created and stored.run_id == run.run_id
        got = await store.get_run(self.app, run.run_id)
        assert got is not None and got.status == RunStatus.RUNNING and got.owner == "w1"
        assert [e.key for e in await store.load_history(self.app, run.run_id)] == ["a#1"]
        assert [a.key for a in await store.load_attempts(self.app, run.run_id)] == ["a#1"]
        assert await store.get_event(self.app, first.events[0].id) is not None
        await store.commit_run(self.app, run.run_id, 1, RunWrite(status=RunStatus.COMPLETED))

        dup = new_run(self.app, idempotency_key="k", args_hash="h", owner="w2", fence=1)
        other = RunWrite(entries=[entry("b#1", 1)], events=[ev("order.placed")],
                         status=RunStatus.FAILED)
        again, created = await store.create_run(dup, other)
        assert not created and again.run_id == run.run_id
        assert await store.load_history(self.app, dup.run_id) == []
        assert [e.key for e in await store.load_history(self.app, run.run_id)] == ["a#1"]
        assert await store.get_event(self.app, other.events[0].id) is None
        got = await store.get_run(self.app, run.run_id)
        assert got is not None and got.status == RunStatus.COMPLETED
        report = await store.verify_audit(self.app)
        assert report.ok

    async def test_concurrent_creates_with_one_key_make_one_run(
        self, store: Store, peer: Store
    ) -> None:
        a, b = await asyncio.gather(
            store.create_run(new_run(self.app, idempotency_key="k", args_hash="h")),
            peer.create_run(new_run(self.app, idempotency_key="k", args_hash="h")),
        )
        assert a[0].run_id == b[0].run_id
        assert sorted([a[1], b[1]]) == [False, True]
        assert len(await store.list_runs(self.app)) == 1

    async def test_list_runs_filters_newest_first_with_limit(self, store: Store) -> None:
        r1 = new_run(self.app, "a")
        r2 = new_run(self.app, "b", status=RunStatus.FAILED)
        r3 = new_run(self.app, "a", status=RunStatus.FAILED)
        r4 = new_run(self.app, "a")
        for r in (r1, r2, r3, r4):
            await store.create_run(r)

        async def ids(**kw: Any) -> list[str]:
            return [r.run_id for r in await store.list_runs(self.app, **kw)]

        assert await ids() == [r4.run_id, r3.run_id, r2.run_id, r1.run_id]
        assert await ids(limit=2) == [r4.run_id, r3.run_id]
        assert await ids(status=RunStatus.FAILED) == [r3.run_id, r2.run_id]
        assert await ids(workflow="a") == [r4.run_id, r3.run_id, r1.run_id]
        assert await ids(workflow="a", status=RunStatus.FAILED) == [r3.run_id]
        assert await ids(workflow="zzz") == []

    async def test_oldest_live_run_is_the_creation_of_the_oldest_run_not_final(
        self, store: Store
    ) -> None:
        assert await store.oldest_live_run(self.app) is None
        done = new_run(self.app, status=RunStatus.COMPLETED)
        compensating = new_run(self.app, status=RunStatus.COMPENSATING)
        running = new_run(self.app, status=RunStatus.RUNNING)
        pending = new_run(self.app)
        cancelled = new_run(self.app, status=RunStatus.CANCELLED)
        for r in (done, cancelled, new_run(f"{self.app}-other")):
            await store.create_run(r)
        assert await store.oldest_live_run(self.app) is None  # (and another app's runs)
        for r in (pending, running, compensating):
            await store.create_run(r)
        assert await store.oldest_live_run(self.app) == compensating.created_at
        claimed = await self.claim(store, "w1")
        by_id = {r.run_id: r for r in claimed}
        first = by_id[compensating.run_id]
        await store.commit_run(
            self.app,
            first.run_id,
            first.fence,
            RunWrite(status=RunStatus.COMPENSATED, release=True),
        )
        assert await store.oldest_live_run(self.app) == running.created_at

    async def test_claim_runs_takes_only_live_runs_of_given_workflows(self, store: Store) -> None:
        live = [new_run(self.app, status=s) for s in
                (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.COMPENSATING)]
        final = [new_run(self.app, status=s) for s in
                 (RunStatus.COMPLETED, RunStatus.COMPENSATED, RunStatus.FAILED,
                  RunStatus.CANCELLED)]
        for r in [*live, *final, new_run(self.app, "other")]:
            await store.create_run(r)
        assert await store.claim_runs(self.app, "w1", [], stale_before=0, limit=10) == []
        claimed = await self.claim(store, "w1")
        assert {r.run_id for r in claimed} == {r.run_id for r in live}
        assert all(r.owner == "w1" and r.fence == 1 for r in claimed)
        stored = await store.get_run(self.app, live[0].run_id)
        assert stored is not None and (stored.owner, stored.fence) == ("w1", 1)
        assert await self.claim(store, "w1") == []  # never the claimer's own runs

    async def test_claim_runs_respects_limit(self, store: Store) -> None:
        await self.live(store, "w1")
        for _ in range(5):
            await store.create_run(new_run(self.app))
        assert len(await self.claim(store, "w1", limit=2)) == 2
        assert len(await self.claim(store, "w2", limit=10)) == 3

    async def test_claim_runs_takes_over_stale_or_unknown_owners(self, store: Store) -> None:
        now = await self.live(store, "alive")
        await store.heartbeat(self.app, "stale", now - 60, None, lease=LEASE)
        for owner in ("alive", "stale", "ghost"):
            await store.create_run(new_run(self.app, owner=owner, fence=3, service=owner))
        claimed = await store.claim_runs(
            self.app, "w2", ["wf"], stale_before=now, limit=10
        )
        assert sorted(r.service or "" for r in claimed) == ["ghost", "stale"]
        assert all(r.owner == "w2" and r.fence == 4 for r in claimed)

    async def test_owned_runs_lists_live_runs_of_one_owner_with_their_fence(
        self, store: Store
    ) -> None:
        await self.live(store, "w1", "w2")
        mine = new_run(self.app)
        await store.create_run(mine)
        await store.create_run(new_run(self.app, owner="w2", fence=5))
        await store.create_run(new_run(self.app, owner="w1", fence=2,
                                       status=RunStatus.COMPLETED))
        assert await store.owned_runs(self.app, "w1") == {}
        [claimed] = await self.claim(store, "w1")
        assert await store.owned_runs(self.app, "w1") == {mine.run_id: claimed.fence}
        assert await store.owned_runs("other-app", "w1") == {}
        await store.commit_run(self.app, mine.run_id, claimed.fence, RunWrite(release=True))
        assert await store.owned_runs(self.app, "w1") == {}

    async def test_concurrent_claimers_never_share_a_run(self, store: Store, peer: Store) -> None:
        await self.live(store, "w1", "w2")
        runs = [new_run(self.app) for _ in range(30)]
        for r in runs:
            await store.create_run(r)
        seen: list[str] = []
        while True:
            a, b = await asyncio.gather(self.claim(store, "w1", 4), self.claim(peer, "w2", 4))
            if not a and not b:
                break
            seen += [r.run_id for r in a] + [r.run_id for r in b]
        assert sorted(seen) == sorted(r.run_id for r in runs)

    async def test_commit_run_applies_a_checkpoint(self, store: Store) -> None:
        run, _ = await store.create_run(new_run(self.app, correlation_id="c1"))
        [claimed] = await self.claim(store, "w1")
        e = ev(correlation_id="c1")
        await self.handlers(store, ("g", "order.*"))
        await store.commit_run(self.app, run.run_id, claimed.fence, RunWrite(
            entries=[entry("b#1", 2, ENTRY_RUNNING), entry("a#1", 1, result="1")],
            attempts=[Attempt("b#1", 1, 10.0)],
            events=[e],
            status=RunStatus.RUNNING,
        ))
        assert [h.key for h in await store.load_history(self.app, run.run_id)] == ["a#1", "b#1"]
        assert await store.get_event(self.app, e.id) == e
        assert [d.group for d in await store.deliveries(self.app, e.id)] == ["g"]
        await store.commit_run(self.app, run.run_id, claimed.fence, RunWrite(
            entries=[entry("b#1", 2, result='"ok"', attempts=2, started_at=10.0, ended_at=12.0,
                           wake_at=13.0, detail='{"d":1}', error="E: e", error_type="E")],
            attempts=[Attempt("b#1", 1, 10.0, 11.0, "E", "E: e"), Attempt("b#1", 2, 11.5, 12.0)],
            status=RunStatus.COMPLETED, result='{"done":true}', error="none", flagged=True,
            release=True,
        ))
        history = await store.load_history(self.app, run.run_id)
        assert history[1] == entry("b#1", 2, result='"ok"', attempts=2, started_at=10.0,
                                   ended_at=12.0, wake_at=13.0, detail='{"d":1}', error="E: e",
                                   error_type="E")
        assert len(history) == 2
        assert await store.load_attempts(self.app, run.run_id) == [
            Attempt("b#1", 1, 10.0, 11.0, "E", "E: e"), Attempt("b#1", 2, 11.5, 12.0)
        ]
        stored = await store.get_run(self.app, run.run_id)
        assert stored is not None
        assert (stored.status, stored.result, stored.error, stored.flagged, stored.owner) == (
            RunStatus.COMPLETED, '{"done":true}', "none", True, None
        )
        assert stored.updated_at > run.updated_at

    async def test_commit_run_leaves_unset_fields_alone(self, store: Store) -> None:
        run, _ = await store.create_run(new_run(self.app, status=RunStatus.RUNNING, result="1"))
        [claimed] = await self.claim(store, "w1")
        await store.commit_run(self.app, run.run_id, claimed.fence, RunWrite())
        stored = await store.get_run(self.app, run.run_id)
        assert stored is not None
        assert (stored.status, stored.result, stored.owner) == (RunStatus.RUNNING, "1", "w1")

    async def test_excused_attempts_are_marked_and_stay_excused(self, store: Store) -> None:
        """A worker paused past its lease excuses the attempts it was cut off in
        (docs/leases.md): only its own (same start time), only unfinished or
        ``WorkerLost`` ones, and a later ``WorkerLost`` write leaves them excused."""
        run, _ = await store.create_run(new_run(self.app))
        [old] = await self.claim(store, "w1")
        await store.commit_run(self.app, run.run_id, old.fence, RunWrite(attempts=[
            Attempt("a#1", 1, 1.0), Attempt("b#1", 1, 2.0), Attempt("c#1", 1, 3.0, 3.5, "E", "e"),
        ]))
        [new] = await self.claim(store, "w2")  # w1 silent: taken over
        lost = Attempt("a#1", 1, 1.0, 5.0, "WorkerLost", "lost")
        await store.commit_run(self.app, run.run_id, new.fence, RunWrite(attempts=[lost]))
        paused = ("Paused", "paused")
        n = await store.excuse_attempts(self.app, run.run_id, [
            Attempt("a#1", 1, 1.0, 6.0, *paused),  # WorkerLost: excused
            Attempt("b#1", 1, 2.0, 6.0, *paused),  # unfinished: excused
            Attempt("c#1", 1, 3.0, 6.0, *paused),  # failed on its own: stays
            Attempt("b#1", 1, 9.9, 6.0, *paused),  # not this start: nothing
        ])
        assert n == 2
        # The new owner's write marking them lost arrives after the excuse.
        await store.commit_run(self.app, run.run_id, new.fence, RunWrite(attempts=[
            lost, Attempt("b#1", 1, 2.0, 7.0, "WorkerLost", "lost"),
        ]))
        got = {a.key: a for a in await store.load_attempts(self.app, run.run_id)}
        assert (got["a#1"].error_type, got["a#1"].ended_at) == ("Paused", 6.0)
        assert (got["b#1"].error_type, got["b#1"].ended_at) == ("Paused", 6.0)
        assert got["c#1"].error_type == "E"
        # A later attempt under an excused one's number replaces it (the start time is
        # kept as first written, as for every attempt).
        await store.commit_run(self.app, run.run_id, new.fence,
                               RunWrite(attempts=[Attempt("a#1", 1, 8.0)]))
        again = [a for a in await store.load_attempts(self.app, run.run_id) if a.key == "a#1"]
        assert again == [Attempt("a#1", 1, 1.0)]

    async def test_stale_fence_raises_lease_lost_and_writes_nothing(self, store: Store) -> None:
        run, _ = await store.create_run(new_run(self.app))
        [old] = await self.claim(store, "w1")
        [new] = await self.claim(store, "w2")  # w1 never heartbeated: unknown, taken over
        assert new.fence == old.fence + 1
        await self.handlers(store, ("g", "order.placed"))
        e = ev()
        with pytest.raises(LeaseLost):
            await store.commit_run(self.app, run.run_id, old.fence, RunWrite(
                entries=[entry("a#1", 1)], attempts=[Attempt("a#1", 1, 1.0)], events=[e],
                status=RunStatus.COMPLETED, result="1", release=True,
            ))
        assert await store.load_history(self.app, run.run_id) == []
        assert await store.load_attempts(self.app, run.run_id) == []
        assert await store.get_event(self.app, e.id) is None
        assert await store.deliveries(self.app, e.id) == []
        assert await store.unpublished_events(self.app, limit=10) == []
        stored = await store.get_run(self.app, run.run_id)
        assert stored is not None and (stored.status, stored.owner, stored.result) == (
            RunStatus.PENDING, "w2", None
        )
        with pytest.raises(LeaseLost):
            await store.commit_run(self.app, "no-such-run", 0, RunWrite())

    async def test_request_cancel_and_cancelled_runs(self, store: Store) -> None:
        live, _ = await store.create_run(new_run(self.app))
        done, _ = await store.create_run(new_run(self.app, status=RunStatus.COMPLETED))
        flagged = await store.request_cancel(self.app, live.run_id)
        assert flagged is not None and flagged.cancel_requested
        final = await store.request_cancel(self.app, done.run_id)
        assert final is not None and not final.cancel_requested
        assert await store.request_cancel(self.app, "missing") is None
        many = [codec.new_id() for _ in range(600)] + [live.run_id, done.run_id]
        assert await store.cancelled_runs(self.app, many) == [live.run_id]
        assert await store.cancelled_runs(self.app, []) == []
        assert await store.cancelled_runs(self.app + "-b", [live.run_id]) == []

    async def test_child_runs(self, store: Store) -> None:
        parent, _ = await store.create_run(new_run(self.app))
        c1, _ = await store.create_run(new_run(self.app, parent_run_id=parent.run_id))
        c2, _ = await store.create_run(new_run(self.app, parent_run_id=parent.run_id))
        await store.create_run(new_run(self.app))
        await store.create_run(new_run(self.app + "-b", parent_run_id=parent.run_id))
        children = await store.child_runs(self.app, parent.run_id)
        assert [c.run_id for c in children] == [c1.run_id, c2.run_id]
        assert await store.child_runs(self.app, c1.run_id) == []

    # -- observability --------------------------------------------------------------------

    async def test_trace_records_gather_one_correlation(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"), ("h", "order.placed"))
        root, _ = await store.create_run(new_run(self.app, correlation_id="c"))
        child, _ = await store.create_run(
            new_run(self.app, correlation_id="c", parent_run_id=root.run_id)
        )
        await store.create_run(new_run(self.app, correlation_id="other"))
        mine, theirs = ev(correlation_id="c"), ev(correlation_id="other")
        await store.commit_run(self.app, root.run_id, 0, RunWrite(
            entries=[entry("a#1", 1)], attempts=[Attempt("a#1", 1, 5.0, 6.0)], events=[mine],
        ))
        await store.append_events(self.app, [theirs])
        await store.settle_delivery(self.app, "g", mine.id, Settlement("dead", 3, error="E: x"))
        tr = await store.trace_records(self.app, "c", limit=100)
        assert [r.run_id for r in tr.runs] == [root.run_id, child.run_id]
        assert tr.entries[root.run_id] == [entry("a#1", 1)]
        assert tr.entries[child.run_id] == []
        assert tr.attempts[root.run_id] == [Attempt("a#1", 1, 5.0, 6.0)]
        assert [e for e, _ in tr.events] == [mine]
        assert all(isinstance(at, float) for _, at in tr.events)
        assert sorted((d.group, d.status) for d in tr.deliveries) == [
            ("g", DELIVERY_DEAD), ("h", DELIVERY_PENDING)
        ]
        assert [(d.group, d.event) for d in tr.dead_letters] == [("g", mine)]
        empty = await store.trace_records(self.app, "nothing", limit=100)
        assert (empty.runs, empty.events, empty.deliveries, empty.dead_letters) == ([], [], [], [])

    async def test_stale_correlations(self, store: Store) -> None:
        await self.handlers(store, ("g", "order.placed"))
        await store.create_run(new_run(self.app, correlation_id="old-live"))
        await store.create_run(
            new_run(self.app, correlation_id="old-done", status=RunStatus.COMPLETED)
        )
        now = time.time()
        await store.create_run(
            new_run(self.app, correlation_id="fresh", created_at=now + 50, updated_at=now + 50)
        )
        waiting, handled = ev(correlation_id="stuck-event"), ev(correlation_id="handled")
        await store.append_events(self.app, [waiting, handled])
        await store.settle_delivery(self.app, "g", handled.id, Settlement("done", 1))
        got = await store.stale_correlations(self.app, older_than=now + 10, limit=10)
        assert set(got) == {"old-live", "stuck-event"}
        assert len(await store.stale_correlations(self.app, older_than=now + 10, limit=1)) == 1
        assert await store.stale_correlations(self.app, older_than=0, limit=10) == []

    # -- namespaces -----------------------------------------------------------------------

    async def test_apps_never_see_each_other(self, store: Store) -> None:
        a, b = self.app, self.app + "-b"
        for app in (a, b):
            await store.declare(app, [Declaration("handler", "g", "order.placed")])
            await store.heartbeat(app, f"w-{app}", time.time(), None, lease=LEASE)
        run, _ = await store.create_run(new_run(a))
        shared = ev()
        assert await store.append_events(a, [shared]) == [1]
        assert await store.append_events(b, [shared]) == [1]  # same id, other namespace
        assert await store.get_run(b, run.run_id) is None
        assert await store.list_runs(b) == []
        assert await store.claim_runs(b, "w", ["wf"], stale_before=0, limit=9) == []
        assert [w.worker_id for w in await store.workers(b)] == [f"w-{b}"]
        await store.settle_delivery(a, "g", shared.id, Settlement("dead", 1, error="E: a"))
        assert await store.dead_letters(b) == []
        [d] = await store.claim_deliveries(b, "w", ["g"], now=time.time(), stale_before=0, limit=9)
        assert d.event == shared and d.attempts == 1
        await store.mark_published(a, [shared.id])
        assert [e.id for e in await store.unpublished_events(b, limit=9)] == [shared.id]
        assert (await store.trace_records(b, run.correlation_id, limit=9)).runs == []

    async def test_apps_lists_every_app_with_anything_stored(self, store: Store) -> None:
        names = [f"{self.app}-{x}" for x in ("runs", "decl", "events", "workers")]
        await store.create_run(new_run(names[0]))
        await store.declare(names[1], [Declaration("workflow", "wf")])
        await store.append_events(names[2], [ev()])
        await store.heartbeat(names[3], "w", time.time(), None, lease=LEASE)
        got = await store.apps()
        assert got == sorted(got) and len(got) == len(set(got))
        assert set(names) <= set(got)
        assert self.app not in got  # nothing stored under the bare name
        if not self.shares_database:
            assert got == sorted(names)

    # -- JSON round trip ------------------------------------------------------------------

    # One inherited test runs on every backend's class (different executors) and reuses
    # the store fixture across examples on purpose: both health checks are expected.
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture, HealthCheck.differing_executors
        ],
    )
    @given(value=json_values)
    async def test_json_values_round_trip(self, store: Store, value: Any) -> None:
        text = codec.dumps(value)
        run, _ = await store.create_run(new_run(self.app, args=codec.dumps([value])))
        e: Event[Any] = Event("value.stored", value)
        await store.commit_run(self.app, run.run_id, 0, RunWrite(
            entries=[entry("v#1", 1, result=text, detail=text)], events=[e], result=text,
            status=RunStatus.COMPLETED,
        ))
        stored = await store.get_run(self.app, run.run_id)
        assert stored is not None and stored.result == text
        assert codec.loads(stored.args) == [value]
        [h] = await store.load_history(self.app, run.run_id)
        assert h.result == text and codec.loads(h.detail) == value
        got = await store.get_event(self.app, e.id)
        assert got is not None and got.data == value and got == e
