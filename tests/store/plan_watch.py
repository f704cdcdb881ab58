"""Statements a store runs, explained as they run: what each read of each table, for
the tests that check a statement reads by key whatever the table's statistics.

:class:`Explained` wraps a store's pool (its statements run as they do);
:class:`Explaining` one connection a test hands a store function; :func:`read` and
:func:`rows_read` count what a plan read."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Sequence
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


class Explaining:
    """A connection on which each fetch is run as ``EXPLAIN ANALYZE`` in a transaction
    rolled back at once, its plan kept (``plans``); then, with ``run``, run for its
    rows, else it answers none (the statement's effects are rolled back with it)."""

    def __init__(self, conn: Conn, *, run: bool = False) -> None:
        self.conn = conn
        self.run = run
        self.plans: list[dict[str, Any]] = []

    async def _explain(self, sql: str, args: Sequence[Any]) -> None:
        tx = self.conn.transaction()
        await tx.start()
        try:
            plan = await self.conn.fetchval(f"EXPLAIN (ANALYZE, FORMAT JSON) {sql}", *args)
        finally:
            await tx.rollback()
        self.plans.append(json.loads(plan)[0]["Plan"])

    async def fetch(self, sql: str, *args: Any) -> list[Any]:
        await self._explain(sql, args)
        return list(await self.conn.fetch(sql, *args)) if self.run else []

    async def fetchrow(self, sql: str, *args: Any) -> Any:
        await self._explain(sql, args)
        return await self.conn.fetchrow(sql, *args) if self.run else None


def read(plan: dict[str, Any], relation: str = "runs") -> tuple[int, int, set[str]]:
    """Rows of ``relation`` a plan read (returned by its scans or filtered out by them,
    a bitmap index scan's counted with its heap's), of which filtered out, and the
    indexes it read them by (``"(seq scan)"`` for a sequential scan)."""
    rows = removed = 0
    indexes: set[str] = set()
    nodes = [(plan, "")]
    while nodes:
        node, parent = nodes.pop()
        table = node.get("Relation Name", parent)  # a bitmap index scan: its heap's
        nodes += [(child, table) for child in node.get("Plans", [])]
        if table != relation:
            continue
        loops = node.get("Actual Loops", 1)
        gone = (node.get("Rows Removed by Filter", 0)
                + node.get("Rows Removed by Index Recheck", 0)) * loops
        rows += node.get("Actual Rows", 0) * loops + gone
        removed += gone
        if "Index Name" in node:
            indexes.add(node["Index Name"])
        elif node.get("Node Type") == "Seq Scan":
            indexes.add("(seq scan)")
    return rows, removed, indexes
