"""A tiny third-party backend, as a package outside Cantata would ship it.

``tiny:///path.db`` is a SQLite store that counts what it commits, and
``tinybus://`` an embedded broker under another scheme: both are found through
the entry points of ``tinybackend-0.1.dist-info`` beside this file.
"""

from __future__ import annotations

from cantata.broker.embedded import EmbeddedBroker
from cantata.store.sqlite import SQLiteStore


class TinyStore(SQLiteStore):
    """SQLite under another scheme (a real backend would implement cantata.Store)."""


def make_store(url: str) -> TinyStore:
    rest = url.split("://", 1)[1]
    path = rest[1:] if rest.startswith("/") else rest  # tiny:///rel.db, tiny:////abs.db
    return TinyStore(path, url=url)


def make_broker(url: str) -> EmbeddedBroker:
    return EmbeddedBroker(url)


def not_a_store(url: str) -> object:
    return object()
