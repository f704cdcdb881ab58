"""Schedules with the skipping clock: ticks, arguments, overlap, catch-up, time zones, API."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pydantic
import pytest

from cantata import App
from cantata.errors import (
    ConfigurationError,
    PayloadTooLarge,
    ScheduleExists,
    SerializationError,
    UnknownSchedule,
)
from cantata.model.schedule import ScheduleSpec, tick_key
from cantata.testing import SkipClock, environment
from tests.flow.helpers import ManualClock, until

T0 = 1_800_000_000.0  # a whole minute (and hour)


async def runs_of(app: App, workflow: str) -> list[tuple[str, str]]:
    """(idempotency key, status) of the runs of ``workflow``, oldest first."""
    runs = await app.store.list_runs(app.name, workflow=workflow, limit=10_000)
    return sorted((r.idempotency_key or "", str(r.status)) for r in runs)


async def test_every_tick_starts_one_run_with_the_tick_as_argument() -> None:
    app = App("sched")
    seen: list[dt.datetime] = []

    @app.schedule(every=60, overlap="allow")  # above @workflow
    @app.workflow
    async def report(ctx: object, tick):  # type: ignore[no-untyped-def]
        seen.append(tick)

    @app.workflow
    @app.schedule("*/5 * * * *", name="five", overlap="allow")  # below @workflow
    async def sweep(ctx: object, tick: dt.datetime) -> str:
        return tick.isoformat()

    app.configure(store="memory://", broker="embedded")
    app.clock = SkipClock(start=T0 + 1)
    async with app:
        await app.clock.sleep(600)
        await until(lambda: _count(app, "sweep", 2))
        await until(lambda: _count(app, "report", 10))
        await asyncio.sleep(0.2)
        keys = [k for k, _ in await runs_of(app, "sweep")]
    assert seen[:10] == [dt.datetime.fromtimestamp(T0 + 60 * i, dt.UTC) for i in range(1, 11)]
    assert all(t.tzinfo is not None and t.utcoffset() == dt.timedelta(0) for t in seen)
    assert keys[:2] == [tick_key("five", T0 + 300), tick_key("five", T0 + 600)]


async def _count(app: App, workflow: str, n: int) -> bool:
    return len(await app.store.list_runs(app.name, workflow=workflow)) >= n


def test_cron_time_zones_and_daylight_saving() -> None:
    spec = ScheduleSpec("n", "wf", cron="30 2 * * *", timezone="Europe/Berlin")
    start = dt.datetime(2026, 3, 27, 12, tzinfo=dt.UTC).timestamp()
    ticks = spec.ticks(start, start + 3 * 86400)
    local = [dt.datetime.fromtimestamp(t, dt.UTC).isoformat() for t in ticks]
    # 02:30 does not exist on 29 March (clocks jump 02:00 -> 03:00): it runs at 03:00.
    assert local == ["2026-03-28T01:30:00+00:00", "2026-03-29T01:00:00+00:00",
                     "2026-03-30T00:30:00+00:00"]
    start = dt.datetime(2026, 10, 24, 12, tzinfo=dt.UTC).timestamp()
    ticks = spec.ticks(start, start + 3 * 86400)
    # 02:30 happens twice on 25 October: one run, at the first.
    assert [dt.datetime.fromtimestamp(t, dt.UTC).isoformat() for t in ticks] == [
        "2026-10-25T00:30:00+00:00", "2026-10-26T01:30:00+00:00", "2026-10-27T01:30:00+00:00"]
    every = ScheduleSpec("e", "wf", every=90)
    assert every.ticks(0, 300) == [90, 180, 270]
    assert every.next_tick(270) == 360


@pytest.mark.parametrize(("overlap", "while_busy", "in_all"), [
    ("skip", 1, 1), ("buffer_one", 1, 2), ("allow", 5, 5),
])
async def test_overlap_policies(overlap: str, while_busy: int, in_all: int) -> None:
    app = App("sched")
    gate = asyncio.Event()

    @app.schedule(every=60, overlap=overlap)
    @app.workflow
    async def slow(ctx: object, tick: dt.datetime) -> None:
        await gate.wait()

    clock = ManualClock(T0 + 1)
    app.configure(store="memory://", broker="embedded")
    app.clock = clock
    async with app:
        for k in range(1, 6):  # five ticks while the first run is in progress
            clock.advance(60)
            await until(lambda k=k: _decided_until(app, T0 + 60 * k))  # type: ignore[misc]
        assert len(await runs_of(app, "slow")) == while_busy
        gate.set()
        for _ in range(3):  # let a buffered tick start once the first run ended
            await until(lambda: _all_ended(app))
            clock.advance(1)
            await asyncio.sleep(0.1)
        await until(lambda: _all_ended(app))
        keys = [k for k, _ in await runs_of(app, "slow")]
    assert keys == [tick_key("slow", T0 + 60 * i) for i in range(1, in_all + 1)]


async def _decided_until(app: App, tick: float) -> bool:
    import json

    [row] = await app.store.schedules(app.name)
    state = json.loads(row.state)
    return bool(state["last_tick"] >= tick and not state["starting"])


async def _all_ended(app: App) -> bool:
    runs = await app.store.list_runs(app.name, workflow="slow", limit=10_000)
    return all(r.status.is_final for r in runs)


@pytest.mark.parametrize(("catch_up", "limit", "missed"),
                         [("skip", None, 0), ("last", None, 1), ("all", None, 10),
                          ("all", 3, 3)])
async def test_missed_ticks_after_a_stop(
    tmp_path: Path, catch_up: str, limit: int | None, missed: int
) -> None:
    url = f"sqlite:///{tmp_path}/s.db"

    def build(start: float) -> App:
        app = App("sched", store=url, broker="embedded", clock=SkipClock(start=start))

        @app.schedule(every=60, catch_up=catch_up, catch_up_limit=limit, overlap="allow")
        @app.workflow
        async def tick(ctx: object, when: dt.datetime) -> None:
            return None

        return app

    first = build(T0 + 1)
    async with first:
        pass  # a worker recorded the schedule: no tick before now is due
    later = build(T0 + 10 * 60 + 30)  # down for ten ticks
    async with later:
        await until(lambda: _decided(later))
        keys = [k for k, _ in await runs_of(later, "tick")]
    missed_keys = [tick_key("tick", T0 + 60 * i) for i in range(1, 11)]
    caught = [k for k in keys if k in missed_keys]  # (later ticks are current ones)
    assert caught == (missed_keys[len(missed_keys) - missed:] if missed else [])


async def _decided(app: App) -> bool:
    import json

    [row] = await app.store.schedules(app.name)
    return bool(json.loads(row.state)["last_tick"] >= T0 + 600 and not
                json.loads(row.state)["starting"])


async def test_api_create_pause_resume_trigger_delete() -> None:
    app = App("sched")
    got: list[object] = []

    @app.workflow
    async def nightly(ctx: object, tick: dt.datetime, data: dict[str, int]) -> None:
        got.append((tick, data))

    async with environment(app):
        await app.schedules.create("n", "0 2 * * *", nightly, input={"x": 1},
                                   timezone="America/New_York")
        [info] = await app.schedules.list()
        assert (info.name, info.when, info.paused, info.source) == ("n", "0 2 * * *", False,
                                                                     "api")
        assert info.next_tick is not None and info.next_tick.hour in (6, 7)
        await app.schedules.pause("n")
        assert (await app.schedules.list())[0].paused
        await app.schedules.resume("n")
        handle = await app.schedules.trigger("n")
        await handle.result(timeout=10)
        assert got and got[0][1] == {"x": 1}  # type: ignore[index]
        await app.schedules.delete("n")
        assert await app.schedules.list() == []
        with pytest.raises(UnknownSchedule, match="'n'"):
            await app.schedules.pause("n")
        with pytest.raises(ConfigurationError, match="invalid cron expression 'nope'"):
            await app.schedules.create("bad", "nope", nightly)


async def test_create_without_replace_leaves_a_schedule_of_that_name_as_it_is() -> None:
    """``replace=False`` (the console's create): a name in use raises ScheduleExists,
    saying what to do, and nothing changes or is recorded; the default replaces."""
    app = App("sched")

    @app.schedule("0 3 * * *")
    @app.workflow
    async def nightly(ctx: object, tick: dt.datetime) -> None:
        pass

    async with environment(app):
        await app.schedules.create("n", "0 2 * * *", nightly, replace=False)
        with pytest.raises(ScheduleExists, match=r"a schedule named 'n' exists in app "
                           r"'sched': choose another name, or delete it first") as made:
            await app.schedules.create("n", None, nightly, every=60, replace=False)
        assert "declared in code" not in str(made.value)
        with pytest.raises(ScheduleExists, match=r"declared in code with @app\.schedule"):
            await app.schedules.create("nightly", None, nightly, every=60, replace=False)
        specs = {s.name: s.when for s in await app.schedules.list()}
        assert specs == {"n": "0 2 * * *", "nightly": "0 3 * * *"}
        actions = [r.action for r in await app.store.audit_records(app.name)
                   if r.action.startswith("schedule.")]
        assert actions == ["schedule.created"]
        await app.schedules.create("n", None, nightly, every=60)  # replace=True: replaced
        assert {s.name: s.when for s in await app.schedules.list()}["n"] == "every 60s"


async def test_an_input_over_max_payload_is_refused_when_the_schedule_is_made() -> None:
    """Each tick's run takes the input as its argument, and a run's arguments are held
    to ``max_payload``: a schedule whose input is over it could start no run, so it is
    refused when it is made, not at every tick."""
    app = App("sched", max_payload=1024)

    @app.workflow
    async def feed(ctx: object, tick: dt.datetime, source: str) -> None:
        pass

    async with environment(app):
        with pytest.raises(PayloadTooLarge, match=r"input of schedule 'big'.*over the "
                           r"app's max_payload of 1024 bytes"):
            await app.schedules.create("big", None, feed, every=60, input="x" * 1100)
        assert await app.schedules.list() == []
        await app.schedules.create("small", None, feed, every=60, input="x" * 900)
        assert [s.name for s in await app.schedules.list()] == ["small"]


async def _tick(ctx: Any, tick: Any) -> None:
    return None


def test_bad_schedules_name_the_value() -> None:
    """(Unnamed, each is checked when applied: its error names the schedule.)"""
    app = App("sched")
    with pytest.raises(ConfigurationError, match=r"invalid cron expression '61 \* \* \* \*'"):
        app.schedule("61 * * * *")(_tick)
    with pytest.raises(ConfigurationError, match="unknown time zone 'Mars/Base'"):
        app.schedule("* * * * *", timezone="Mars/Base")(_tick)
    with pytest.raises(ConfigurationError, match="overlap='sometimes'"):
        app.schedule(every=5, overlap="sometimes")(_tick)
    with pytest.raises(ConfigurationError, match="catch_up='most'"):
        app.schedule(every=5, catch_up="most")(_tick)
    with pytest.raises(ConfigurationError, match="catch_up_limit=0"):
        app.schedule(every=5, catch_up_limit=0)(_tick)
    with pytest.raises(ConfigurationError, match="every=-1"):
        app.schedule(every=-1)(_tick)
    with pytest.raises(ConfigurationError, match=(
        r"every=1e\+16 must be seconds > 0, at most 3155760000 seconds \(100 years\)"
    )):
        app.schedule(every=1e16)(_tick)
    with pytest.raises(ConfigurationError, match="one of them"):
        app.schedule("* * * * *", every=5)(_tick)


async def test_a_triggered_runs_handle_outlives_the_block_it_was_made_in(
    tmp_path: Path,
) -> None:
    """As the handles of app.start: a handle from app.schedules.trigger in an earlier
    `async with` block works once the app is open again."""
    app = App("sched", store=f"sqlite:///{tmp_path / 's.db'}")

    @app.workflow
    async def nightly(ctx: object, tick: dt.datetime) -> str:
        return "ran"

    async with app.client():
        await app.schedules.create("n", "0 2 * * *", nightly)
        handle = await app.schedules.trigger("n")
    async with app:
        assert await handle.result(timeout=10) == "ran"


@pytest.mark.parametrize("overlap", ["skip", "buffer_one", "allow"])
async def test_a_week_skipped_at_once_starts_every_nightly_run(overlap: str) -> None:
    """Ticks a scheduler sees late (the clock jumped a week) start as usual, one after
    another: none of them came while a run of the schedule was in progress."""
    app = App("sched")

    @app.schedule("30 2 * * *", timezone="Europe/Berlin", overlap=overlap)
    @app.workflow
    async def nightly(ctx: object, tick: dt.datetime) -> None:
        return None

    async with environment(app):
        start = app.clock.now()
        await app.clock.sleep(7 * 86400 + 1)
        week = ScheduleSpec("nightly", "nightly", "30 2 * * *", timezone="Europe/Berlin")
        ticks = week.ticks(start, start + 7 * 86400 + 1)
        assert len(ticks) == 7
        await until(lambda: _ended(app, "nightly", 7))
        runs = dict(await runs_of(app, "nightly"))  # (the skipping clock goes on after)
    assert [runs.get(tick_key("nightly", t)) for t in ticks] == ["completed"] * 7


async def _ended(app: App, workflow: str, n: int) -> bool:
    runs = await app.store.list_runs(app.name, workflow=workflow, limit=10_000)
    return len(runs) >= n and all(r.status.is_final for r in runs)


async def test_ticks_of_one_late_pass_wait_for_the_run_it_started() -> None:
    """Three ticks due in one pass, fast runs: all three start (before the fix, the
    second and third were taken as overlapping the run the pass had just started)."""
    app = App("sched")

    @app.schedule(every=60, overlap="skip")
    @app.workflow
    async def slow(ctx: object, tick: dt.datetime) -> None:
        return None

    clock = ManualClock(T0 + 1)
    app.configure(store="memory://", broker="embedded")
    app.clock = clock
    async with app:
        await asyncio.sleep(0.1)
        clock.advance(180)  # ticks T0+60, T0+120, T0+180 at once
        await until(lambda: _ended(app, "slow", 3))
        keys = [k for k, _ in await runs_of(app, "slow")]
    assert keys == [tick_key("slow", T0 + 60 * i) for i in range(1, 4)]


async def test_an_unannotated_tick_is_a_datetime_for_schedules_made_at_run_time() -> None:
    app = App("sched")
    seen: list[object] = []

    @app.workflow
    async def plain(ctx: object, tick):  # type: ignore[no-untyped-def]
        seen.append(tick)

    @app.workflow
    async def with_input(ctx: object, tick, data):  # type: ignore[no-untyped-def]
        seen.append(tick)

    async with environment(app):
        # (input: a set, JSON-encoded as app.start encodes arguments)
        await app.schedules.create("p", None, plain, every=60)
        await app.schedules.create("i", None, with_input, every=60, input={1, 2})
        await (await app.schedules.trigger("p")).result(timeout=10)
        await (await app.schedules.trigger("i")).result(timeout=10)
        await app.clock.sleep(61)  # and real ticks, started by the worker
        await until(lambda: len(seen) >= 4)
    assert all(isinstance(t, dt.datetime) and t.utcoffset() == dt.timedelta(0)
               for t in seen), seen


async def test_a_code_schedule_no_code_declares_stops_ticking(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/s.db"

    def build(declared: bool) -> App:
        app = App("sched", store=url, broker="embedded", clock=SkipClock(start=T0 + 1))

        async def tickwf(ctx: object, tick: dt.datetime) -> None:
            return None

        if declared:
            app.schedule(every=60, overlap="allow")(tickwf)
        app.workflow(tickwf)
        return app

    async with build(True):
        pass  # a worker recorded it as declared in code
    app = build(False)  # the decorator line was removed
    async with app:
        await app.schedules.create("api", None, "tickwf", every=60, overlap="allow")
        await app.clock.sleep(600)
        await until(lambda: _count(app, "tickwf", 10))
        await asyncio.sleep(0.3)
        keys = [k for k, _ in await runs_of(app, "tickwf")]
        infos = {i.name: i for i in await app.schedules.list()}
    assert keys and all(k.startswith("schedule:api:") for k in keys), keys
    assert (infos["tickwf"].source, infos["tickwf"].in_code) == ("code", False)
    assert infos["api"].in_code is None


async def test_bad_schedule_arguments_raise_cantata_errors() -> None:
    from cantata.errors import RegistrationError

    app = App("sched")

    @app.workflow
    async def wf(ctx: object, tick: dt.datetime) -> None:
        return None

    @app.workflow
    async def cleanup(ctx: object) -> None:
        return None

    @app.workflow
    async def job(ctx: object, i: int) -> None:
        return None

    app.queue("one")
    with pytest.raises(RegistrationError, match=r"cleanup.*tick"):
        app.schedule(every=60)(cleanup)
    async with environment(app):
        with pytest.raises(ConfigurationError, match="schedule name None"):
            await app.schedules.create(None, "* * * * *", wf)  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="schedule name '' must be 1-100"):
            await app.schedules.create("", "* * * * *", wf)
        with pytest.raises(SerializationError, match="input of schedule x"):
            await app.schedules.create("x", "* * * * *", wf, input=object())
        with pytest.raises(ConfigurationError, match=r"cleanup.*tick"):
            await app.schedules.create("c", "* * * * *", cleanup)
        with pytest.raises(ConfigurationError, match=r"with_input|input"):
            await app.schedules.create("c", "* * * * *", wf, input=1)
        with pytest.raises(ConfigurationError, match=r"priority=9223372036854775808"):
            await app.start(job, 1, queue="one", priority=2**63)
        with pytest.raises(ConfigurationError, match=r"priority=-9223372036854775809"):
            await app.start(job, 1, queue="one", priority=-2**63 - 1)
        assert await app.schedules.list() == []


def test_a_bad_schedule_is_named_by_its_workflow_or_name() -> None:
    """Not "schedule '(schedule)'": the name the schedule has, its workflow's or the
    name given, above or below @app.workflow."""
    app = App("sched")
    with pytest.raises(ConfigurationError,
                       match=r"^schedule 'nightly': invalid cron expression 'not a cron'"):
        @app.schedule("not a cron")
        @app.workflow
        async def nightly(ctx: Any, tick: Any) -> None:
            return None
    with pytest.raises(ConfigurationError,
                       match=r"^schedule 'hourly': invalid cron expression 'not a cron'"):
        @app.workflow
        @app.schedule("not a cron")
        async def hourly(ctx: Any, tick: Any) -> None:
            return None
    with pytest.raises(ConfigurationError, match=r"^schedule 'reports': every=-1"):
        app.schedule(every=-1, name="reports")


def test_cron_must_have_five_fields() -> None:
    app = App("sched")
    for cron in ("0 * * * * *", "* * * * * */15", "* * * *", "@daily"):
        with pytest.raises(ConfigurationError,
                           match=rf"invalid cron expression '{re.escape(cron)}'.*five"):
            app.schedule(cron)(_tick)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_schedule_operations_are_audited_with_their_actor(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Each operation writes one audit record, with the actor given (or this process)."""
    if backend == "postgres":
        pytest.importorskip("asyncpg")
        url = request.getfixturevalue("pg_session_url")
    else:
        url = f"sqlite:///{tmp_path / 's.db'}"
    app = App(f"sched-{tmp_path.name[-8:]}", store=url)

    @app.workflow
    async def nightly(ctx: object, tick: dt.datetime) -> None:
        return None

    async with app.client():
        before = await app.store.audit_head_seq(app.name)
        await app.schedules.create("n", "0 2 * * *", nightly, actor="cli:alice@host")
        await app.schedules.create("n", "0 3 * * *", nightly, actor="cli:alice@host")
        await app.schedules.pause("n", actor="token:bob")
        await app.schedules.resume("n")
        run_id = (await app.schedules.trigger("n", actor="token:bob")).run_id
        await app.schedules.delete("n", actor="cli:carol@host")
        with pytest.raises(UnknownSchedule):
            await app.schedules.delete("n", actor="cli:carol@host")  # nothing: no record
        records = await app.store.audit_records(app.name, after_seq=before)
        assert (await app.store.verify_audit(app.name)).ok
    ours = [(r.actor, r.action, r.target, json.loads(r.data)) for r in records
            if r.action.startswith("schedule.")]
    process = ours[3][0] if len(ours) > 3 else ""
    assert process.startswith("process:")
    assert ours == [
        ("cli:alice@host", "schedule.created", "n",
         {"workflow": "nightly", "when": "0 2 * * *"}),
        ("cli:alice@host", "schedule.replaced", "n",
         {"workflow": "nightly", "when": "0 3 * * *"}),
        ("token:bob", "schedule.paused", "n", {}),
        (process, "schedule.resumed", "n", {}),
        ("token:bob", "schedule.triggered", "n", {"run_id": run_id}),
        ("cli:carol@host", "schedule.deleted", "n", {}),
    ]
    # the triggered run is the operator's too, as a run app.start(actor=...) creates
    assert [r.actor for r in records if (r.action, r.target) == ("run.created", run_id)] == [
        "token:bob"]


class Feed(pydantic.BaseModel):
    """What a scheduled workflow takes as its input (module level: resolved here)."""

    source: str
    limit: int


async def test_an_input_that_does_not_fit_the_workflows_type_is_refused_when_made(
        tmp_path: Path) -> None:
    """Each tick's run takes the input as its second argument: an input that is not the
    declared type would fail every run in its first line, so the schedule is refused
    when it is made, in one line naming it, the workflow, the argument and the field."""
    app = App("sched")

    @app.workflow
    async def pull(ctx: object, tick: dt.datetime, feed: Feed) -> int:
        return feed.limit

    async with environment(app, store=f"sqlite:///{tmp_path}/sched.db"):
        with pytest.raises(SerializationError) as info:
            await app.schedules.create("p", None, pull, every=60,
                                       input={"source": "erp", "limit": "many"})
        message = str(info.value)
        assert "\n" not in message, message
        assert message.startswith(
            "schedule 'p': workflow 'pull' argument 2 (feed) does not match its declared "
            "type Feed: limit: Input should be a valid integer"), message
        assert message.endswith("(the schedule was not made)"), message
        assert await app.schedules.list() == []
        await app.schedules.create("p", None, pull, every=60, input={"source": "erp",
                                                                     "limit": 5})
        handle = await app.schedules.trigger("p")
        assert await handle.result(timeout=10) == 5
