"""Helpers and fixtures shared by the store contract (see :mod:`cantata.testing.contract.store`)."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import strategies as st

from cantata.model import codec
from cantata.model.event import Event
from cantata.model.records import (
    ENTRY_COMPLETED,
    STEP,
    AuditRecord,
    Declaration,
    EntryStatus,
    HistoryEntry,
    RunRecord,
)
from cantata.model.status import RunStatus
from cantata.store import audit
from cantata.store.base import Store

_clock = itertools.count(1)

#: The lease the contract's workers heartbeat with: a worker is live until its heartbeat
#: + this, and the stores' ``stale_before`` is the time it is judged at (the current
#: time), so a heartbeat 60 s old is long expired.
LEASE = 10.0

#: Arbitrary JSON values the codec can encode (orjson: 64-bit integers, finite floats).
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def new_run(app: str, workflow: str = "wf", **kw: Any) -> RunRecord:
    """A pending run with a unique id and a creation time later than every earlier one."""
    created = 1_700_000_000.0 + next(_clock)
    fields: dict[str, Any] = {
        "run_id": codec.new_id(),
        "app": app,
        "workflow": workflow,
        "status": RunStatus.PENDING,
        "args": "[1]",
        "created_at": created,
        "updated_at": created,
        "correlation_id": codec.new_id(),
    }
    fields.update(kw)
    return RunRecord(**fields)


def ev(event_type: str = "order.placed", data: Any = None, **kw: Any) -> Event[Any]:
    """An event (``data`` defaults to a small object; build ``Event`` for ``None`` data)."""
    return Event(type=event_type, data={"n": 1} if data is None else data, **kw)


def entry(
    key: str, seq: int, status: EntryStatus = ENTRY_COMPLETED, **kw: Any
) -> HistoryEntry:
    """A step history entry keyed ``key`` (``name#occurrence``)."""
    return HistoryEntry(key=key, kind=STEP, name=key.split("#")[0], status=status, seq=seq, **kw)


#: The ways :meth:`StoreFixtures.tamper` changes an audit record. It also takes
#: ``"forge"``: insert :func:`forged_after` the record (past the chain head when the
#: record is the last one).
TAMPERINGS = ("data", "hash", "prev_hash", "rehash", "delete")


def forged_after(rec: AuditRecord) -> AuditRecord:
    """The record :meth:`StoreFixtures.tamper` inserts for ``"forge"``: the next
    ``seq`` after ``rec``, linked to it, with an operator's actor and a made-up hash."""
    return AuditRecord(rec.seq + 1, rec.time, "token:admin", "run.retried", rec.target,
                       rec.data, rec.hash, "not-a-hash")


def tampered(rec: AuditRecord, how: str) -> dict[str, Any] | None:
    """The columns of ``rec`` to overwrite for ``how`` (``None``: delete the row).

    ``data`` falsifies the data; ``hash`` and ``prev_hash`` overwrite a hash;
    ``rehash`` falsifies the data and recomputes the record's own hash, as an
    attacker who knows the algorithm would.
    """
    if how == "delete":
        return None
    forged = '{"forged":true,"status":"completed"}'
    if how == "data":
        return {"data": forged}
    if how == "hash":
        return {"hash": "0" * 64}
    if how == "prev_hash":
        return {"prev_hash": "f" * 64}
    assert how == "rehash", how
    rest = audit.tail(rec.time, rec.actor, rec.action, rec.target, forged)
    return {"data": forged, "hash": audit.chain_hash(rec.prev_hash, rec.seq, rest)}


class StoreFixtures:
    """The backend hook, the fixtures and small helpers of the store contract."""

    #: Two stores from :meth:`make_store` in one test share one database (False for
    #: private in-memory databases: races then run on one instance).
    shares_database: bool = True

    app: str

    async def make_store(self) -> Store:
        """A new, unopened store on this test's database."""
        raise NotImplementedError

    @pytest.fixture(autouse=True)
    def _app_name(self) -> None:
        self.app = f"app-{codec.new_id()[-12:]}"

    @pytest.fixture
    async def store(self) -> AsyncIterator[Store]:
        s = await self.make_store()
        await s.open()
        try:
            yield s
        finally:
            await s.close()

    @pytest.fixture
    async def peer(self, store: Store) -> AsyncIterator[Store]:
        """A second store instance on the same database (or the same one if private)."""
        if not self.shares_database:
            yield store
            return
        other = await self.make_store()
        await other.open()
        try:
            yield other
        finally:
            await other.close()

    async def tamper(self, store: Store, app: str, seq: int, how: str = "data") -> None:
        """Change audit record ``seq`` of ``app`` behind the store's back, with raw SQL.

        ``how`` is one of :data:`TAMPERINGS` (see :func:`tampered`), or ``"forge"``:
        insert :func:`forged_after` record ``seq`` (a new row). The backend's
        append-only guard (trigger) is bypassed as an attacker with database access
        would. Every backend's test class implements it.
        """
        raise NotImplementedError

    async def live(self, store: Store, *workers: str) -> float:
        now = time.time()
        for w in workers:
            await store.heartbeat(self.app, w, now, None, lease=LEASE)
        return now

    async def handlers(self, store: Store, *decls: tuple[str, str]) -> None:
        await store.declare(self.app, [Declaration("handler", g, p) for g, p in decls])

    async def claim(self, store: Store, worker: str, limit: int = 100) -> list[RunRecord]:
        return await store.claim_runs(
            self.app, worker, ["wf"], stale_before=time.time(), limit=limit
        )

    async def claim_d(
        self, store: Store, worker: str, groups: list[str], now: float | None = None
    ) -> list[Any]:
        now = time.time() if now is None else now
        return await store.claim_deliveries(
            self.app, worker, groups, now=now, stale_before=now, limit=100
        )
