"""Statements a store runs, explained as they run: what each read of each table, for
the tests that check a statement reads by key whatever the table's statistics."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

from cantata import App
from cantata.store.postgres_pool import Conn


class Explained:
    """A pooled connection on which each statement is first run under ``EXPLAIN
    ANALYZE`` (in a savepoint rolled back at once), its plan kept with its text, and
    then run for real: the store's methods work as they do, and say what they read."""

    def __init__(self, conn: Conn, plans: list[tuple[str, dict[str, Any]]]) -> None:
        self._conn = conn
        self._plans = plans

    async def _explain(self, sql: str, args: tuple[Any, ...]) -> None:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE", "INSERT",
                                                "DELETE")):
            return
        # (by SQL: the store may have begun its transaction by SQL too, where asyncpg's
        # transaction() refuses to nest)
        inside = self._conn.is_in_transaction()
        await self._conn.execute("SAVEPOINT explained" if inside else "BEGIN")
        try:
            plan = await self._conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        finally:
            await self._conn.execute("ROLLBACK TO SAVEPOINT explained" if inside
                                     else "ROLLBACK")
        self._plans.append((sql, json.loads(plan)[0]["Plan"]))

    async def fetch(self, sql: str, *args: Any) -> Any:
        await self._explain(sql, args)
        return await self._conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        await self._explain(sql, args)
        return await self._conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        await self._explain(sql, args)
        return await self._conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> Any:
        if args:  # (a statement without arguments may be several, or not explainable)
            await self._explain(sql, args)
        return await self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@contextlib.asynccontextmanager
async def explaining(app: App) -> AsyncIterator[list[tuple[str, dict[str, Any]]]]:
    """Every statement ``app``'s store runs on its pool meanwhile, explained
    (:class:`Explained`): (its text, its plan)."""
    db = app.store._db  # type: ignore[attr-defined]
    plans: list[tuple[str, dict[str, Any]]] = []
    pooled = db.conn

    @contextlib.asynccontextmanager
    async def conn(**kw: Any) -> AsyncIterator[Any]:
        async with pooled(**kw) as c:
            yield Explained(c, plans)

    db.conn = conn
    try:
        yield plans
    finally:
        del db.conn


def rows_read(plan: dict[str, Any], relation: str) -> int:
    """Rows of ``relation`` a plan read: returned by its scans of it or filtered out by
    them, times their loops (a bitmap scan's rows counted at its heap scan; the
    ``UPDATE`` itself, which writes what its scans found, not counted)."""
    rows, nodes = 0, [plan]
    while nodes:
        node = nodes.pop()
        nodes += node.get("Plans", [])
        if node.get("Relation Name") == relation and node["Node Type"] != "ModifyTable":
            rows += (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)
                     + node.get("Rows Removed by Index Recheck", 0)) * node.get("Actual Loops", 1)
    return rows
