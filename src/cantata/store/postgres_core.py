"""The PostgreSQL store's core: the pool and the group-committing writer.

Every role of :class:`~cantata.store.postgres.PostgresStore` (``postgres_runs``,
``postgres_events``, ``postgres_trace``, ``postgres_operate``, ``postgres_console``,
``postgres_flow``)
is a subclass of :class:`PostgresCore`: reads and rare writes use pooled connections
(``_db``), hot writes the batch writer (``_w``, see :mod:`cantata.store.postgres_batch`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cantata.store import audit
from cantata.store import postgres_event_writes as event_writes
from cantata.store import postgres_onetrip as onetrip
from cantata.store.common import StoreBase
from cantata.store.postgres_batch import BatchWriter
from cantata.store.postgres_pool import SCHEMA_VERSION, Conn, PgPool


class _OneStatement:
    """What the writer sends as one statement, without BEGIN or COMMIT: a batch of run
    creations and checkpoints (:mod:`cantata.store.postgres_onetrip`), of delivery
    settlements, or of delivery claims
    (:mod:`cantata.store.postgres_event_writes`)."""

    def eligible(self, shares: Sequence[tuple[Any, Any]]) -> bool:
        return event_writes.eligible(shares) or onetrip.eligible(shares)

    async def write(
        self, c: Conn, shares: Sequence[tuple[Any, Any]], keys: Mapping[str, audit.AuditKey]
    ) -> list[Any]:
        if event_writes.eligible(shares):
            return await event_writes.write(c, shares, keys)
        return await onetrip.write(c, shares, keys)

    def falls_back(self, exc: BaseException) -> bool:
        return onetrip.falls_back(exc) or isinstance(exc, event_writes.NotHere)


class PostgresCore(StoreBase):
    """The pool, the batch writer, opening and closing."""

    schema_version = SCHEMA_VERSION
    hears_others = True  # LISTEN/NOTIFY on the schema's channel (postgres_pool.py)
    says_runnable = True  # (postgres_listen.runs_notice)

    def __init__(
        self, url: str, *, pool_size: int = 10, connect_timeout: float = 3.0, writers: int = 2,
        create: bool = True,
    ) -> None:
        super().__init__()
        self.url = url
        self._db = PgPool(
            url, pool_size=pool_size, connect_timeout=connect_timeout, on_change=self._emit,
            create=create,
        )
        self._w = BatchWriter(self._db, writers=writers, one_statement=_OneStatement())
        self._w.audit_keys = self._audit_keys  # one dict: set_audit_key keys the writer too
        # (app, event id) -> (seq, stored_at) of events find_events(after=) looked up:
        # a stored event's place in the log never changes (postgres_events.py).
        self._event_places: dict[tuple[str, str], tuple[int, float]] = {}

    async def open(self) -> None:
        """Connect (retrying briefly), migrate the schema, open the pool and LISTEN."""
        await self._db.open()
        self._w.reopen()

    @property
    def listening(self) -> bool:
        """Whether the listening connection is up (see ``StoreLifecycle.listening``)."""
        return self._db.listening

    def adopt_timing(self, *, lease: float) -> None:
        """The listener's outage warnings at most every ``max(10 s, lease)``; its probe
        after a lease heard nothing (``store/postgres_listen.py``); the session limits
        of the connections made from now on (``store/postgres_session.py``)."""
        self._db.listener.adopt_timing(lease)
        self._db.adopt_lease(lease)

    async def _recorded_schema(self) -> int | None:
        row = await self._db.fetchrow("SELECT max(version) FROM schema_version")
        return None if row is None or row[0] is None else int(row[0])

    def _schema_where(self) -> str:
        return f"the Cantata store in {self._db.masked_url}"

    async def close(self) -> None:
        """Commit queued writes, let operations in flight finish, close every connection."""
        await self._w.close()
        await self._db.close()
