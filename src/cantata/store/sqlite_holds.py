"""The SQLite store, who holds a delivery (:meth:`~cantata.store.roles.EventStore.
delivery_holds`, :meth:`~cantata.store.roles.EventStore.take_deliveries`): what the NATS
broker reads, and takes, before it runs a copy of an event that another worker may
hold (docs/guarantees.md)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from cantata.store.roles.events import DeliveryHold
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import E_EVENT_COLS, event_row

_CHUNK = 500  # ids per statement (SQLite's bound parameters)

# The deliveries of a chunk of ids with their live holder (``holder`` given: reported
# as the holder where it owns the delivery, whatever its own expiry) and stored event.
_HOLDS = (
    "SELECT d.event_id, d.status, d.attempts, d.next_at, CASE WHEN d.owner=:me THEN :me "
    "WHEN w.expires_at >= :stale THEN d.owner END, e.id IS NOT NULL, d.error, "
    f"{E_EVENT_COLS} "
    "FROM deliveries d LEFT JOIN workers w ON w.app=d.app AND w.worker_id=d.owner "
    "LEFT JOIN events e ON e.app=d.app AND e.id=d.event_id "
    "WHERE d.app=:app AND d.grp=:grp AND d.event_id IN ({ids})"
)
# Taken: pending, and its owner none or presumed dead (one that owns it already keeps it
# unwritten, and is reported as its holder by _HOLDS).
_TAKE = (
    "UPDATE deliveries SET owner=:me WHERE app=:app AND grp=:grp AND event_id IN ({ids}) "
    "AND status='pending' AND (owner IS NULL OR (owner<>:me AND NOT EXISTS ("
    " SELECT 1 FROM workers w WHERE w.app=deliveries.app AND w.worker_id=deliveries.owner"
    " AND w.expires_at >= :stale)))"
)


class SQLiteHolds(SQLiteCore):
    """:meth:`delivery_holds`, :meth:`take_deliveries` and :meth:`release_delivery` of
    :class:`~cantata.store.sqlite.SQLiteStore`."""

    async def delivery_holds(
        self, app: str, group: str, event_ids: Sequence[str], *, stale_before: float
    ) -> dict[str, DeliveryHold]:
        return await self._holds(app, group, event_ids, None, stale_before)

    async def take_deliveries(
        self, app: str, group: str, event_ids: Sequence[str], worker_id: str, *,
        stale_before: float,
    ) -> dict[str, DeliveryHold]:
        return await self._holds(app, group, event_ids, worker_id, stale_before)

    async def _holds(
        self, app: str, group: str, event_ids: Sequence[str], taker: str | None,
        stale_before: float,
    ) -> dict[str, DeliveryHold]:
        """The holds of ``event_ids``, each free one taken for ``taker`` first (in the
        write lock: no other connection takes one between the UPDATE and the read of
        what it left); a read alone without one."""
        ids = list(dict.fromkeys(event_ids))
        if not ids:
            return {}
        if taker is None:
            return await self._t.read(lambda c: _holds(c, app, group, ids, None, stale_before))
        return await self._t.write(lambda c: _holds(c, app, group, ids, taker, stale_before))

    async def release_delivery(
        self, app: str, group: str, event_id: str, worker_id: str
    ) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            return c.execute(
                "UPDATE deliveries SET owner=NULL WHERE app=? AND grp=? AND event_id=? "
                "AND owner=? AND status='pending'", (app, group, event_id, worker_id),
            ).rowcount == 1

        return await self._t.write(op)


def _holds(
    c: sqlite3.Connection, app: str, group: str, ids: list[str], me: str | None,
    stale_before: float,
) -> dict[str, DeliveryHold]:
    """The holds of ``ids``, each free one taken for ``me`` first (``None``: read only)."""
    out: dict[str, DeliveryHold] = {}
    for i in range(0, len(ids), _CHUNK):
        chunk = ids[i : i + _CHUNK]
        # (named parameters do not mix with "?": the ids are bound by name too)
        params = {"app": app, "grp": group, "me": me, "stale": stale_before,
                  **{f"i{n}": v for n, v in enumerate(chunk)}}
        ids_sql = ",".join(f":i{n}" for n in range(len(chunk)))
        if me is not None:
            c.execute(_TAKE.format(ids=ids_sql), params)
        for row in c.execute(_HOLDS.format(ids=ids_sql), params):
            out[row[0]] = DeliveryHold(row[1], row[2], row[3], row[4],
                                       event_row(tuple(row)[7:]) if row[5] else None, row[6])
    return out
