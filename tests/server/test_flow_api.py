"""``/api/schedules`` and ``/api/queues`` against the shop with a queue and schedules, on
SQLite and on PostgreSQL (docs/console.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
import zoneinfo
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from cantata import App, Rate
from cantata.cli import common
from cantata.cli.main import main
from cantata.server.stream import change_of
from tests.helpers import eventually
from tests.server.conftest import Shop, make_tokens
from tests.server.shop import make_shop
from tests.server.test_api import audit_records
from tests.server.test_cli_json import cli_json

YEARLY = "0 3 1 1 *"  # Jan 1st, 03:00: a code schedule that never ticks during a test


def with_flow(app: App) -> App:
    """The shop plus a queue in front of a fragile downstream and a scheduled report."""
    app.queue("fragile", concurrency=1, rate=Rate(5, per=60))

    @app.schedule(YEARLY)
    @app.workflow
    async def yearly_report(ctx: Any, tick: dt.datetime) -> dict[str, Any]:
        return {"tick": tick.isoformat()}

    return app


@pytest.fixture
async def shop(store_url: str) -> AsyncIterator[Shop]:
    state: dict[str, Any] = {"emails_broken": False}
    app = with_flow(make_shop(store_url, state=state))
    async with app:
        tokens, names = await make_tokens(app)
        await app.schedules.create("weekly-sync", "15 4 * * 1", "yearly_report",
                                   timezone="Europe/Berlin", overlap="buffer_one",
                                   catch_up="all", catch_up_limit=2)
        transport = httpx.ASGITransport(app=app.asgi(stream_interval=0.05))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield Shop(app, state, client, tokens, names)


def by_name(listed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in listed}


def parse(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


async def test_schedules_are_listed_with_their_spec_state_and_next_ticks(shop: Shop) -> None:
    r = await shop.get("/api/schedules", "viewer")
    assert r.status_code == 200, r.text
    listed = r.json()
    assert [s["name"] for s in listed] == ["weekly-sync", "yearly_report"]
    code, api = by_name(listed)["yearly_report"], by_name(listed)["weekly-sync"]
    assert {k: code[k] for k in ("workflow", "cron", "every", "when", "timezone", "overlap",
                                 "catch_up", "catch_up_limit", "paused", "source",
                                 "in_code", "last_run", "served")} == {
        "workflow": "yearly_report", "cron": YEARLY, "every": None, "when": YEARLY,
        "timezone": "UTC", "overlap": "skip", "catch_up": "skip", "catch_up_limit": None,
        "paused": False, "source": "code", "in_code": True, "last_run": None,
        "served": True}  # (the fixture's app is a worker too)
    ticks = [parse(t) for t in code["next_ticks"]]
    assert len(ticks) == 3 and ticks == sorted(ticks) and parse(code["next_tick"]) == ticks[0]
    assert all((t.month, t.day, t.hour, t.minute) == (1, 1, 3, 0) for t in ticks)
    assert [t.year for t in ticks] == [ticks[0].year + i for i in range(3)]
    assert code["next_tick"].endswith("Z")  # RFC 3339 UTC, as every time of the API
    # made at run time: read in its own zone, an API schedule (in_code says nothing)
    assert (api["source"], api["in_code"], api["timezone"], api["overlap"], api["catch_up"],
            api["catch_up_limit"]) == ("api", None, "Europe/Berlin", "buffer_one", "all", 2)
    assert len(api["next_ticks"]) == 3
    for t in api["next_ticks"]:
        local = parse(t).astimezone(zoneinfo.ZoneInfo("Europe/Berlin"))
        assert (local.weekday(), local.hour, local.minute) == (0, 4, 15)


async def test_pause_resume_and_trigger_are_audited_with_the_token(shop: Shop) -> None:
    token = f"token:{shop.names['operator']}"
    r = await shop.post("/api/schedules/yearly_report/pause")
    assert r.status_code == 200, r.text
    paused = r.json()
    assert paused["name"] == "yearly_report" and paused["paused"] is True
    assert paused["next_tick"] is None and paused["next_ticks"] == []
    listed = by_name((await shop.get("/api/schedules")).json())
    assert listed["yearly_report"]["paused"] is True
    assert listed["weekly-sync"]["paused"] is False
    assert (await shop.app.schedules.list())[1].paused is True  # the library's own view

    r = await shop.post("/api/schedules/yearly_report/resume")
    assert r.status_code == 200 and r.json()["paused"] is False
    assert r.json()["next_tick"] is not None

    r = await shop.post("/api/schedules/yearly_report/trigger")
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    assert r.json()["schedule"] == "yearly_report"
    run = await shop.app.get_handle(run_id).result(timeout=10)
    assert parse(run["tick"]).tzinfo is not None

    records = [(x["actor"], x["action"], x["target"], x["data"])
               for x in await audit_records(shop) if x["actor"] == token]
    assert records == [
        (token, "schedule.paused", "yearly_report", {}),
        (token, "schedule.resumed", "yearly_report", {}),
        # the triggered run is created by the token too, then the trigger is recorded
        (token, "run.created", run_id, records[2][3]),
        (token, "schedule.triggered", "yearly_report", {"run_id": run_id}),
    ]
    assert records[2][3]["workflow"] == "yearly_report"


async def test_the_last_run_of_a_schedules_ticks_is_shown_with_its_tick_and_status(
    shop: Shop,
) -> None:
    await shop.app.schedules.create("every-second", None, "yearly_report", every=1)
    found: dict[str, Any] = {}

    async def ticked() -> bool:
        listed = by_name((await shop.get("/api/schedules")).json())
        found.update(listed["every-second"])
        last = found["last_run"]
        return last is not None and last["status"] == "completed"

    await eventually(ticked, timeout=15)
    last = found["last_run"]
    run = (await shop.get(f"/api/runs/{last['run_id']}")).json()
    assert run["idempotency_key"] == f"schedule:every-second:{last['tick']}"
    assert parse(last["tick"]).microsecond == 0 and found["every"] == 1.0
    assert found["when"] == "every 1s" and found["cron"] is None
    assert (await shop.post("/api/schedules/every-second/pause")).status_code == 200


async def test_an_unknown_schedule_is_a_404_in_the_error_shape(shop: Shop) -> None:
    # a name longer than any schedule's (over 100 characters) is simply unknown too
    for path in ("nope/pause", "nope/resume", "nope/trigger", "a%00b/pause",
                 "x" * 100 + "/trigger", "x" * 101 + "/pause", "y" * 5000 + "/resume"):
        r = await shop.post(f"/api/schedules/{path}")
        assert r.status_code == 404, (path[:20], r.text[:200])
        error = r.json()["error"]
        assert error["code"] == "unknown_schedule", path[:20]
        assert error["field"] is None
        # the API's own way to see the names, not the CLI's
        assert error["message"].endswith("GET /api/schedules lists them"), error["message"]
    assert "'nope'" in (await shop.post("/api/schedules/nope/pause")).json()["error"]["message"]
    # nothing was audited for them
    assert not [x for x in await audit_records(shop) if x["action"].startswith("schedule.")
                and x["actor"].startswith("token:")]


async def test_a_name_with_a_slash_or_a_space_is_addressed_encoded(shop: Shop) -> None:
    name = f"reports/daily sync {uuid.uuid4().hex[:4]}"
    await shop.app.schedules.create(name, YEARLY, "yearly_report")
    r = await shop.post(f"/api/schedules/{name.replace('/', '%2F').replace(' ', '%20')}/pause")
    assert r.status_code == 200, r.text
    assert r.json()["name"] == name and r.json()["paused"] is True
    lines = f"nightly\nsecond line {uuid.uuid4().hex[:4]}"  # (any text the library takes)
    await shop.app.schedules.create(lines, YEARLY, "yearly_report")
    for action in ("pause", "resume"):
        r = await shop.post(f"/api/schedules/{quote(lines, safe='')}/{action}")
        assert r.status_code == 200, r.text
        assert r.json()["name"] == lines
    r = await shop.client.delete(f"/api/schedules/{quote(lines, safe='')}",
                                 headers=shop.auth("operator"))
    assert r.status_code == 204, r.text


async def test_roles_viewers_read_operators_act(shop: Shop) -> None:
    for path in ("/api/schedules", "/api/queues"):
        assert (await shop.client.get(path)).status_code == 401
        assert (await shop.get(path, "viewer")).status_code == 200
    for action in ("pause", "resume", "trigger"):
        path = f"/api/schedules/yearly_report/{action}"
        r = await shop.client.post(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
        r = await shop.post(path, "viewer")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        assert (await shop.post(path, "admin")).status_code in (200, 201)
    # the refused calls changed nothing and recorded nothing
    assert [(x["actor"], x["action"]) for x in await audit_records(shop)
            if x["action"].startswith("schedule.") and x["actor"].startswith("token:")] == [
        (f"token:{shop.names['admin']}", f"schedule.{a}")
        for a in ("paused", "resumed", "triggered")]


async def test_a_schedule_change_is_a_live_change(shop: Shop) -> None:
    await shop.post("/api/schedules/yearly_report/pause")
    trig = (await shop.post("/api/schedules/yearly_report/trigger")).json()
    records = await shop.app.store.audit_records(shop.app.name, after_seq=0, limit=10_000)
    changes = [c.data for c in map(change_of, records) if c is not None and c.kind == "schedule"]
    assert [(c["name"], c["action"], c["run_id"]) for c in changes] == [
        ("weekly-sync", "created", None),  # (the fixture's app.schedules.create)
        ("yearly_report", "paused", None), ("yearly_report", "triggered", trig["run_id"])]
    assert all(c["time"].endswith("Z") for c in changes)


async def test_queues_show_limits_depth_in_progress_and_the_oldest_wait(shop: Shop) -> None:
    r = await shop.get("/api/queues", "viewer")
    assert r.status_code == 200, r.text
    [q] = r.json()
    assert q == {"name": "fragile", "concurrency": 1, "per_worker": None,
                 "rate": {"limit": 5, "per": 60.0}, "priorities": False, "waiting": 0,
                 "in_progress": 0, "began_recently": 0, "window_seconds": q["window_seconds"],
                 "oldest_waiting_since": None, "oldest_waiting_seconds": None,
                 "partitioned": False, "per_partition_max": None, "served": True}
    assert 60 <= q["window_seconds"] <= 61
    # runs that wait for an approval hold the queue's one slot: the others wait
    handles = [await shop.app.start("await_approval", {"id": f"Q-{i}"}, queue="fragile")
               for i in range(3)]
    seen: dict[str, Any] = {}

    async def settled() -> bool:
        [got] = (await shop.get("/api/queues")).json()
        seen.update(got)
        done: bool = got["in_progress"] == 1 and got["waiting"] == 2
        return done

    await eventually(settled, timeout=15)
    assert seen["began_recently"] == 1
    assert seen["oldest_waiting_seconds"] is not None and seen["oldest_waiting_seconds"] >= 0
    since = parse(seen["oldest_waiting_since"])
    assert abs(since.timestamp() - shop.app.clock.now()) < 60
    for h in handles:
        await h.cancel()


async def test_a_queued_runs_page_says_its_queue_its_place_and_the_queues_limits(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    """`GET /api/runs/{id}` of a run started in a queue says the queue, partition key,
    priority, its place among the runs waiting there (1 begins next), `running` once it
    began, and the queue's limits; a run of no queue has `queue: null`. `cantata run
    --json` says the same (docs/console.md)."""
    limits = {"concurrency": 1, "per_worker": None, "rate": {"limit": 5, "per": 60.0},
              "priorities": False}
    # the first holds the queue's one slot (it waits for an approval): the others wait
    handles = [await shop.app.start("await_approval", {"id": f"W-{i}"}, queue="fragile")
               for i in range(3)]
    ids = [h.run_id for h in handles]
    seen: dict[str, Any] = {}

    async def settled() -> bool:
        for run_id in ids:
            r = await shop.get(f"/api/runs/{run_id}")
            assert r.status_code == 200, r.text
            seen[run_id] = r.json()["queue"]
        running: bool = seen[ids[0]]["state"] == "running"
        return running

    await eventually(settled, timeout=15)
    assert seen[ids[0]] == {"name": "fragile", "partition": None, "priority": 0,
                            "state": "running", "position": None, "waiting_since": None,
                            "limits": limits}
    for place, run_id in enumerate(ids[1:], start=1):
        q = seen[run_id]
        assert (q["state"], q["position"], q["name"], q["limits"]) == (
            "waiting", place, "fragile", limits), q
        assert abs(parse(q["waiting_since"]).timestamp() - shop.app.clock.now()) < 60
    assert (await cli_json(capsys, shop, "run", ids[2]))["queue"] == seen[ids[2]]
    plain = await shop.app.start("await_approval", {"id": "W-plain"})
    assert (await shop.get(f"/api/runs/{plain.run_id}")).json()["queue"] is None
    for h in [*handles, plain]:
        await h.cancel()
    await eventually(lambda: _ended(shop, ids[2]), timeout=15)
    ended = (await shop.get(f"/api/runs/{ids[2]}")).json()["queue"]
    assert (ended["state"], ended["position"]) == ("ended", None)


async def _ended(shop: Shop, run_id: str) -> bool:
    cancelled: bool = (await shop.get(f"/api/runs/{run_id}")).json()["status"] == "cancelled"
    return cancelled


async def test_a_partitioned_runs_place_counts_its_partition_only(store_url: str) -> None:
    """A partitioned run's place is among the runs waiting in its partition; with
    priorities, by priority first (docs/flow-control.md#queues)."""
    app = make_shop(store_url)
    app.queue("per-customer", concurrency=1, priorities=True)
    async with app.client():  # no worker: every run waits
        tokens, names = await make_tokens(app)
        a1 = await app.start("await_approval", {"id": "a1"}, queue="per-customer",
                             partition="a", priority=5)
        await app.start("await_approval", {"id": "b1"}, queue="per-customer", partition="b")
        a2 = await app.start("await_approval", {"id": "a2"}, queue="per-customer",
                             partition="a", priority=1)
        transport = httpx.ASGITransport(app=app.asgi(stream_interval=0.05))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            shop = Shop(app, {}, client, tokens, names)
            first = (await shop.get(f"/api/runs/{a2.run_id}")).json()["queue"]
            second = (await shop.get(f"/api/runs/{a1.run_id}")).json()["queue"]
    assert (first["partition"], first["priority"], first["position"]) == ("a", 1, 1)
    assert (second["partition"], second["priority"], second["position"]) == ("a", 5, 2)
    assert first["state"] == second["state"] == "waiting"
    assert first["limits"]["priorities"] is True


async def test_the_clis_json_is_the_apis_for_schedules_and_queues(
    shop: Shop, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cantata schedules list --json` and `cantata queues --json` print the objects
    `GET /api/schedules` and `GET /api/queues` answer, field for field."""
    await shop.app.schedules.create("every-second", None, "yearly_report", every=1)
    await eventually(lambda: _has_last_run(shop), timeout=15)
    await shop.app.schedules.pause("every-second")  # (its ticks stay put between the reads)

    async def last_run_ended() -> bool:  # (else its status may change between the reads)
        [got] = [s for s in (await shop.get("/api/schedules")).json()
                 if s["name"] == "every-second"]
        return got["last_run"]["status"] not in ("pending", "running")

    await eventually(last_run_ended, timeout=15)
    api = (await shop.get("/api/schedules")).json()
    cli = await cli_json(capsys, shop, "schedules", "list")
    # the CLI opens the app by name, without its code: whether the code declares a
    # code schedule is unknown there (null), as for any console without the code
    assert by_name(cli)["yearly_report"]["in_code"] is None
    assert by_name(api)["yearly_report"]["in_code"] is True
    by_name(cli)["yearly_report"]["in_code"] = True
    assert cli == api
    assert by_name(api)["every-second"]["last_run"]["status"] is not None
    assert await cli_json(capsys, shop, "queues") == (await shop.get("/api/queues")).json()


async def _has_last_run(shop: Shop) -> bool:
    return any(s.name == "every-second" and s.last_run_id is not None
               for s in await shop.app.schedules.list())


async def cli_text(capsys: pytest.CaptureFixture[str], app: App, *args: str) -> str:
    """What `cantata ARGS --app NAME --store URL` prints (a client: no worker)."""
    store = app._store_spec
    assert isinstance(store, str)
    code = await asyncio.get_running_loop().run_in_executor(
        None, main, [*args, "--app", app.name, "--store", store])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


async def test_served_says_whether_a_live_worker_serves_the_app(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schedules and queues say `served: false` while no worker's heartbeat is within
    its lease (the console alone is no worker): nothing ticks or begins then. The
    CLI's tables say it under them."""
    monkeypatch.setattr(common.console, "_width", 250)
    app = with_flow(make_shop(store_url))  # (its lease: 5 s)
    async with app.client():
        tokens, names = await make_tokens(app)
        await app.schedules.create("weekly-sync", "15 4 * * 1", "yearly_report")
        transport = httpx.ASGITransport(app=app.asgi(stream_interval=0.05))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            shop = Shop(app, {}, client, tokens, names)

            async def served() -> set[bool]:
                flags = set()
                for path in ("/api/schedules", "/api/queues"):
                    r = await shop.get(path)
                    assert r.status_code == 200, r.text
                    assert r.json(), path
                    flags |= {item["served"] for item in r.json()}
                return flags

            async def beat(seconds_ago: float, lease: float) -> set[bool]:
                await app.store.remove_worker(app.name, "w-1")
                await app.store.heartbeat(app.name, "w-1", app.clock.now() - seconds_ago,
                                          None, lease=lease)
                return await served()

            assert await served() == {False}  # no worker has ever run
            unserved = f"no worker is serving app {app.name!r} (no live worker heartbeat)"
            listed = await cli_text(capsys, app, "schedules", "list")
            assert f"{unserved}: no schedule ticks" in listed
            assert f"{unserved}: no queued run begins" in await cli_text(capsys, app, "queues")
            assert await beat(0, 30.0) == {True}
            assert await beat(20, 30.0) == {True}  # within its own lease (not the console's)
            assert await beat(20, 5.0) == {False}  # its lease ran out: it is gone
            await app.store.remove_worker(app.name, "w-1")
            worker = with_flow(make_shop(store_url))
            async with worker:  # a real worker process
                assert await served() == {True}
                for args in (("schedules", "list"), ("queues",)):
                    assert "no worker" not in await cli_text(capsys, app, *args)
            assert await served() == {False}  # stopped cleanly: its row is gone


