"""What a choreographed hop writes on SQLite (docs/performance.md, "Round twenty-two
(chain)"), and a store of the version before (26) migrated with events in flight.

A hop's commit (a handler's settlement: its delivery done, the event it emits stored
with the delivery it holds for the next group, the audit record) appends one WAL
frame per page it changed, and each frame is another page for the commit's fsync.
Migration 0027 keys the deliveries by event first (the settled delivery and the held
one on one leaf), lets their key serve the lookups by event (no `deliveries_event`)
and drops `AUTOINCREMENT` from the events (no `sqlite_sequence` row per commit).
"""

from __future__ import annotations

import sqlite3
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import Declaration
from cantata.store import migrations
from cantata.store.base import Settlement
from cantata.store.sqlite import SQLiteStore
from cantata.store.sqlite_open import STORE_MARK, script_statements
from tests.helpers import eventually, make_app
from tests.store.wal_frames import frame_pages, mx_frame

CHAIN = (("inventory", "order.placed"), ("payment", "inventory.reserved"),
         ("shipping", "payment.charged"))
WORKER = "w1"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(str(tmp_path / "hops.db"))
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_a_hops_commit_writes_one_page_of_each_tree_it_changes(
    store: SQLiteStore,
) -> None:
    """Settling a delivery that emits one event held for the next group: no page of
    `sqlite_sequence`, one leaf of `deliveries` for both deliveries, and (with
    `deliveries_event` gone) a page or two fewer in all, hop after hop."""
    path = store.path
    await store.declare("shop", [Declaration("handler", g, t) for g, t in CHAIN])
    hops: list[list[int]] = []
    for _ in range(150):
        first = Event(CHAIN[0][1], {"n": 1})
        await store.append_held("shop", [first], hold_for=WORKER,
                                hold=[(CHAIN[0][0], first.id)], wake=False)
        event = first
        for i, (group, _type) in enumerate(CHAIN):
            emitted = [] if i + 1 == len(CHAIN) else [
                Event(CHAIN[i + 1][1], {"n": 1}, correlation_id=first.id,
                      causation_id=event.id)]
            hold = [(CHAIN[i + 1][0], e.id) for e in emitted]
            before = mx_frame(path)
            assert await store.settle_delivery("shop", group, event.id, Settlement(
                "done", 1, events=emitted, hold_for=WORKER, hold=hold, wake=False))
            after = mx_frame(path)
            if i == 0 and after > before:  # a hop between two handlers (a WAL reset: skip)
                hops.append(frame_pages(path, before + 1, after))
            if emitted:
                event = emitted[0]
    conn = sqlite3.connect(path)
    try:
        tree = dict(conn.execute("SELECT pageno, name FROM dbstat").fetchall())
    finally:
        conn.close()
    named = [Counter(tree.get(p, "?") for p in pages) for pages in hops[50:]]
    assert len(named) >= 80
    assert not [n for n in named if "sqlite_sequence" in n], named[:3]
    # (a leaf that splits now and then writes its parent and a new leaf too)
    assert statistics.median(n["deliveries"] for n in named) == 1, named[:3]
    # (9 at the median hop since migration 0027, 14 before; splits come and go)
    assert statistics.median(sum(n.values()) for n in named) <= 10, named[:3]


# -- a version 26 store with events in flight, migrated -----------------------------------


