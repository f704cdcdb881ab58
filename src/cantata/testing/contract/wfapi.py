"""Store contract, workflow API part: step heartbeats and transactional steps."""

from __future__ import annotations

from typing import Any, cast

import pytest

from cantata.errors import LeaseLost, TransactionUnsupported
from cantata.model.records import ENTRY_COMPLETED, Attempt, RunWrite, StepHeartbeat
from cantata.store.base import Store, TransactionalStore
from cantata.store.tx import Tx
from cantata.testing.contract.support import StoreFixtures, entry, ev, new_run


def _tx_store(store: Store) -> TransactionalStore:
    assert hasattr(store, "run_transaction")
    return cast(TransactionalStore, store)


class WorkflowApiContract(StoreFixtures):
    """``record_step_heartbeat`` / ``last_step_heartbeat`` and ``run_transaction``."""

    #: ``run_transaction`` works (False for ``memory://``: it refuses).
    transactional: bool = True

    async def test_step_heartbeats_keep_the_newest_of_the_newest_attempt(
        self, store: Store, peer: Store
    ) -> None:
        run, _ = await store.create_run(new_run(self.app))
        assert await store.last_step_heartbeat(self.app, run.run_id, "s#1") is None
        await store.record_step_heartbeat(self.app, run.run_id, StepHeartbeat("s#1", 1, 1.0, '1'))
        await store.record_step_heartbeat(self.app, run.run_id, StepHeartbeat("s#1", 2, 2.0, '2'))
        # a late write of the lost attempt 1 does not overwrite attempt 2's details
        await store.record_step_heartbeat(self.app, run.run_id, StepHeartbeat("s#1", 1, 3.0, '9'))
        await store.record_step_heartbeat(self.app, run.run_id, StepHeartbeat("t#1", 1, 1.0, None))
        assert await peer.last_step_heartbeat(self.app, run.run_id, "s#1") == StepHeartbeat(
            "s#1", 2, 2.0, "2"
        )
        assert await peer.last_step_heartbeat(self.app, run.run_id, "t#1") == StepHeartbeat(
            "t#1", 1, 1.0, None
        )
        assert await peer.last_step_heartbeat("other-app", run.run_id, "s#1") is None

    async def _owned_run(self, store: Store) -> Any:
        run, _ = await store.create_run(new_run(self.app, owner="w1", fence=1))
        return run

    async def test_run_transaction_commits_sql_checkpoint_and_events_together(
        self, store: Store, peer: Store
    ) -> None:
        run = await self._owned_run(store)
        table = f"t_{self.app.replace('-', '_')}"
        runner = getattr(store, "run_transaction", None)
        assert runner is not None
        event = ev("order.saved", {"n": 1})

        async def body(tx: Tx) -> tuple[RunWrite, Any]:
            await tx.execute(f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, note TEXT)")
            assert await tx.execute(f"INSERT INTO {table} VALUES (?, ?)", 1, "a") == 1
            await tx.execute(f"INSERT INTO {table} VALUES ($1, $2)", 2, "it's ?")
            rows = await tx.fetch(f"SELECT id, note FROM {table} ORDER BY id")
            assert rows == [(1, "a"), (2, "it's ?")]
            assert await tx.fetchone(f"SELECT note FROM {table} WHERE id = ?", 5) is None
            tx.publish(event)
            done = entry("save#1", 1, ENTRY_COMPLETED, result='"ok"')
            return RunWrite(entries=[done], attempts=[Attempt("save#1", 1, 1.0, 2.0)],
                            events=list(tx.events)), "value"

        if not self.transactional:
            with pytest.raises(TransactionUnsupported, match=run.run_id):
                await runner(self.app, run.run_id, 1, body)
            return
        assert await runner(self.app, run.run_id, 1, body) == "value"
        history = await peer.load_history(self.app, run.run_id)
        assert [(e.key, e.status) for e in history] == [("save#1", ENTRY_COMPLETED)]
        assert (await peer.get_event(self.app, event.id)) is not None

        async def read(tx: Tx) -> tuple[RunWrite, Any]:
            return RunWrite(), await tx.fetch(f"SELECT count(*) FROM {table}")

        assert await _tx_store(peer).run_transaction(self.app, run.run_id, 1, read) == [(2,)]

    async def test_run_transaction_rolls_back_on_error_and_on_a_stale_fence(
        self, store: Store, peer: Store
    ) -> None:
        if not self.transactional:
            pytest.skip("this store refuses transactions")
        run = await self._owned_run(store)
        table = f"r_{self.app.replace('-', '_')}"
        runner = _tx_store(store).run_transaction

        async def create(tx: Tx) -> tuple[RunWrite, Any]:
            await tx.execute(f"CREATE TABLE {table} (id INTEGER)")
            return RunWrite(), None

        await runner(self.app, run.run_id, 1, create)

        def insert(fail: bool) -> Any:
            async def body(tx: Tx) -> tuple[RunWrite, Any]:
                await tx.execute(f"INSERT INTO {table} VALUES (1)")
                if fail:
                    raise RuntimeError("step failed")
                return RunWrite(entries=[entry("s#1", 1)], events=[ev()]), None

            return body

        with pytest.raises(RuntimeError):
            await runner(self.app, run.run_id, 1, insert(fail=True))
        with pytest.raises(LeaseLost):
            await runner(self.app, run.run_id, 0, insert(fail=False))  # fence 0 is stale

        async def count(tx: Tx) -> tuple[RunWrite, Any]:
            return RunWrite(), await tx.fetchone(f"SELECT count(*) FROM {table}")

        assert await _tx_store(peer).run_transaction(self.app, run.run_id, 1, count) == (0,)
        assert await peer.load_history(self.app, run.run_id) == []
