"""The lean attempts writer and its gate (engine/gate.py, checkpoint.lean_attempts).

Once every worker of an app is of this release (the mark in each ``workers`` row's
``info``), a step's first attempt in progress or succeeded goes without its
``attempts`` row: its ``history`` entry says it, and every reader reads it from there
(docs/leases.md, "Where an attempt is recorded"; docs/performance.md, "Round
twenty-six (attempts)"). A row of an older worker keeps every row written; a failed
attempt, a retry, a row written at an attempt's start keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from typing import Any, cast
from urllib.parse import parse_qsl, urlencode

import asyncpg

from cantata import App, Retry, Tx, WorkflowContext
from cantata.cli.runs import run_details
from cantata.engine import gate
from cantata.model.records import WorkerInfo
from cantata.store.base import Store
from cantata.store.common import StoreBase
from cantata.store.roles.lifecycle import SCHEMA_CHECK_EVERY

from .helpers import eventually, make_app


def lean_apps(store: Store) -> set[str]:
    """The apps whose gate ``store`` holds open (every store here is a StoreBase)."""
    return cast(StoreBase, store).lean_apps


# An older release's heartbeat info: no mark.
OLDER_INFO = '{"version": null, "any_version": false, "workflows": ["order"]}'

_ROWS = ("SELECT key, attempt, started_at, ended_at, error_type FROM attempts "
         "WHERE app={0} ORDER BY key, attempt")
# The rows a writer of the release before would have written, from the entries that say
# them alone (model.records.first_attempt), for the runs that lack them.
_FILL = (
    "INSERT INTO attempts (app, run_id, key, attempt, started_at, ended_at, error_type, "
    "error) SELECT app, run_id, key, 1, started_at, CASE WHEN status='completed' THEN "
    "ended_at END, NULL, NULL FROM history h WHERE app={0} AND attempts=1 AND "
    "started_at IS NOT NULL AND error_type IS NULL AND status IN ('running', 'completed') "
    "AND NOT EXISTS (SELECT 1 FROM attempts a WHERE a.app=h.app AND a.run_id=h.run_id "
    "AND a.key=h.key)"
)


def _pg(url: str) -> tuple[str, str]:
    """A PostgreSQL store URL as (URL to connect to, the store's schema)."""
    base, _, query = url.partition("?")
    params = dict(parse_qsl(query))
    schema = params.pop("schema", "public")
    return (f"{base}?{urlencode(params)}" if params else base), schema


async def _sql(url: str, sql: str, app: str) -> list[tuple[Any, ...]]:
    """Run ``sql`` (``{0}``: the app's parameter) on the store at ``url`` directly."""
    if url.startswith("sqlite:///"):
        with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as db, db:
            return db.execute(sql.format("?"), (app,)).fetchall()
    base, schema = _pg(url)
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'SET search_path TO "{schema}"')
        return [tuple(r) for r in await conn.fetch(sql.format("$1"), app)]
    finally:
        await conn.close()


def shop(url: str, tries: list[int], held: asyncio.Event | None = None) -> App:
    app = make_app(url, "lean")

    @app.step
    async def reserve(n: int) -> int:
        return n

    @app.step
    async def release(n: int) -> None:
        return None

    @app.step(retry=Retry(max_attempts=3, initial_interval=0.01))
    async def charge(n: int) -> int:
        tries.append(n)
        if len(tries) == 1:
            raise ConnectionError("gateway busy")
        return n * 2

    @app.step
    async def ship(n: int) -> int:
        return n + 1

    @app.step
    async def hold(n: int) -> int:
        tries.append(-n)
        assert held is not None
        await held.wait()
        return n

    @app.workflow
    async def order(ctx: WorkflowContext, n: int) -> int:
        await ctx.run(reserve, n, compensate=release)
        c = await ctx.run(charge, n)
        return int(await ctx.run(ship, c))

    @app.workflow
    async def held_order(ctx: WorkflowContext, n: int) -> int:
        await ctx.run(reserve, n)
        return int(await ctx.run(hold, n))

    return app


