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
from cantata.store.base import EVENTS, RUNNABLE, RUNS
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


async def heard_by(store: PostgresStore, here: PostgresStore, app: str,
                   write: Awaitable[object]) -> list[str]:
    """What ``store`` hears of ``write`` (awaited on ``here``): the channels up to those
    of an event appended after it (``events``), which come after the write's
    (PostgreSQL delivers notices in commit order)."""
    heard: list[str] = []
    store.add_listener(heard.append)
    await write
    await here.append_events(app, [ev()])
    await eventually(lambda: EVENTS in heard)
    return heard[: heard.index(EVENTS)]


async def test_a_run_that_ends_is_no_claim_loops_news(
    pair: tuple[PostgresStore, PostgresStore, str],
) -> None:
    here, there, app = pair
    for status in (RunStatus.COMPLETED, RunStatus.FAILED):
        run, _ = await here.create_run(new_run(app, owner="w1", fence=1))
        done = RunWrite(entries=[entry("a#1", 1, ENTRY_COMPLETED, result="1")],
                        status=status, release=True)
        for store in (there, here):  # another process, and the one that wrote it
            assert await heard_by(store, here, app, here.commit_run(
                app, run.run_id, 1, done)) == [RUNS], status
            run, _ = await here.create_run(new_run(app, owner="w1", fence=1))


async def test_a_run_let_go_or_made_with_no_owner_is_runnable(
    pair: tuple[PostgresStore, PostgresStore, str],
) -> None:
    here, there, app = pair
    run, _ = await here.create_run(new_run(app, owner="w1", fence=1))
    assert await heard_by(there, here, app, here.commit_run(
        app, run.run_id, 1, RunWrite(release=True))) == [RUNS, RUNNABLE]
    assert await heard_by(there, here, app, here.create_run(new_run(app))) == [
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
