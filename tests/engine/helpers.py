"""Helpers for the orchestration tests: short intervals so the suite stays fast."""

from __future__ import annotations

from typing import Any

from cantata import App
from tests import helpers
from tests.helpers import LEASE, POLL, eventually

__all__ = ["LEASE", "POLL", "eventually", "history_keys", "make_app"]


def make_app(store: str, name: str = "shop", **kw: Any) -> App:
    """:func:`tests.helpers.make_app` with a short stop grace too (tests that leave a
    step running when they close the app do not wait 30 s for it)."""
    kw.setdefault("shutdown_grace", 0.2)
    return helpers.make_app(store, name, **kw)


async def history_keys(app: App, run_id: str) -> list[str]:
    """The keys of a run's recorded history, in order."""
    return [e.key for e in await app.store.load_history(app.name, run_id)]
