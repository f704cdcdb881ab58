"""Which settlements and appends tell the other processes (migration 0024): a hop whose
every delivery is held for its own worker, or a settlement that stores nothing, sends
no notification; anything a consumer elsewhere could claim, or a run elsewhere could
wait for, still does."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable

import pytest

from cantata.model.codec import new_id
from cantata.model.records import Declaration
from cantata.store.base import CLAIMS, EVENTS, RUNS, Settlement
from cantata.store.postgres import PostgresStore
from cantata.testing.contract.support import ev, new_run
from cantata.testing.wait import eventually
from tests.helpers import with_schema
from tests.store.test_postgres import opened

pytestmark = pytest.mark.postgres


@pytest.fixture
async def pair(
    postgres_url: str, pooled_schema: str
) -> AsyncIterator[tuple[PostgresStore, PostgresStore, str]]:
    """The store of the process that writes, and another process's, on one schema of
    the test's own: only its stores notify its channel (migration 0027)."""
    app = f"app-{new_id()[-8:]}"
    url = with_schema(postgres_url, pooled_schema)
    async with opened(url) as here, opened(url) as there:
        await here.declare(app, [
            Declaration("handler", "g1", "order.*"),
            Declaration("handler", "g2", "pay.done"),
            Declaration("wait", "wf", "ship.done"),
            Declaration("wait", "wf", "parcel.*"),
        ])
        yield here, there, app


async def heard_by(there: PostgresStore, here: PostgresStore, app: str,
                   write: Awaitable[object]) -> list[str]:
    """What ``there`` hears of ``write`` (awaited on ``here``): the notifications up to
    a run created after it, whose own notification (``runs``) comes after any of the
    write's (PostgreSQL delivers them in commit order)."""
    heard: list[str] = []
    there.add_listener(heard.append)
    await write
    await here.create_run(new_run(app))
    await eventually(lambda: RUNS in heard)
    return heard[: heard.index(RUNS)]


async def test_a_hop_held_for_its_worker_tells_no_one(
    pair: tuple[PostgresStore, PostgresStore, str],
) -> None:
    here, there, app = pair
    placed, reserved = ev("order.placed"), ev("order.reserved")
    assert await heard_by(there, here, app, here.append_held(
        app, [placed], hold_for="w1", hold=[("g1", placed.id)])) == []
    done = Settlement("done", 1, events=[reserved], hold_for="w1",
                      hold=[("g1", reserved.id)])
    assert await heard_by(there, here, app, here.settle_delivery(
        app, "g1", placed.id, done)) == []
    assert done.held == [("g1", reserved.id)] and done.addressed == [1]
    # the last hop: settled, nothing stored
    assert await heard_by(there, here, app, here.settle_delivery(
        app, "g1", reserved.id, Settlement("done", 1))) == []


async def test_what_another_process_could_claim_or_wait_for_is_told(
    pair: tuple[PostgresStore, PostgresStore, str],
) -> None:
    here, there, app = pair
    placed = ev("order.placed")
    # a delivery nobody holds: a consumer anywhere may claim it
    assert set(await heard_by(there, here, app, here.append_events(app, [placed]))) == {
        EVENTS, CLAIMS}
    # held for this worker, but a run may wait for its type (exactly, or by a pattern)
    for event_type in ("ship.done", "parcel.sent"):
        waited = ev(event_type)
        assert EVENTS in await heard_by(there, here, app, here.append_held(
            app, [waited], hold_for="w1", hold=[]))
    # one of two deliveries held, the other one (g3's) pending; or none held (g2's)
    paid, both = ev("pay.done"), ev("order.paid")
    await here.declare(app, [Declaration("handler", "g3", "order.paid")])
    assert CLAIMS in await heard_by(there, here, app, here.append_held(
        app, [both], hold_for="w1", hold=[("g1", both.id)]))
    assert CLAIMS in await heard_by(there, here, app, here.append_held(
        app, [paid], hold_for="w1", hold=[]))
    # a delivery pending again (a retry) or a dead letter
    assert CLAIMS in await heard_by(there, here, app, here.settle_delivery(
        app, "g1", placed.id, Settlement("retry", 1, error="E: later", retry_at=0.0)))
    assert EVENTS in await heard_by(there, here, app, here.settle_delivery(
        app, "g1", placed.id, Settlement("dead", 2, error="E: no")))


async def test_an_append_that_holds_nothing_is_heard_by_its_own_store(
    pair: tuple[PostgresStore, PostgresStore, str],
) -> None:
    """Its process's listeners hear of their own appends by the notice (the store
    contract), even of an event for no group; a settlement's event for no group (a
    chain's last hop) is told to no one."""
    here, _, app = pair
    lonely, last = ev("nobody.listens"), ev("nobody.listens")
    assert EVENTS in await heard_by(here, here, app, here.append_events(app, [lonely]))
    placed = ev("order.placed")
    await here.append_held(app, [placed], hold_for="w1", hold=[("g1", placed.id)])
    assert await heard_by(here, here, app, here.settle_delivery(
        app, "g1", placed.id, Settlement("done", 1, events=[last]))) == []
