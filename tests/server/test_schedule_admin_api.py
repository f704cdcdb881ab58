"""``POST /api/schedules`` and ``DELETE /api/schedules/{name}``: an operator makes and
removes schedules from the console, through ``app.schedules.create`` and ``delete``
and their own checks, audited with the token; on SQLite and on PostgreSQL
(docs/console.md)."""

from __future__ import annotations

import datetime as dt
import zoneinfo
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pydantic
import pytest

from cantata import App
from tests.helpers import eventually
from tests.server.conftest import Shop, make_tokens
from tests.server.shop import make_shop
from tests.server.test_api import audit_records
from tests.server.test_flow_api import YEARLY, by_name, parse, with_flow


class Note(pydantic.BaseModel):
    """A typed schedule input (module level: the annotation is resolved here)."""

    text: str
    times: int


def with_reminder(app: App) -> App:
    """The shop's flow plus workflows a schedule with an input can start (one takes a
    plain dict, one a model)."""
    with_flow(app)

    @app.workflow
    async def remind(ctx: Any, tick: dt.datetime, note: dict[str, Any]) -> dict[str, Any]:
        return {"tick": tick.isoformat(), **note}

    @app.workflow
    async def nag(ctx: Any, tick: dt.datetime, note: Note) -> int:
        return note.times

    return app


@pytest.fixture
async def shop(store_url: str) -> AsyncIterator[Shop]:
    app = with_reminder(make_shop(store_url, state={"emails_broken": False}))
    async with app:
        tokens, names = await make_tokens(app)
        transport = httpx.ASGITransport(app=app.asgi(stream_interval=0.05))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield Shop(app, {}, client, tokens, names)


async def delete(shop: Shop, name: str, role: str | None = "operator") -> httpx.Response:
    headers = shop.auth(role) if role else {}
    return await shop.client.delete(f"/api/schedules/{name}", headers=headers)


