"""Two operator publishes of one new event id at the same moment end as they would one
after the other (docs/security.md, "What the audit log records"): the first stores the
event and records ``event.published``; the second is a repeat — ``duplicate=True`` and
an ``event.publish_repeated`` record when its content is the same, ``DuplicateEventId``
and no record when it differs.

Before, both looked the id up before either had stored it: the one whose append found
the event stored came back as if it had published (``duplicate=False``), with no
record of it, and with other content its data was silently dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from cantata import App, Event
from cantata.errors import DuplicateEventId
from tests.helpers import with_schema

KEY = "publish-race-key-0123456789abcdef"
APP = "raceshop"


def shop(url: str) -> App:
    app = App(APP, store=url, audit_key=KEY, poll_interval=0.05)

    @app.on("order.placed", group="ledger")
    async def book(event: Event[Any]) -> None:
        pass

    return app


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store two apps (as two processes would) open at once."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/race.db"
        return
    base: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")
    yield with_schema(base, schema)


async def publish_records(app: App) -> list[tuple[str, str, str]]:
    return [(r.actor, r.action, r.target)
            for r in await app.store.audit_records(APP, limit=10_000)
            if r.action.startswith("event.publish")]


@pytest.mark.parametrize("apart", [False, True], ids=["one-app", "two-apps"])
async def test_two_publishes_of_one_new_id_at_once_are_a_publish_and_a_repeat(
    url: str, apart: bool
) -> None:
    first, second = shop(url), shop(url)
    async with first.client(), second.client():
        other = second if apart else first
        for n in range(5):
            event_id = f"evt-{n}"
            results = await asyncio.gather(
                first.publish("order.placed", {"n": n}, id=event_id, actor="cli:ann@host"),
                other.publish("order.placed", {"n": n}, id=event_id, actor="token:bo"),
            )
            assert sorted(r.duplicate for r in results) == [False, True], (n, results)
            mine = next(r for r in results if not r.duplicate)
            again = next(r for r in results if r.duplicate)
            assert again.id == mine.id and again.data == mine.data
            assert again.time == mine.time  # the stored event, as a repeat returns it
        records = await publish_records(first)
        for n in range(5):
            actions = sorted(a for _, a, t in records if t == f"evt-{n}")
            assert actions == ["event.publish_repeated", "event.published"], (n, records)
        assert (await first.store.verify_audit(APP, key=first.audit_key)).ok


@pytest.mark.parametrize("apart", [False, True], ids=["one-app", "two-apps"])
async def test_two_publishes_of_one_new_id_with_other_content_at_once_refuse_one(
    url: str, apart: bool
) -> None:
    first, second = shop(url), shop(url)
    async with first.client(), second.client():
        other = second if apart else first
        for n in range(5):
            event_id = f"evt-{n}"
            results = await asyncio.gather(
                first.publish("order.placed", {"n": n, "by": "ann"}, id=event_id,
                              actor="cli:ann@host"),
                other.publish("order.placed", {"n": n, "by": "bo"}, id=event_id,
                              actor="token:bo"),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, BaseException)]
            done = [r for r in results if not isinstance(r, BaseException)]
            assert len(done) == 1 and len(refused) == 1, (n, results)
            assert isinstance(refused[0], DuplicateEventId), refused[0]
            assert "use a new id" in str(refused[0])
            stored = await first.store.get_event(APP, event_id)
            assert stored is not None and stored.data == done[0].data
            assert not done[0].duplicate
        records = await publish_records(first)
        assert sorted(t for _, _, t in records) == [f"evt-{n}" for n in range(5)], records
        assert {a for _, a, _ in records} == {"event.published"}
        by = {t: actor for actor, _, t in records}
        for n in range(5):
            stored = await first.store.get_event(APP, f"evt-{n}")
            assert stored is not None
            assert by[f"evt-{n}"] == {"ann": "cli:ann@host", "bo": "token:bo"}[
                stored.data["by"]], (n, records, stored.data)
        assert json.loads((await first.store.audit_records(APP, limit=1))[0].data)
        assert (await first.store.verify_audit(APP, key=first.audit_key)).ok
