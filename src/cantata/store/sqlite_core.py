"""The SQLite store's core: the connection thread and appending events.

Every role of :class:`~cantata.store.sqlite.SQLiteStore` (``sqlite_runs``,
``sqlite_events``, ``sqlite_tasks``, ``sqlite_trace``, ``sqlite_operate``,
``sqlite_console``, ``sqlite_flow``) is a
subclass of :class:`SQLiteCore` and runs its SQL through :attr:`SQLiteCore._t`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from cantata.errors import (
    StoreUnavailable,
)
from cantata.model import codec
from cantata.model.event import Event, matches
from cantata.store.common import StoreBase
from cantata.store.faults import sqlite_fault
from cantata.store.sqlite_open import connect
from cantata.store.sqlite_ops import (
    EVENT_COLS,
)
from cantata.store.sqlite_thread import ConnectionThread, TxConnection


_DECL_VERSION = "SELECT value FROM cantata_meta WHERE key=?"


class SQLiteCore(StoreBase):
    """The connection thread, the subscriptions cache and the event append."""

    def __init__(
        self, path: str, *, synchronous: str = "FULL", url: str | None = None,
        create: bool = True,
    ) -> None:
        self.path = path
        self.create = create
        self.url = url or f"sqlite:///{path}"
        self.synchronous = synchronous.upper()
        if self.synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise StoreUnavailable(
                f"synchronous={synchronous!r} is not a SQLite synchronous mode: use FULL, "
                "NORMAL, OFF or EXTRA"
            )
        super().__init__()
        self._thread: ConnectionThread | None = None
        self._subs_cache: dict[str, tuple[str, list[tuple[str, str]]]] = {}
        self._tx_lane: Any = None  # transactional steps' connection (sqlite_tx)

    async def open(self) -> None:
        """Open the file (creating it if allowed), switch to WAL and migrate; a file
        that cannot be written is opened read-only (writes then raise StoreReadOnly)."""
        if self._thread is not None:
            return
        def keyed_connect() -> TxConnection:
            conn = connect(self.path, self.url, self.synchronous, create=self.create)
            conn.audit_keys = self._audit_keys
            return conn

        thread = ConnectionThread(
            keyed_connect, self._notify, name=f"cantata-sqlite:{self.path}",
            translate=lambda exc: sqlite_fault(exc, self.path),
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

    @property
    def _t(self) -> ConnectionThread:
        if self._thread is None:
            raise StoreUnavailable(f"store {self.url} is not open: use `async with app:` first")
        return self._thread

    def _subscriptions(self, c: sqlite3.Connection, app: str) -> list[tuple[str, str]]:
        """The (group, pattern) of ``app``'s handlers and triggers, as declared now.

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
        if cached is not None and cached[0] == version:
            return cached[1]
        subs = c.execute(
            "SELECT name, pattern FROM declarations WHERE app=? AND kind IN ('handler','trigger')",
            (app,),
        ).fetchall()
        result = [(r[0], r[1]) for r in subs]
        self._subs_cache[app] = (version, result)
        return result

    def _append(self, c: sqlite3.Connection, app: str, events: Sequence[Event[Any]]) -> list[int]:
        subs = self._subscriptions(c, app)
        now = time.time()
        counts: list[int] = []
        for ev in events:
            cur = c.execute(
                f"INSERT INTO events (app, {EVENT_COLS}, stored_at) VALUES "
                "(?,?,?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING",
                (
                    app, ev.id, ev.type, ev.source, ev.subject, ev.time,
                    codec.dumps(ev.data, f"data of event {ev.type}"), ev.correlation_id,
                    ev.causation_id, ev.traceparent, ev.signature, now,
                ),
            )
            if cur.rowcount == 0:
                counts.append(0)
                continue
            groups = sorted({g for g, p in subs if matches(p, ev.type)})
            if groups:
                c.executemany(
                    "INSERT INTO deliveries (app, grp, event_id, status, updated_at) "
                    "VALUES (?,?,?,'pending',?) ON CONFLICT DO NOTHING",
                    [(app, g, ev.id, now) for g in groups],
                )
            counts.append(len(groups))
        return counts
