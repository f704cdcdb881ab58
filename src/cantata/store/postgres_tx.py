"""Transactional steps on PostgreSQL: the step's SQL and its checkpoint in one transaction.

The step gets a pooled connection of its own for its duration (the group-committed
writer keeps its connections for short operations). Its statements, then the
checkpoint (the same statement as a group-committed one, fenced), the events the
step published and the audit record commit together. Tables the step names without
a schema are looked up in the store's schema (the connection's ``search_path``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from cantata.errors import StoreError, StoreUnavailable
from cantata.model.records import RunWrite
from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store import postgres_writes as writes
from cantata.store.faults import is_step_shortage, postgres_statement_fault
from cantata.store.postgres_batch import Batch, _commit_sql
from cantata.store.postgres_pool import CONN_ERRORS, Conn, PgPool
from cantata.store.tx import Tx, TxBody, commit_through, to_numbered

R = TypeVar("R")

# The step's code may await other work (another service) between its statements: its
# transaction is exempt from the session's idle_in_transaction_session_timeout, which
# bounds Cantata's own transactions (store/postgres_session.py), in the same round trip.
_BEGIN = "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 0"


class PostgresTx(Tx):
    """A :class:`~cantata.store.tx.Tx` on one pooled asyncpg connection."""

    dialect = "postgresql"

    def __init__(self, conn: Conn, where: str) -> None:
        super().__init__()
        self._conn = conn
        self._where = where

    def _fault(self, exc: Exception) -> StoreError | None:
        # disk full, read-only, damaged; not a shortage the step's transaction caused
        return postgres_statement_fault(exc, self._where)

    async def _execute(self, sql: str, params: Sequence[Any]) -> int:
        status = await self._conn.execute(to_numbered(sql, "$"), *params)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else -1

    async def _fetch(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        rows = await self._conn.fetch(to_numbered(sql, "$"), *params)
        return [tuple(r) for r in rows]


async def run_transaction(
    db: PgPool, app: str, run_id: str, fence: int, body: TxBody[R],
    keys: Mapping[str, audit.AuditKey] | None = None,
) -> R:
    """:meth:`~cantata.store.base.TransactionalStore.run_transaction` on PostgreSQL;
    ``keys``: the apps' audit keys (a keyed chain stays keyed).

    The step's own error (``body``'s) is raised as it is, after the rollback, not
    through the pool, which takes an ``OSError`` or a ``TimeoutError`` for a lost
    connection (the step's code may meet them calling another service); a disk-full
    or read-only error of its statements reaches it as ``StoreFull`` or
    ``StoreReadOnly`` already (:meth:`PostgresTx._fault`, as the pool names them), and
    a shortage its transaction can cause (out of memory or shared memory, a configured
    limit: SQLSTATE 53200, 53400, 53000) as the driver's error, the step's own: so is
    such a shortage met by the checkpoint or the COMMIT, raised after the rollback
    (the step's locks or memory may have caused it: waiting it out would fail for
    ever). If the
    connection was lost under it (found gone after it, or at the rollback),
    ``StoreUnavailable`` is raised instead, as when connecting, beginning, the
    checkpoint or the COMMIT lost the connection. A cancel that comes during the
    checkpoint and COMMIT is raised once they have ended (:func:`commit_through`).
    """
    failed: Exception | None = None  # the step's own error
    async with db.conn() as c:
        await c.execute(_BEGIN)
        tx = PostgresTx(c, db.masked_url)
        try:
            try:
                write, value = await body(tx)
            except Exception as exc:
                failed = exc
            tx.close()
            if failed is None:
                try:
                    await commit_through(
                        tx, _commit(db, c, app, run_id, fence, write, keys), c.terminate)
                except asyncpg.PostgresError as exc:
                    if not is_step_shortage(exc):
                        raise
                    failed = exc  # (the transaction's own shortage: the step's error)
        except BaseException:
            tx.close()
            if not _lost(c) and c.is_in_transaction():
                await c.execute("ROLLBACK")
            raise
        if failed is not None and await _rolled_back_lost(c):
            raise StoreUnavailable(
                f"lost the connection to PostgreSQL at {db.masked_url} in the transaction "
                f"of step {tx.step} of run {run_id} ({type(failed).__name__}: {failed}); "
                "nothing of it was committed"
            ) from failed
    if failed is not None:
        raise failed
    return value


async def _commit(
    db: PgPool, c: Conn, app: str, run_id: str, fence: int, write: RunWrite,
    keys: Mapping[str, audit.AuditKey] | None,
) -> None:
    """The step's checkpoint (fenced), its audit record and the COMMIT."""
    batch = Batch()
    refused = await writes.commit_runs(c, batch, [(app, run_id, fence, write)])
    if refused[0] is not None:
        raise refused[0].error
    if batch.audits:
        await ops.audit_append_many(c, batch.audits, keys)
    await c.execute(_commit_sql(batch.notices, db.channel))


def _lost(c: Conn) -> bool:
    """``c`` is gone (the server or the network closed it: asyncpg then gives a pooled
    connection back to its pool, and the proxy's calls raise ``InterfaceError``)."""
    try:
        return c.is_closed()
    except asyncpg.InterfaceError:
        return True


async def _rolled_back_lost(c: Conn) -> bool:
    """Roll back after the step's own error: True if the connection was lost (under
    the step's statements, or at the rollback)."""
    try:
        if not _lost(c) and c.is_in_transaction():
            await c.execute("ROLLBACK")
    except CONN_ERRORS:
        if not _lost(c):  # still busy with a statement the step left running
            c.terminate()  # (never handed out again)
            return False
    return _lost(c)
