"""The PostgreSQL store's console operations: pages of runs, counts, API tokens and
operator actions in the audit log (see :mod:`cantata.store.console_sql`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cantata.errors import TokenExists
from cantata.model.access import AttentionCounts, RunQuery, TokenRecord
from cantata.model.records import RunRecord
from cantata.store import audit
from cantata.store.console_sql import TOKEN_COLS, runs_page, token_row
from cantata.store.postgres_core import PostgresCore
from cantata.store.postgres_ops import RUN_COLS, audit_append, audit_append_many, run_row


def runs_sql(app: str, q: RunQuery) -> tuple[str, list[Any]]:
    """The query of one page of runs (``bench/console.py`` EXPLAINs it too).

    The runs failed since a time are read by their own index (runs_failed: an hour's
    failures), then sorted: ordered by ``created_at + 0``, which no index yields, the
    planner does not walk every failed run by runs_status_newest for its order instead
    (it did, table never analyzed, for 3 failures among 500 older ones).
    """
    sql, params = runs_page(app, q, RUN_COLS, lambda n: f"${n}", ' COLLATE "C"',
                            failed_at="failed_at")
    if q.failed_since is not None and q.idempotency_key is None:
        sql = sql.replace(" ORDER BY created_at DESC,", " ORDER BY created_at + 0 DESC,", 1)
    return sql, params


# The overview's counts of what needs attention, each by an index: the dead letters by
# their key, the runs failed since a time by runs_failed (a range of failed rows only,
# by failed_at: migration 0038).
ATTENTION = (
    "SELECT (SELECT count(*) FROM dead_letters WHERE app=$1), "
    "(SELECT count(*) FROM runs WHERE app=$1 AND status='failed' AND failed_at>=$2)"
)


class PostgresConsole(PostgresCore):
    """The console role of :class:`~cantata.store.postgres.PostgresStore` (docs/md)."""

    async def query_runs(self, app: str, query: RunQuery) -> list[RunRecord]:
        async with self._db.conn() as c:
            q = query
            sql, params = runs_sql(app, q)
            return [run_row(r) for r in await c.fetch(sql, *params)]

    async def count_runs(self, app: str) -> dict[str, int]:
        async with self._db.conn() as c:
            rows = await c.fetch(
                "SELECT status, count(*) FROM runs WHERE app=$1 GROUP BY status", app
            )
            return {r[0]: int(r[1]) for r in rows}

    async def attention_counts(self, app: str, *, failed_since: float) -> AttentionCounts:
        async with self._db.conn() as c:
            row = await c.fetchrow(ATTENTION, app, failed_since)
            assert row is not None
            return AttentionCounts(int(row[0]), int(row[1]))

    async def record_action(
        self, app: str, actor: str, action: str, target: str, data: dict[str, Any]
    ) -> None:
        async with self._db.tx() as c:
            key = self._audit_keys.get(app)
            await audit_append(c, app, (actor, action, target, data), key)

    async def create_token(
        self, token: TokenRecord, *, actor: str = audit.SYSTEM, apps: Sequence[str] = ()
    ) -> None:
        async with self._db.tx() as c:
            revoked = await c.fetchrow(
                "SELECT revoked_at FROM tokens WHERE name=$1 FOR UPDATE", token.name
            )
            if revoked is not None and revoked[0] is None:
                raise TokenExists(
                    f"an active token is already named {token.name!r}: revoke it first "
                    f"(cantata token revoke {token.name}) or choose another name"
                )
            await c.execute(
                f"INSERT INTO tokens ({TOKEN_COLS}) VALUES ($1,$2,$3,$4,NULL) ON CONFLICT (name) "
                "DO UPDATE SET role=excluded.role, token_hash=excluded.token_hash, "
                "created_at=excluded.created_at, revoked_at=NULL",
                token.name,
                str(token.role),
                token.token_hash,
                token.created_at,
            )
            entry = audit.token_entry(actor, token.name, str(token.role))
            await audit_append_many(c, [(app, entry) for app in set(apps)], self._audit_keys)

    async def token_by_hash(self, token_hash: str) -> TokenRecord | None:
        async with self._db.conn() as c:
            row = await c.fetchrow(
                f"SELECT {TOKEN_COLS} FROM tokens WHERE token_hash=$1", token_hash
            )
            return None if row is None else token_row(row)

    async def tokens(self) -> list[TokenRecord]:
        async with self._db.conn() as c:
            return [
                token_row(r)
                for r in await c.fetch(f'SELECT {TOKEN_COLS} FROM tokens ORDER BY name COLLATE "C"')
            ]

    async def revoke_token(
        self, name: str, now: float, *, actor: str = audit.SYSTEM, apps: Sequence[str] = ()
    ) -> bool:
        async with self._db.tx() as c:
            status = await c.execute(
                "UPDATE tokens SET revoked_at=$2 WHERE name=$1 AND revoked_at IS NULL", name, now
            )
            if status == "UPDATE 0":
                return False
            entry = audit.token_entry(actor, name, None)
            await audit_append_many(c, [(app, entry) for app in set(apps)], self._audit_keys)
            return True