async def _reads(app: App, run_id: str) -> dict[str, Any]:
    """What the readers of a run's attempts say: ``cantata run --json`` and
    ``GET /api/runs/{id}`` (run_details), the trace, ``load_attempts``."""
    rec = await app.store.get_run(app.name, run_id)
    assert rec is not None
    trace = await app.store.trace_records(app.name, rec.correlation_id or "", limit=100)
    return {"details": await run_details(app, rec), "trace": trace.attempts[run_id],
            "attempts": await app.store.load_attempts(app.name, run_id)}


async def test_a_saga_with_the_gate_open_writes_only_the_rows_history_does_not_say(
    shared_store: str,
) -> None:
    """Every worker of the app is of this release: the gate opens at its first
    heartbeat, and a saga's first-try successes leave no ``attempts`` row; the step
    that failed once keeps the rows of both its attempts. The run reads the same as
    with every row written (the rows an older writer wrote added to the store)."""
    tries: list[int] = []
    app = shop(shared_store, tries)
    async with app:
        assert app.name in lean_apps(app.store)
        h = await app.start("order", 5)
        assert await h.result(timeout=10) == 11
        rows = await _sql(shared_store, _ROWS, app.name)
        assert [(k, n, e) for k, n, _, _, e in rows] == [
            ("charge#1", 1, "ConnectionError"), ("charge#1", 2, None)]
        assert all(ended is not None for _, _, _, ended, _ in rows)
        lean = await _reads(app, h.run_id)
        assert [(a.key, a.attempt, a.error_type) for a in lean["attempts"]] == [
            ("reserve#1", 1, None), ("charge#1", 1, "ConnectionError"),
            ("charge#1", 2, None), ("ship#1", 1, None)]
        await _sql(shared_store, _FILL, app.name)
        assert len(await _sql(shared_store, _ROWS, app.name)) == 4
        assert await _reads(app, h.run_id) == lean


async def test_an_older_workers_row_keeps_every_row_written(shared_store: str) -> None:
    """A live worker of an older release (its row without the mark) keeps the gate
    closed: every attempt's row is written, as that release reads them."""
    tries: list[int] = []
    app = shop(shared_store, tries)
    async with app:
        await app.store.heartbeat(app.name, "older", app.clock.now(), OLDER_INFO, lease=3600)
        assert not await gate.look(app.engine)
        h = await app.start("order", 5)
        assert await h.result(timeout=10) == 11
        rows = await _sql(shared_store, _ROWS, app.name)
        await app.store.remove_worker(app.name, "older")
    assert [(k, n, e) for k, n, _, _, e in rows] == [
        ("charge#1", 1, "ConnectionError"), ("charge#1", 2, None), ("reserve#1", 1, None),
        ("ship#1", 1, None)]


async def test_the_gate_opening_mid_attempt_ends_the_row_its_start_wrote(
    shared_store: str,
) -> None:
    """An attempt that began while the gate was closed (its row written) has its end
    written to that row though the gate opened meanwhile; the next step's first
    attempt goes without one."""
    held = asyncio.Event()
    tries: list[int] = []
    app = shop(shared_store, tries, held)
    async with app:
        await app.store.heartbeat(app.name, "older", app.clock.now(), OLDER_INFO, lease=3600)
        assert not await gate.look(app.engine)
        h = await app.start("held_order", 3)
        await eventually(lambda: bool(tries))
        begun = await _sql(shared_store, _ROWS, app.name)
        assert [(k, ended is None) for k, _, _, ended, _ in begun] == [
            ("hold#1", True), ("reserve#1", False)]
        await app.store.remove_worker(app.name, "older")
        assert await gate.look(app.engine)
        held.set()
        assert await h.result(timeout=10) == 3
        rows = await _sql(shared_store, _ROWS, app.name)
    (hold,) = [r for r in rows if r[0] == "hold#1"]
    assert hold[3] is not None and hold[4] is None
    assert hold[2] == begun[0][2]


