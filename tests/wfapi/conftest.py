"""Fixtures of the workflow API tests (the shared ones are in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(
    params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                          pytest.mark.nats])]
)
def sql_store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store that can share its transaction with a service's tables: a SQLite file,
    or PostgreSQL (with NATS as the broker)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    url: str = request.getfixturevalue("distributed_url")
    return url
