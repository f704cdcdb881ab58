"""Transactional steps on SQLite: the step's SQL and its checkpoint in one transaction.

The store's connection thread group-commits short operations; a step's transaction
lasts as long as the step, so it gets a connection of its own (one per store,
driven by its own thread, one transaction at a time). ``BEGIN IMMEDIATE`` takes the
database's write lock for the step's duration: SQLite has one writer, so the
store's other writes wait (up to the busy timeout) while a transactional step runs
— keep such steps short, and do not await other store writes inside them.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from cantata.errors import LeaseLost, StoreError, TransactionUnsupported
from cantata.model.records import RunWrite
from cantata.store.base import CLAIMS, EVENTS, RUNS, TASKS
from cantata.store.faults import sqlite_fault
from cantata.store.sqlite_open import connect
from cantata.store.sqlite_thread import TxConnection
from cantata.store.tx import Tx, TxBody, commit_through, to_numbered

if TYPE_CHECKING:
    from cantata.store.sqlite import SQLiteStore

R = TypeVar("R")


class _Lane:
    """One connection and the one thread that uses it."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"cantata-sqlite-tx:{store.path}")
        self.conn: TxConnection | None = None
        self.lock = asyncio.Lock()

    async def call(self, fn: Callable[[TxConnection], R]) -> R:
        """``fn`` on the lane's connection, in its thread; a fault of the database (disk
        full, read-only, damaged, locked too long) raised as Cantata's error."""
        def go() -> R:
            if self.conn is None:
                self.conn = connect(self.store.path, self.store.url, self.store.synchronous,
                                    create=False, busy_ms=self.store.busy_timeout)
                self.conn.audit_keys = self.store._audit_keys  # a keyed chain stays keyed
                self.conn.lean_apps = self.store.lean_apps  # and the gate is the store's
            return fn(self.conn)

        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, go)
        except sqlite3.Error as exc:
            fault = sqlite_fault(exc, self.store.path)
            if fault is None:
                raise
            raise fault from exc

    def close(self) -> None:
        def shut() -> None:
            if self.conn is not None:
                self.conn.close()
                self.conn = None

        self.pool.submit(shut)
        self.pool.shutdown(wait=True)


class SQLiteTx(Tx):
    """A :class:`~cantata.store.tx.Tx` on the lane's connection."""

    dialect = "sqlite"

    def __init__(self, lane: _Lane) -> None:
        super().__init__()
        self._lane = lane

    def _fault(self, exc: Exception) -> StoreError | None:
        return exc if isinstance(exc, StoreError) else None  # (named by the lane)

    async def _execute(self, sql: str, params: Sequence[Any]) -> int:
        text = to_numbered(sql, "?")
        return await self._lane.call(lambda c: c.execute(text, tuple(params)).rowcount)

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        text = to_numbered(sql, "?")
        return await self._lane.call(
            lambda c: [tuple(r) for r in c.execute(text, tuple(params)).fetchall()]
        )


def lane_of(store: SQLiteStore) -> _Lane:
    lane: _Lane | None = getattr(store, "_tx_lane", None)
    if lane is None:
        lane = _Lane(store)
        store._tx_lane = lane
    return lane


async def run_transaction(
    store: SQLiteStore, app: str, run_id: str, fence: int, body: TxBody[R]
) -> R:
    """:meth:`~cantata.store.base.TransactionalStore.run_transaction` on SQLite."""
    if store.path == ":memory:":
        raise TransactionUnsupported(
            f"run {run_id}: an @app.transaction step needs a store whose database also "
            f"holds the service's tables, and {store.url} is private to one connection; "
            "use sqlite:///file.db or postgresql://... (see docs/workflow-api.md)"
        )
    lane = lane_of(store)
    async with lane.lock:
        await lane.call(lambda c: c.begin_write())
        tx = SQLiteTx(lane)
        try:
            write, value = await body(tx)
            tx.close()

            def finish(c: TxConnection) -> None:
                if not store._commit_fenced(c, app, run_id, fence, write):
                    raise LeaseLost(
                        f"run {run_id} was taken over by another worker (fence {fence} is "
                        "stale); its transactional step is rolled back"
                    )
                c.commit_write()

            await commit_through(tx, lane.call(finish))
        except BaseException:
            tx.close()
            if tx.committed:  # a cancel came during the COMMIT: raised after it
                _notify(store, write)
            else:
                await asyncio.shield(lane.call(_rollback))
            raise
    _notify(store, write)
    return value


def _notify(store: SQLiteStore, write: RunWrite) -> None:
    """Wake what waits for the committed step's writes."""
    channels = {RUNS}
    if write.events:
        channels.update((EVENTS, CLAIMS))
    if write.tasks:
        channels.add(TASKS)
    store._notify(channels)


def _rollback(c: sqlite3.Connection) -> None:
    if c.in_transaction:
        c.execute("ROLLBACK")