def _make_v26_store(path: Path) -> None:
    """A store file as Cantata with schema version 26 made it (its migration scripts)."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("CREATE TABLE cantata_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        conn.execute(
            "INSERT INTO cantata_meta (key, value) VALUES ('mark', ?), ('schema_version', '26')",
            (STORE_MARK,),
        )
        for n, script in sorted(migrations.scripts("sqlite").items()):
            if n <= 26:
                for statement in script_statements(script.read_text()):
                    conn.execute(statement)
    finally:
        conn.close()


def _insert_event(conn: sqlite3.Connection, ev: Event[Any], *, published: int) -> int:
    cur = conn.execute(
        "INSERT INTO events (app, id, type, source, subject, time, data, correlation_id, "
        "causation_id, traceparent, signature, stored_at, published) "
        "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
        ("shop", ev.id, ev.type, ev.source, ev.subject, ev.time, codec.dumps(ev.data, "data"),
         ev.correlation_id or ev.id, ev.causation_id, ev.traceparent, ev.signature, time.time(),
         published),
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _insert_delivery(
    conn: sqlite3.Connection, group: str, event_id: str, status: str, *,
    attempts: int = 0, owner: str | None = None,
) -> None:
    conn.execute(
        "INSERT INTO deliveries (app, grp, event_id, status, attempts, owner, fence, "
        "updated_at) VALUES (?,?,?,?,?,?,?,?)",
        ("shop", group, event_id, status, attempts, owner, 1 if owner else 0, time.time()),
    )


async def test_a_version_26_store_with_events_in_flight_is_migrated(tmp_path: Path) -> None:
    """Events stored, published or not, their deliveries pending, held by a worker that
    is gone, done, dead-lettered: after the migration each pending one is handled once,
    the done one not again, the dead letter replays, the log keeps its positions and
    goes on after them, and every lookup (by event, by correlation, the group's pending
    ones, the outbox, the audit chain) finds what it found."""
    path = tmp_path / "v26.db"
    _make_v26_store(path)
    placed = [Event("order.placed", {"n": n}) for n in range(4)]
    reserved = Event("inventory.reserved", {"n": 2}, correlation_id=placed[2].id,
                     causation_id=placed[2].id)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        seqs = {e.id: _insert_event(conn, e, published=1) for e in placed[:3]}
        seqs[placed[3].id] = _insert_event(conn, placed[3], published=0)
        seqs[reserved.id] = _insert_event(conn, reserved, published=0)
        _insert_delivery(conn, "inventory", placed[0].id, "pending")
        _insert_delivery(conn, "inventory", placed[1].id, "pending", attempts=1,
                         owner="gone-worker")
        _insert_delivery(conn, "inventory", placed[2].id, "done", attempts=1)
        _insert_delivery(conn, "payment", reserved.id, "pending")
        _insert_delivery(conn, "inventory", placed[3].id, "dead", attempts=5)
        conn.execute(
            "INSERT INTO dead_letters (app, id, grp, event_id, error, attempts, failed_at) "
            "VALUES ('shop', 'dl1', 'inventory', ?, 'ValueError: no stock', 5, ?)",
            (placed[3].id, time.time()),
        )
        rows_before = conn.execute(
            "SELECT seq, id, type, data, correlation_id, published FROM events ORDER BY seq"
        ).fetchall()
    finally:
        conn.close()

    handled: list[tuple[str, int]] = []
    app = make_app(f"sqlite:///{path}", broker="embedded")

    @app.on("order.placed", group="inventory")
    async def reserve(event: cantata.Event[Any], ctx: Any) -> None:
        handled.append(("inventory", event.data["n"]))
        await ctx.emit("inventory.reserved", {"n": event.data["n"]})

    @app.on("inventory.reserved", group="payment")
    async def charge(event: cantata.Event[Any], ctx: Any) -> None:
        handled.append(("payment", event.data["n"]))

    async with app:
        store = app.store
        await eventually(lambda: len(handled) >= 5, timeout=20)
        dead = await app.dead_letters()
        assert [d.id for d in dead] == ["dl1"]
        await app.replay("dl1")
        await eventually(lambda: len(handled) >= 7, timeout=20)
        assert sorted(handled) == [("inventory", 0), ("inventory", 1), ("inventory", 3),
                                   ("payment", 0), ("payment", 1), ("payment", 2),
                                   ("payment", 3)]
        # the old rows kept their positions; new ones come after them
        assert await store.log_position("shop") > max(seqs.values())
        # (since: in an hour, so that only the positions after the old rows count)
        newer = await store.find_events("shop", "inventory.reserved", since=time.time() + 3600,
                                        exclude=[], limit=10, position=max(seqs.values()))
        assert len(newer) == 3
        assert {d.group: str(d.status) for d in await store.deliveries("shop", placed[1].id)
                } == {"inventory": "done"}
        trace = await app.trace(placed[2].id)
        assert (trace.kind, trace.name) == ("event", "order.placed")
        assert [(c.kind, c.group) for c in trace.children if c.kind == "handler"] == [
            ("handler", "inventory")]
        assert await store.pending_events("shop", "payment", limit=10) == []
        assert (await store.verify_audit("shop")).ok
    conn = sqlite3.connect(path)
    try:
        rows_after = conn.execute(
            "SELECT seq, id, type, data, correlation_id FROM events WHERE seq<=? ORDER BY seq",
            (max(seqs.values()),),
        ).fetchall()
        assert rows_after == [r[:5] for r in rows_before]
        assert conn.execute(
            "SELECT value FROM cantata_meta WHERE key='schema_version'"
        ).fetchone()[0] == str(migrations.latest("sqlite"))
    finally:
        conn.close()
