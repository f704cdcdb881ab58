"""The store contract, keyed chain part: with an audit key set, every write the store
audits keys its record, on every path a backend has for it (docs/security.md)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

from cantata.model.access import Role, TokenRecord, hash_token, new_token
from cantata.model.flow import QueueEntry, ScheduleRow
from cantata.model.records import (
    ENTRY_FAILED,
    Attempt,
    AuditRecord,
    RunRecord,
    RunWrite,
    TaskRecord,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.base import Settlement, Store, TransactionalStore
from cantata.store.tx import Tx
from cantata.testing.contract.support import StoreFixtures, entry, ev, new_run

#: The key of the chain this part checks.
KEY = audit.AuditKey("keyed-contract-key-0123456789abcdef")


def _task(run_id: str, key: str) -> TaskRecord:
    return TaskRecord(f"{run_id}:{key}", run_id, key, key.split("#")[0], "inventory", "[]")


def unkeyed(records: list[AuditRecord]) -> list[tuple[int, str, str]]:
    """``(seq, actor, action)`` of each record whose hash is not the keyed one."""
    return [(r.seq, r.actor, r.action) for r in records if audit.record_hash(r, KEY) != r.hash]


class KeyedChainContract(StoreFixtures):
    """Every audited write keys its record: creation (alone, with its first checkpoint,
    queued, several at once; by Cantata and by an operator), checkpoints (alone and
    several at once), cancel, retry, fork, tasks, deliveries, dead letters (replay,
    discard), an operator's publish, schedules, operator actions, API tokens and a
    transaction step.

    ``verify_audit`` with the key accepts plain records before the first keyed one (a
    store written before its key was set), so a path that forgets the key on a new
    chain would pass it: each record's hash is checked against the key too."""

    async def test_every_audited_write_keeps_the_chain_keyed(
        self, store: Store, peer: Store
    ) -> None:
        for s in {id(store): store, id(peer): peer}.values():
            s.set_audit_key(self.app, KEY)
        now = time.time()
        await self.handlers(store, ("g", "order.*"))
        await self.live(store, "w1")

        # Creations: alone, with an idempotency key (and repeated), owned with the first
        # checkpoint in the same transaction, queued, and several at once.
        plain, _ = await store.create_run(new_run(self.app))
        keyed, _ = await store.create_run(new_run(self.app, idempotency_key="k", args_hash="h"))
        await peer.create_run(new_run(self.app, idempotency_key="k", args_hash="h"))
        owned = new_run(self.app, owner="w1", fence=1)
        await store.create_run(owned, RunWrite(
            status=RunStatus.RUNNING, entries=[entry("a#1", 1)],
            attempts=[Attempt("a#1", 1, now, now)]))
        await store.create_queued_run(new_run(self.app), QueueEntry("q"))
        # ... and started by an operator (their run.created names them).
        await store.create_run(new_run(self.app), actor="cli:ann@host")
        await store.create_run(new_run(self.app, owner="w1", fence=1), RunWrite(
            status=RunStatus.RUNNING), actor="cli:ann@host")
        await store.create_queued_run(new_run(self.app), QueueEntry("q"), actor="token:bo")
        many = [new_run(self.app, owner="w1", fence=1) for _ in range(6)]
        await asyncio.gather(*(
            (store if i % 2 else peer).create_run(
                r, RunWrite(status=RunStatus.RUNNING) if i % 3 else None)
            for i, r in enumerate(many)))

        # Checkpoints: alone (status changed or not) and several at once, ending runs.
        await store.commit_run(self.app, owned.run_id, 1, RunWrite(entries=[entry("b#1", 2)]))
        await asyncio.gather(*(
            (store if i % 2 else peer).commit_run(self.app, r.run_id, 1, RunWrite(
                entries=[entry("a#1", 1, ENTRY_FAILED, error="E: no")],
                status=RunStatus.FAILED, error="StepFailed: no", release=True))
            for i, r in enumerate(many)))

        # Operating: cancel, retry, fork, an operator's own record.
        await store.request_cancel(self.app, plain.run_id, actor="ops:ann")
        await store.retry_run(self.app, many[0].run_id, include_compensated=False,
                              version=None, actor="ops:ann", now=now)
        await store.fork_run(self.app, many[1].run_id, new_run(self.app), before_key="a#1",
                             actor="ops:ann")
        await store.record_action(self.app, "token:ann", "run.start_repeated", keyed.run_id,
                                  {"workflow": "wf", "idempotency_key": "k"})

        # Tasks: created by a checkpoint, done, failed, withdrawn.
        await store.commit_run(self.app, owned.run_id, 1, RunWrite(tasks=[
            _task(owned.run_id, k) for k in ("r#1", "r#2", "r#3")]))
        done, failed = await store.claim_tasks(self.app, "inv", ["inventory"], now=now,
                                               stale_before=now, limit=2)
        await store.finish_task(self.app, done.task_id, done.fence, outcome="done",
                                result="1", attempts=[])
        await store.finish_task(self.app, failed.task_id, failed.fence, outcome="failed",
                                error="E: x", error_type="E", attempts=[])
        await store.withdraw_tasks(self.app, owned.run_id, stale_before=now,
                                   error="Withdrawn: cancelled", actor="w1")

        # Deliveries: done (emitting), dead (one after the other and at once), then the
        # dead letters replayed and discarded.
        events = [ev("order.placed") for _ in range(4)]
        await store.append_events(self.app, events)
        await self.claim_d(store, "w2", ["g"])
        await store.settle_delivery(self.app, "g", events[0].id, Settlement(
            "done", 1, [ev("order.noted")]))
        await store.settle_delivery(self.app, "g", events[1].id, Settlement(
            "dead", 1, error="E: a", dead_letter_id=f"{self.app}-dl-1"))
        await asyncio.gather(*(
            (store if i % 2 else peer).settle_delivery(self.app, "g", e.id, Settlement(
                "dead", 1, error="E: b", dead_letter_id=f"{self.app}-dl-{i}"))
            for i, e in enumerate(events[2:], 2)))
        await store.replay_dead_letter(self.app, f"{self.app}-dl-1", now, actor="ops:ann")
        await store.discard_dead_letter(self.app, f"{self.app}-dl-2", actor="ops:ann")

        # An operator's publish: appended alone, and holding deliveries for a worker.
        await store.append_events(self.app, [ev("order.placed")], actor="cli:ann@host")
        published = ev("order.placed")
        await peer.append_held(self.app, [published], hold_for="w2",
                               hold=[("g", published.id)], actor="token:bo")

        # Schedules: created, replaced, paused, resumed, deleted.
        spec = '{"workflow": "wf", "cron": null, "every": 60.0}'
        row = ScheduleRow("s", spec, "api", False, "{}")
        await store.put_schedule(self.app, row, actor="ops:ann")
        await store.put_schedule(self.app, row, actor="ops:ann")
        [got] = await store.schedules(self.app)
        await store.update_schedule(self.app, "s", got.version, paused=True, actor="ops:ann")
        await store.update_schedule(self.app, "s", got.version + 1, paused=False,
                                    actor="ops:ann")
        await store.delete_schedule(self.app, "s", actor="ops:ann")

        # API tokens: created and revoked, recorded in the apps' chains.
        token = TokenRecord(f"t-{self.app}", Role.VIEWER, hash_token(new_token()), now)
        await store.create_token(token, actor="cli:ann@host", apps=[self.app])
        await store.revoke_token(token.name, now, actor="cli:ann@host", apps=[self.app])

        # A transaction step's checkpoint (stores that share their transaction).
        if getattr(self, "transactional", True):
            async def body(tx: Tx) -> tuple[RunWrite, Any]:
                tx.publish(ev("order.saved"))
                return RunWrite(entries=[entry("save#1", 3)], events=list(tx.events)), None

            await cast(TransactionalStore, store).run_transaction(
                self.app, owned.run_id, 1, body)

        await self._assert_keyed(store, owned)

    async def test_a_rotated_key_verifies_the_records_of_the_keys_before_it(
        self, store: Store
    ) -> None:
        """Records written under a previous key verify with the key that replaced it
        (given its previous keys); one written under the old key after the new key's
        records is reported (docs/security.md, rotating the audit key)."""
        old, new = "keyed-contract-old-key-0123456789", "keyed-contract-new-key-0123456789"
        rotated = audit.AuditKey(new, [old])
        store.set_audit_key(self.app, audit.AuditKey(old))
        for _ in range(2):
            await store.create_run(new_run(self.app))  # #1, #2: the old key
        store.set_audit_key(self.app, rotated)
        await store.create_run(new_run(self.app))  # #3, #4: the new key
        await store.record_action(self.app, "cli:ann@host", "run.retried", "r", {})
        report = await store.verify_audit(self.app, key=rotated)
        assert report.ok and report.records == 4, report
        alone = await store.verify_audit(self.app, key=audit.AuditKey(new))
        assert (alone.ok, alone.wrong_key, alone.first_bad_seq) == (False, True, 1), alone
        store.set_audit_key(self.app, audit.AuditKey(old))  # a writer still on the old key
        await store.record_action(self.app, "cli:ann@host", "run.retried", "r", {})
        late = await store.verify_audit(self.app, key=rotated)
        assert (late.ok, late.first_bad_seq) == (False, 5), late
        assert late.reason is not None and "previous audit key" in late.reason

    async def _assert_keyed(self, store: Store, owned: RunRecord) -> None:
        records = await store.audit_records(self.app, limit=100_000)
        written = {r.action for r in records}
        expected = {
            "run.created", "run.status", "run.checkpoint", "run.cancel_requested",
            "run.retried", "run.forked", "run.start_repeated", "task.done", "task.failed",
            "task.withdrawn", "delivery.done", "delivery.dead", "dead_letter.replayed",
            "dead_letter.discarded", "event.published", "schedule.created", "schedule.replaced",
            "schedule.paused", "schedule.resumed", "schedule.deleted", "token.created",
            "token.revoked",
        }
        assert expected <= written, f"not written: {expected - written}"
        bad = unkeyed(records)
        assert not bad, f"records written without the audit key (seq, actor, action): {bad}"
        report = await store.verify_audit(self.app, key=KEY)
        assert report.ok and report.records == len(records), report
        assert owned.run_id in {r.target for r in records}
        assert {"cli:ann@host", "token:bo"} <= {
            r.actor for r in records if r.action == "run.created"}
