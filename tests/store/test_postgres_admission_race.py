"""A queued run that another transaction updates while a claim admits it keeps its place.

The claim's admission updates each run by the ``ctid`` its lookup found
(``postgres_ops.by_ctid``): a run another transaction updated after the statement's
snapshot has another ``ctid`` by then and is left alone, where ``run_id IN (...)``
re-checked its new version. A run the admission did not get was dropped from its queue
as one that can no longer begin; the claim now looks at it again, and one that may
still begin keeps its place for the next claim (docs/performance.md, "The by-key writes
without IN")."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from cantata import App
from cantata.model.flow import QueueEntry, QueueSpec
from cantata.testing.contract.support import new_run
from tests.helpers import lock_waits, with_schema

pytestmark = pytest.mark.postgres

APP = "race"


async def test_a_run_updated_while_its_claim_admits_it_is_admitted_by_the_next(
    postgres_url: str, pooled_schema: str
) -> None:
    async with App(APP, store=with_schema(postgres_url, pooled_schema)).client() as app:
        store = app.store
        await store.declare_queue(APP, QueueSpec("q", concurrency=10), worker_id="w1",
                                  stale_before=0)
        run = new_run(APP)
        await store.create_queued_run(run, QueueEntry("q"))
        other = await asyncpg.connect(postgres_url,
                                      server_settings={"search_path": pooled_schema})
        try:
            async with other.transaction():
                # a new version of the run's row (nothing of it changed), locked until
                # the claim waits for it
                await other.execute("UPDATE runs SET updated_at = updated_at WHERE app=$1 "
                                    "AND run_id=$2", APP, run.run_id)
                claim = asyncio.ensure_future(store.claim_queued_runs(
                    APP, "w1", "q", ["wf"], now=time.time(), limit=10))
                await lock_waits(other, 1, "UPDATE runs r SET owner%")
            first = await claim
        finally:
            await other.close()
        # Left alone by its ctid, or admitted at once (a plan that re-checked it): either
        # way it begins, once.
        again = await store.claim_queued_runs(APP, "w1", "q", ["wf"], now=time.time(),
                                              limit=10)
        admitted = [r.run_id for r in first.runs] + [r.run_id for r in again.runs]
        assert admitted == [run.run_id]
