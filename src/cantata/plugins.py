"""Backends from other packages, found by URL scheme through entry points.

A package that provides a store registers a factory under the ``cantata.stores``
entry-point group, named by its URL scheme; a broker under ``cantata.brokers``::

    [project.entry-points."cantata.stores"]
    tinystore = "tinystore:make_store"       # make_store(url: str) -> cantata.Store

The built-in schemes (``sqlite``, ``memory``, ``postgresql``; ``embedded``,
``nats``) are resolved without looking. A backend is done when the contract
suites pass on it (see docs/architecture.md, "Seams").
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

from cantata.errors import ConfigurationError

STORES = "cantata.stores"
BROKERS = "cantata.brokers"


def factory(group: str, scheme: str) -> Callable[[str], Any] | None:
    """The factory a package registered for ``scheme`` in ``group`` (``None``: none)."""
    found = entry_points(group=group, name=scheme)
    if not found:
        return None
    ep = next(iter(found))
    try:
        made = ep.load()
    except Exception as exc:
        raise ConfigurationError(
            f"the {scheme}:// backend registered by {ep.value!r} cannot be loaded "
            f"({type(exc).__name__}: {exc}); reinstall the package that provides it"
        ) from None
    if not callable(made):
        raise ConfigurationError(
            f"the {scheme}:// backend {ep.value!r} is not a factory taking the URL"
        )
    return made  # type: ignore[no-any-return]


def schemes(group: str) -> list[str]:
    """URL schemes that installed packages add to ``group``."""
    return sorted(ep.name for ep in entry_points(group=group))