async def schedule_records(shop: Shop) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The ``schedule.*`` records tokens wrote, in order."""
    return [(x["actor"], x["action"], x["target"], x["data"]) for x in await audit_records(shop)
            if x["action"].startswith("schedule.") and x["actor"].startswith("token:")]


async def test_an_operator_creates_a_schedule_and_it_is_listed_with_its_next_ticks(
    shop: Shop,
) -> None:
    r = await shop.post("/api/schedules", json={
        "name": "weekly-berlin", "workflow": "yearly_report", "cron": "15 4 * * 1",
        "timezone": "Europe/Berlin", "overlap": "buffer_one", "catch_up": "all",
        "catch_up_limit": 2})
    assert r.status_code == 201, r.text
    made = r.json()
    assert {k: made[k] for k in ("name", "workflow", "cron", "every", "when", "timezone",
                                 "overlap", "catch_up", "catch_up_limit", "paused",
                                 "source", "in_code", "last_run")} == {
        "name": "weekly-berlin", "workflow": "yearly_report", "cron": "15 4 * * 1",
        "every": None, "when": "15 4 * * 1", "timezone": "Europe/Berlin",
        "overlap": "buffer_one", "catch_up": "all", "catch_up_limit": 2, "paused": False,
        "source": "api", "in_code": None, "last_run": None}
    assert len(made["next_ticks"]) == 3 and made["next_tick"] == made["next_ticks"][0]
    for t in made["next_ticks"]:
        local = parse(t).astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
        assert (local.weekday(), local.hour, local.minute) == (0, 4, 15)
    # the list says the same, and so does the library
    assert by_name((await shop.get("/api/schedules")).json())["weekly-berlin"] == made
    [info] = [s for s in await shop.app.schedules.list() if s.name == "weekly-berlin"]
    assert (info.cron, info.timezone, info.source) == ("15 4 * * 1", "Europe/Berlin", "api")
    token = f"token:{shop.names['operator']}"
    assert await schedule_records(shop) == [
        (token, "schedule.created", "weekly-berlin",
         {"when": "15 4 * * 1", "workflow": "yearly_report"})]


async def test_a_schedule_made_with_every_and_an_input_starts_runs_with_them(
    shop: Shop,
) -> None:
    r = await shop.post("/api/schedules", json={
        "name": "remind each second", "workflow": "remind", "every": 1,
        "input": {"note": "water the plants"}})
    assert r.status_code == 201, r.text
    assert (r.json()["every"], r.json()["when"], r.json()["cron"]) == (1.0, "every 1s", None)
    found: dict[str, Any] = {}

    async def ticked() -> bool:
        listed = by_name((await shop.get("/api/schedules")).json())
        found.update(listed["remind each second"])
        return found["last_run"] is not None and found["last_run"]["status"] == "completed"

    await eventually(ticked, timeout=15)
    result = await shop.app.get_handle(found["last_run"]["run_id"]).result(timeout=10)
    assert result["note"] == "water the plants"
    assert parse(result["tick"]) == parse(found["last_run"]["tick"])
    assert (await delete(shop, "remind%20each%20second")).status_code == 204


async def test_an_operator_deletes_a_schedule_and_a_second_delete_is_a_404(
    shop: Shop,
) -> None:
    await shop.app.schedules.create("reports/daily", "0 6 * * *", "yearly_report")
    r = await delete(shop, "reports%2Fdaily")
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert "reports/daily" not in by_name((await shop.get("/api/schedules")).json())
    assert "reports/daily" not in [s.name for s in await shop.app.schedules.list()]
    again = await delete(shop, "reports%2Fdaily")
    assert again.status_code == 404
    error = again.json()["error"]
    assert error["code"] == "unknown_schedule"
    assert error["message"].endswith("GET /api/schedules lists them"), error["message"]
    for name in ("nope", "x" * 101, "a%00b"):  # unknown, longer than any, a NUL
        r = await delete(shop, name)
        assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_schedule", name
    token = f"token:{shop.names['operator']}"
    assert await schedule_records(shop) == [(token, "schedule.deleted", "reports/daily", {})]


async def test_a_name_in_use_is_a_409_that_says_what_to_do_and_replaces_nothing(
    shop: Shop,
) -> None:
    await shop.app.schedules.create("nightly", "0 2 * * *", "yearly_report")
    before = by_name((await shop.get("/api/schedules")).json())
    for name, spec in (("nightly", {"cron": "*/5 * * * *"}),
                       ("yearly_report", {"every": 60})):  # one declared in code too
        r = await shop.post("/api/schedules", json={
            "name": name, "workflow": "yearly_report", **spec})
        assert r.status_code == 409, r.text
        error = r.json()["error"]
        assert error["code"] == "schedule_exists" and error["field"] == "name"
        assert repr(name) in error["message"]
        assert f"DELETE /api/schedules/{name}" in error["message"], error["message"]
        assert "another name" in error["message"]
    code_error = (await shop.post("/api/schedules", json={
        "name": "yearly_report", "workflow": "yearly_report", "every": 60})).json()["error"]
    assert "@app.schedule" in code_error["message"]  # declared in code: comes back
    assert by_name((await shop.get("/api/schedules")).json()) == before
    assert await schedule_records(shop) == []


async def test_a_bad_body_is_a_400_naming_its_field_and_makes_nothing(shop: Shop) -> None:
    good = {"name": "ok", "workflow": "yearly_report", "cron": "0 1 * * *"}
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"workflow": "yearly_report", "cron": "0 1 * * *"}, "name", ""),
        ({**good, "name": ""}, "name", "1-100 characters"),
        ({**good, "name": "x" * 101}, "name", "1-100 characters"),
        ({**good, "name": "a\x00b"}, "name", "NUL"),
        ({**good, "cron": "61 * * * *"}, "cron", "invalid cron expression"),
        ({**good, "cron": "* * * * * *"}, "cron", "five fields"),
        ({**good, "cron": None}, "cron", "one of them"),
        ({**good, "every": 5}, "cron", "one of them"),
        ({**good, "cron": None, "every": 0}, "every", "must be seconds > 0"),
        ({**good, "cron": None, "every": -3}, "every", "must be seconds > 0"),
        ({**good, "cron": None, "every": "soon"}, "every", ""),
        ({**good, "timezone": "Mars/Olympus"}, "timezone", "unknown time zone"),
        ({**good, "overlap": "sometimes"}, "overlap", "skip, buffer_one, allow"),
        ({**good, "catch_up": "never"}, "catch_up", "skip, last, all"),
        ({**good, "catch_up_limit": 0}, "catch_up_limit", "whole number > 0"),
        ({**good, "workflow": "nope"}, "workflow", "no workflow named 'nope'"),
        ({**good, "workflow": "bad name!"}, "workflow", ""),
        ({**good, "input": {"x": 1}}, "input", "(ctx, tick, input)"),
        ({**good, "workflow": "remind"}, "workflow", "(ctx, tick)"),
        ({**good, "args": [1]}, "args", ""),
    ]
    for sent, field, said in cases:
        r = await shop.post("/api/schedules", json=sent)
        assert r.status_code == 400, (sent, r.text)
        error = r.json()["error"]
        assert error["field"] == field, (sent, error)
        assert said in error["message"], (sent, error)
    for raw, field in ((b"{not json", "body"), (b"[]", "body"), (b"", "body"),
                       (b'{"name": "n", "workflow": "remind", "every": 1, '
                        b'"input": {"x": NaN}}', "input")):
        r = await shop.client.post("/api/schedules", content=raw, headers={
            **shop.auth("operator"), "Content-Type": "application/json"})
        assert r.status_code == 400, (raw, r.text)
        assert r.json()["error"]["field"] == field, (raw, r.json())
    # an input each tick's run could not take (over max_payload): a 413, as for a start
    r = await shop.post("/api/schedules", json={**good, "workflow": "remind",
                                                "input": {"n": "x" * (1 << 20)}})
    assert r.status_code == 413, r.text
    assert r.json()["error"]["field"] == "input"
    assert "over the app's max_payload" in r.json()["error"]["message"]
    listed = {s["name"] for s in (await shop.get("/api/schedules")).json()}
    assert listed == {"yearly_report"}
    assert await schedule_records(shop) == []


async def test_an_input_that_does_not_fit_the_workflows_type_is_a_400_naming_it(
    shop: Shop,
) -> None:
    """Each tick's run would fail in its first line: the schedule is refused with 400
    `invalid_input` on `input`, one line naming the workflow, the argument and the
    field, and nothing is made or audited."""
    r = await shop.post("/api/schedules", json={
        "name": "nag", "workflow": "nag", "every": 60,
        "input": {"text": "water the plants", "times": "often"}})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["code"], error["field"]) == ("invalid_input", "input"), error
    assert "\n" not in error["message"], error
    assert error["message"].startswith(
        "schedule 'nag': workflow 'nag' argument 2 (note) does not match its declared "
        "type Note: times: Input should be a valid integer"), error
    assert "nag" not in by_name((await shop.get("/api/schedules")).json())
    assert await schedule_records(shop) == []
    r = await shop.post("/api/schedules", json={
        "name": "nag", "workflow": "nag", "every": 60,
        "input": {"text": "water the plants", "times": 2}})
    assert r.status_code == 201, r.text


async def test_viewers_may_not_create_or_delete_and_no_token_is_a_401(shop: Shop) -> None:
    await shop.app.schedules.create("keep", "0 1 * * *", "yearly_report")
    body = {"name": "new", "workflow": "yearly_report", "cron": "0 1 * * *"}
    r = await shop.client.post("/api/schedules", json=body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert (await delete(shop, "keep", role=None)).status_code == 401
    r = await shop.post("/api/schedules", "viewer", json=body)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    r = await delete(shop, "keep", "viewer")
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    # a bad body is not looked at before the role
    r = await shop.post("/api/schedules", "viewer", json={"name": ""})
    assert r.status_code == 403
    assert {s["name"] for s in (await shop.get("/api/schedules")).json()} == {
        "keep", "yearly_report"}
    # an admin may (operator or above)
    assert (await shop.post("/api/schedules", "admin", json=body)).status_code == 201
    assert (await delete(shop, "new", "admin")).status_code == 204
    admin = f"token:{shop.names['admin']}"
    assert await schedule_records(shop) == [
        (admin, "schedule.created", "new", {"when": "0 1 * * *", "workflow": "yearly_report"}),
        (admin, "schedule.deleted", "new", {})]


async def test_deleting_a_code_schedule_lasts_until_a_worker_of_that_code_opens_the_app(
    shop: Shop, store_url: str,
) -> None:
    """The library's semantics (docs/flow-control.md#schedules): the console deletes
    it, and a worker whose code declares it records it anew when it opens the app."""
    assert (await delete(shop, "yearly_report")).status_code == 204
    assert "yearly_report" not in by_name((await shop.get("/api/schedules")).json())
    worker = with_reminder(make_shop(store_url, state={"emails_broken": False}))
    async with worker:
        listed = by_name((await shop.get("/api/schedules")).json())
        assert listed["yearly_report"]["source"] == "code"
        assert listed["yearly_report"]["when"] == YEARLY
