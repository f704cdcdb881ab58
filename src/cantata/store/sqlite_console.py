"""The SQLite store's console operations: pages of runs, counts, API tokens and
operator actions in the audit log (see :mod:`cantata.store.console_sql`)."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from cantata.errors import TokenExists
from cantata.model.access import AttentionCounts, RunQuery, TokenRecord
from cantata.model.records import RunRecord
from cantata.store import audit
from cantata.store.console_sql import TOKEN_COLS, runs_page, token_row
from cantata.store.sqlite_core import SQLiteCore
from cantata.store.sqlite_ops import RUN_COLS, audit_append, run_row


def runs_sql(app: str, q: RunQuery) -> tuple[str, list[Any]]:
    """The query of one page of runs (``bench/console.py`` EXPLAINs it too).

    Without statistics SQLite prefers the index that yields the order (runs_newest)
    and filters a transaction's few runs out of all of them; a correlation id names a
    handful of runs, so its own index is the one to read (then sort those few). So do
    the runs failed since a time (an hour's failures, by runs_failed), rather than all
    the failed runs read in order of creation.
    """
    sql, params = runs_page(app, q, RUN_COLS, lambda _: "?",
                            attributes_index=" INDEXED BY run_attributes_value")
    if q.correlation_id is not None and q.idempotency_key is None:
        sql = sql.replace("FROM runs WHERE", "FROM runs INDEXED BY runs_correlation WHERE", 1)
    elif q.failed_since is not None and q.idempotency_key is None:
        sql = sql.replace("FROM runs WHERE", "FROM runs INDEXED BY runs_failed WHERE", 1)
    return sql, params


# The overview's counts of what needs attention, each by an index: the dead letters by
# their key, the runs failed since a time by runs_failed (a range of failed rows only;
# a failed run's updated_at is when it failed).
ATTENTION = (
    "SELECT (SELECT count(*) FROM dead_letters WHERE app=?), "
    "(SELECT count(*) FROM runs INDEXED BY runs_failed "
    "WHERE app=? AND status='failed' AND updated_at>=?)"
)


class SQLiteConsole(SQLiteCore):
    """The console role of :class:`~cantata.store.sqlite.SQLiteStore` (docs/md)."""

    async def query_runs(self, app: str, query: RunQuery) -> list[RunRecord]:
        def op(c: sqlite3.Connection) -> list[RunRecord]:
            q = query
            sql, params = runs_sql(app, q)
            return [run_row(r) for r in c.execute(sql, params).fetchall()]

        return await self._t.read(op)

    async def count_runs(self, app: str) -> dict[str, int]:
        def op(c: sqlite3.Connection) -> dict[str, int]:
            rows = c.execute(
                "SELECT status, count(*) FROM runs WHERE app=? GROUP BY status", (app,)
            ).fetchall()
            return {r[0]: r[1] for r in rows}

        return await self._t.read(op)

    async def attention_counts(self, app: str, *, failed_since: float) -> AttentionCounts:
        def op(c: sqlite3.Connection) -> AttentionCounts:
            row = c.execute(ATTENTION, (app, app, failed_since)).fetchone()
            return AttentionCounts(int(row[0]), int(row[1]))

        return await self._t.read(op)

    async def record_action(
        self, app: str, actor: str, action: str, target: str, data: dict[str, Any]
    ) -> None:
        def op(c: sqlite3.Connection) -> None:
            audit_append(c, app, (actor, action, target, data))

        await self._t.write(op)

    async def create_token(
        self, token: TokenRecord, *, actor: str = audit.SYSTEM, apps: Sequence[str] = ()
    ) -> None:
        def op(c: sqlite3.Connection) -> None:
            row = c.execute("SELECT revoked_at FROM tokens WHERE name=?", (token.name,)).fetchone()
            if row is not None and row[0] is None:
                raise TokenExists(
                    f"an active token is already named {token.name!r}: revoke it first "
                    f"(cantata token revoke {token.name}) or choose another name"
                )
            c.execute(
                f"INSERT INTO tokens ({TOKEN_COLS}) VALUES (?,?,?,?,NULL) ON CONFLICT (name) DO "
                "UPDATE "
                "SET role=excluded.role, token_hash=excluded.token_hash, "
                "created_at=excluded.created_at, revoked_at=NULL",
                (token.name, str(token.role), token.token_hash, token.created_at),
            )
            for app in sorted(set(apps)):
                audit_append(c, app, audit.token_entry(actor, token.name, str(token.role)))

        await self._t.write(op)

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        def op(c: sqlite3.Connection) -> TokenRecord | None:
            row = c.execute(
                f"SELECT {TOKEN_COLS} FROM tokens WHERE token_hash=?", (token_hash,)
            ).fetchone()
            return None if row is None else token_row(row)

        return await self._t.read(op)

    async def tokens(self) -> list[TokenRecord]:
        def op(c: sqlite3.Connection) -> list[TokenRecord]:
            rows = c.execute(f"SELECT {TOKEN_COLS} FROM tokens ORDER BY name").fetchall()
            return [token_row(r) for r in rows]

        return await self._t.read(op)

    async def revoke_token(
        self, name: str, now: float, *, actor: str = audit.SYSTEM, apps: Sequence[str] = ()
    ) -> bool:
        def op(c: sqlite3.Connection) -> bool:
            revoked = c.execute(
                "UPDATE tokens SET revoked_at=? WHERE name=? AND revoked_at IS NULL", (now, name)
            ).rowcount > 0
            for app in sorted(set(apps)) if revoked else ():
                audit_append(c, app, audit.token_entry(actor, name, None))
            return revoked

        return await self._t.write(op)
