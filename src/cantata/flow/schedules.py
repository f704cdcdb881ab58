"""Durable schedules: cron or fixed-interval ticks, each starting exactly one run.

Declared with ``@app.schedule`` or ``app.schedules.create``; recorded in the store
(spec and state as JSON, updated compare-and-set). Every worker runs a
:class:`Scheduler`; whichever wins the compare-and-set of a schedule's state
decides its ticks, and every run is started with the idempotency key
``schedule:NAME:TICK``, so a tick starts one run however many workers race.
See docs/flow-control.md.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cantata.errors import (
    ConfigurationError,
    IdempotencyConflict,
    ScheduleExists,
    UnknownSchedule,
)
from cantata.model import codec
from cantata.model.checks import actor_or, check_text
from cantata.model.flow import ScheduleRow
from cantata.model.records import to_datetime
from cantata.model.schedule import (  # noqa: F401 (re-exported: the spec lives in the model)
    CATCH_UP,
    MAX_TICKS,
    OVERLAP,
    ScheduleSpec,
    tick_iso,
    tick_key,
    zone,
)
from cantata.quietlog import QuietLog, outage_interval, reason
from cantata.store.roles.lifecycle import idle_wait

if TYPE_CHECKING:
    from cantata.engine.engine import Engine
    from cantata.engine.handle import RunHandle

log = logging.getLogger("cantata.schedules")

# Seconds of silence after which ticks nobody looked at count as missed (catch-up
# policy) rather than late (started as usual): longer than a busy worker's pass. A
# scheduler that waits for notifications (far apart: idle_wait) also looks MAX_PASS
# before each tick, so that around a tick the schedule's checked_at is as fresh as
# when it looked every MAX_PASS.
WATCH_GAP = 3.0
MAX_PASS = 1.0  # seconds between passes at most, unless the store hears other processes


@dataclass
class ScheduleState:
    """A schedule's progress, stored as JSON next to its spec."""

    last_tick: float  # every tick up to here has been decided
    checked_at: float  # when a scheduler last looked at it
    # (tick, kind): "catch" (missed, caught up), "late" (behind a run started after
    # it) or "now" (buffered behind a run in progress that began before it)
    backlog: list[tuple[float, str]] = field(default_factory=list)
    starting: list[float] = field(default_factory=list)  # decided, runs not yet created
    last_run_id: str | None = None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScheduleState:
        raw = json.loads(text)
        raw["backlog"] = [(float(t), str(k)) for t, k in raw.get("backlog", [])]
        return cls(**raw)


def _trim(remaining: list[tuple[float, str]], overlap: str) -> list[tuple[float, str]]:
    """What waits for the run in progress: caught-up ticks and late ones (behind a run
    started after them), plus one overlapping tick with ``buffer_one``; other
    overlapping ticks are skipped."""
    kept = [x for x in remaining if x[1] != "now"]
    if overlap == "buffer_one":
        kept += [x for x in remaining if x[1] == "now"][:1]
    return sorted(kept)


