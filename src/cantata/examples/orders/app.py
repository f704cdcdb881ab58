"""The order example as one app: ``cantata worker cantata.examples.orders.app:app``."""

from __future__ import annotations

from cantata import App

from . import choreographed, orchestrated


def make_app(store: str | None = None, broker: str | None = None, name: str = "orders") -> App:
    """Build the example app on the given store and broker (defaults: env, then embedded)."""
    app = App(name, store=store, broker=broker)
    app.include(orchestrated.router)
    app.include(choreographed.router)
    return app


app = make_app()
