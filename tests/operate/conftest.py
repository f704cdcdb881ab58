"""Fixtures of the operating tests: a store that several apps (old and new code) share."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(
    params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                            pytest.mark.nats])]
)
def shared_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store URL shared by the apps of one test: a SQLite file, or PostgreSQL (+NATS)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    url: str = request.getfixturevalue("distributed_url")
    return url
