"""SQL of the console's store operations, for both dialects: a page of runs by keyset,
runs counted by status, and API tokens (see docs/console.md).

Only the placeholders differ between SQLite (``?``) and PostgreSQL (``$n``), and the
ordering of ``run_id``: PostgreSQL compares it by bytes (``COLLATE "C"``, as its
index is built) so both stores page in the same order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from cantata.model.access import Role, RunQuery, TokenRecord

TOKEN_COLS = "name, role, token_hash, created_at, revoked_at"


def runs_page(
    app: str, q: RunQuery, cols: str, mark: Callable[[int], str], collate: str = "",
    attributes_index: str = "", failed_at: str = "updated_at",
) -> tuple[str, list[Any]]:
    """``SELECT cols FROM runs`` for one page of ``q``, newest first.

    The keyset condition is written as ``created_at <= x AND (created_at < x OR
    run_id < y)`` rather than a row comparison, so both planners use its first half
    as an index bound on the (…, created_at, run_id) indexes of migration 0003.
    Each search attribute is a set of run ids read from the ``(app, name, value)``
    index of ``run_attributes`` (``attributes_index``: SQLite's ``INDEXED BY`` hint).
    ``failed_at`` is the column the ``runs_failed`` index orders the failed runs by
    (migrations: SQLite 0029, PostgreSQL 0038).
    """
    params: list[Any] = [app]

    def p(value: Any) -> str:
        params.append(value)
        return mark(len(params))

    where = [f"app={mark(1)}"]
    if q.workflow is not None:
        where.append(f"workflow={p(q.workflow)}")
    if q.status is not None:
        where.append(f"status={p(str(q.status))}")
    if q.idempotency_key is not None:
        where.append(f"idempotency_key={p(q.idempotency_key)}")
    if q.correlation_id is not None:
        where.append(f"correlation_id={p(q.correlation_id)}")
    if q.version is not None:
        where.append(f"version={p(q.version)}")
    if q.failed_since is not None:
        where.append(f"status='failed' AND {failed_at}>={p(q.failed_since)}")
    if q.since is not None:
        where.append(f"created_at>={p(q.since)}")
    if q.until is not None:
        where.append(f"created_at<{p(q.until)}")
    for name, value in q.attributes:
        where.append(
            f"run_id IN (SELECT run_id FROM run_attributes{attributes_index} WHERE "
            f"app={p(app)} AND name={p(name)} AND value={p(value)})"
        )
    if q.after is not None:
        at, run_id = q.after
        where.append(
            f"created_at<={p(at)} AND (created_at<{p(at)} OR run_id{collate}<{p(run_id)})"
        )
    sql = (
        f"SELECT {cols} FROM runs WHERE {' AND '.join(where)} "
        f"ORDER BY created_at DESC, run_id{collate} DESC LIMIT {p(q.limit)}"
    )
    return sql, params


def token_row(row: Any) -> TokenRecord:
    return TokenRecord(row[0], Role(row[1]), row[2], row[3], row[4])
