"""What every CLI command shares: loading APP, opening a client, printing."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import orjson
from rich.console import Console

from cantata.app import DEFAULT_STORE, App
from cantata.errors import ConfigurationError
from cantata.store.base import Store
from cantata.store.factory import store_from_url

T = TypeVar("T")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def load_app(spec: str) -> App:
    """Import ``module:attribute`` (from the current folder too) and return the App.

    Raises:
        ConfigurationError: the spec is malformed, the module or attribute is missing, or
            the attribute is not an ``App``.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigurationError(
            f"APP must be 'module:attribute' (for example 'shop.app:app'), got {spec!r}"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"cannot import module {module_name!r} ({exc}); run from the folder that holds it "
            "or install it"
        ) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigurationError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if callable(obj) and not isinstance(obj, App):
        obj = obj()
    if not isinstance(obj, App):
        raise ConfigurationError(
            f"{spec!r} is a {type(obj).__name__}, not a cantata.App"
        )
    return obj


def store_url(store: str | None) -> str:
    """The store URL a command uses: ``--store``, else ``$CANTATA_STORE``, else the
    default; an empty one is an error, not the default.

    Raises:
        ConfigurationError: ``--store`` or ``$CANTATA_STORE`` is empty.
    """
    if store is not None:
        if not store.strip():
            raise ConfigurationError(
                "--store is empty: give a store URL such as sqlite:///cantata.db or "
                "postgresql://user@host/db"
            )
        return store
    env = os.environ.get("CANTATA_STORE")
    if env is not None and not env.strip():
        raise ConfigurationError(
            "CANTATA_STORE is set but empty: unset it or give a store URL such as "
            "sqlite:///cantata.db"
        )
    return env or DEFAULT_STORE


def existing_store(url: str) -> Store:
    """The store a query command reads: a SQLite file must exist already (a typo in a
    path must not create a new, empty store)."""
    return store_from_url(url, create=False)


def client_app(app: str | None, store: str | None) -> App:
    """The app a query command works on.

    ``app`` is either ``module:attribute`` (the user's App is imported) or just the
    app's name (a bare App is enough to read the store); ``store`` overrides the URL.
    The store must exist (see :func:`existing_store`).
    """
    spec = app or os.environ.get("CANTATA_APP")
    if not spec:
        raise ConfigurationError(
            "which app? pass --app NAME (or module:attribute), or set CANTATA_APP"
        )
    if ":" in spec:
        loaded = load_app(spec)
        if store is not None:
            loaded.configure(store=existing_store(store_url(store)))
        elif isinstance(loaded._store_spec, str):
            loaded.configure(store=existing_store(loaded._store_spec))
        return loaded
    return App(spec, store=existing_store(store_url(store)))


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine function to completion."""

    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def parse_json(text: str, what: str) -> Any:
    """Parse a JSON option value, with a message naming the option."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise ConfigurationError(f"{what} is not valid JSON ({exc}): {text[:80]!r}") from None


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``5m``, ``2h``, ``1d`` → seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip().lower()
    try:
        if t and t[-1] in units:
            return float(t[:-1]) * units[t[-1]]
        return float(t)
    except ValueError:
        raise ConfigurationError(
            f"duration {text!r} is invalid: use seconds or a number with s, m, h or d ('5m')"
        ) from None


def fmt_time(ts: float | None) -> str:
    import datetime as dt

    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S.%f")[:-3]


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    return f"{seconds / 60:.1f} min"


def demo_db_path() -> Path:
    return Path.cwd() / "cantata-demo.db"


def operator() -> str:
    """Who is acting, for the audit log: ``cli:user@host``."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return f"cli:{user}@{socket.gethostname()}"