async def test_the_gate_closing_mid_attempt_writes_the_whole_row_at_its_end(
    shared_store: str,
) -> None:
    """An attempt that began without its row (the gate open) gets it whole at its end
    once the gate closed meanwhile (an older worker appeared): its start is the one
    its entry recorded."""
    held = asyncio.Event()
    tries: list[int] = []
    app = shop(shared_store, tries, held)
    async with app:
        assert app.name in lean_apps(app.store)
        h = await app.start("held_order", 3)
        await eventually(lambda: bool(tries))
        assert await _sql(shared_store, _ROWS, app.name) == []
        await app.store.heartbeat(app.name, "older", app.clock.now(), OLDER_INFO, lease=3600)
        assert not await gate.look(app.engine)
        held.set()
        assert await h.result(timeout=10) == 3
        rows = await _sql(shared_store, _ROWS, app.name)
        history = {e.key: e for e in await app.store.load_history(app.name, h.run_id)}
        await app.store.remove_worker(app.name, "older")
    assert [(k, n, s, e, t) for k, n, s, e, t in rows] == [
        ("hold#1", 1, history["hold#1"].started_at, history["hold#1"].ended_at, None)]


async def test_a_transactional_steps_first_attempt_goes_without_its_row(
    shared_store: str,
) -> None:
    """A transactional step's ``done`` attempt (written in its transaction) is left out
    as a local step's is, and reads with the start its entry recorded."""
    app = make_app(shared_store, "lean")

    @app.transaction
    async def book(tx: Tx, n: int) -> int:
        await tx.execute("SELECT 1")
        return n

    @app.workflow
    async def booking(ctx: WorkflowContext, n: int) -> int:
        return int(await ctx.run(book, n))

    async with app:
        assert app.name in lean_apps(app.store)
        h = await app.start(booking, 4)
        assert await h.result(timeout=10) == 4
        assert await _sql(shared_store, _ROWS, app.name) == []
        (entry,) = await app.store.load_history(app.name, h.run_id)
        (attempt,) = await app.store.load_attempts(app.name, h.run_id)
    assert (attempt.key, attempt.started_at, attempt.ended_at, attempt.error_type) == (
        "book#1", entry.started_at, entry.ended_at, None)


# -- the gate's rule ---------------------------------------------------------------------


def _worker(info: str | None, beat: float, lease: float = 10.0) -> WorkerInfo:
    return WorkerInfo("w", beat, beat, info, lease=lease)


def test_the_gate_opens_only_when_every_worker_is_marked_or_long_gone() -> None:
    now = time.time()
    marked = _worker('{"lean": 1, "version": null}', now)
    later = _worker('{"lean": 2}', now)
    assert gate.open_for([marked, later], now)
    assert gate.open_for([], now)
    for unmarked in (None, OLDER_INFO, "not json", '{"lean": "1"}', '{"lean": 0}', "[]"):
        assert not gate.open_for([marked, _worker(unmarked, now)], now), unmarked
    # an unmarked row expired: it holds the gate closed for SCHEMA_CHECK_EVERY of its
    # own leases past its expiry, not after
    lease = 10.0
    expired = now - lease - 1
    assert not gate.open_for([marked, _worker(OLDER_INFO, expired, lease)], now)
    edge = now - lease * (1 + SCHEMA_CHECK_EVERY)
    assert not gate.open_for([marked, _worker(OLDER_INFO, edge, lease)], now)
    assert gate.open_for([marked, _worker(OLDER_INFO, edge - 0.5, lease)], now)


async def test_a_worker_of_this_release_marks_its_heartbeat(sqlite_url: str) -> None:
    app = make_app(sqlite_url, "lean")

    @app.workflow
    async def nothing(ctx: WorkflowContext) -> None:
        return None

    async with app:
        (me,) = await app.store.workers(app.name)
        assert gate.marked(me.info)
        assert app.name in lean_apps(app.store)


