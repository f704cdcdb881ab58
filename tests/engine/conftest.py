"""Fixtures for the orchestration tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test using it runs once on ``memory://`` and once on a SQLite file."""
    if request.param == "memory":
        return "memory://"
    return f"sqlite:///{tmp_path}/cantata.db"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file shared by the apps of one test (restarts, several processes)."""
    return f"sqlite:///{tmp_path}/cantata.db"

