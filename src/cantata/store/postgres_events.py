"""The PostgreSQL store, events: the log, deliveries, dead letters and the outbox
(see :class:`~cantata.store.roles.EventStore` and :class:`~cantata.store.roles.OutboxStore`).
Appending, claiming, settling and marking published are group-committed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cantata.errors import ConfigurationError, DeadLetterNotFound
from cantata.model import codec
from cantata.model.event import Event, like_pattern, match_filter, match_needles, matches
from cantata.model.records import (
    DeadLetter,
    Delivery,
)
from cantata.store import audit
from cantata.store import postgres_event_writes as event_writes
from cantata.store import postgres_ops as ops
from cantata.store.base import (
    EVENTS,
    Settlement,
)
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_ops import (
    D_DELIVERY_COLS,
    E_EVENT_COLS,
    EVENT_COLS,
    dead_letter_row,
    delivery_row,
    event_row,
)
from cantata.store.roles.events import AFTER_SKEW

# (each by its key, whatever the statistics: postgres_ops.each_by_key)
_STATES_BY_KEY = ops.each_by_key("deliveries", "d", "x.app=$1 AND x.grp=$2", "event_id", "$3")


class PostgresEvents(PostgresCore):
    """The events, deliveries and outbox roles of :class:`~cantata.store.postgres.PostgresStore`."""

    async def append_events(
        self, app: str, events: Sequence[Event[Any]], *, actor: str | None = None,
        stored: list[bool] | None = None,
    ) -> list[int]:
        if not events:
            if stored is not None:
                stored.clear()
            return []
        if actor is not None or stored is not None:
            # an operator's publish, audited in the same transaction (or one whose
            # caller asks which events it stored)
            call: event_writes.Published = (app, events, actor, None, ())
            counts, _, new = await self._w.run_many(event_writes.published_many, call)
            if stored is not None:
                stored[:] = new
            return counts
        return await self._w.run_many(event_writes.append_many, (app, events))

    async def get_event(self, app: str, event_id: str) -> Event[Any] | None:
        row = await self._db.fetchrow(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, event_id
        )
        return None if row is None else event_row(row)

    async def find_events(
        self, app: str, event_type: str, *, since: float, exclude: Sequence[str], limit: int,
        after: str | None = None, position: int | None = None,
        match: Mapping[str, Any] | None = None,
    ) -> list[Event[Any]]:
        if position is not None and after is not None:
            raise ConfigurationError("find_events takes after= or position=, not both")
        wildcard = "*" in event_type
        args: list[Any] = [
            app, like_pattern(event_type) if wildcard else event_type, since, list(exclude),
            limit,
        ]
        of_type = (
            f"SELECT {EVENT_COLS}, seq, stored_at FROM events WHERE app=$1 AND "
            + ("type LIKE $2 ESCAPE '\\'" if wildcard else "type=$2")
            # (a hashed subplan: ``NOT (id = ANY($4))`` compares each row with every
            # id, and a long-lived run's waits leave out thousands)
            + " AND id NOT IN (SELECT unnest($4::text[]))"
        )
        paths, wants = may_match(match)
        if paths:
            # A wait's match compared in the server (migration 0044), after the text
            # the data must hold (strpos is far cheaper than parsing the JSON); the
            # caller checks every event returned, as Python compares.
            needles = match_needles(match)
            of_type += "".join(f" AND strpos(data, ${8 + i}) > 0" for i in range(len(needles)))
            of_type += " AND cantata_may_match(data, $6::text[], $7::jsonb)"
            args += [paths, wants, *needles]
        sql = of_type + " AND stored_at>=$3"
        if position is not None:
            # Those stored after ``position`` by the clocks too early for ``since``: a
            # range of the seq index (what was stored since), whatever the clocks.
            sql = f"{sql} UNION ALL {of_type} AND seq>${len(args) + 1} AND stored_at<$3"
            args.append(position)
        place = None if after is None else await self._event_place(app, after)
        if place is not None:
            # The events after ``after`` in the log (seq: one order for every writer,
            # whatever their clocks), looked for from AFTER_SKEW before it by the
            # clocks: the scan stays a range of the (app, type, stored_at) index.
            seq, stored_at = place
            n = len(args)
            sql = of_type + f" AND stored_at>=$3 AND (stored_at>=${n + 1} OR seq>${n + 2})"
            args[2] = min(since, stored_at - AFTER_SKEW)
            args += [since, seq]
        rows = await self._db.fetch(sql + " ORDER BY seq LIMIT $5", *args)
        if rows:
            # The first is the one a wait takes, most often: the next wait of its kind
            # reads after it (engine/wait_look.py), without asking where it is.
            first = rows[0]
            self._remember_place(app, first["id"], int(first["seq"]), float(first["stored_at"]))
        found = [event_row(r) for r in rows]
        return [e for e in found if matches(event_type, e.type)] if wildcard else found

    async def log_position(self, app: str) -> int:
        # (the store's log: the seq index answers it at once, whatever the apps)
        row = await self._db.fetchrow("SELECT coalesce(max(seq), 0) FROM events")
        return 0 if row is None else int(row[0])

    async def _event_place(self, app: str, event_id: str) -> tuple[int, float] | None:
        """The seq and stored_at of a stored event (``None`` if it is not stored), kept
        once known: a triggered run's waits ask for their trigger's at every look."""
        places = self._event_places
        place = places.get((app, event_id))
        if place is None:
            row = await self._db.fetchrow(
                "SELECT seq, stored_at FROM events WHERE app=$1 AND id=$2", app, event_id
            )
            if row is None:
                return None
            place = self._remember_place(app, event_id, int(row["seq"]),
                                         float(row["stored_at"]))
        return place

    def _remember_place(self, app: str, event_id: str, seq: int, stored_at: float
                        ) -> tuple[int, float]:
        places = self._event_places
        if len(places) >= 10_000:
            places.clear()
        place = places[(app, event_id)] = (seq, stored_at)
        return place

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
        return await self._w.run_many(
            event_writes.claim_deliveries_many, (app, worker_id, groups, now, stale_before, limit)
        )

    async def settle_delivery(
        self, app: str, group: str, event_id: str, settlement: Settlement
    ) -> bool:
        return await self._w.run_many(
            event_writes.settle_many, (app, group, event_id, settlement)
        )

    async def deliveries(self, app: str, event_id: str) -> list[Delivery]:
        rows = await self._db.fetch(
            f"SELECT {D_DELIVERY_COLS}, {E_EVENT_COLS} FROM deliveries d JOIN events e "
            "ON e.app=d.app AND e.id=d.event_id WHERE d.app=$1 AND d.event_id=$2 "
            'ORDER BY d.grp COLLATE "C"',
            app, event_id,
        )
        return [delivery_row(r, event_row(r[8:])) for r in rows]

    async def delivery_states(
        self, app: str, group: str, event_ids: Sequence[str]
    ) -> dict[str, tuple[str, int]]:
        if not event_ids:
            return {}
        rows = await self._db.fetch(
            f"SELECT d.event_id, d.status, d.attempts FROM {_STATES_BY_KEY}",
            app, group, list(dict.fromkeys(event_ids)),
        )
        return {r[0]: (r[1], r[2]) for r in rows}

    async def dead_letters(
        self, app: str, *, limit: int = 100, group: str | None = None,
        type: str | None = None,
    ) -> list[DeadLetter]:
        rows = await self._db.fetch(
            f"SELECT d.id, d.grp, d.event_id, d.error, d.attempts, d.failed_at, "
            f"{E_EVENT_COLS} FROM dead_letters d JOIN events e ON e.app=d.app "
            "AND e.id=d.event_id WHERE d.app=$1 AND ($3::text IS NULL OR d.grp=$3) "
            "AND ($4::text IS NULL OR e.type=$4) ORDER BY d.failed_at LIMIT $2",
            app, limit, group, type,
        )
        return [dead_letter_row(r, event_row(r[6:])) for r in rows]

    async def replay_dead_letter(
        self, app: str, dead_letter_id: str, now: float, *, actor: str = audit.SYSTEM
    ) -> DeadLetter:
        async with self._db.tx() as c:
            # The delivery locked first, as a settlement locks it before the trigger of
            # migration 0025 drops its dead letters: no deadlock with one settling it
            # done meanwhile (its dead letter is then gone: not found).
            await c.execute(
                "SELECT 1 FROM deliveries d JOIN dead_letters l ON d.app=l.app AND "
                "d.grp=l.grp AND d.event_id=l.event_id WHERE l.app=$1 AND l.id=$2 "
                "FOR UPDATE OF d",
                app, dead_letter_id,
            )
            # Off the queue, kept for the trace (migration 0028).
            row = await c.fetchrow(
                "WITH gone AS (DELETE FROM dead_letters WHERE app=$1 AND id=$2 "
                "RETURNING id, grp, event_id, error, attempts, failed_at), "
                "kept AS (INSERT INTO replayed_dead_letters (app, id, grp, event_id, error, "
                "attempts, failed_at, replayed_at) SELECT $1, id, grp, event_id, error, "
                "attempts, failed_at, $3 FROM gone ON CONFLICT DO NOTHING) "
                "SELECT id, grp, event_id, error, attempts, failed_at FROM gone",
                app, dead_letter_id, now,
            )
            ev_row = None if row is None else await c.fetchrow(
                f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND id=$2", app, row[2]
            )
            if row is None or ev_row is None:
                raise DeadLetterNotFound(
                    f"no dead letter {dead_letter_id!r} in app {app!r}; list them with "
                    "`cantata dlq list`"
                )
            await c.execute(
                "UPDATE deliveries SET status='pending', attempts=0, next_at=$4, owner=NULL, "
                "error=NULL, updated_at=$4 WHERE app=$1 AND grp=$2 AND event_id=$3 "
                "AND status<>'done'",  # never a handled one: its effect would come twice
                app, row[1], row[2], now,
            )
            await self._db.notify(c, app, EVENTS)
            await ops.audit_append(
                c, app, audit.replay_entry(row[1], row[2], dead_letter_id, actor),
                self._audit_keys.get(app),
            )
        return dead_letter_row(row, event_row(ev_row))

    async def unpublished_events(self, app: str, *, limit: int) -> list[Event[Any]]:
        rows = await self._db.fetch(
            f"SELECT {EVENT_COLS} FROM events WHERE app=$1 AND NOT published ORDER BY seq "
            "LIMIT $2",
            app, limit,
        )
        return [event_row(r) for r in rows]

    async def mark_published(self, app: str, event_ids: Sequence[str]) -> None:
        if not event_ids:
            return
        await self._w.run(lambda c, b: event_writes.mark_published(c, b, app, event_ids))

    async def append_external(self, app: str, events: Sequence[Event[Any]]) -> list[int]:
        if not events:
            return []
        return await self._w.run(lambda c, b: event_writes.append_external(c, b, app, events))

    async def redrive_events(
        self, app: str, *, stored_before: float, limit: int
    ) -> list[Event[Any]]:
        return await self._w.run(
            lambda c, b: event_writes.redrive_events(c, b, app, stored_before, limit)
        )


def may_match(match: Mapping[str, Any] | None) -> tuple[list[str], str]:
    """What ``cantata_may_match`` (migration 0044) compares of a wait's ``match``: each
    key's parts joined by U+001F (which no part holds: ``match_filter`` leaves control
    characters out), and the JSON array of the values. Of
    :func:`~cantata.model.event.match_filter`'s pairs, the strings, and the integers
    below 2**53 in size: an integer-valued float equal to one of those is that very
    integer, so a JSON number written as an integer and compared exactly in the server
    leaves out no event Python would match."""
    paths: list[str] = []
    values: list[str | int] = []
    for parts, value in match_filter(match):
        if isinstance(value, int) and not -_FLOAT_EXACT < value < _FLOAT_EXACT:
            continue
        paths.append(SEPARATOR.join(parts))
        values.append(value)
    return paths, codec.dumps(values)


SEPARATOR = "\x1f"
_FLOAT_EXACT = 2**53
