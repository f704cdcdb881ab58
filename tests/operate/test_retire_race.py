"""A worker of a group that starts while the group is being retired wins: the retire's
check saw no live worker serving it, but one is live once the retire has committed, so
the declaration is written back and the events stored from then on reach it."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cantata.errors import GroupInUse
from cantata.model import codec
from cantata.model.records import Declaration, GroupRetired
from cantata.observability.groups import retire
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import ev

APP = "race"


class WorkerStartsDuringRetire(SQLiteStore):
    """A store on which a worker serving ``ledger`` starts (declares the group and
    heartbeats) right after the retire's check, before its transaction."""

    async def retire_group(
        self, app: str, group: str, *, now: float, actor: str
    ) -> GroupRetired:
        await self.declare(app, [Declaration("handler", "ledger", "order.placed")])
        await self.heartbeat(app, "late-worker", time.time(),
                             codec.dumps({"version": "v1", "groups": ["ledger"]}), lease=10)
        return await super().retire_group(app, group, now=now, actor=actor)


async def test_a_worker_started_during_the_retire_keeps_the_group(tmp_path: Path) -> None:
    store = WorkerStartsDuringRetire(str(tmp_path / "race.db"))
    await store.open()
    try:
        await store.declare(APP, [Declaration("handler", "ledger", "order.placed"),
                                  Declaration("handler", "mailer", "order.placed")])
        before = ev("order.placed")
        await store.append_events(APP, [before])
        done = await retire(store, APP, "ledger", now=time.time(), actor="ops")
        # the retire ran (the pending delivery it found is ended, and audited) ...
        assert (done.ended, [d.pattern for d in done.declarations]) == (1, ["order.placed"])
        assert [r.action for r in await store.audit_records(APP)][-1] == "group.retired"
        # ... but the group stays declared for the worker that serves it now
        assert {(d.kind, d.name) for d in await store.declarations(APP)} == {
            ("handler", "ledger"), ("handler", "mailer"),
        }
        after = ev("order.placed")
        assert await store.append_events(APP, [after]) == [2]
        assert sorted(d.group for d in await store.deliveries(APP, after.id)) == [
            "ledger", "mailer",
        ]
    finally:
        await store.close()


async def test_a_live_worker_that_does_not_say_what_it_serves_blocks_the_retire(
    tmp_path: Path,
) -> None:
    store = SQLiteStore(str(tmp_path / "unsure.db"))
    await store.open()
    try:
        await store.declare(APP, [Declaration("handler", "ledger", "order.placed")])
        await store.append_events(APP, [ev("order.placed")])
        # a worker of an older release (one that named its groups once its consumer had
        # started, or never)
        await store.heartbeat(APP, "starting", time.time(),
                              codec.dumps({"version": "v1", "workflows": []}), lease=10)
        with pytest.raises(GroupInUse, match="starting do not say which groups"):
            await retire(store, APP, "ledger", now=time.time(), actor="ops")
        assert [d.name for d in await store.declarations(APP)] == ["ledger"]
        [stats] = await store.group_stats(APP, now=time.time())
        assert stats.pending == 1
        # once it says (it serves other groups), the retire goes ahead
        await store.heartbeat(APP, "starting", time.time(), codec.dumps(
            {"version": "v1", "workflows": [], "groups": ["mailer"]}), lease=10)
        done = await retire(store, APP, "ledger", now=time.time(), actor="ops")
        assert (done.ended, await store.declarations(APP)) == (1, [])
    finally:
        await store.close()
