"""Fixtures of the observability tests: one store holding every broken transaction."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from cantata import App
from tests.helpers import make_app

from .scenarios import Scenario, populate


@pytest.fixture(scope="session")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    """The scenarios of :mod:`.scenarios`, driven once into a SQLite file."""
    path = tmp_path_factory.mktemp("observability") / "shop.db"
    return asyncio.run(populate(f"sqlite:///{path}"))


@pytest.fixture
async def reader(scenario: Scenario) -> AsyncIterator[App]:
    """A client (no worker) on the scenario store."""
    app = make_app(scenario.url)
    async with app.client():
        yield app