async def test_a_heartbeat_back_from_an_outage_records_its_return_before_the_gates_read(
    sqlite_url: str,
) -> None:
    """The heartbeat that gets through after a store outage ends the lapse (the worker
    reaches the store again: its hold sure, its runs resumed) before the gate's read of
    the ``workers`` rows, not one read later (engine/ownership.py, ``beat``); the read
    still comes on that heartbeat when due, and a failed read still closes the gate.
    Before the fix the read came first: it saw the worker still lapsed."""
    app = make_app(sqlite_url, "lean")

    @app.workflow
    async def nothing(ctx: WorkflowContext) -> None:
        return None

    async with app:
        store, own = app.store, app.engine.ownership
        real_beat, real_workers = store.heartbeat, store.workers
        seen: list[tuple[bool, bool, bool]] = []  # (lapsed, in doubt, healthy) at each read
        fail_read = False

        async def away(*args: Any, **kwargs: Any) -> None:
            raise ConnectionError("the store is away")

        async def workers(*args: Any, **kwargs: Any) -> Any:
            task = asyncio.current_task()
            if task is not None and task.get_name() == "cantata-heartbeat":
                seen.append((own.lapsed, own.in_doubt(), own._healthy.is_set()))
                if fail_read:
                    raise ConnectionError("the store is away again")
            return await real_workers(*args, **kwargs)

        store.workers = workers  # type: ignore[method-assign]
        try:
            for failing in (False, True):
                fail_read = failing
                store.heartbeat = away  # type: ignore[method-assign]
                await eventually(lambda: own.lapsed, timeout=10)
                seen.clear()
                own._gate_beats = 1  # the gate is looked at on the next heartbeat through
                store.heartbeat = real_beat  # type: ignore[method-assign]
                await eventually(lambda: bool(seen), timeout=10)
                assert seen[0] == (False, False, True), seen  # the lapse over, then the read
                assert (app.name in lean_apps(store)) is not failing
        finally:
            store.heartbeat, store.workers = real_beat, real_workers  # type: ignore[method-assign]


def test_lean_attempts_leaves_out_what_the_entry_says_alone() -> None:
    """``checkpoint.lean_attempts`` (its own inline copy of the rule) leaves an attempt
    of a step whose row was left out so far out again exactly when
    the entry in the same write says that very attempt (``first_attempt(entry) == a``,
    what the readers synthesize for a missing row), and keeps
    it (its row written, the step no longer rowless) otherwise."""
    import itertools
    from types import SimpleNamespace

    from cantata.engine.checkpoint import lean_attempts
    from cantata.model.records import (
        Attempt,
        EntryKind,
        EntryStatus,
        HistoryEntry,
        RunWrite,
        first_attempt,
    )

    entries = [
        HistoryEntry("s#1", EntryKind.STEP, "s", status, attempts=n, started_at=start,
                     ended_at=end, error_type=etype)
        for status, n, start, end, etype in itertools.product(
            list(EntryStatus), (1, 2), (None, 1.0), (None, 2.0, 3.0), (None, "Boom"))
    ]
    attempts = [
        Attempt("s#1", number, start, end, etype, err)
        for number, start, end, etype, err in itertools.product(
            (1, 2), (1.0, 1.5), (None, 2.0), (None, "Boom"), (None, "x"))
    ]
    left_out = 0
    for e in entries:
        for a in attempts:
            other = HistoryEntry("t#1", EntryKind.STEP, "t", EntryStatus.RUNNING,
                                 attempts=1, started_at=5.0)
            x = SimpleNamespace(run=SimpleNamespace(app="shop"),
                                engine=SimpleNamespace(lean_apps={"shop"}),
                                rowless={"s#1"}, attempts={}, mine={})
            kept = lean_attempts(x, RunWrite(entries=[other, e], attempts=[a]))  # type: ignore[arg-type]
            said = first_attempt(e) == a
            assert (kept == []) == said, (e, a)
            assert ("s#1" in x.rowless) == said, (e, a)
            left_out += said
    assert left_out > 0
