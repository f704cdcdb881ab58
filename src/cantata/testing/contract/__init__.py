"""The store and broker contract suites, shipped so any backend can prove itself.

A backend is done when its subclass of :class:`StoreContract` (or
:class:`BrokerContract`) passes. Both are pytest test classes without the ``Test``
prefix: pytest collects them only through a subclass named ``Test...`` that
overrides the fixtures' hooks (see docs/backends.md)::

    from cantata.testing.contract import StoreContract

    class TestMyStore(StoreContract):
        async def make_store(self) -> Store:
            return MyStore(...)

        async def tamper(self, store, app, seq, how="data") -> None:
            ...  # change audit record ``seq`` behind the store's back

This package needs what Cantata's own tests use, which Cantata does not install
by default: ``pip install "cantata[testing]"`` (pytest, pytest-asyncio in
``asyncio_mode = "auto"``, hypothesis). ``import cantata`` and
:mod:`cantata.testing` never import pytest.
"""

from __future__ import annotations

from cantata.errors import ConfigurationError

try:
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    import pytest_asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - only without the testing extra
    raise ConfigurationError(
        f"cantata.testing.contract needs {exc.name}, which Cantata does not install by "
        'default: pip install "cantata[testing]" (pytest, pytest-asyncio, hypothesis)'
    ) from exc

from cantata.testing.contract.broker import BrokerContract, Env, Seen
from cantata.testing.contract.store import StoreContract
from cantata.testing.contract.support import (
    TAMPERINGS,
    StoreFixtures,
    entry,
    ev,
    forged_after,
    new_run,
    tampered,
)
from cantata.testing.wait import eventually

__all__ = [
    "TAMPERINGS",
    "BrokerContract",
    "Env",
    "Seen",
    "StoreContract",
    "StoreFixtures",
    "entry",
    "ev",
    "eventually",
    "forged_after",
    "new_run",
    "tampered",
]
