"""Which PostgreSQL writes say ``runnable`` (a run may have become claimable): a run
created with no owner, a run let go; not a run that only ended, whose notice
(``'<app>:ended:runs'``) still says ``runs`` to every process, older workers too."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

import asyncpg
import pytest

from cantata.model.codec import new_id
from cantata.model.records import ENTRY_COMPLETED, RunWrite
from cantata.model.status import RunStatus
from cantata.store.base import CLAIMS, EVENTS, RUNNABLE, RUNS
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import entry, ev, new_run
from cantata.testing.wait import eventually
from tests.helpers import with_schema
from tests.store.test_postgres import opened

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pair(
    postgres_url: str, pooled_schema: str
) -> AsyncIterator[tuple[PostgresStore, PostgresStore, str]]:
    """The store of the process that writes, and another process's, on one schema of
    the test's own."""
    app = f"app-{new_id()[-8:]}"
    url = with_schema(postgres_url, pooled_schema)
    async with opened(url) as here, opened(url) as there:
        yield here, there, app


class Ears:
    """What each store of the pair hears, every channel in order, from before the
    test's first write; and the writes' events (``heard_by``).

    Each store's listening backend delivers the notices in commit order, but each on
    its own time: one can still be sending an earlier write's ``events`` when the other
    heard it and the next write begins (a loaded machine). So the notices of a write
    are told apart by where they fall, not by when a listener was added: between the
    ``events`` of the appends before and after it.
    """

    def __init__(self, *stores: PostgresStore) -> None:
        self.heard: dict[int, list[str]] = {}
        for store in stores:
            heard: list[str] = []
            self.heard[id(store)] = heard
            store.add_listener(heard.append)
        self.appends = 0

    async def heard_by(self, store: PostgresStore, here: PostgresStore, app: str,
                       write: Awaitable[object]) -> list[str]:
        """What ``store`` hears of ``write`` (awaited on ``here``): the channels after
        the ``events`` of the last append before it, up to that of an event appended
        after it."""
        heard = self.heard[id(store)]
        await write
        await here.append_events(app, [ev()])
        self.appends += 1
        n = self.appends
        await eventually(lambda: heard.count(EVENTS) >= n)
        ends = [i for i, channel in enumerate(heard) if channel == EVENTS]
        # (the listener says ``claims`` right after each ``events``)
        start = ends[n - 2] + 1 if n > 1 else 0
        if n > 1 and heard[start:start + 1] == [CLAIMS]:
            start += 1
        return heard[start:ends[n - 1]]


@pytest.fixture
def ears(pair: tuple[PostgresStore, PostgresStore, str]) -> Ears:
    """Listeners on both stores, added before the test writes anything."""
    here, there, _ = pair
    return Ears(here, there)


async def test_a_run_that_ends_is_no_claim_loops_news(
    pair: tuple[PostgresStore, PostgresStore, str], ears: Ears,
) -> None:
    here, there, app = pair
    for status in (RunStatus.COMPLETED, RunStatus.FAILED):
        run, _ = await here.create_run(new_run(app, owner="w1", fence=1))
        done = RunWrite(entries=[entry("a#1", 1, ENTRY_COMPLETED, result="1")],
                        status=status, release=True)
        for store in (there, here):  # another process, and the one that wrote it
            assert await ears.heard_by(store, here, app, here.commit_run(
                app, run.run_id, 1, done)) == [RUNS], status
            run, _ = await here.create_run(new_run(app, owner="w1", fence=1))


async def test_a_run_let_go_or_made_with_no_owner_is_runnable(
    pair: tuple[PostgresStore, PostgresStore, str], ears: Ears,
) -> None:
    here, there, app = pair
    run, _ = await here.create_run(new_run(app, owner="w1", fence=1))
    assert await ears.heard_by(there, here, app, here.commit_run(
        app, run.run_id, 1, RunWrite(release=True))) == [RUNS, RUNNABLE]
    assert await ears.heard_by(there, here, app, here.create_run(new_run(app))) == [
        RUNS, RUNNABLE]


async def test_an_older_worker_hears_runs_of_every_notice(
    pair: tuple[PostgresStore, PostgresStore, str], postgres_url: str, pooled_schema: str,
) -> None:
    """An older worker reads a notice's last part alone: ``runs`` for a run's end too."""
    here, _, app = pair
    raw = await asyncpg.connect(postgres_url)
    notices: list[str] = []
    try:
        channel = await raw.fetchval(f'SELECT "{pooled_schema}".cantata_channel()')
        await raw.add_listener(channel, lambda *a: notices.append(str(a[3])))
        run, _ = await here.create_run(new_run(app, owner="w1", fence=1))
        await here.commit_run(app, run.run_id, 1, RunWrite(
            status=RunStatus.COMPLETED, result="1", release=True))
        await eventually(lambda: len(notices) >= 1)
        assert notices == [f"{app}:ended:{RUNS}"]
        assert [n.rpartition(":")[2] for n in notices] == [RUNS]
    finally:
        await raw.close()
