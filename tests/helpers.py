"""Helpers every test folder shares: one app factory, one wait, ports and schemas.

Waiting is :func:`cantata.testing.eventually` (shipped, so the contract suites use
it too); the folders' own ``helpers.py`` add only what is theirs.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import time
from collections.abc import Callable
from typing import Any

from cantata import App
from cantata.store import audit
from cantata.testing import eventually

__all__ = ["LEASE", "POLL", "drop_schema", "eventually", "free_port", "make_app", "with_schema"]

#: A short lease and poll interval: takeovers and polls happen in tens of ms.
LEASE = 1.0
POLL = 0.05


def make_app(store: str, name: str = "shop", **kw: Any) -> App:
    """An app with a short lease and poll interval, so the suite stays fast."""
    kw.setdefault("lease", LEASE)
    kw.setdefault("poll_interval", POLL)
    return App(name, store=store, **kw)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def with_schema(url: str, schema: str) -> str:
    """A PostgreSQL URL whose store uses ``schema``."""
    return f"{url}{'&' if '?' in url else '?'}schema={schema}"


async def drop_schema(url: str, schema: str) -> None:
    """Drop a PostgreSQL schema a test made (and everything in it)."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


def rehashed_plain(rows: list[Any], changed: int = 2,
                   actor: str = "someone-else") -> list[tuple[Any, ...]]:
    """An audit chain forged without its key: the rows ``(seq, time, actor, action,
    target, data)`` in order, record ``changed``'s actor replaced and every hash
    recomputed with plain SHA-256; ``(actor, prev_hash, hash, seq)`` of each, for an
    ``UPDATE audit SET actor=?, prev_hash=?, hash=? WHERE ... AND seq=?``."""
    prev, out = audit.GENESIS_HASH, []
    for seq, at, who, action, target, data in rows:
        who = actor if seq == changed else who
        h = hashlib.sha256(
            f"{prev}[{seq},{audit.tail(at, who, action, target, data)}".encode("ascii")
        ).hexdigest()
        out.append((who, prev, h, seq))
        prev = h
    return out


def recorded(
    call: Callable[..., Any], seen: list[tuple[float, str]], what: str,
    told: Callable[[Any, dict[str, Any]], str],
) -> Callable[..., Any]:
    """``call`` (a coroutine function, or an unbound method: ``self`` is passed through),
    noting in ``seen`` (monotonic time, what) each call's begin (``what`` begun), then
    ``told(answer, kwargs)`` or the error it raised. What a timing test's failure shows."""

    async def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append((time.monotonic(), f"{what} begun"))
        try:
            answer = await call(*args, **kwargs)
        except BaseException as exc:
            seen.append((time.monotonic(), f"{what} failed: {exc!r}"))
            raise
        seen.append((time.monotonic(), told(answer, kwargs)))
        return answer

    return recording


def watch_claims(
    store: Any, method: str, seen: list[tuple[float, str]],
    took: Callable[[Any, dict[str, Any]], str],
) -> None:
    """Note in ``seen`` each call of the store's claim ``method`` (:func:`recorded`, an
    instance attribute put over it)."""
    setattr(store, method, recorded(getattr(store, method), seen, "claim", took))


async def lock_waits(conn: Any, n: int, statement: str = "%") -> None:
    """Until ``n`` other backends of ``conn``'s database wait on a lock in a statement
    ``LIKE statement``; fails after 10 s. ``conn`` (asyncpg) may be in a transaction: its
    view of the server's activity is taken afresh at each look."""
    deadline = time.monotonic() + 10
    while await conn.fetchval(
        "SELECT count(*) FROM (SELECT pg_stat_clear_snapshot()) fresh, pg_stat_activity "
        "WHERE datname=current_database() AND wait_event_type='Lock' "
        "AND pid<>pg_backend_pid() AND query LIKE $1", statement) < n:
        assert time.monotonic() < deadline, f"{n} statement(s) never waited on a lock"
        await asyncio.sleep(0.01)
