"""The SQLite store, events: the log, deliveries, dead letters and the outbox
(see :class:`~cantata.store.roles.EventStore` and :class:`~cantata.store.roles.OutboxStore`).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping, Sequence
from typing import Any, cast

from cantata.errors import ConfigurationError, DeadLetterNotFound
from cantata.model import codec
from cantata.model.event import (
    Event,
    json_path,
    like_pattern,
    match_filter,
    match_needles,
    matches,
)
from cantata.model.records import (
    DELIVERY_DEAD,
    DELIVERY_DONE,
    DELIVERY_PENDING,
    DeadLetter,
    Delivery,
)
from cantata.store import audit
from cantata.store.base import (
    CLAIMS,
    EVENTS,
    Settlement,
)
from cantata.store.roles.events import AFTER_SKEW
from cantata.store.sqlite_core import Hold, SQLiteCore
from cantata.store.sqlite_ops import (
    E_EVENT_COLS,
    EVENT_COLS,
    audit_append,
    dead_letter_row,
    event_row,
)
from cantata.store.sqlite_thread import TxConnection

# What a commit that stores events (or makes a delivery pending) tells the listeners;
# one that held every delivery a consumer here would claim leaves out CLAIMS.
_CHANGED = (EVENTS, CLAIMS)
_CHANGED_HELD = (EVENTS,)


class SQLiteEvents(SQLiteCore):
    """The events, deliveries and outbox roles of :class:`~cantata.store.sqlite.SQLiteStore`."""

    async def append_events(
        self, app: str, events: Sequence[Event[Any]], *, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> list[int]:
        if stored is not None:  # (told once committed: a write may run again)
            counts, new = await self._t.write(
                lambda c: self._published(c, app, events, actor), *_CHANGED)
            stored[:] = new
            return counts
        if actor is None:
            return await self._t.write(lambda c: self._append(c, app, events), *_CHANGED)
        return await self._t.write(
            lambda c: self._published(c, app, events, actor)[0], *_CHANGED)

    async def append_held(
        self, app: str, events: Sequence[Event[Any]], *, hold_for: str,
        hold: Sequence[tuple[str, str]], wake: bool = True, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> tuple[list[int], list[tuple[str, str]]]:
        def op(c: sqlite3.Connection) -> tuple[list[int], list[tuple[str, str]], list[bool]]:
            held = Hold(hold_for, hold, time.time())
            counts, new = self._published(c, app, events, actor, held)
            return counts, held.finish(c, app, events, counts), new

        counts, held, new = await self._t.write(op, *_CHANGED if wake else _CHANGED_HELD)
        if stored is not None:
            stored[:] = new
        return counts, held

    def _published(
        self, c: sqlite3.Connection, app: str, events: Sequence[Event[Any]],
        actor: str | None, hold: Hold | None = None,
    ) -> tuple[list[int], list[bool]]:
        """:meth:`_append`, and (with ``actor``) each event it stored audited as
        ``event.published`` by them in the same transaction; the counts, and per event
        whether it was stored here."""
        stored: list[bool] = []
        counts = self._append(c, app, events, hold, stored)
        if actor is not None:
            for ev, new in zip(events, stored, strict=True):
                if new:
                    audit_append(c, app, audit.published_entry(actor, ev.id, ev.type))
        return counts, stored

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        row = await self._t.read(
            lambda c: c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND id=?", (app, event_id)
            ).fetchone()
        )
        return None if row is None else event_row(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int,
        after: str | None = None, position: int | None = None,
        match: Mapping[str, Any] | None = None,
    ) -> list[Event[Any]]:
        if position is not None and after is not None:
            raise ConfigurationError("find_events takes after= or position=, not both")
        skip = list(exclude)
        # A wait's match compared in the query (data that is not JSON matches nothing).
        # (text the data must hold first: instr is far cheaper than parsing the JSON)
        keyed, needles = match_filter(match), match_needles(match)
        by_value = " AND instr(data, ?) > 0" * len(needles) + "".join(
            " AND CASE WHEN json_valid(data) THEN json_extract(data, ?) END = ?" for _ in keyed
        )
        values = (*needles,
                  *(v for parts, want in keyed for v in (json_path(parts), want)))
        wildcard = "*" in event_type
        bound: tuple[Any, ...] = (since,)
        if after is None:
            stored = " AND stored_at>=?"
        else:
            # The events after ``after`` in the log (seq, the order the writers
            # committed in), looked for from AFTER_SKEW before it by the clocks.
            stored = (
                " AND stored_at>=min(?, coalesce((SELECT stored_at FROM events "
                "WHERE app=? AND id=?)-?, ?)) AND (stored_at>=? OR seq>(SELECT seq "
                "FROM events WHERE app=? AND id=?))"
            )
            bound = (since, app, after, AFTER_SKEW, since, since, app, after)
        of_type = (
            f"SELECT {EVENT_COLS}, seq FROM events WHERE app=? AND "
            + ("type LIKE ? ESCAPE '\\'" if wildcard else "type=?")
            + (f" AND id NOT IN ({','.join('?' * len(skip))})" if skip else "")
            + by_value
        )
        wanted = like_pattern(event_type) if wildcard else event_type
        sql = of_type + stored
        params: tuple[Any, ...] = (app, wanted, *skip, *values, *bound)
        if position is not None:
            # Those stored after ``position`` by the clocks too early for ``since``
            # (a range of seq, the rowid), whatever the clocks.
            sql += f" UNION ALL {of_type} AND seq>? AND stored_at<?"
            params += (app, wanted, *skip, *values, position, since)
        rows = await self._t.read(
            lambda c: c.execute(sql + " ORDER BY seq LIMIT ?", (*params, limit)).fetchall()
        )
        found = [event_row(r) for r in rows]
        return [e for e in found if matches(event_type, e.type)] if wildcard else found

    async def log_position(self, app: str) -> int:
        # (the store's log: seq is the rowid, its largest is read at once)
        row = await self._t.read(
            lambda c: c.execute("SELECT coalesce(max(seq), 0) FROM events").fetchone()
        )
        return int(row[0])

    async def claim_deliveries(
        self,
        app: str,
        worker_id: str,
        groups: Sequence[str],
        *,
        now: float,
        stale_before: float,
        limit: int,
    ) -> list[Delivery]:
        if not groups:
            return []
        marks = ",".join("?" * len(groups))

        def op(c: sqlite3.Connection) -> list[Delivery]:
            claimed = c.execute(
                f"UPDATE deliveries SET owner=?, fence=fence+1, attempts=attempts+1, "
                f"updated_at=? WHERE (app, grp, event_id) IN ("
                f" SELECT d.app, d.grp, d.event_id FROM deliveries d INDEXED BY deliveries_due"
                f"  LEFT JOIN workers w"
                f"  ON w.app=d.app AND w.worker_id=d.owner"
                f" WHERE d.app=? AND d.status='pending' AND d.grp IN ({marks}) AND d.next_at<=?"
                f"  AND (d.owner IS NULL OR (d.owner<>? AND"
                f"   (w.worker_id IS NULL OR w.expires_at < ?)))"
                f" ORDER BY d.next_at LIMIT ?)"
                f" RETURNING grp, event_id, attempts, next_at, error, fence",
                (worker_id, now, app, *groups, now, worker_id, stale_before, limit),
            ).fetchall()
            out = []
            for grp, event_id, attempts, next_at, error, fence in claimed:
                row = c.execute(
                    f"SELECT {EVENT_COLS} FROM events WHERE app=? AND id=?", (app, event_id)
                ).fetchone()
                if row is None:
                    continue
                out.append(
                    Delivery(
                        grp, event_row(row), DELIVERY_PENDING, attempts, next_at, error, now, fence
                    )
                )
            return out

        return await self._t.write(op)

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            s = settlement
            now = time.time()
            params: tuple[Any, ...]
            if s.outcome == "done":
                sql, params = _SETTLE_DONE, (s.attempts, now)
            elif s.outcome == "retry":
                sql, params = _SETTLE_RETRY, (s.attempts, s.error, s.retry_at, now)
            else:
                sql, params = _SETTLE_DEAD, (s.attempts, s.error, now)
            found = _settle_row(c, str(s.outcome), sql, params, app, group, event_id, now)
            if found is _SETTLED_BEFORE:
                return False
            owner = cast("str | None", found)
            if s.outcome == "done":
                if s.events:
                    held = None if s.hold_for is None else Hold(s.hold_for, s.hold, now)
                    s.stored = []
                    counts = s.addressed = self._append(c, app, s.events, held, s.stored)
                    if held is not None:
                        s.held = held.finish(c, app, s.events, counts)
                audit_append(
                    c,
                    app,
                    audit.delivery_entry(
                        group, event_id, owner, "done", s.attempts, emitted=[e.id for e in s.events]
                    ),
                )
            elif s.outcome != "retry":
                dead_letter_id = s.dead_letter_id or codec.new_id()
                c.execute(
                    "INSERT INTO dead_letters (app, id, grp, event_id, error, attempts, failed_at) "
                    "VALUES (?,?,?,?,?,?,?)",
                    (
                        app,
                        dead_letter_id,
                        group,
                        event_id,
                        s.error or "unknown error",
                        s.attempts,
                        now,
                    ),
                )
                audit_append(
                    c,
                    app,
                    audit.delivery_entry(
                        group,
                        event_id,
                        owner,
                        "dead",
                        s.attempts,
                        error=s.error,
                        dead_letter_id=dead_letter_id,
                    ),
                )
            return True

        return await self._t.write(op, *_CHANGED if settlement.wake else _CHANGED_HELD)

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT d.grp, d.status, d.attempts, d.next_at, d.error, d.updated_at, "
                f"d.fence, {E_EVENT_COLS} FROM deliveries d "
                "JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND d.event_id=? ORDER BY d.grp",
                (app, event_id),
            ).fetchall()
        )
        if not rows:
            return []
        event = event_row(rows[0][7:])
        return [Delivery(r[0], event, r[1], r[2], r[3], r[4], r[5], r[6]) for r in rows]

    async def delivery_states(
        self, app: str, group: str, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        ids = list(dict.fromkeys(event_ids))

        def op(c: sqlite3.Connection) -> dict[str, tuple[str, int]]:
            out: dict[str, tuple[str, int]] = {}
            for i in range(0, len(ids), 500):
                chunk = ids[i : i + 500]
                for event_id, status, attempts in c.execute(
                    "SELECT event_id, status, attempts FROM deliveries WHERE app=? AND grp=? "
                    f"AND event_id IN ({','.join('?' * len(chunk))})",
                    (app, group, *chunk),
                ):
                    out[event_id] = (status, attempts)
            return out

        return await self._t.read(op) if ids else {}

    async def dead_letters(
        self, app: str, *, limit: int = 100, group: str | None = None,
        type: str | None = None,
    ) -> list[DeadLetter]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
                f"{E_EVENT_COLS} "
                "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND (? IS NULL OR d.grp=?) AND (? IS NULL OR e.type=?) "
                "ORDER BY d.failed_at LIMIT ?",
                (app, group, group, type, type, limit),
            ).fetchall()
        )
        return [dead_letter_row(r) for r in rows]

    async def replay_dead_letter(
        self, app: str, dead_letter_id: str, now: float, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        def op(c: sqlite3.Connection) -> DeadLetter:
            row = c.execute(
                f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
                f"{E_EVENT_COLS} "
                "FROM dead_letters d JOIN events e ON e.app=d.app AND e.id=d.event_id "
                "WHERE d.app=? AND d.id=?",
                (app, dead_letter_id),
            ).fetchone()
            if row is None:
                raise DeadLetterNotFound(
                    f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
                    "`cantata dlq list`"
                )
            dl = dead_letter_row(row)
            # Off the queue, kept for the trace (migration 0021).
            c.execute(
                "INSERT OR IGNORE INTO replayed_dead_letters (app, id, grp, event_id, error, "
                "attempts, failed_at, replayed_at) SELECT app, id, grp, event_id, error, "
                "attempts, failed_at, ? FROM dead_letters WHERE app=? AND id=?",
                (now, app, dead_letter_id),
            )
            c.execute("DELETE FROM dead_letters WHERE app=? AND id=?", (app, dead_letter_id))
            # Never a delivery handled since (settling it done dropped its dead letters,
            # migration 0019): handled again, its effect would be applied twice.
            c.execute(
                "UPDATE deliveries SET status='pending', attempts=0, next_at=?, owner=NULL, "
                "error=NULL, updated_at=? WHERE app=? AND grp=? AND event_id=? "
                "AND status<>'done'",
                (now, now, app, dl.group, dl.event.id),
            )
            audit_append(c, app, audit.replay_entry(dl.group, dl.event.id, dead_letter_id, actor))
            return dl

        return await self._t.write(op, *_CHANGED)

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._t.read(
            lambda c: c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND published=0 ORDER BY seq LIMIT ?",
                (app, limit),
            ).fetchall()
        )
        return [event_row(r) for r in rows]

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        ids = list(event_ids)
        if not ids:
            return
        # One statement for the batch (the ids as a JSON array), not one per row: the
        # store's thread binds and steps it once, releasing the GIL once rather than
        # per event while the event loop relays (docs/performance.md, the
        # choreography path).
        listed = json.dumps(ids)
        await self._t.write(
            lambda c: c.execute(
                "UPDATE events SET published=1 WHERE app=? AND id IN "
                "(SELECT value FROM json_each(?))", (app, listed),
            )
        )

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        def write(c: sqlite3.Connection) -> list[int]:
            counts = self._append(c, app, events)
            c.executemany(
                "UPDATE events SET published=1, external=1 WHERE app=? AND id=? AND published=0",
                [(app, e.id) for e in events],
            )
            return counts

        return await self._t.write(write, *_CHANGED)

    async def redrive_events(
        self, app: str, *, stored_before: float, limit: int
    ) -> list[Event[Any]]:
        def write(c: sqlite3.Connection) -> list[Event[Any]]:
            rows = c.execute(
                f"SELECT {EVENT_COLS} FROM events WHERE app=? AND published=1 AND external=0"
                " AND stored_at < ? AND id IN (SELECT event_id FROM deliveries"
                " INDEXED BY deliveries_due WHERE app=? AND status='pending')"
                " ORDER BY seq LIMIT ?",
                (app, stored_before, app, limit),
            ).fetchall()
            events = [event_row(r) for r in rows]
            c.executemany(
                "UPDATE events SET published=0 WHERE app=? AND id=?", [(app, e.id) for e in events]
            )
            return events

        return await self._t.write(write, *_CHANGED)



# What a settlement sets, by outcome (the key and its conditions follow).
_SETTLE_DONE = (
    "UPDATE deliveries SET status='done', attempts=?, owner=NULL, error=NULL, updated_at=?"
)
_SETTLE_RETRY = (
    "UPDATE deliveries SET status='pending', attempts=?, owner=NULL, error=?, next_at=?, "
    "updated_at=?"
)
_SETTLE_DEAD = "UPDATE deliveries SET status='dead', attempts=?, owner=NULL, error=?, updated_at=?"
_KEY = " WHERE app=? AND grp=? AND event_id=?"
# Not settled for good yet: the update, and the owner it had (TxConnection.was), in one
# statement. 'done' takes anything not done (a dead letter's delivery that another copy
# handled), 'retry' and 'dead' a pending delivery only (a dead one stays dead until it
# is replayed: no second dead letter, no reopening); as PostgreSQL's migration 0026.
_PENDING_ONLY = _KEY + " AND status='pending' AND cantata_was(owner)"
_UNSETTLED_FOR = {
    "done": _KEY + " AND status<>'done' AND cantata_was(owner)",
    "retry": _PENDING_ONLY,
    "dead": _PENDING_ONLY,
}
_SETTLED_BEFORE = object()


def _settle_row(
    c: sqlite3.Connection, outcome: str, sql: str, params: tuple[Any, ...], app: str,
    group: str, event_id: str, now: float,
) -> object:
    """Apply a settlement's ``sql`` to the delivery unless it was settled for good
    already (:data:`_SETTLED_BEFORE`: done, or dead for an ``outcome`` other than done);
    the owner it had. A delivery the store has no row of (an event it was handed but did
    not fan out) gets one first."""
    if isinstance(c, TxConnection) and c.execute(
        sql + _UNSETTLED_FOR[outcome], (*params, app, group, event_id)
    ).rowcount == 1:
        return c.was[0]
    row = c.execute(
        "SELECT status, owner FROM deliveries" + _KEY, (app, group, event_id)
    ).fetchone()
    if row is not None and (
        row[0] == DELIVERY_DONE or (row[0] == DELIVERY_DEAD and outcome != "done")
    ):
        return _SETTLED_BEFORE
    if row is None:
        c.execute(
            "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
            "VALUES (?,?,?,'pending',?)",
            (app, group, event_id, now),
        )
    c.execute(sql + _KEY, (*params, app, group, event_id))
    return None if row is None else row[1]