async def test_a_partitioned_queue_gives_the_busiest_partitions_figures(
    store_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limits hold per partition: next to the sums, the highest figures of one
    partition are given, to read against them; a queue without keys has none. The
    CLI's table reads the same way."""
    monkeypatch.setattr(common.console, "_width", 250)
    app = make_shop(store_url)
    app.queue("per-customer", rate=Rate(2, per=60))
    app.queue("plain", concurrency=1)
    async with app:
        tokens, names = await make_tokens(app)
        for i in range(9):  # 3 customers, 3 runs each: 2 of each begin (the rate), 1 waits
            await app.start("await_approval", {"id": f"P-{i}"}, queue="per-customer",
                            partition=f"customer-{i % 3}")
        await app.start("await_approval", {"id": "plain-1"}, queue="plain")
        transport = httpx.ASGITransport(app=app.asgi(stream_interval=0.05))
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            shop = Shop(app, {}, client, tokens, names)
            seen: dict[str, Any] = {}

            async def settled() -> bool:
                seen.update(by_name((await shop.get("/api/queues")).json()))
                q = seen["per-customer"]
                return (q["in_progress"], q["waiting"], seen["plain"]["in_progress"]) == (6, 3, 1)

            await eventually(settled, timeout=20)
            q, plain = seen["per-customer"], seen["plain"]
            assert (q["began_recently"], q["partitioned"], q["served"]) == (6, True, True)
            assert q["per_partition_max"] == {"in_progress": 2, "began_recently": 2}
            assert (plain["partitioned"], plain["per_partition_max"]) == (False, None)
            assert (plain["in_progress"], plain["began_recently"]) == (1, 1)
            table = await cli_text(capsys, app, "queues")
            lines = {name: line for line in table.splitlines()
                     for name in ("per-customer", "plain") if f" {name} " in line}
            assert "6 (busiest partition 2)" in lines["per-customer"]
            assert "6 in 60s (busiest partition 2 of 2/60s)" in lines["per-customer"]
            assert "1 of 5/60s" not in lines["plain"] and "busiest" not in lines["plain"]
            assert " 1 in 60s " in lines["plain"]
            for h in await app.list_runs(limit=20):
                await app.get_handle(h.run_id).cancel()