class Scheduler:
    """Decides the ticks of every schedule whose workflow this worker serves."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.started_at = engine.clock.now()
        self.run_ended = asyncio.Event()  # set by the store's notifications
        self.changed = asyncio.Event()  # a schedule changed (``schedules``), anywhere
        self._backlog = False  # a tick waits for a run in progress to end
        # a store outage fails every pass: one line per max(10 s, lease), docs/leases.md
        self.quiet = QuietLog(log, every=outage_interval(engine.lease))

    async def run(self) -> None:
        """Passes until cancelled: at the next tick (the app's clock, so a skipping
        clock jumps to it), when a schedule changed (created, replaced, paused, resumed
        or deleted, by any process while the store hears other processes' writes), when
        a run ended while a tick waits for it, and on their own: every ``MAX_PASS`` real
        seconds, or, while the store hears other processes, after a safety-net wait
        (``idle_wait``) and ``MAX_PASS`` before each tick (see WATCH_GAP)."""
        engine = self.engine
        clock = engine.clock
        while True:
            due: float | None = None
            # cleared before the pass: news heard during it wakes the wait below
            self.changed.clear()
            self.run_ended.clear()
            every = MAX_PASS  # (after a failed pass too: the store may answer again)
            try:
                due = await self.pass_once()
            except Exception as exc:
                self.quiet.warning("pass", "schedules: a pass failed (%s); retrying",
                                   reason(exc))
            else:
                self.quiet.recovered("pass", "schedules: passes work again")
                every = idle_wait(engine.store, MAX_PASS)
            waits: list[asyncio.Future[Any]] = [
                asyncio.ensure_future(asyncio.sleep(every)),
                asyncio.ensure_future(self.changed.wait()),
            ]
            if self._backlog:  # the end of the run in progress lets the next tick start
                waits.append(asyncio.ensure_future(self.run_ended.wait()))
            if due is not None:
                wait = due - clock.now()
                if every > MAX_PASS and wait > MAX_PASS:
                    wait -= MAX_PASS  # a look just before the tick (WATCH_GAP)
                waits.append(asyncio.ensure_future(clock.sleep(max(wait, 0.01))))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if self.changed.is_set():  # let a burst (a deploy declaring many) coalesce
                await asyncio.sleep(min(0.05, engine.poll_interval))

    async def pass_once(self) -> float | None:
        """Decide and start due ticks; returns when the next one is due (clock time)."""
        engine = self.engine
        due: float | None = None
        self._backlog = False
        for row in await engine.store.schedules(engine.app):
            spec = ScheduleSpec.from_json(row.spec)
            if row.paused or not engine.serves(spec.workflow):
                continue
            if row.source == "code" and row.name not in engine.router.schedule_specs:
                continue  # its declaration left this code: only code that declares it ticks
            nxt = await self._advance(spec, row)
            if nxt is not None:
                due = nxt if due is None else min(due, nxt)
        return due

    async def _advance(self, spec: ScheduleSpec, row: ScheduleRow) -> float | None:
        engine, now = self.engine, self.engine.clock.now()
        state = ScheduleState.from_json(row.state)
        version = row.version
        if state.starting:  # a decision whose runs may not all exist yet: finish it
            if not await self._start(spec, state, version):
                return None
            version += 1
        due = spec.ticks(state.last_tick, now)
        unwatched = state.checked_at < self.started_at - WATCH_GAP
        missed = [t for t in due if unwatched and t <= self.started_at]
        current = [t for t in due if t not in missed]
        if spec.catch_up == "skip":
            missed = []
        elif spec.catch_up == "last":
            missed = missed[-1:]
        elif spec.catch_up_limit is not None:
            missed = missed[-spec.catch_up_limit:]
        queue = state.backlog + [(t, "catch") for t in missed] + [(t, "now") for t in current]
        # A tick overlaps only a run in progress that began before it; behind a run
        # started after it (this pass's, or a late one's) it waits as "late" and starts
        # when that run ends, as it would have had the scheduler been on time.
        live = await self._live(state.last_run_id)
        start: list[float] = []
        remaining: list[tuple[float, str]] = []
        for tick, kind in queue:
            if spec.overlap == "allow" or live is None:
                start.append(tick)
                live = now
            elif kind == "now" and tick < live:
                remaining.append((tick, "late"))
            else:
                remaining.append((tick, kind))
        changed = bool(due or start or remaining != state.backlog)
        if changed or now - state.checked_at >= MAX_PASS:
            new = dataclasses.replace(
                state, last_tick=due[-1] if due else state.last_tick, checked_at=now,
                backlog=_trim(remaining, spec.overlap), starting=start,
            )
            if not await engine.store.update_schedule(
                engine.app, spec.name, version, state=new.to_json()
            ):
                return now + 0.05  # another worker decided first: look again soon
            if start:
                await self._start(spec, new, version + 1)
            state = new
        self._backlog = self._backlog or bool(state.backlog)
        return spec.next_tick(max(state.last_tick, now))

    async def _live(self, run_id: str | None) -> float | None:
        """When the schedule's run in progress was created (``None``: none is)."""
        if run_id is None:
            return None
        run = await self.engine.store.get_run(self.engine.app, run_id)
        return None if run is None or run.status.is_final else run.created_at

    async def _start(self, spec: ScheduleSpec, state: ScheduleState, version: int) -> bool:
        """Create the runs of ``state.starting`` (idempotent by key), then record them."""
        run_id = state.last_run_id
        for tick in state.starting:
            run_id = await start_tick(self.engine, spec, tick) or run_id
        done = dataclasses.replace(state, starting=[], last_run_id=run_id)
        return await self.engine.store.update_schedule(
            self.engine.app, spec.name, version, state=done.to_json()
        )


async def start_tick(engine: Engine, spec: ScheduleSpec, tick: float,
                     actor: str | None = None) -> str | None:
    """Start the one run of ``tick`` (or find it); its run id (``None`` if refused).
    ``actor`` is who its ``run.created`` names (an operator's trigger; ``None``:
    ``system``, a tick)."""
    from cantata.flow.queues import entry_for

    try:
        run, _ = await engine.create_run(
            spec.workflow, spec.args(tick), idempotency_key=tick_key(spec.name, tick),
            queue=await entry_for(engine, spec.workflow, None, 0, None), actor=actor,
        )
    except IdempotencyConflict as exc:  # the key was used by a run with other input
        log.warning("schedule %s: tick %s not started: %s", spec.name, tick_iso(tick), exc)
        return None
    return run.run_id


def new_row(spec: ScheduleSpec, source: str, now: float) -> ScheduleRow:
    """A schedule's first row: no tick before ``now`` is due."""
    return ScheduleRow(spec.name, spec.to_json(), source, False,
                       ScheduleState(last_tick=now, checked_at=now).to_json())


@dataclass(frozen=True, slots=True)
class ScheduleInfo:
    """A schedule as ``app.schedules.list()`` and ``cantata schedules list`` show it."""

    name: str
    workflow: str
    when: str  # the cron expression, or "every Ns"
    timezone: str
    overlap: str
    catch_up: str
    paused: bool
    source: str
    next_tick: dt.datetime | None
    last_run_id: str | None
    # Declared in code: whether the listing app's code declares it (a code schedule no
    # serving code declares starts no runs); None for an API schedule, or when the
    # listing app has no code (a bare App given the app's name).
    in_code: bool | None = None
    cron: str | None = None  # the cron expression, or None for an interval
    every: float | None = None  # the interval in seconds, or None for a cron
    catch_up_limit: int | None = None
    # The next ticks, oldest first: next_tick and the ones after it (empty when
    # next_tick is None).
    upcoming: tuple[dt.datetime, ...] = ()


UPCOMING = 3  # ticks ScheduleInfo.upcoming shows


def _upcoming(spec: ScheduleSpec, first: float | None) -> tuple[dt.datetime, ...]:
    """``first`` and the ticks after it, :data:`UPCOMING` at most."""
    out: list[dt.datetime] = []
    tick = first
    while tick is not None and len(out) < UPCOMING:
        out.append(dt.datetime.fromtimestamp(tick, dt.UTC))
        tick = spec.next_tick(tick)
    return tuple(out)


def _who(engine: Engine, actor: str | None) -> str:
    """Who a schedule operation is audited as (default: this process)."""
    return actor_or(actor, f"process:{engine.worker_id}")


class Schedules:
    """``app.schedules``: create, list, pause, resume, trigger and delete schedules."""

    def __init__(self, engine_of: Any, handle_of: Any) -> None:
        self._engine_of = engine_of  # () -> Engine (the app must be open)
        self._handle_of = handle_of  # (engine, run id, workflow) -> the app's RunHandle

    @property
    def _engine(self) -> Engine:
        engine: Engine = self._engine_of()
        return engine

    async def create(
        self,
        name: str,
        cron: str | None,
        workflow: Any,
        *,
        input: Any = None,
        every: float | None = None,
        timezone: str = "UTC",
        overlap: str = "skip",
        catch_up: str = "skip",
        catch_up_limit: int | None = None,
        actor: str | None = None,
        replace: bool = True,
    ) -> None:
        """Create (or replace the spec of) a schedule at run time; it survives restarts.
        Audited (``schedule.created`` or ``schedule.replaced``) with ``actor`` (default:
        this process), as are pause, resume, trigger and delete. With
        ``replace=False`` a schedule of that name is left as it is and
        :class:`ScheduleExists` raised (nothing is recorded).

        Raises:
            ConfigurationError: a bad cron, time zone, policy or limit (named).
            PayloadTooLarge: ``input`` and a tick, each run's arguments, are over the
                app's ``max_payload``.
            SerializationError: ``input`` is not JSON-serialisable, or (when this
                process has the workflow's code) does not match the declared type of
                its parameter after the tick, as each run's worker would restore it.
            UnknownWorkflow: no service of this app declares ``workflow``.
            ScheduleExists: ``replace=False`` and the name is taken.
        """
        from cantata.declare.defs import check_arguments, workflow_name
        from cantata.declare.schedules import check_takes_tick
        from cantata.errors import UnknownWorkflow

        engine = self._engine
        wf = workflow_name(workflow)
        spec = ScheduleSpec(name, wf, cron, every, timezone, overlap, catch_up, catch_up_limit,
                            input, input is not None)
        if spec.has_input:  # each tick's run takes (tick, input): held to max_payload
            codec.dumps([dt.datetime.now(dt.UTC), input],
                        f"input of schedule {name!r} (with its tick, each run's arguments)",
                        limit=engine.max_payload)
        if not await engine.knows_workflow(wf):
            raise UnknownWorkflow(f"schedule {name!r}: no workflow named {wf!r} in app "
                                  f"{engine.app!r}")
        wdef = engine.router.workflows.get(wf)
        if wdef is not None:  # (one of another service's: its own code is not here)
            check_takes_tick(wdef, spec.has_input, ConfigurationError, f"schedule {name!r}")
            if spec.has_input:  # an input each tick's run would refuse in its first line
                check_arguments(wdef, spec.args(engine.clock.now()), where=f"schedule "
                                f"{name!r}: ", outcome="the schedule was not made")
        if not await engine.store.put_schedule(
            engine.app, new_row(spec, "api", engine.clock.now()), actor=_who(engine, actor),
            replace=replace,
        ) and not replace:
            rows = {r.name: r for r in await engine.store.schedules(engine.app)}
            raise _exists(engine, name, getattr(rows.get(name), "source", None) == "code")

    async def list(self) -> list[ScheduleInfo]:
        """Every schedule of the app, by name."""
        engine = self._engine
        out = []
        for row in await engine.store.schedules(engine.app):
            spec, state = ScheduleSpec.from_json(row.spec), ScheduleState.from_json(row.state)
            in_code = (None if row.source != "code" or not engine.router.workflows
                       else row.name in engine.router.schedule_specs)
            nxt = None if row.paused or in_code is False else spec.next_tick(
                max(state.last_tick, engine.clock.now()))
            upcoming = _upcoming(spec, nxt)
            out.append(ScheduleInfo(
                row.name, spec.workflow, spec.cron or f"every {spec.every:g}s", spec.timezone,
                spec.overlap, spec.catch_up, row.paused, row.source,
                to_datetime(nxt),
                state.last_run_id, in_code,
                cron=spec.cron, every=spec.every, catch_up_limit=spec.catch_up_limit,
                upcoming=upcoming,
            ))
        return out

    async def _row(self, name: str) -> ScheduleRow:
        engine = self._engine
        for row in await engine.store.schedules(engine.app):
            if row.name == name:
                return row
        raise _unknown(engine, name)

    async def pause(self, name: str, *, actor: str | None = None) -> None:
        """Stop starting runs of ``name`` until :meth:`resume` (audited with ``actor``)."""
        await self._set_paused(name, True, actor)

    async def resume(self, name: str, *, actor: str | None = None) -> None:
        """Start runs of ``name`` again from now (ticks while paused are skipped);
        audited with ``actor``."""
        await self._set_paused(name, False, actor)

    async def _set_paused(self, name: str, paused: bool, actor: str | None) -> None:
        engine = self._engine
        who = _who(engine, actor)
        while True:
            row = await self._row(name)
            state = ScheduleState.from_json(row.state)
            if not paused and row.paused:
                now = engine.clock.now()
                state = dataclasses.replace(state, last_tick=max(state.last_tick, now),
                                            checked_at=now, backlog=[])
            if await engine.store.update_schedule(engine.app, name, row.version,
                                                  state=state.to_json(), paused=paused,
                                                  actor=who):
                return

    async def trigger(self, name: str, *, actor: str | None = None) -> RunHandle:
        """Start one run of ``name`` now (its tick: the current time), whatever its
        policy. Its handle follows the app, as :meth:`App.start`'s does. Audited as
        ``schedule.triggered`` with ``actor`` and the run's id, after its
        ``run.created``, which names ``actor`` too."""
        engine = self._engine
        who = _who(engine, actor)
        spec = ScheduleSpec.from_json((await self._row(name)).spec)
        run_id = await start_tick(engine, spec, engine.clock.now(), actor=who)
        if run_id is None:
            raise ConfigurationError(f"schedule {name!r}: the triggered run was refused")
        await engine.store.record_action(engine.app, who, "schedule.triggered", name,
                                         {"run_id": run_id})
        handle: RunHandle = self._handle_of(engine, run_id, spec.workflow)
        return handle

    async def delete(self, name: str, *, actor: str | None = None) -> None:
        """Remove a schedule; audited with ``actor``. One declared in code comes back
        when a worker whose code declares it opens the app (not when a client does).

        Raises:
            UnknownSchedule: no schedule of that name.
        """
        engine = self._engine
        check_text("schedule name", name, error=UnknownSchedule,
                   hint="no schedule has such a name; see `cantata schedules list`")
        if not await engine.store.delete_schedule(engine.app, name,
                                                  actor=_who(engine, actor)):
            raise _unknown(engine, name)


def _exists(engine: Engine, name: str, in_code: bool) -> ScheduleExists:
    code = (" (declared in code with @app.schedule: deleted, it comes back when a worker "
            "of that code opens the app)" if in_code else "")
    return ScheduleExists(
        f"a schedule named {name!r} exists in app {engine.app!r}{code}: choose another "
        "name, or delete it first (`cantata schedules delete`), or create with "
        "replace=True to replace its spec"
    )


def _unknown(engine: Engine, name: str) -> UnknownSchedule:
    if name in engine.router.schedule_specs:
        return UnknownSchedule(
            f"schedule {name!r} is declared in app {engine.app!r}'s code but not recorded "
            "yet (or was deleted): a worker records it when it opens the app "
            "(`cantata worker module:app`)"
        )
    return UnknownSchedule(
        f"no schedule named {name!r} in app {engine.app!r}: see `cantata schedules list`"
    )
