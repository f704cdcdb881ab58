"""The PostgreSQL store, who holds a delivery (:meth:`~cantata.store.roles.EventStore.
delivery_holds`, :meth:`~cantata.store.roles.EventStore.take_deliveries`): what the NATS
broker reads, and takes, before it runs a copy of an event that another worker may
hold (docs/guarantees.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cantata.model.event import Event
from cantata.store import postgres_event_writes as event_writes
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_ops import (
    CUSTOM_PLANS,
    E_EVENT_COLS,
    by_ctid,
    each_by_key,
    event_row,
)
from cantata.store.roles.events import DeliveryHold

_GROUP = "x.app=$1 AND x.grp=$2"
_HOLDS_BY_KEY = each_by_key("deliveries", "d", _GROUP, "event_id", "$3")
_HOLDS = (
    "SELECT d.event_id, d.status, d.attempts, d.next_at, CASE WHEN {mine} THEN $5 WHEN "
    f"w.expires_at >= $4 THEN d.owner END, e.id IS NOT NULL, d.error, {E_EVENT_COLS} "
    f"FROM {_HOLDS_BY_KEY} "
    "LEFT JOIN workers w ON w.app=d.app AND w.worker_id=d.owner "
    "LEFT JOIN events e ON e.app=d.app AND e.id=d.event_id"
)
# Taken: pending, its owner none or presumed dead (one that owns it already is left
# unwritten). Each row is found by its key from the ids, then updated by its ctid
# (postgres_ops.by_ctid): the plain ``event_id IN (...)`` let the planner, trusting no
# statistics, scan the group's deliveries and look every id up again for each one
# (7.8 s for 500 ids among 6,000 deliveries). A row another worker
# updated meanwhile (took it) has another ctid by then: left alone. The read beside it
# sees the rows as they were before (a statement's snapshot): ``mine`` reports the
# taken ones, and those this worker owned already, as held by it; one that another
# worker took meanwhile reads as it was, which the caller takes for not held by it, and
# looks again.
_TAKE = (
    "WITH taken AS (UPDATE deliveries t SET owner=$5 FROM "
    f"{by_ctid('deliveries', _GROUP, 'event_id', '$3')} WHERE t.ctid = found.at "
    "AND t.status='pending' AND (t.owner IS NULL OR (t.owner<>$5 AND NOT EXISTS ("
    " SELECT 1 FROM workers w WHERE w.app=t.app AND w.worker_id=t.owner"
    " AND w.expires_at >= $4))) RETURNING t.event_id) "
    + _HOLDS.format(mine="d.owner=$5 OR d.event_id IN (SELECT event_id FROM taken)")
)


class PostgresHolds(PostgresCore):
    """:meth:`delivery_holds` and :meth:`append_held` of
    :class:`~cantata.store.postgres.PostgresStore`."""

    async def append_held(
        self, app: str, events: Sequence[Event[Any]], *, hold_for: str,
        hold: Sequence[tuple[str, str]], wake: bool = True, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> tuple[list[int], list[tuple[str, str]]]:
        # (``wake`` is not used: every commit that stores events sends ``claims``.)
        # The deliveries the append created claimed in its own transaction (one
        # statement with the other writes of its batch: cantata_settle, migration 0015;
        # alone in its batch, cantata_settle_one, 0020).
        if not events:
            if stored is not None:
                stored.clear()
            return [], []
        if actor is not None or stored is not None:
            # an operator's publish, audited in the same transaction (or one whose
            # caller asks which events it stored)
            call: event_writes.Published = (app, events, actor, hold_for, hold)
            counts, held, new = await self._w.run_many(event_writes.published_many, call)
            if stored is not None:
                stored[:] = new
            return counts, held
        if not hold:
            return await self._w.run_many(event_writes.append_many, (app, events)), []
        return await self._w.run_many(
            event_writes.append_held_many, (app, events, hold_for, hold)
        )

    async def delivery_holds(
        self, app: str, group: str, event_ids: Sequence[str], *, stale_before: float
    ) -> dict[str, DeliveryHold]:
        if not event_ids:
            return {}
        # (a copy's batch, on the NATS consumers' path: each by its key, ops.each_by_key)
        rows = await self._db.fetch(_HOLDS.format(mine="false"), app, group,
                                    list(dict.fromkeys(event_ids)), stale_before, None)
        return _by_id(rows)

    async def take_deliveries(
        self, app: str, group: str, event_ids: Sequence[str], worker_id: str, *,
        stale_before: float,
    ) -> dict[str, DeliveryHold]:
        if not event_ids:
            return {}
        ids = sorted(set(event_ids))  # (in key order: two takes never deadlock)
        async with self._db.tx() as c:
            # Not durable (a take a server crash loses is one its holder lost with it):
            # its commit waits for no WAL flush. Planned at each run, as planned_now
            # plans, set with it in one round trip.
            await c.execute(f"SET LOCAL synchronous_commit = off; {CUSTOM_PLANS}")
            rows = await c.fetch(_TAKE, app, group, ids, stale_before, worker_id)
        return _by_id(rows)

    async def release_delivery(
        self, app: str, group: str, event_id: str, worker_id: str
    ) -> bool:
        done = await self._db.execute(
            "WITH quick AS (SELECT set_config('synchronous_commit', 'off', true)) "
            "UPDATE deliveries d SET owner=NULL FROM quick WHERE d.app=$1 AND d.grp=$2 "
            "AND d.event_id=$3 AND d.owner=$4 AND d.status='pending'",
            app, group, event_id, worker_id,
        )
        return done == "UPDATE 1"


def _by_id(rows: Sequence[Any]) -> dict[str, DeliveryHold]:
    return {r[0]: DeliveryHold(r[1], r[2], r[3], r[4],
                               event_row(tuple(r)[7:]) if r[5] else None, r[6]) for r in rows}
