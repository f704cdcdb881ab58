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

from cantata.store import audit
from cantata.store import postgres_ops as ops
from cantata.store import postgres_writes as writes
from cantata.store.postgres_batch import Batch, _commit_sql
from cantata.store.postgres_pool import Conn, PgPool
from cantata.store.tx import Tx, TxBody, to_numbered

R = TypeVar("R")


class PostgresTx(Tx):
    """A :class:`~cantata.store.tx.Tx` on one pooled asyncpg connection."""

    dialect = "postgresql"

    def __init__(self, conn: Conn) -> None:
        super().__init__()
        self._conn = conn

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
    ``keys``: the apps' audit keys (a keyed chain stays keyed)."""
    async with db.conn() as c:
        await c.execute("BEGIN")
        tx = PostgresTx(c)
        try:
            write, value = await body(tx)
            tx.close()
            batch = Batch()
            refused = await writes.commit_runs(c, batch, [(app, run_id, fence, write)])
            if refused[0] is not None:
                raise refused[0].error
            if batch.audits:
                await ops.audit_append_many(c, batch.audits, keys)
            await c.execute(_commit_sql(batch.notices, db.channel))
        except BaseException:
            tx.close()
            if not c.is_closed() and c.is_in_transaction():
                await c.execute("ROLLBACK")
            raise
    return value
