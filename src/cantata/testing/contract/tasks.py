"""The store contract, part three: tasks (steps served by another service's workers)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from cantata.errors import LeaseLost
from cantata.model.records import (
    TASK_DONE,
    TASK_FAILED,
    TASK_PENDING,
    UNADDRESSED,
    Attempt,
    Declaration,
    RunWrite,
    TaskRecord,
)
from cantata.model.status import RunStatus
from cantata.store.base import TASKS, Store
from cantata.testing.contract.support import LEASE, StoreFixtures, new_run
from cantata.testing.wait import eventually


def task(run_id: str, key: str = "inventory.reserve#1", **kw: object) -> TaskRecord:
    """A pending task of ``run_id`` for the ``inventory`` service."""
    fields: dict[str, object] = {
        "task_id": f"{run_id}:{key}", "run_id": run_id, "key": key,
        "step": key.split("#")[0], "service": "inventory", "args": '[{"sku":"a"}]',
    }
    fields.update(kw)
    return TaskRecord(**fields)  # type: ignore[arg-type]


class TasksContract(StoreFixtures):
    """Tasks: created by a run's checkpoint, claimed and finished by another service."""

    async def started(self, store: Store, *tasks_of: str, **run_kw: Any) -> tuple[str, int]:
        """A run (claimed by ``orders-w``) whose checkpoint created tasks ``tasks_of``,
        each created a little later than the one before (so claims come in that order)."""
        run, _ = await store.create_run(new_run(self.app, **run_kw))
        base = time.time() - 100
        [claimed] = await store.claim_runs(
            self.app, "orders-w", ["wf"], stale_before=0, limit=1
        )
        await store.commit_run(self.app, run.run_id, claimed.fence, RunWrite(
            tasks=[task(run.run_id, k, created_at=base + i, updated_at=base + i)
                   for i, k in enumerate(tasks_of)]
        ))
        return run.run_id, claimed.fence

    async def claim_t(
        self, store: Store, worker: str, services: list[str] | None = None,
        now: float | None = None, limit: int = 100,
    ) -> list[TaskRecord]:
        now = time.time() if now is None else now
        return await store.claim_tasks(
            self.app, worker, ["inventory"] if services is None else services, now=now,
            stale_before=now, limit=limit,
        )

    async def test_commit_run_creates_tasks_once(self, store: Store) -> None:
        heard: list[str] = []
        store.add_listener(heard.append)
        before = time.time()
        run, _ = await store.create_run(new_run(self.app, correlation_id="c-1"))
        [claimed] = await store.claim_runs(self.app, "w", ["wf"], stale_before=0, limit=1)
        run_id, fence = run.run_id, claimed.fence
        await store.commit_run(self.app, run_id, fence, RunWrite(tasks=[task(run_id)]))
        await eventually(lambda: TASKS in heard)
        [t] = await store.tasks_of_run(self.app, run_id)
        assert t == task(run_id, created_at=t.created_at, updated_at=t.updated_at,
                         correlation_id="c-1")  # the run's correlation id, when none given
        assert t.created_at >= before - 1 and t.updated_at == t.created_at
        assert await store.get_task(self.app, t.task_id) == t
        again = task(run_id, args="[2]", correlation_id="other", created_at=5.0, updated_at=5.0)
        second = task(run_id, "inventory.release#1", created_at=t.created_at + 1,
                      updated_at=t.created_at + 1)
        await store.commit_run(self.app, run_id, fence, RunWrite(tasks=[again, second]))
        got = await store.tasks_of_run(self.app, run_id)
        assert [x.key for x in got] == ["inventory.reserve#1", "inventory.release#1"]
        assert got[0] == t  # an existing task_id is left alone
        assert got[1].correlation_id == "c-1"
        assert await store.get_task(self.app, "missing") is None
        assert await store.get_task(self.app + "-b", t.task_id) is None
        assert await store.tasks_of_run(self.app + "-b", run_id) == []

    async def test_stale_fence_creates_no_task(self, store: Store) -> None:
        run, _ = await store.create_run(new_run(self.app))
        with pytest.raises(LeaseLost):
            await store.commit_run(self.app, run.run_id, 5, RunWrite(tasks=[task(run.run_id)]))
        assert await store.tasks_of_run(self.app, run.run_id) == []
        assert await self.claim_t(store, "inv-w") == []

    async def test_claim_tasks_takes_due_tasks_of_given_services(self, store: Store) -> None:
        run, _ = await store.create_run(new_run(self.app))
        now = time.time()
        await store.commit_run(self.app, run.run_id, 0, RunWrite(tasks=[
            task(run.run_id, "a#1", created_at=now - 3),
            task(run.run_id, "b#1", service="billing"),
            task(run.run_id, "c#1", next_at=now + 100, created_at=now - 5),
            task(run.run_id, "d#1", created_at=now - 4),
        ]))
        assert await store.claim_tasks(
            self.app, "w1", [], now=now, stale_before=0, limit=9
        ) == []
        claimed = await self.claim_t(store, "w1", now=now)
        assert [t.key for t in claimed] == ["d#1", "a#1"]  # due first, then oldest
        assert all((t.owner, t.fence, t.attempts, t.status) == ("w1", 1, 1, TASK_PENDING)
                   for t in claimed)
        assert await store.get_task(self.app, claimed[0].task_id) == claimed[0]
        assert await self.claim_t(store, "w1", now=now) == []  # never the claimer's own
        [billing] = await self.claim_t(store, "w1", ["billing", "other"], now=now)
        assert billing.key == "b#1"
        [late] = await self.claim_t(store, "w1", now=now + 100)
        assert late.key == "c#1"

    async def test_claim_tasks_respects_limit_and_live_owners(self, store: Store) -> None:
        now = await self.live(store, "w1", "w2")
        await self.started(store, "a#1", "b#1", "c#1")
        assert len(await self.claim_t(store, "w1", limit=2)) == 2
        [rest] = await self.claim_t(store, "w2")
        assert rest.owner == "w2"
        assert await self.claim_t(store, "w3") == []  # both owners are alive
        await store.heartbeat(self.app, "w1", now - 60, None, lease=LEASE)
        taken = await self.claim_t(store, "w3")
        assert len(taken) == 2 and all(
            (t.owner, t.fence, t.attempts) == ("w3", 2, 2) for t in taken
        )

    async def test_concurrent_claimers_never_share_a_task(
        self, store: Store, peer: Store
    ) -> None:
        await self.live(store, "w1", "w2")
        keys = [f"s{i}#1" for i in range(30)]
        run_id, _ = await self.started(store, *keys)
        seen: list[str] = []
        while True:
            a, b = await asyncio.gather(
                self.claim_t(store, "w1", limit=4), self.claim_t(peer, "w2", limit=4)
            )
            if not a and not b:
                break
            seen += [t.key for t in a] + [t.key for t in b]
        assert sorted(seen) == sorted(keys)
        assert {t.attempts for t in await store.tasks_of_run(self.app, run_id)} == {1}

    async def test_finish_task_done_failed_and_retry(self, store: Store) -> None:
        heard: list[str] = []
        store.add_listener(heard.append)
        run_id, _ = await self.started(store, "a#1", "b#1", "c#1")
        a, b, c = await self.claim_t(store, "w1")
        heard.clear()
        assert await store.finish_task(
            self.app, a.task_id, a.fence, outcome="done", result='{"ok":1}',
            attempts=[Attempt("a#1", 1, 10.0, 11.0)],
        )
        await eventually(lambda: TASKS in heard)
        assert await store.finish_task(
            self.app, b.task_id, b.fence, outcome="failed", error="KeyError: 'sku'",
            error_type="KeyError", attempts=[Attempt("b#1", 1, 10.0, 12.0, "KeyError", "'sku'")],
        )
        now = time.time()
        assert await store.finish_task(
            self.app, c.task_id, c.fence, outcome="retry", error="OSError: down",
            error_type="OSError", next_at=now + 30,
            attempts=[Attempt("c#1", 1, 10.0, 13.0, "OSError", "down")],
        )
        done, failed, retry = [await store.get_task(self.app, t.task_id) for t in (a, b, c)]
        assert done is not None and failed is not None and retry is not None
        assert (done.status, done.result, done.error, done.owner) == (
            TASK_DONE, '{"ok":1}', None, None
        )
        assert (failed.status, failed.error, failed.error_type, failed.owner) == (
            TASK_FAILED, "KeyError: 'sku'", "KeyError", None
        )
        assert (retry.status, retry.owner, retry.next_at, retry.error, retry.error_type) == (
            TASK_PENDING, None, now + 30, "OSError: down", "OSError"
        )
        assert retry.attempts == 1 and retry.result is None
        assert await store.load_attempts(self.app, run_id) == [
            Attempt("a#1", 1, 10.0, 11.0), Attempt("b#1", 1, 10.0, 12.0, "KeyError", "'sku'"),
            Attempt("c#1", 1, 10.0, 13.0, "OSError", "down"),
        ]
        assert await self.claim_t(store, "w1", now=now) == []  # not due yet
        [again] = await self.claim_t(store, "w1", now=now + 30)
        assert (again.key, again.attempts, again.fence) == ("c#1", 2, 2)
        # The second attempt's record completes an upserted one (same key+attempt).
        assert await store.finish_task(
            self.app, again.task_id, again.fence, outcome="done", result="1",
            attempts=[Attempt("c#1", 1, 10.0, 13.5, "OSError", "down"),
                      Attempt("c#1", 2, 40.0, 41.0)],
        )
        attempts = [x for x in await store.load_attempts(self.app, run_id) if x.key == "c#1"]
        assert attempts == [Attempt("c#1", 1, 10.0, 13.5, "OSError", "down"),
                            Attempt("c#1", 2, 40.0, 41.0)]

    async def test_finish_task_with_a_lost_claim_writes_nothing(self, store: Store) -> None:
        run_id, _ = await self.started(store, "a#1")
        [old] = await self.claim_t(store, "w1")
        [new] = await self.claim_t(store, "w2")  # w1 never heartbeated: taken over
        assert new.fence == old.fence + 1
        assert not await store.finish_task(
            self.app, old.task_id, old.fence, outcome="done", result="1",
            attempts=[Attempt("a#1", 1, 1.0, 2.0)],
        )
        current = await store.get_task(self.app, old.task_id)
        assert current == new
        assert await store.load_attempts(self.app, run_id) == []
        assert await store.finish_task(
            self.app, new.task_id, new.fence, outcome="failed", error="E: x", error_type="E",
            attempts=[],
        )
        for outcome in ("done", "retry", "failed"):  # finished: never changed again
            assert not await store.finish_task(
                self.app, new.task_id, new.fence, outcome=outcome, result="2",
                attempts=[Attempt("a#1", 9, 1.0)],
            )
        final = await store.get_task(self.app, new.task_id)
        assert final is not None and (final.status, final.result) == (TASK_FAILED, None)
        assert await store.load_attempts(self.app, run_id) == []
        assert not await store.finish_task(
            self.app, "missing", 1, outcome="done", attempts=[Attempt("a#1", 1, 1.0)]
        )
        with pytest.raises(ValueError, match="outcome"):
            await store.finish_task(self.app, new.task_id, new.fence, outcome="maybe",
                                    attempts=[])

    async def test_remove_worker_releases_its_pending_tasks(self, store: Store) -> None:
        await self.live(store, "w1", "w2")
        await self.started(store, "a#1", "b#1")
        a, b = await self.claim_t(store, "w1")
        assert await store.finish_task(
            self.app, b.task_id, b.fence, outcome="done", result="1", attempts=[]
        )
        assert await self.claim_t(store, "w2") == []
        await store.remove_worker(self.app, "w1")
        [again] = await self.claim_t(store, "w2")
        assert (again.task_id, again.owner, again.fence) == (a.task_id, "w2", 2)
        finished = await store.get_task(self.app, b.task_id)
        assert finished is not None and finished.status == TASK_DONE

    async def test_trace_and_stale_correlations_include_tasks(self, store: Store) -> None:
        run_id, fence = await self.started(store, "a#1", "b#1", correlation_id="remote")
        await store.create_run(new_run(self.app, correlation_id="other"))
        a, b = await self.claim_t(store, "w1")
        await store.finish_task(self.app, a.task_id, a.fence, outcome="done", result="1",
                                attempts=[])
        tr = await store.trace_records(self.app, "remote", limit=100)
        assert [(t.key, t.status) for t in tr.tasks] == [("a#1", TASK_DONE), ("b#1", "pending")]
        assert (await store.trace_records(self.app, "other", limit=100)).tasks == []
        # The run is final; only its pending task keeps the transaction open.
        await store.commit_run(self.app, run_id, fence, RunWrite(status=RunStatus.COMPLETED))
        now = time.time()
        got = await store.stale_correlations(self.app, older_than=now + 10, limit=10)
        assert set(got) == {"other", "remote"}
        await store.finish_task(self.app, b.task_id, b.fence, outcome="failed", error="E: x",
                                error_type="E", attempts=[])
        assert await store.stale_correlations(self.app, older_than=now + 10, limit=10) == [
            "other"
        ]


    async def test_claim_tasks_takes_only_the_steps_given(self, store: Store) -> None:
        run_id, _ = await self.started(store, "inventory.reserve#1", "inventory.release#1")
        now = time.time()
        claim = store.claim_tasks
        assert await claim(self.app, "old", ["inventory"], now=now, stale_before=now,
                           limit=9, steps=[]) == []
        [got] = await claim(self.app, "old", ["inventory"], now=now, stale_before=now,
                            limit=9, steps=["inventory.release", "inventory.other"])
        assert got.step == "inventory.release"
        # The step the old code lacks was not claimed: no claim counted against it.
        [reserve] = [t for t in await store.tasks_of_run(self.app, run_id)
                     if t.step == "inventory.reserve"]
        assert (reserve.owner, reserve.attempts, reserve.fence) == (None, 0, 0)
        [taken] = await claim(self.app, "new", ["inventory"], now=now,
                              stale_before=now, limit=9, steps=["inventory.reserve"])
        assert (taken.step, taken.attempts) == ("inventory.reserve", 1)

    async def test_a_task_for_no_service_yet_goes_to_the_service_declaring_its_step(
        self, store: Store
    ) -> None:
        run, _ = await store.create_run(new_run(self.app))
        [claimed] = await store.claim_runs(self.app, "orders-w", ["wf"], stale_before=0,
                                           limit=1)
        await store.commit_run(self.app, run.run_id, claimed.fence, RunWrite(tasks=[
            task(run.run_id, "stock.reserve#1", service=UNADDRESSED)]))
        now = time.time()

        async def claim(steps: list[str] | None) -> list[TaskRecord]:
            return await store.claim_tasks(self.app, "inv-w", ["inventory"], now=now,
                                           stale_before=now, limit=9, steps=steps)

        assert await claim(None) == []  # a claim of any step takes addressed tasks only
        assert await claim(["inventory.reserve"]) == []  # not a step this worker has
        await store.declare(self.app, [Declaration("step", "stock.reserve", "", "inventory")])
        [got] = await claim(["inventory.reserve", "stock.reserve"])
        assert (got.step, got.service, got.owner, got.attempts) == (
            "stock.reserve", "inventory", "inv-w", 1)
        assert await store.get_task(self.app, got.task_id) == got

    async def test_a_task_of_an_ended_run_is_withdrawn_instead_of_claimed(
        self, store: Store
    ) -> None:
        now = await self.live(store, "live", "w1")
        await store.heartbeat(self.app, "dead", now - 60, None, lease=LEASE)
        run_id, fence = await self.started(store, "a#1", "b#1", "c#1")
        [a] = await self.claim_t(store, "live", limit=1)
        [b] = await self.claim_t(store, "dead", limit=1)  # its worker died since
        assert (a.key, b.key) == ("a#1", "b#1")
        other, _ = await self.started(store, "d#1")
        await store.commit_run(self.app, run_id, fence, RunWrite(status=RunStatus.CANCELLED))
        heard: list[str] = []
        store.add_listener(heard.append)
        [got] = await self.claim_t(store, "w1")
        assert got.run_id == other
        by_key = {t.key: t for t in await store.tasks_of_run(self.app, run_id)}
        # the live worker's task ends as it will; the dead one's and the unclaimed one
        # are withdrawn, never run again
        assert (by_key["a#1"].status, by_key["a#1"].owner) == (TASK_PENDING, "live")
        for key, attempts in (("b#1", 1), ("c#1", 0)):
            t = by_key[key]
            assert (t.status, t.error_type, t.owner, t.attempts) == (
                TASK_FAILED, "Withdrawn", None, attempts)
            assert (t.error or "").startswith(f"Withdrawn: run {run_id} ended before ")
        await eventually(lambda: TASKS in heard)
        withdrawn = [r for r in await store.audit_records(self.app, limit=1000)
                     if r.action == "task.withdrawn"]
        assert sorted((r.actor, r.target) for r in withdrawn) == [
            ("worker:w1", b.task_id), ("worker:w1", by_key["c#1"].task_id)]
        assert await self.claim_t(store, "w2") == []
        assert not await store.finish_task(self.app, b.task_id, b.fence, outcome="done",
                                           result="1", attempts=[])

    async def test_withdraw_tasks_leaves_those_a_live_worker_holds(self, store: Store) -> None:
        heard: list[str] = []
        store.add_listener(heard.append)
        now = await self.live(store, "live")
        await store.heartbeat(self.app, "dead", now - 60, None, lease=LEASE)
        run_id, _ = await self.started(store, "a#1", "b#1", "c#1", "d#1")
        [a] = await self.claim_t(store, "live", limit=1)
        [c] = await self.claim_t(store, "w", limit=1)  # b#1, waiting for its retry
        assert await store.finish_task(self.app, c.task_id, c.fence, outcome="retry",
                                       next_at=now + 100, attempts=[], error="E: x",
                                       error_type="E")
        [b] = await self.claim_t(store, "dead", limit=1)  # c#1, held by a dead worker
        other, _ = await self.started(store, "a#1")
        heard.clear()
        assert await store.withdraw_tasks(
            self.app, run_id, stale_before=now, error="Withdrawn: the run was cancelled",
            actor="orders-w", task_ids=[],
        ) == []
        got = await store.withdraw_tasks(
            self.app, run_id, stale_before=now, error="Withdrawn: the run was cancelled",
            actor="orders-w",
        )
        assert got == sorted([b.task_id, c.task_id, f"{run_id}:d#1"])
        await eventually(lambda: TASKS in heard)
        by_id = {t.task_id: t for t in await store.tasks_of_run(self.app, run_id)}
        assert (by_id[a.task_id].status, by_id[a.task_id].owner) == (TASK_PENDING, "live")
        for task_id in got:
            t = by_id[task_id]
            assert (t.status, t.error_type, t.error, t.owner) == (
                TASK_FAILED, "Withdrawn", "Withdrawn: the run was cancelled", None)
        assert not await store.finish_task(self.app, b.task_id, b.fence, outcome="done",
                                           result="1", attempts=[])
        assert [t.status for t in await store.tasks_of_run(self.app, other)] == [TASK_PENDING]
        assert await self.claim_t(store, "w2") == [
            await store.get_task(self.app, f"{other}:a#1")]  # only the other run's task
        # One of them, by id: withdrawn once.
        [a_left] = [t for t in await store.tasks_of_run(self.app, run_id) if t.owner == "live"]
        await store.heartbeat(self.app, "live", now - 60, None, lease=LEASE)
        assert await store.withdraw_tasks(
            self.app, run_id, stale_before=now, error="Withdrawn: x",
            task_ids=[a_left.task_id],
        ) == [a_left.task_id]
        assert await store.withdraw_tasks(
            self.app, run_id, stale_before=now, error="Withdrawn: x",
        ) == []

    async def test_an_attempt_starts_under_the_fence_and_a_count_is_kept(
        self, store: Store
    ) -> None:
        run_id, _ = await self.started(store, "a#1")
        [old] = await self.claim_t(store, "w1")
        assert await store.start_task_attempt(
            self.app, old.task_id, old.fence, [Attempt("a#1", 1, 10.0)])
        assert await store.load_attempts(self.app, run_id) == [Attempt("a#1", 1, 10.0)]
        [new] = await self.claim_t(store, "w2")  # w1 died: its attempt never ended
        assert new.attempts == 2
        assert not await store.start_task_attempt(
            self.app, old.task_id, old.fence, [Attempt("a#1", 9, 1.0)])
        lost = Attempt("a#1", 1, 10.0, 20.0, "WorkerLost", "lost")
        assert await store.start_task_attempt(
            self.app, new.task_id, new.fence, [lost, Attempt("a#1", 2, 20.0)])
        assert await store.finish_task(
            self.app, new.task_id, new.fence, outcome="retry", next_at=0.0, error="E: x",
            error_type="E", attempts=[Attempt("a#1", 2, 20.0, 21.0, "E", "x")], count=2,
        )
        [again] = await self.claim_t(store, "w2")
        assert again.attempts == 3  # a claim counts until its attempts are known
        assert await store.finish_task(
            self.app, again.task_id, again.fence, outcome="failed", error="WorkerLost: lost",
            error_type="WorkerLost", attempts=[], count=2,
        )
        final = await store.get_task(self.app, again.task_id)
        assert final is not None and (final.status, final.attempts) == (TASK_FAILED, 2)
        assert await store.load_attempts(self.app, run_id) == [
            lost, Attempt("a#1", 2, 20.0, 21.0, "E", "x")]
        assert not await store.start_task_attempt(
            self.app, again.task_id, again.fence, [Attempt("a#1", 3, 1.0)])
