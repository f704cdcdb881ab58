"""Shared fixtures: service URLs that skip on a laptop and fail in CI when absent."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlsplit

import pytest

POSTGRES_URL = os.environ.get("CANTATA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("CANTATA_TEST_NATS", "nats://127.0.0.1:4222")


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), 1):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> str:
    """Return ``url`` if the server answers; otherwise skip (laptop) or fail (CI)."""
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url}"
    if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and CANTATA_REQUIRE_SERVICES=1: start it (see .ci/run)")
    pytest.skip(f"{message}; set CANTATA_TEST_{name.upper()} or start it to run this test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_service("postgres", POSTGRES_URL, 5432)


@pytest.fixture(scope="session")
def nats_url() -> str:
    return require_service("nats", NATS_URL, 4222)
