"""The order example: four services in one app.

All in one process: ``cantata worker cantata.examples.orders.app:app``. One process
per service: add ``--service orders`` (or ``inventory``, ``payments``, ``shipping``).
"""

from __future__ import annotations

from cantata import App

from . import inventory, orders, payments, shipping

SERVICES = ("orders", "inventory", "payments", "shipping")


def make_app(
    store: str | None = None,
    broker: str | None = None,
    name: str = "orders",
    services: list[str] | None = None,
) -> App:
    """Build the example app on the given store and broker (defaults: env, then embedded)."""
    app = App(name, store=store, broker=broker, services=services)
    for module in (orders, inventory, payments, shipping):
        app.include(module.router)
    return app


app = make_app()
