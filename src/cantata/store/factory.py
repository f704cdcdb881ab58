"""Open a store by URL: ``sqlite:///path``, ``memory://``, ``postgresql://...``."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from cantata import plugins
from cantata.errors import ConfigurationError
from cantata.model import secrets
from cantata.store.base import Store

SYNCHRONOUS_MODES = ("FULL", "NORMAL", "OFF", "EXTRA")  # sqlite:///file.db?synchronous=


def mask_url(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    secrets.remember(url)
    try:
        urlsplit(url).port  # noqa: B018 - parses host and port, as a driver would
    except ValueError:  # not parseable (postgresql://[bad): hide whatever is after '//'
        head, sep, rest = url.partition("://")
        return f"{head}{sep}{'***' if '@' in rest else rest}"
    return secrets.mask(url)


def url_options(url: str, query: str, what: str) -> dict[str, str]:
    """The ``?name=value`` options of a URL's query, each given once.

    Raises:
        ConfigurationError: an option is given twice (which one would be meant?).
    """
    options: dict[str, str] = {}
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name in options:
            raise ConfigurationError(
                f"{what} URL {mask_url(url)!r}: {name} is given twice; give it once"
            )
        options[name] = value
    return options


def store_from_url(url: str, *, create: bool = True) -> Store:
    """Build (not open) the store a URL names.

    Args:
        create: a SQLite file or a PostgreSQL schema that does not exist is created on
            open (``False``: opening it fails, naming the path or the schema; for
            commands that only query or operate a store).

    Raises:
        ConfigurationError: the URL's scheme is unknown or its form is wrong.
    """
    if not isinstance(url, str) or "://" not in url:
        raise ConfigurationError(
            f"store URL {url!r} is not a URL: use sqlite:///path/to/file.db, memory:// or "
            "postgresql://user@host:5432/db"
        )
    scheme = url.split("://", 1)[0].lower()
    if scheme == "memory":
        from cantata.store.sqlite import SQLiteStore

        opts = url_options(url, url.partition("?")[2], "store")
        _refuse_unknown(url, opts, (), "memory:// takes no options")
        return SQLiteStore(":memory:", synchronous="OFF", url=url)
    if scheme == "sqlite":
        from cantata.store.sqlite import SQLiteStore

        rest = url.split("://", 1)[1]
        path, _, query = rest.partition("?")
        if not path.startswith("/"):
            raise ConfigurationError(
                f"store URL {url!r} has no path: use sqlite:///relative.db or "
                "sqlite:////absolute/path.db"
            )
        path = path[1:]
        if not path:
            raise ConfigurationError(f"store URL {url!r} names no file: use sqlite:///cantata.db")
        opts = url_options(url, query, "store")
        _refuse_unknown(url, opts, ("synchronous", "busy_timeout"),
                        f"the options are ?synchronous={'|'.join(SYNCHRONOUS_MODES)} and "
                        "?busy_timeout=MILLISECONDS (or 5s)")
        synchronous = opts.get("synchronous", "FULL")
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ConfigurationError(
                f"store URL {url!r}: synchronous={synchronous!r} is not a SQLite "
                f"synchronous mode: use {', '.join(SYNCHRONOUS_MODES)}"
            )
        from cantata.store.sqlite_open import BUSY_TIMEOUT_MS, check_busy_timeout

        busy = BUSY_TIMEOUT_MS
        if "busy_timeout" in opts:  # checked here too, so that the error names the URL
            said = f"store URL {url!r}: busy_timeout={opts['busy_timeout']!r}"
            busy = check_busy_timeout(_milliseconds(opts["busy_timeout"], said), said)
        return SQLiteStore(path, synchronous=synchronous, url=url, create=create,
                           busy_timeout=busy)
    if scheme in ("postgresql", "postgres"):
        try:
            parts = urlsplit(url)
            _ = parts.port  # raises for a port that is not a number
        except ValueError as exc:
            raise ConfigurationError(
                f"store URL {mask_url(url)!r} is malformed ({exc}): use "
                "postgresql://user:password@host:5432/database"
            ) from None
        url_options(url, parts.query, "store")
        try:
            from cantata.store.postgres import PostgresStore
        except ImportError as exc:
            if exc.name != "asyncpg":
                raise
            raise ConfigurationError(
                f"the PostgreSQL store needs asyncpg ({exc}): pip install 'cantata[postgres]'"
            ) from None
        return PostgresStore(url, create=create)
    made = plugins.factory(plugins.STORES, scheme)
    if made is not None:
        store: Store = _checked(made(url), Store, url)
        return store
    others = "".join(f", {s}://…" for s in plugins.schemes(plugins.STORES))
    raise ConfigurationError(
        f"unknown store URL scheme {scheme!r} in {mask_url(url)!r}: use sqlite:///file.db, "
        f"memory:// or postgresql://…{others} (or install the package of that backend)"
    )


_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s)?\s*", re.IGNORECASE)


def _milliseconds(value: str, what: str) -> float:
    """A URL option's duration in milliseconds: ``5000``, ``5000ms`` or ``5s``."""
    found = _DURATION.fullmatch(value)
    if found is None:
        raise ConfigurationError(
            f"{what} is not a duration: give milliseconds (?busy_timeout=5000) or "
            "seconds (?busy_timeout=5s)"
        )
    number = float(found[1])
    return number * 1000 if (found[2] or "ms").lower() == "s" else number


def _refuse_unknown(url: str, opts: dict[str, str], known: tuple[str, ...],
                    understood: str) -> None:
    """Raise :class:`ConfigurationError` naming the options of ``url`` not ``known``."""
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ConfigurationError(
            f"store URL {mask_url(url)!r} has unknown option(s) {unknown}: {understood}"
        )


def _checked(made: object, protocol: type, url: str) -> Any:
    if not isinstance(made, protocol):
        raise ConfigurationError(
            f"the backend for {mask_url(url)!r} made a {type(made).__name__}, which is not "
            f"a cantata.{protocol.__name__}: check its package"
        )
    return made
