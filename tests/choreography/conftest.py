"""Fixtures of the choreography tests: every behaviour runs on memory:// and a SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                    pytest.mark.nats])]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs on ``memory://``, a SQLite file, and PostgreSQL + NATS."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/c.db"
    url: str = request.getfixturevalue("distributed_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/c.db"
