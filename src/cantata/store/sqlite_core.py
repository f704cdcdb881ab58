"""The SQLite store's core: the connection thread and appending events.

Every role of :class:`~cantata.store.sqlite.SQLiteStore` (``sqlite_runs``,
``sqlite_events``, ``sqlite_tasks``, ``sqlite_trace``, ``sqlite_operate``,
``sqlite_console``, ``sqlite_flow``) is a
subclass of :class:`SQLiteCore` and runs its SQL through :attr:`SQLiteCore._t`.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from cantata.errors import (
    ConfigurationError,
    StoreUnavailable,
)
from cantata.model import codec
from cantata.model.event import Event, matches
from cantata.store.common import StoreBase
from cantata.store.faults import sqlite_fault
from cantata.store.sqlite_open import (
    BUSY_TIMEOUT_MS,
    SCHEMA_VERSION,
    check_busy_timeout,
    connect,
    recorded_version,
)
from cantata.store.sqlite_ops import (
    EVENT_COLS,
    HOLD_SQL,
)
from cantata.store.sqlite_thread import ConnectionThread, TxConnection

_DECL_VERSION = "SELECT value FROM cantata_meta WHERE key=?"


def declarations_changed(c: sqlite3.Connection, app: str) -> None:
    """``app``'s declarations changed in this write: a new version, so that every
    process's fan-out reads them anew (and this transaction's appends too)."""
    c.execute(
        "INSERT INTO cantata_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT DO UPDATE SET value=excluded.value",
        (f"decl:{app}", codec.new_id()),
    )
    if isinstance(c, TxConnection):
        c.decl_versions.pop(app, None)


class SQLiteCore(StoreBase):
    """The connection thread, the subscriptions cache and the event append."""

    schema_version = SCHEMA_VERSION

    def __init__(
        self, path: str, *, synchronous: str = "FULL", url: str | None = None,
        create: bool = True, busy_timeout: float = BUSY_TIMEOUT_MS,
    ) -> None:
        self.path = path
        self.create = create
        self.url = url or f"sqlite:///{path}"
        self.busy_timeout = check_busy_timeout(busy_timeout, f"busy_timeout={busy_timeout!r}")
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise ConfigurationError(
                f"synchronous={synchronous!r} is not a SQLite synchronous mode: use FULL, "
                "NORMAL, OFF or EXTRA"
            )
        super().__init__()
        self._thread: ConnectionThread | None = None
        self._subs_cache: dict[str, Fanout] = {}
        self._tx_lane: Any = None  # transactional steps' connection (sqlite_tx)

    async def open(self) -> None:
        """Open the file (creating it if allowed), switch to WAL and migrate; a file
        that cannot be written is opened read-only (writes then raise StoreReadOnly)."""
        if self._thread is not None:
            return
        def keyed_connect() -> TxConnection:
            conn = connect(self.path, self.url, self.synchronous, create=self.create,
                           busy_ms=self.busy_timeout)
            conn.audit_keys = self._audit_keys
            conn.lean_apps = self.lean_apps  # one set: the gate opens for the writer too
            return conn

        thread = ConnectionThread(
            keyed_connect, self._notify, name=f"cantata-sqlite:{self.path}",
            translate=lambda exc: sqlite_fault(exc, self.path),
            home=asyncio.get_running_loop(),
        )
        thread.start()
        self._thread = thread

    async def close(self) -> None:
        """Commit what is queued and close the connection."""
        if self._tx_lane is not None:
            self._tx_lane.close()
            self._tx_lane = None
        if self._thread is not None:
            self._thread.stop()
            self._thread = None

    async def _recorded_schema(self) -> int | None:
        return await self._t.read(recorded_version)

    @property
    def _t(self) -> ConnectionThread:
        if self._thread is None:
            raise StoreUnavailable(f"store {self.url} is not open: use `async with app:` first")
        return self._thread

    def _subscriptions(self, c: sqlite3.Connection, app: str) -> Fanout:
        """The handlers and triggers of ``app`` as declared now.

        Cached per declaration version; the version is read once per write
        transaction (see :attr:`TxConnection.decl_versions`), not on every append."""
        versions = c.decl_versions if isinstance(c, TxConnection) and c.in_transaction else None
        version = None if versions is None else versions.get(app)
        if version is None:
            row = c.execute(_DECL_VERSION, (f"decl:{app}",)).fetchone()
            version = row[0] if row else ""
            if versions is not None:
                versions[app] = version
        cached = self._subs_cache.get(app)
        if cached is not None and cached.version == version:
            return cached
        subs = c.execute(
            "SELECT name, pattern FROM declarations WHERE app=? AND kind IN ('handler','trigger')",
            (app,),
        ).fetchall()
        fanout = self._subs_cache[app] = Fanout(version, [(r[0], r[1]) for r in subs])
        return fanout

    def _append(
        self, c: sqlite3.Connection, app: str, events: Sequence[Event[Any]],
        hold: Hold | None = None, stored: list[bool] | None = None,
    ) -> list[int]:
        """Store ``events`` (an id stored before is skipped: count 0) and fan each new
        one out to the groups subscribed to its type; the number of groups per event.

        ``hold``: claim some of the new deliveries for a worker as they are made
        (see :class:`Hold`). ``stored``: told, per event, whether it was stored here."""
        subs = self._subscriptions(c, app)
        now = time.time()
        counts: list[int] = []
        for ev in events:
            cur = c.execute(
                _INSERT_EVENT,
                (
                    app, ev.id, ev.type, ev.source, ev.subject, ev.time,
                    codec.dumps_event_data(ev.data, f"data of event {ev.type}"), ev.correlation_id,
                    ev.causation_id, ev.traceparent, ev.signature, now,
                ),
            )
            if stored is not None:
                stored.append(cur.rowcount != 0)
            if cur.rowcount == 0:
                counts.append(0)
                continue
            groups = subs.groups(ev.type)
            held = None if hold is None or not groups else hold.wanted.get(ev.id)
            groups_plain = groups
            if hold is not None and held:
                groups_plain = [g for g in groups if g not in held]
                hold.fan_out(c, app, ev.id, [g for g in groups if g in held])
            if groups_plain:
                c.executemany(_INSERT_DELIVERY, [(app, g, ev.id, now) for g in groups_plain])
            counts.append(len(groups))
        return counts


class Fanout:
    """An app's subscriptions (group, pattern) at one declaration version, and the
    groups each event type goes to (looked up once per type, not per event)."""

    __slots__ = ("by_type", "subs", "version")
    MAX_TYPES = 4096  # the memo starts over past this many types

    def __init__(self, version: str, subs: list[tuple[str, str]]) -> None:
        self.version = version
        self.subs = subs
        self.by_type: dict[str, list[str]] = {}

    def groups(self, event_type: str) -> list[str]:
        """The groups an event of ``event_type`` goes to, sorted (do not change it)."""
        found = self.by_type.get(event_type)
        if found is None:
            if len(self.by_type) >= self.MAX_TYPES:
                self.by_type.clear()
            found = sorted({g for g, p in self.subs if matches(p, event_type)})
            self.by_type[event_type] = found
        return found


_INSERT_EVENT = (
    f"INSERT INTO events (app, {EVENT_COLS}, stored_at) VALUES "
    "(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING"
)
_INSERT_DELIVERY = (
    "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
    "VALUES (?,?,?,'pending',?) ON CONFLICT DO NOTHING"
)
# A delivery fanned out and held in one statement: made claimed (as HOLD_SQL leaves a
# new one: fence 0+1, its first attempt counted) or, if it was there already, claimed
# on HOLD_SQL's conditions (pending, nobody's, no attempt). 1 row changed: held.
_INSERT_HELD = (
    "INSERT INTO deliveries (app, grp, event_id, status, attempts, owner, fence, updated_at) "
    "VALUES (?,?,?,'pending',1,?,1,?) ON CONFLICT DO UPDATE SET owner=excluded.owner, "
    "fence=fence+1, attempts=1, updated_at=excluded.updated_at "
    "WHERE status='pending' AND owner IS NULL AND attempts=0"
)


class Hold:
    """The deliveries an append claims for ``worker_id`` (``Settlement.hold``): only of
    events it stores (an id stored before may have a delivery a broker copy is being
    handled with right now, which the store cannot see), still pending, nobody's, no
    attempt — as ``claim_deliveries`` would, the first attempt counted.

    Those of the groups an event fans out to are held by the INSERT that makes them
    (:data:`_INSERT_HELD`: one statement instead of an INSERT and an UPDATE); any
    other pair by :data:`~cantata.store.sqlite_ops.HOLD_SQL` after the append.
    """

    __slots__ = ("held", "now", "pairs", "tried", "wanted", "worker_id")

    def __init__(self, worker_id: str, pairs: Sequence[tuple[str, str]], now: float) -> None:
        self.worker_id = worker_id
        self.pairs = pairs
        self.now = now
        self.wanted: dict[str, set[str]] = {}
        for g, e in pairs:
            self.wanted.setdefault(e, set()).add(g)
        self.tried: set[tuple[str, str]] = set()
        self.held: set[tuple[str, str]] = set()

    def fan_out(self, c: sqlite3.Connection, app: str, event_id: str, groups: list[str]) -> None:
        for g in groups:
            self.tried.add((g, event_id))
            if c.execute(_INSERT_HELD, (app, g, event_id, self.worker_id, self.now)).rowcount:
                self.held.add((g, event_id))

    def finish(
        self, c: sqlite3.Connection, app: str, events: Sequence[Event[Any]], counts: Sequence[int]
    ) -> list[tuple[str, str]]:
        """Hold the pairs the fan-out did not make (of an event stored now, a group it did
        not fan out to); the pairs held, in ``pairs`` order, each once."""
        new = {e.id for e, n in zip(events, counts, strict=True) if n}
        out: list[tuple[str, str]] = []
        seen: set[tuple[str, str]] = set()
        for pair in self.pairs:
            if pair in seen or pair[1] not in new:
                continue
            seen.add(pair)
            if pair in self.tried:  # held, or not holdable, by its INSERT
                if pair in self.held:
                    out.append(pair)
            elif c.execute(HOLD_SQL, (self.worker_id, self.now, app, *pair)).rowcount == 1:
                out.append(pair)
        return out
