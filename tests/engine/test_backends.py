"""The suites really run on the backends their fixture names."""

from __future__ import annotations

from .helpers import make_app


async def test_the_fixture_selects_store_and_broker(store_url: str) -> None:
    app = make_app(store_url)
    async with app:
        store, broker = type(app.store).__name__, type(app._broker).__name__
    if store_url.startswith("postgresql"):
        assert (store, broker) == ("PostgresStore", "NatsBroker")
    else:
        assert (store, broker) == ("SQLiteStore", "EmbeddedBroker")
