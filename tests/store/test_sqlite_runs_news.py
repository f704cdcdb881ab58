"""What a SQLite run write tells the store's listeners on the ``runs`` channel: as
PostgreSQL's notices (``postgres_writes.wakes_runs``), only what a claimer, a queue, a
parent run or a ``result()`` waiter waits for — a run no worker owns, a run that ended,
a run let go. A step's checkpoint in between (every step of every saga) is not news:
it woke the claim loop for a claim that found nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from cantata.model.records import Attempt, EntryKind, EntryStatus, HistoryEntry, RunWrite
from cantata.model.status import RunStatus
from cantata.store.base import CLAIMS, EVENTS, RUNS
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract.support import ev, new_run

APP = "news"
WORKER = "w1"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "news.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


def step(key: str, seq: int, status: EntryStatus, at: float) -> RunWrite:
    e = HistoryEntry(key, EntryKind.STEP, key.split("#")[0], status, seq, started_at=at)
    if status == EntryStatus.COMPLETED:
        e.result, e.ended_at = "1", at + 0.5
    return RunWrite(entries=[e], attempts=[Attempt(key, 1, at)])


async def test_a_step_checkpoint_of_an_owned_run_is_no_news_its_end_is(
    store: SQLiteStore,
) -> None:
    heard: list[str] = []
    store.add_listener(heard.append)
    run = new_run(APP, status=RunStatus.RUNNING, owner=WORKER, fence=1)
    # created here with its first step begun, run by this worker: no one else's news
    _, created = await store.create_run(run, step("a#1", 1, EntryStatus.RUNNING, 1.0))
    assert created
    assert heard == []
    # a step ended and the next begun; then a change of status that ends nothing
    await store.commit_run(APP, run.run_id, 1, step("b#1", 2, EntryStatus.RUNNING, 2.0))
    await store.commit_run(APP, run.run_id, 1, RunWrite(status=RunStatus.COMPENSATING))
    assert heard == []
    # a checkpoint that stores events tells of them, not of the run
    await store.commit_run(APP, run.run_id, 1, RunWrite(events=[ev()]))
    assert set(heard) == {EVENTS, CLAIMS}
    heard.clear()
    # the run ends: news for result() waiters, parents and claimers
    await store.commit_run(APP, run.run_id, 1, RunWrite(status=RunStatus.COMPLETED,
                                                         result="1", release=True))
    assert heard == [RUNS]


async def test_a_run_no_worker_owns_or_let_go_is_news(store: SQLiteStore) -> None:
    heard: list[str] = []
    store.add_listener(heard.append)
    await store.create_run(new_run(APP))  # pending, claimable
    assert heard == [RUNS]
    heard.clear()
    await store.create_run(new_run(APP, status=RunStatus.RUNNING, owner=None),
                           step("a#1", 1, EntryStatus.RUNNING, 1.0))
    assert heard == [RUNS]
    heard.clear()
    run = new_run(APP, status=RunStatus.RUNNING, owner=WORKER, fence=1)
    await store.create_run(run, step("a#1", 1, EntryStatus.RUNNING, 1.0))
    assert heard == []
    await store.commit_run(APP, run.run_id, 1, RunWrite(release=True))  # let go (parked)
    assert heard == [RUNS]
    heard.clear()
    ended = new_run(APP, status=RunStatus.RUNNING, owner=WORKER, fence=1)
    await store.create_run(ended, RunWrite(status=RunStatus.FAILED, error="E: x",
                                           release=True))
    assert heard == [RUNS]
